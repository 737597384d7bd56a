"""Goodput under failures: a training job under ``resumekit run``, SIGKILLed at a random point in every T seconds of
training, warm restart against cold, side by side in one run (issue 14).

Prints, per job and T: the effective training time, the mean redone work per failure against the save interval,
and the restart-latency breakdown (the run summary's medians); then the kill-to-next-step median over many kills
(warm and cold, and their ratio), the effective training time extrapolated to a kill every 10 minutes, and one final
JSON line. Not a test: the numbers depend on the machine, and a busy machine makes every figure worse.

The jobs (``goodput_job.py``): the demo's model ("demo") and the same with ~1 GiB of frozen weights ("big"), one
step every ``--step-time`` seconds, async saves every ``every_seconds`` chosen by Young's rule from the save cost
measured before the runs (``policy.young_interval(save cost, MTBF = T)``), never shorter than one background
persist (a save that waits for the previous one stalls training). Warm restart is ``resumekit run``'s default;
cold is ``--no-warm``. A ``resumekit run`` without ``--no-warm`` (no warm restart) runs cold only and says so.

Effective training time of a run = net steps trained x the job's own mean step time (its ``step_time`` metric:
from the end of one ``maybe_save`` to the next call, the batch fetch included) / wall time from the job's first step
to its last report (the save on the bench's final SIGTERM). The first start is left out: it is paid once per job,
not per failure. Everything else (detection, backoff, pre-checks, spawn, restore, redone steps, save stalls, the
per-step cost of ``maybe_save``) is inside.

    python benchmarks/bench_goodput.py --quick          # ~2-3 minutes: the demo and a 64 MiB job, T = 10 s
    python benchmarks/bench_goodput.py                  # ~20 minutes on a quiet machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from resumekit.events import EventTail
from resumekit.policy import young_interval
from resumekit.supervisor.latency import COMPONENTS, extrapolate_effective, format_breakdown

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from goodput_job import PROGRESS

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "goodput_job.py")
PY = sys.executable
WAIT_S = 180.0  # the longest any one wait of the bench may take (a start, a first step, the end of a run)


def has_no_warm() -> bool:
    """Whether this ``resumekit run`` has ``--no-warm`` (warm restart)."""
    out = subprocess.run([PY, "-m", "resumekit", "run", "--help"], capture_output=True, text=True, timeout=60)
    return "--no-warm" in out.stdout


def calibrate(state_mib: int, workdir: str) -> dict[str, float]:
    """The job's save cost outside the supervisor: mean blocking and persist seconds of 3 async saves."""
    d = tempfile.mkdtemp(prefix="calibrate-", dir=workdir)
    try:
        out = subprocess.run(
            [PY, JOB, "--dir", d, "--state-mib", str(state_mib), "--calibrate", "3"],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Log:
    """The run's ``events.jsonl``, followed incrementally."""

    def __init__(self, directory: str):
        self.tail = EventTail(os.path.join(directory, "events.jsonl"))
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        self.events += self.tail.read()
        return self.events

    def wait(self, what: str, pred: Any, timeout: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred(self.poll())
            if got is not None:
                return got
            time.sleep(0.02)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def _attempt_first_step(k: int) -> Any:
    """A predicate: ``(pid, first step time)`` of the k-th start once it reported its first step."""

    def pred(events: list[dict[str, Any]]) -> tuple[int, float] | None:
        starts = [e for e in events if e.get("source") == "supervisor" and e.get("event") == "start"]
        if len(starts) < k:
            return None
        t0 = starts[k - 1]["time"]
        nxt = starts[k]["time"] if len(starts) > k else float("inf")
        for e in events:
            if e.get("event") == "first_step" and t0 <= e["time"] < nxt:
                return starts[k - 1]["pid"], e["time"]
        return None

    return pred


@dataclass
class RunResult:
    job: str
    mode: str
    period_s: float
    save_interval_s: float
    kills: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    effective: float | None = None
    step_s: float | None = None
    window_s: float = 0.0
    save_stall_s: list[float] = field(default_factory=list)
    #: per restart, seconds of steps really redone: from the job's per-step progress file, not its reports
    redone_true: list[float] = field(default_factory=list)
    #: the save interval as it happened: median time between two saves of one attempt (saves land on step
    #: boundaries, and a background save commits only after its persist)
    actual_interval_s: float | None = None

    @property
    def breakdown(self) -> list[dict[str, Any]]:
        return self.summary.get("breakdown") or []

    def redone(self) -> list[float]:
        return [b["redone_s"] for b in self.breakdown if b.get("redone_s") is not None]

    def k2s(self, warm_only: bool = False) -> list[float]:
        return [
            b["kill_to_next_step_s"]
            for b in self.breakdown
            if b.get("kill_to_next_step_s") is not None and (b.get("warm") or not warm_only)
        ]


def run_with_kills(
    *,
    job: str,
    state_mib: int,
    mode: str,
    period_s: float,
    kills: int,
    save_interval_s: float,
    step_time: float,
    rng: random.Random,
    workdir: str,
) -> RunResult:
    """One supervised run: a SIGKILL at a random point in each of ``kills`` windows of ``period_s`` seconds of
    training (training time: wall time since each attempt's first step), then the last attempt trains to the end
    of its window and the run is stopped with SIGTERM (the job saves and exits; the supervisor prints its summary).
    """
    d = tempfile.mkdtemp(prefix=f"{job}-{mode}-T{period_s:g}-", dir=workdir)
    res = RunResult(job, mode, period_s, save_interval_s)
    # Every kill is a restart: the budget must outlast them (the default --max-restarts is 10).
    cmd = [PY, "-m", "resumekit", "run", "--dir", d, "--json", "--max-restarts", str(kills + 5)]
    cmd += ["--no-warm"] if mode == "cold" else []
    cmd += ["--", PY, JOB, "--dir", d, "--state-mib", str(state_mib), "--step-time", str(step_time)]
    cmd += ["--every-seconds", f"{save_interval_s:.3f}"]
    err_path = os.path.join(workdir, os.path.basename(d) + ".stderr")
    with open(err_path, "w") as err:
        sup = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    log = Log(d)
    try:
        # Kill instants on the training clock: one at a random point of each window [kT, (k+1)T).
        targets = [k * period_s + rng.uniform(0.0, period_s) for k in range(kills)] + [kills * period_s]
        trained = 0.0
        for k, target in enumerate(targets, start=1):
            pid, first = log.wait(f"attempt {k}'s first step", _attempt_first_step(k))
            first_mono = time.monotonic() - (time.time() - first)
            left = target - trained - (time.monotonic() - first_mono)
            if left > 0:
                time.sleep(left)
            trained += time.monotonic() - first_mono
            if k <= kills:
                try:
                    os.kill(pid, signal.SIGKILL)
                    res.kills += 1
                except ProcessLookupError:  # it died on its own: the supervisor restarts it all the same
                    pass
        os.killpg(sup.pid, signal.SIGTERM)
        out, _ = sup.communicate(timeout=WAIT_S)
    except BaseException:
        try:
            os.killpg(sup.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sup.wait()
        raise
    events = log.poll() + EventTail(log.tail.path, log.tail.offset).read(final=True)
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    res.summary = json.loads(lines[-1]) if lines else {}
    _ground_truth(res, events)
    _redone_truth(res, events, EventTail(os.path.join(d, PROGRESS)).read(final=True))
    shutil.rmtree(d, ignore_errors=True)
    return res


def _ground_truth(res: RunResult, events: list[dict[str, Any]]) -> None:
    """Effective training time from the job's own steps: net steps x step time / wall from the first step."""
    job = [e for e in events if e.get("source") != "supervisor"]
    firsts = [e for e in job if e.get("event") == "first_step"]
    # The run ends at the job's last report (its preemption save): the stop is the bench's, not a failure, and the
    # interpreter's exit after it is not training time lost to failures.
    end = [e["time"] for e in job if isinstance(e.get("time"), float)]
    times = [e["step_time"] for e in job if e.get("event") == "metrics" and isinstance(e.get("step_time"), float)]
    steps = [e["step"] for e in job if isinstance(e.get("step"), int) and e.get("event") in ("metrics", "save")]
    res.save_stall_s = [float(e["blocking_s"]) for e in job if e.get("event") == "save" and "blocking_s" in e]
    saves: dict[int, list[float]] = {}
    for e in job:
        if e.get("event") == "save":
            saves.setdefault(e["pid"], []).append(e["time"])
    gaps = [b - a for ts in saves.values() for a, b in itertools.pairwise(ts)]
    res.actual_interval_s = statistics.median(gaps) if gaps else None
    if not (firsts and end and times and steps):
        return
    res.step_s = statistics.fmean(times)  # the steps as this machine ran them (a busy machine is no failure)
    res.window_s = end[-1] - firsts[0]["time"]
    net = max(steps) - (firsts[0]["step"] - 1)
    if res.window_s > 0:
        res.effective = min(1.0, net * res.step_s / res.window_s)


def _redone_truth(res: RunResult, events: list[dict[str, Any]], progress: list[dict[str, Any]]) -> None:
    """Seconds of steps each restart really redid: the last step the killed attempt trained (its progress file)
    minus the step the next one restored, times the step time."""
    if res.step_s is None:
        return
    last: dict[int, int] = {}
    for rec in progress:
        last[rec["pid"]] = max(rec["step"], last.get(rec["pid"], 0))
    pids = [e["pid"] for e in events if e.get("source") == "supervisor" and e.get("event") == "start"]
    restored = {e["pid"]: e["step"] for e in events if e.get("event") == "restore" and isinstance(e.get("step"), int)}
    for prev, cur in itertools.pairwise(pids):
        if cur in restored:
            res.redone_true.append(max(0, last.get(prev, restored[cur]) - restored[cur]) * res.step_s)


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _f(v: float | None, spec: str = ".2f") -> str:
    return "unknown" if v is None else format(v, spec)


def medians(results: list[RunResult]) -> dict[str, Any]:
    """Per breakdown figure, the median over every restart of these runs (known ones only)."""
    items = [b for r in results for b in r.breakdown]
    out: dict[str, Any] = {"restarts": len(items)}
    for name in [n for n, _ in COMPONENTS] + ["detect_max_s", "kill_to_next_step_s"]:
        known = [b[name] for b in items if b.get(name) is not None]
        out[name] = round(statistics.median(known), 3) if known else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T = 10 s, 3 kills, a 64 MiB 'big' job: ~2-3 minutes")
    ap.add_argument("--periods", default="30,60,120", help="T values for the demo job, seconds")
    ap.add_argument("--kills", type=int, default=2, help="kills per run (one per window of T seconds)")
    ap.add_argument("--big-mib", type=int, default=1024, help="the big job's state, MiB (0: skip it)")
    ap.add_argument("--big-periods", default="30", help="T values for the big job")
    ap.add_argument("--big-kills", type=int, default=1, help="kills per run of the big job")
    ap.add_argument("--latency-kills", type=int, default=20, help="kills for the kill-to-next-step median")
    ap.add_argument("--latency-period", type=float, default=6.0, help="T of those kills, seconds")
    ap.add_argument("--step-time", type=float, default=0.05)
    ap.add_argument("--modes", default="warm,cold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the runs write (default: a temporary directory)")
    args = ap.parse_args()
    if args.quick:
        args.periods, args.kills, args.big_mib, args.big_periods, args.latency_kills = "10", 3, 64, "10", 0
        args.big_kills = 1
    rng = random.Random(args.seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-goodput-")
    os.makedirs(workdir, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    if "warm" in modes and not has_no_warm():
        print("this resumekit run has no --no-warm (no warm restart): running cold only", flush=True)
        modes = ["cold"]
    periods = [float(p) for p in args.periods.split(",") if p]
    big_periods = [float(p) for p in args.big_periods.split(",") if p] if args.big_mib else []
    big_kills = args.big_kills
    jobs = [("demo", 0, periods, args.kills)]
    if big_periods:
        jobs.append((f"big ({args.big_mib} MiB)", args.big_mib, big_periods, big_kills))
    est = sum(sum(p * kills + 5 * (kills + 1) for p in ps) for _, _, ps, kills in jobs) * len(modes)
    est += len(modes) * args.latency_kills * (args.latency_period + 5)
    print(f"bench_goodput: modes {modes}, about {est / 60:.0f} minutes; runs write under {workdir}", flush=True)

    results: list[RunResult] = []
    costs: dict[str, dict[str, float]] = {}
    for name, mib, ps, kills in jobs:
        cost = costs[name] = calibrate(mib, workdir)
        print(
            f"{name}: save cost {cost['blocking_s'] * 1000:.1f} ms blocking, {cost['persist_s']:.2f} s persist "
            f"({cost['bytes'] / 2**20:.0f} MiB)",
            flush=True,
        )
        for period in ps:
            # Young's rule, MTBF = T; never shorter than one persist (the next save would wait for it) nor 2 steps.
            interval = max(young_interval(cost["blocking_s"], period), cost["persist_s"], 2 * args.step_time)
            for mode in modes:
                r = run_with_kills(
                    job=name,
                    state_mib=mib,
                    mode=mode,
                    period_s=period,
                    kills=kills,
                    save_interval_s=interval,
                    step_time=args.step_time,
                    rng=rng,
                    workdir=workdir,
                )
                results.append(r)
                seen = statistics.fmean(r.redone()) if r.redone() else None
                mean_red = statistics.fmean(r.redone_true) if r.redone_true else None
                print(
                    f"  {name:>16} {mode:>4} T={period:>5g} s: {r.kills} kills, save every {interval:.2f} s, "
                    f"effective {_f(r.effective and 100 * r.effective, '.1f')}% (summary "
                    f"{_f(r.summary.get('effective_ratio') and 100 * r.summary['effective_ratio'], '.1f')}%), "
                    f"redone/failure mean {_f(mean_red)} s (the supervisor saw {_f(seen)} s) vs half the interval "
                    f"{interval / 2:.2f} s (saves came every {_f(r.actual_interval_s)} s), kill to next step "
                    f"{_f(_med(r.k2s()))} s",
                    flush=True,
                )
                if r.summary.get("breakdown_median"):
                    print(f"      {format_breakdown(r.summary['breakdown_median'])}", flush=True)

    latency: dict[str, list[RunResult]] = {}
    if args.latency_kills:
        cost = costs["demo"]
        interval = max(young_interval(cost["blocking_s"], args.latency_period), cost["persist_s"], 2 * args.step_time)
        for mode in modes:
            r = run_with_kills(
                job="demo",
                state_mib=0,
                mode=mode,
                period_s=args.latency_period,
                kills=args.latency_kills,
                save_interval_s=interval,
                step_time=args.step_time,
                rng=rng,
                workdir=workdir,
            )
            latency[mode] = [r]
            print(f"  latency, demo, {mode}: {r.kills} kills, kill to next step median {_f(_med(r.k2s()))} s")
    else:  # --quick: the demo runs' restarts stand in
        for mode in modes:
            latency[mode] = [r for r in results if r.job == "demo" and r.mode == mode]

    # ----------------------------------------------------------------------------------------- the account
    print("\nside by side (medians over every restart of the runs):")
    table: dict[str, dict[str, Any]] = {m: medians([r for r in results if r.mode == m]) for m in modes}
    print(f"  {'figure':<22}" + "".join(f"{m:>12}" for m in modes))
    for key, label in [*COMPONENTS, ("kill_to_next_step_s", "kill to next step")]:
        print(f"  {label:<22}" + "".join(f"{_f(table[m].get(key)):>12}" for m in modes))
    k2s = {m: _med([v for r in latency[m] for v in r.k2s()]) for m in modes}
    restore = {
        m: _med([b["restore_s"] for r in latency[m] for b in r.breakdown if b.get("restore_s") is not None])
        for m in modes
    }
    ratio = k2s["warm"] / k2s["cold"] if "warm" in k2s and "cold" in k2s and k2s["warm"] and k2s["cold"] else None
    n_kills = {m: sum(len(r.k2s()) for r in latency[m]) for m in modes}
    warm_started = [v for r in latency.get("warm", []) for v in r.k2s(warm_only=True)]
    for m in modes:
        print(f"kill to next step, {m}: median {_f(k2s[m])} s over {n_kills[m]} kills (restore {_f(restore[m])} s)")
    if "warm" in modes:
        # A kill before the standby finished its imports is restarted cold (or waits for it): said apart.
        print(f"  of the warm run's restarts, {len(warm_started)} started warm: median {_f(_med(warm_started))} s")
    if ratio is not None:
        print(f"warm/cold ratio of kill to next step: {ratio:.2f}")

    # Redone work per failure against the save interval (acceptance: mean <= 0.6 x the interval).
    redone_ratio, redone_ratio_set = {}, {}
    for m in modes:
        pairs = [
            (v, r.actual_interval_s) for r in results if r.mode == m and r.actual_interval_s for v in r.redone_true
        ]
        redone_ratio[m] = statistics.fmean(v / i for v, i in pairs) if pairs else None
        pairs = [(v, r.save_interval_s) for r in results if r.mode == m for v in r.redone_true]
        redone_ratio_set[m] = statistics.fmean(v / i for v, i in pairs) if pairs else None
        print(
            f"mean redone work per failure / save interval, {m}: {_f(redone_ratio[m], '.2f')} of the interval the "
            f"saves came at ({_f(redone_ratio_set[m], '.2f')} of the one asked for; theory 0.5)"
        )

    # Extrapolation to a kill every 10 minutes, from the measured components (of the best mode).
    best = "warm" if "warm" in modes else modes[0]
    demo_cost = costs["demo"]
    restart_s = (k2s[best] or 0.0) + (table[best].get("detect_max_s") or 0.0)
    every10 = max(young_interval(demo_cost["blocking_s"], 600.0), demo_cost["persist_s"], 2 * args.step_time)
    frac = redone_ratio[best] if redone_ratio[best] is not None else 0.5
    e10 = extrapolate_effective(
        interval_s=600.0,
        restart_s=restart_s,
        save_cost_s=demo_cost["blocking_s"],
        save_interval_s=every10,
        redone_fraction=frac,
    )
    print(
        f"\nextrapolated (not measured), demo job, {best}, a kill every 600 s of training: effective training time "
        f"{100 * e10:.2f}%\n  = ((1 - save_cost / I) * 600 - f * I) / (600 + restart) with save_cost "
        f"{demo_cost['blocking_s'] * 1000:.2f} ms, I = Young's interval {every10:.2f} s, restart = kill to next step "
        f"+ detect bound = {restart_s:.2f} s, f = measured redone fraction {frac:.2f}"
    )
    for r in results:
        if r.job != "demo" or r.mode != best:
            continue
        # The same formula at the measured T, beside the measured figure: how far the model is from the run.
        every = r.save_interval_s
        model = extrapolate_effective(
            interval_s=r.period_s,
            restart_s=restart_s,
            save_cost_s=demo_cost["blocking_s"],
            save_interval_s=every,
            redone_fraction=frac,
        )
        print(
            f"  check at T={r.period_s:g} s: formula {100 * model:.1f}%, "
            f"measured {_f(r.effective and 100 * r.effective, '.1f')}%"
        )
    eff: dict[str, dict[str, dict[str, float | None]]] = {}
    for r in results:
        eff.setdefault(r.job, {}).setdefault(f"{r.period_s:g}", {})[r.mode] = (
            None if r.effective is None else round(r.effective, 4)
        )
    at60 = [r.effective for r in results if r.job == "demo" and r.period_s == 60 and r.mode == best]
    final = {
        "effective_training_time": eff,
        "redone_ratio": {m: None if v is None else round(v, 3) for m, v in redone_ratio.items()},
        "redone_ratio_to_configured_interval": {
            m: None if v is None else round(v, 3) for m, v in redone_ratio_set.items()
        },
        "breakdown_median": table,
        "kill_to_next_step_median": {m: None if v is None else round(v, 3) for m, v in k2s.items()},
        "kill_to_next_step_kills": n_kills,
        "restore_median": {m: None if v is None else round(v, 3) for m, v in restore.items()},
        "warm_cold_ratio": None if ratio is None else round(ratio, 3),
        "warm_started_restarts": len(warm_started),
        "kill_to_next_step_median_warm_started": None if not warm_started else round(_med(warm_started) or 0.0, 3),
        "extrapolated_effective_10min": round(e10, 4),
        "acceptance": {
            "kill_to_next_step_le_restore_plus_1s": (
                None if k2s.get("warm") is None or restore.get("warm") is None else k2s["warm"] <= restore["warm"] + 1.0
            ),
            "effective_ge_0.90_at_60s": None if not at60 or at60[0] is None else at60[0] >= 0.90,
            "effective_ge_0.97_at_10min_extrapolated": e10 >= 0.97,
            "redone_le_0.6_interval": None if redone_ratio[best] is None else redone_ratio[best] <= 0.6,
        },
        "modes": modes,
        "quick": args.quick,
    }
    print(json.dumps(final))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
