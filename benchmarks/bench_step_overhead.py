"""Training-step overhead of async checkpointing: a ~256 MiB model (AdamW: ~768 MiB of state) checkpointed every
10 steps, vs the same loop without checkpointing (and with synchronous saves), the modes' steps interleaved one by
one in one run.

Two modes model two kinds of jobs:

* ``--mode cpu``: the step computes on every core (torch's default threads), so the background persist competes
  with the training for CPU: the worst case, a CPU-only training job.
* ``--mode accel``: an accelerator stand-in. On a GPU node the host CPU is mostly idle during a step (the kernels
  run on the device); here the step computes on one thread and the other core is free, as the host's spare cores
  are. The same model and batch: only the thread count differs.

Prints one JSON line with ``step_overhead`` (async: mean step time with checkpoints / without - 1) and
``step_overhead_sync`` (the same with blocking saves). docs/performance.md says why the steps are interleaved.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time

import torch


def make(width: int, layers: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def train_step(model, opt, x) -> None:
    loss = model(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class Stream:
    """One mode's steps: its own global step counter and manager (none for the baseline) and each step's time."""

    def __init__(self, name: str, planned: int, mgr=None, directory: str | None = None) -> None:
        self.name, self.planned, self.mgr, self.directory = name, planned, mgr, directory
        self.step = 0
        self.times: list[float] = []
        self.steps: list[int] = []  # the global step number of each timed step
        self.first = (0, 0.0, 0.0)

    def warm_up(self, model, opt, x, every: int) -> None:
        """One save period untimed: the first save allocates the staging buffers (reported apart)."""
        for _ in range(every):
            self.run(model, opt, x)
        self.times.clear()
        self.steps.clear()
        if self.mgr is not None:
            self.mgr.wait()
            c = self.mgr.cost
            self.first = (c.saves, c.blocking_s_total, c.persist_s_total)
        # The timed steps start half a period after that save, so the run ends mid-period as any stretch of a long
        # job does, with the last save's persist overlapping the steps after it (not waited for as a whole).
        self.step += every // 2

    def run(self, model, opt, x) -> bool:
        """One training step, timed with its save if one is due; True if it saved."""
        self.step += 1
        t = time.perf_counter()
        train_step(model, opt, x)
        saved = self.mgr is not None and self.mgr.maybe_save(self.step, {"model": model, "optim": opt})
        self.times.append(time.perf_counter() - t)
        self.steps.append(self.step)
        return saved

    @property
    def busy(self) -> bool:
        return self.mgr is not None and self.mgr.busy

    def close(self) -> dict:
        if self.mgr is None:
            return {}
        self.mgr.close()
        shutil.rmtree(self.directory or "", ignore_errors=True)
        c = self.mgr.cost
        n = max(1, c.saves - self.first[0])
        # Means over the timed saves only: the first save allocates (and pre-faults) the staging image, once a run.
        return {
            "saves": c.saves - self.first[0],
            "blocking_s": (c.blocking_s_total - self.first[1]) / n,
            "persist_s": (c.persist_s_total - self.first[2]) / n,
            "first_blocking_s": self.first[1],
        }


def interleave(streams: list[Stream], model, opt, x, every: int) -> None:
    """Run each stream's planned timed steps, one step at a time, rotating between the streams.

    The host's speed drifts by 10-20% over tens of seconds here (a single-thread matmul loop alone varies so), which
    is several times the effect being measured; alternating single steps puts every mode's steps into the same
    stretch of time, so the drift cancels. Work a mode causes stays on its own steps: the step after a save, and
    every step while its manager has background work in flight (persist, retention), belong to that mode, so no
    baseline step ever runs beside a persist. A mode still busy after its planned steps goes on stepping until it
    is done (what a job would do), at most ``every`` extra steps, then is waited for on its last step.
    """
    turn, hold = 0, None
    while True:
        busy = next((s for s in streams if s.busy), None)
        if busy is not None and len(busy.times) >= busy.planned + every:
            t = time.perf_counter()
            busy.mgr.wait()
            busy.times[-1] += time.perf_counter() - t  # the wait is that step's
            hold = None
            continue
        if busy is not None:
            s = busy
        elif hold is not None and len(hold.times) < hold.planned + every:
            s = hold
        else:
            todo = [s for s in streams if len(s.times) < s.planned]
            if not todo:
                return
            s = todo[turn % len(todo)]
            turn += 1
        was_busy = s is busy
        saved = s.run(model, opt, x)
        # The step after a save stays with the mode that saved, and so does the first step after its background
        # work ended (anything it leaves behind lands on its own step, not on the one it is compared with).
        hold = s if saved or was_busy else None


def by_period(st: Stream, n: int, every: int) -> list[list[float]]:
    """A stream's step times grouped by save period (its global step numbers); steps after the last period (a busy
    mode's extra ones) count in the last."""
    groups: list[list[float]] = [[] for _ in range(n)]
    for t, k in zip(st.times, st.steps, strict=True):
        groups[min(n - 1, (k - st.steps[0]) // every)].append(t)
    return groups


def run(
    model_mb: int,
    every: int,
    directory: str,
    batch: int,
    async_save: bool = True,
    sync_too: bool = False,
    periods: int = 12,
    sync_periods: int = 3,
) -> dict:
    from resumekit import CheckpointManager

    width = 2048
    layers = max(1, round((model_mb << 20) / (4 * (width * width + width))))
    model, opt = make(width, layers)
    x = torch.randn(batch, width)
    for _ in range(3):
        train_step(model, opt, x)  # warm-up: allocates Adam state

    def managed(name: str, d: str, async_: bool, n: int) -> Stream:
        shutil.rmtree(d, ignore_errors=True)
        mgr = CheckpointManager(
            d, every_steps=every, keep_last=2, async_save=async_, handle_sigterm=False, metrics_every=0
        )
        return Stream(name, n * every, mgr, d)  # saves n times

    main_mode = "async" if async_save else "sync"
    streams = [Stream("base", periods * every), managed(main_mode, directory, async_save, periods)]
    if sync_too and async_save:
        # Fewer periods: synchronous saves cost several times the async ones, so a few periods tell them apart,
        # and the time goes to the async estimate, which needs it (see interleave()).
        streams.append(managed("sync", directory + "-sync", False, min(sync_periods, periods)))
    for s in streams:
        s.warm_up(model, opt, x, every)
    interleave(streams, model, opt, x, every)
    by = {s.name: s for s in streams}
    costs = {s.name: s.close() for s in streams if s.mgr is not None}
    base = by["base"].times
    t0 = statistics.mean(base)

    def overhead(name: str) -> tuple[float, list[float]]:
        st = by[name]
        n = st.planned // every
        # The baseline steps of the same stretch of time: its first n periods (the steps take turns).
        same = by_period(by["base"], periods, every)[:n]
        # The time beyond the baseline's over every step the mode ran, per planned step: the extra steps of a mode
        # still busy at the end hold no save of their own, so dividing by them too would dilute the figure.
        m = statistics.mean(t for g in same for t in g)
        total = (sum(st.times) - len(st.times) * m) / (st.planned * m)
        # The same per save period: the spread says how much one period could be trusted on this machine.
        per = []
        for a, b in zip(by_period(st, n, every), same, strict=True):
            mb = statistics.mean(b)
            per.append((sum(a) - len(a) * mb) / (every * mb))
        return total, [min(per), max(per)]

    def by_phase(name: str) -> list[float]:
        # Where in the save period the extra time sits: the mean step time at each position (0: the step that
        # saved, 1: the next, ...) minus the baseline's mean step. Mostly positions 0 and 1 when the overhead is the
        # save's; about the same everywhere when it is the machine's drift.
        st = by[name]
        return [
            statistics.mean(t for t, k in zip(st.times, st.steps, strict=True) if k % every == p) - t0
            for p in range(every)
        ]

    cost = costs[main_mode]
    main_over, main_range = overhead(main_mode)
    state_bytes = sum(p.numel() * 4 for p in model.parameters()) * 3
    res = {
        "model_mb": round(sum(p.numel() * 4 for p in model.parameters()) / 2**20),
        "state_mb": state_bytes >> 20,
        "every": every,
        "periods": periods,
        "sync_periods": min(sync_periods, periods) if sync_too and async_save else 0,
        "steps_timed": {k: len(s.times) for k, s in by.items()},
        "saves_timed": cost["saves"],
        "step_s": t0,
        "step_s_with_ckpt": statistics.mean(by[main_mode].times),
        "save_blocking_s": cost["blocking_s"],
        "save_persist_s": cost["persist_s"],
        "first_save_blocking_s": cost["first_blocking_s"],
        "step_overhead": main_over,
        # The lowest and highest save period's overhead: how noisy the machine was during this run.
        "step_overhead_range": main_range,
        "step_excess_s_by_position": by_phase(main_mode),
    }
    if "sync" in by and async_save:
        sync_over, sync_range = overhead("sync")
        res["step_s_with_sync_ckpt"] = statistics.mean(by["sync"].times)
        res["sync_save_blocking_s"] = costs["sync"]["blocking_s"]
        res["step_overhead_sync"] = sync_over
        res["step_overhead_sync_range"] = sync_range
    return res


def _rounded(v):
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return round(v, 4) if isinstance(v, float) else v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-mb", type=int, default=256)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--periods", type=int, default=12, help="timed save periods (steps: periods x every)")
    p.add_argument("--sync-periods", type=int, default=3, help="timed save periods of --compare-sync")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dir", default="bench-out/overhead")
    p.add_argument("--sync", action="store_true", help="synchronous saves, for comparison")
    p.add_argument("--threads", type=int, default=0, help="torch compute threads (0: the mode's)")
    p.add_argument("--mode", choices=("cpu", "accel"), default="cpu", help="cpu: every core computes; accel: one")
    p.add_argument("--compare-sync", action="store_true", help="also measure synchronous saves (same run)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    elif a.mode == "accel":
        torch.set_num_threads(1)  # the accelerator stand-in: the step occupies one core, the others are free
    res = run(
        a.model_mb,
        a.every,
        a.dir,
        a.batch,
        async_save=not a.sync,
        sync_too=a.compare_sync,
        periods=a.periods,
        sync_periods=a.sync_periods,
    )
    res["mode"] = a.mode
    res["threads"] = torch.get_num_threads()
    res["async"] = not a.sync
    print(json.dumps({"bench": "step_overhead", **{k: _rounded(v) for k, v in res.items()}}))


if __name__ == "__main__":
    main()
