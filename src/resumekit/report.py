"""Plots from the event log: loss and step time against step, with restarts, hangs and preemptions marked.

The plot reads only ``events.jsonl`` (see :mod:`resumekit.events`), so it works for any job ``resumekit run``
supervised. matplotlib is an optional extra (``pip install 'resumekit[report]'``) imported only when plotting.

Metric events, written by the job (``CheckpointManager.maybe_save(step, state, metrics=...)`` or
:func:`log_metrics` for jobs that do not use the manager), have this shape::

    {"time": 1718000000.1, "event": "metrics", "step": 120, "loss": 0.4213, "step_time": 0.083, ...}

``step`` is the number of completed steps (an integer), ``loss`` a float, ``step_time`` the seconds the step took
(optional: when missing it is derived from the times of consecutive metric events). ``step`` events (written by
the framework integrations) count as metrics too. Other numeric fields are kept in :class:`RunData` but not
plotted. When there is nothing to draw, the plot says why (:meth:`RunData.empty_reason`) rather than staying
blank. The markers come from the supervisor's own events: ``start`` (``resume_step``), ``exit``, ``hang``
(``step``), ``preempt``, ``quarantine`` and ``summary``.

A run summary with restarts adds a fourth panel: each restart's latency as a stacked bar (detect, supervisor,
backoff, pre-check, spawn + imports, restore, first step, redone work, save stalls; see
:mod:`resumekit.supervisor.latency`). A segment the supervisor could not measure is not drawn, and the panel's
caption names it: an unknown is never drawn as a guess.
"""

from __future__ import annotations

import math
import os
import statistics
import textwrap
from dataclasses import dataclass, field
from typing import Any

from .events import ENV_DIR, EventLog, read_events

METRICS_EVENT = "metrics"
#: job events whose ``step`` (and ``loss``, ``step_time``) are plotted
STEP_EVENTS = (METRICS_EVENT, "step")


def log_metrics(
    step: int,
    loss: float | None = None,
    step_time: float | None = None,
    log: EventLog | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Append one ``metrics`` event for a job that does not use :class:`~resumekit.CheckpointManager`.

    Args:
        step: completed steps.
        loss: the training loss of that step.
        step_time: seconds the step took.
        log: the event log; default: ``RESUMEKIT_EVENTS`` (set by ``resumekit run``), else the checkpoint
            directory's ``events.jsonl`` from ``RESUMEKIT_DIR``.
        **extra: more JSON numbers to record (learning rate, throughput, ...).
    """
    log = log or EventLog.for_dir(os.environ.get(ENV_DIR) or None)
    fields: dict[str, Any] = {"step": int(step)}
    if loss is not None:
        fields["loss"] = float(loss)
    if step_time is not None:
        fields["step_time"] = float(step_time)
    fields.update(extra)
    return log.emit(METRICS_EVENT, **fields)


@dataclass
class Segment:
    """The metrics of one start of the job (a restart begins a new segment, so redone steps overlap)."""

    index: int
    resume_step: int | None = None
    start_time: float | None = None
    steps: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)


@dataclass
class Marker:
    """A supervisor event worth a line on the plot."""

    kind: str  # "restart", "hang", "preempt", "quarantine", "failure"
    time: float
    step: int | None
    label: str = ""


@dataclass
class RunData:
    """What :func:`load_run` found in an event log."""

    segments: list[Segment] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    saves: list[dict[str, Any]] = field(default_factory=list)
    down: list[tuple[float, float]] = field(default_factory=list)
    hung: list[tuple[float, float]] = field(default_factory=list)
    #: a restarted job starting up: from its launch to its first reported step (spawn, imports, restore)
    starting: list[tuple[float, float]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    t0: float | None = None

    @property
    def breakdowns(self) -> list[dict[str, Any]]:
        """The restart-latency breakdown of every restart, from the run summaries (one per ``resumekit run``)."""
        return [b for s in self.summaries if isinstance(s.get("breakdown"), list) for b in s["breakdown"]]

    def empty_reason(self) -> str | None:
        """Why the loss plot is empty, in one line; None when it has something to show."""
        points = sum(len(s.steps) for s in self.segments)
        if points and any(v == v for s in self.segments for v in s.loss):
            return None
        if points:
            return "the job reported steps but no loss (add loss= to its metrics / step events)"
        if self.saves:
            return (
                "no 'metrics' events: the job logged saves but not its loss; log it with "
                "CheckpointManager.maybe_save(..., metrics=...), resumekit.report.log_metrics() or an integration"
            )
        if not self.segments:
            return "no job events in the log: was the job run under `resumekit run`?"
        return (
            "no 'metrics' events: the job did not report its steps or loss (a framework without a resumekit "
            "integration?); log them with resumekit.report.log_metrics() or use an integration callback"
        )

    def stats(self) -> dict[str, Any]:
        """Counts for ``resumekit report --json``."""
        count = lambda k: sum(1 for m in self.markers if m.kind == k)  # noqa: E731
        return {
            "segments": len(self.segments),
            "metrics": sum(len(s.steps) for s in self.segments),
            "restarts": count("restart"),
            "hangs": count("hang"),
            "failures": count("failure"),
            "preemptions": count("preempt"),
            "quarantines": count("quarantine"),
            "saves": len(self.saves),
            "restart_latency": self.latency(),
        }

    def latency(self) -> dict[str, Any] | None:
        """The restart-latency breakdowns and their medians for ``--json``; None when no run summary has them."""
        if not any(isinstance(s.get("breakdown"), list) for s in self.summaries):
            return None
        last = self.summaries[-1]
        return {
            "breakdown": self.breakdowns,
            "median": last.get("breakdown_median") or {},
            "total": last.get("breakdown_total") or {},
            "kill_to_next_step_s": last.get("kill_to_next_step_s"),
        }


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def load_run(events_path: str) -> RunData:
    """Group the log's metrics by job start and collect the restart, hang and preemption markers."""
    data = RunData()
    seg: Segment | None = None
    last_step: int | None = None
    down_since: float | None = None  # the job is not running: from a failed exit to the next start
    for ev in read_events(events_path):
        name, t = ev.get("event"), _num(ev.get("time"))
        if t is None:
            continue
        if data.t0 is None:
            data.t0 = t
        step = ev.get("step") if isinstance(ev.get("step"), int) else None
        sup = ev.get("source") == "supervisor"
        if sup and name == "start":
            rs = ev.get("resume_step") if isinstance(ev.get("resume_step"), int) else None
            if down_since is not None:
                data.down.append((down_since, t))
                down_since = None
            if ev.get("restart_count"):
                data.markers.append(
                    Marker("restart", t, rs if rs is not None else 0, f"restart {ev.get('restart_count')}")
                )
            seg = Segment(index=len(data.segments) + 1, resume_step=rs, start_time=t)
            data.segments.append(seg)
        elif sup and name == "exit":
            if ev.get("failure"):
                down_since = t
            if ev.get("hung") and data.hung:
                data.hung[-1] = (data.hung[-1][0], t)  # hung until killed (the stack dump takes a moment)
            if ev.get("failure") and not ev.get("hung"):
                ls = ev.get("last_step") if isinstance(ev.get("last_step"), int) else last_step
                sig = ev.get("signal")
                data.markers.append(
                    Marker("failure", t, ls, f"killed ({sig})" if sig else f"exit {ev.get('exit_code')}")
                )
        elif sup and name == "hang":
            td = _num(ev.get("detected_time")) or t  # the event itself comes after the stack dump
            data.markers.append(Marker("hang", td, step if step is not None else last_step, "hang"))
            age = _num(ev.get("heartbeat_age_s"))
            if age is None:  # judged on silence of its output (no heartbeat)
                age = _num(ev.get("output_idle_s"))
            if age is not None:
                data.hung.append((td - age, td))
        elif sup and name == "preempt":
            data.markers.append(Marker("preempt", t, last_step, f"preempted ({ev.get('signal')})"))
        elif sup and name == "quarantine":
            data.markers.append(Marker("quarantine", t, step, f"quarantined step {step}"))
        elif sup and name == "summary":
            data.summaries.append(ev)
        elif not sup and name == "first_step":
            _note_starting(data, seg, t)
        elif not sup and name in STEP_EVENTS and step is not None:
            _note_starting(data, seg, t)  # a job without first_step events: its first metrics end its start-up
            if seg is None:  # a job run without the supervisor (or before it logged its start)
                seg = Segment(index=len(data.segments) + 1, start_time=t)
                data.segments.append(seg)
            loss = _num(ev.get("loss"))
            st = _num(ev.get("step_time"))
            if st is None and seg.steps and step > seg.steps[-1]:
                st = (t - seg.times[-1]) / (step - seg.steps[-1])
            seg.steps.append(step)
            seg.times.append(t)
            seg.loss.append(loss if loss is not None else math.nan)
            seg.step_time.append(st if st is not None else math.nan)
            last_step = step
        elif not sup and name == "save" and step is not None:
            data.saves.append({"time": t, "step": step, "blocking_s": _num(ev.get("blocking_s"))})
            last_step = max(step, last_step or 0)
    return data


def _note_starting(data: RunData, seg: Segment | None, t: float) -> None:
    """The first step of a restarted segment ends its start-up (noted once per segment)."""
    if seg is None or seg.index < 2 or seg.steps or seg.start_time is None:
        return
    if not (data.starting and data.starting[-1][0] == seg.start_time):
        data.starting.append((seg.start_time, t))


_COLORS = {"restart": "#d62728", "failure": "#d62728", "hang": "#ff7f0e", "preempt": "#9467bd", "quarantine": "#111111"}


def plot_report(events_path: str, output: str, title: str | None = None, dpi: int = 110) -> str:
    """Write a PNG with three panels: loss vs step, step time vs step, step reached vs wall time.

    Each start of the job is its own line, so the steps a restart redid show as overlapping segments; restarts
    are red lines at the step resumed from, hangs orange, preemptions purple, quarantines black.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed, with the command that installs it.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError(
            f"resumekit report needs matplotlib ({e}); install it with pip install 'resumekit[report]'"
        ) from None

    run = load_run(events_path)
    t0 = run.t0 or 0.0
    bars = run.breakdowns
    fig = Figure(figsize=(10, 11.0 if bars else 8.2), layout="constrained")
    FigureCanvasAgg(fig)
    if bars:
        ax_loss, ax_time, ax_wall, ax_lat = fig.subplots(4, 1, height_ratios=[1, 1, 1, 1.1])
        draw_breakdown(ax_lat, bars, Patch)
    else:
        ax_loss, ax_time, ax_wall = fig.subplots(3, 1)
    palette = ["#1f77b4", "#2ca02c", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#9edae5"]
    for seg in run.segments:
        if not seg.steps:
            continue
        color = palette[(seg.index - 1) % len(palette)]
        ax_loss.plot(seg.steps, seg.loss, color=color, lw=1.2)
        ax_time.plot(seg.steps, [1000 * v for v in seg.step_time], color=color, lw=0.9)
        ax_wall.plot([(t - t0) for t in seg.times], seg.steps, color=color, lw=1.4)
    for m in run.markers:
        c = _COLORS.get(m.kind, "#333333")
        style = {"restart": "--", "hang": ":", "preempt": "-.", "quarantine": "-", "failure": ":"}[m.kind]
        if m.step is not None and m.kind != "failure":
            for ax in (ax_loss, ax_time):
                ax.axvline(m.step, color=c, ls=style, lw=1.0, alpha=0.8)
        if m.kind in ("preempt", "quarantine"):
            ax_wall.axvline(m.time - t0, color=c, ls=style, lw=1.0, alpha=0.8)
        if m.kind in ("hang", "failure", "preempt") and m.step is not None:
            ax_wall.plot([m.time - t0], [m.step], marker="x" if m.kind != "preempt" else "s", color=c, ms=7)
    for a, b in run.down:
        ax_wall.axvspan(a - t0, b - t0, color=_COLORS["restart"], alpha=0.12, lw=0)
    for a, b in run.starting:
        ax_wall.axvspan(a - t0, b - t0, color=_COLORS["restart"], alpha=0.05, lw=0, hatch="//")
    for a, b in run.hung:
        ax_wall.axvspan(a - t0, b - t0, color=_COLORS["hang"], alpha=0.18, lw=0)
    if run.saves:
        ax_wall.plot(
            [s["time"] - t0 for s in run.saves], [s["step"] for s in run.saves], "|", color="#555555", ms=6, alpha=0.6
        )
    why_empty = run.empty_reason()
    if why_empty:
        ax_loss.text(
            0.5,
            0.5,
            "\n".join(textwrap.wrap(why_empty, 70)),
            ha="center",
            va="center",
            transform=ax_loss.transAxes,
            color="#777777",
            fontsize=9,
        )
    losses = [v for seg in run.segments for v in seg.loss if v == v]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 30:
        ax_loss.set_yscale("log")  # training curves span decades; a linear axis flattens everything after warm-up
    ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel("step")
    ax_time.set_ylabel("step time (ms)")
    ax_time.set_xlabel("step")
    ax_wall.set_ylabel("step reached")
    ax_wall.set_xlabel("wall time since the first event (s)")
    for ax in (ax_loss, ax_time, ax_wall):
        ax.grid(True, alpha=0.25)
    step_legend = [
        Line2D([], [], color=_COLORS["restart"], ls="--", label="restart: resumed from this step"),
        Line2D([], [], color=_COLORS["hang"], ls=":", label="hang detected at this step"),
    ]
    wall_legend = [
        Line2D([], [], color=_COLORS["failure"], ls="", marker="x", label="job killed / failed"),
        Line2D([], [], color=_COLORS["hang"], ls="", marker="x", label="hung job killed"),
        Patch(color=_COLORS["hang"], alpha=0.3, label="hung (no heartbeat / output)"),
        Patch(color=_COLORS["restart"], alpha=0.2, label="down (backoff + restart)"),
        Patch(facecolor=_COLORS["restart"], alpha=0.12, hatch="//", label="starting (launch to first step)"),
        Line2D([], [], color="#555555", ls="", marker="|", label="checkpoint saved"),
    ]
    if any(m.kind == "preempt" for m in run.markers):
        wall_legend.append(Line2D([], [], color=_COLORS["preempt"], ls="-.", label="preemption signal"))
    if any(m.kind == "quarantine" for m in run.markers):
        step_legend.append(Line2D([], [], color=_COLORS["quarantine"], label="checkpoint quarantined"))
    ax_wall.legend(handles=wall_legend, loc="lower right", fontsize=8, framealpha=0.9)
    ax_loss.legend(handles=step_legend, loc="upper right", fontsize=8, framealpha=0.9)
    fig.suptitle(title or _title(run), fontsize=11)
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(output)}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, output)
    return output


#: one color per latency segment, in the order of :data:`resumekit.supervisor.latency.COMPONENTS`
_SEGMENT_COLORS = ("#d62728", "#7f7f7f", "#ff7f0e", "#bcbd22", "#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#8c564b")


def draw_breakdown(ax: Any, bars: list[dict[str, Any]], patch: Any) -> None:
    """Draw one stacked bar per restart on ``ax``; unknown segments are left out and named in the caption.

    Args:
        ax: a matplotlib axes.
        bars: the summary's ``breakdown`` entries.
        patch: ``matplotlib.patches.Patch`` (passed in: matplotlib is imported only when plotting).
    """
    from .supervisor.latency import COMPONENTS

    xs = list(range(len(bars)))
    bottoms = [0.0] * len(bars)
    unknown: dict[str, list[int]] = {}
    handles = []
    for (name, label), color in zip(COMPONENTS, _SEGMENT_COLORS, strict=True):
        heights = []
        for i, b in enumerate(bars):
            v = _num(b.get(name))
            if v is None:
                unknown.setdefault(label, []).append(i + 1)
            heights.append(v or 0.0)
        if any(heights):
            ax.bar(xs, heights, bottom=bottoms, color=color, width=0.7)
            handles.append(patch(color=color, label=label))
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xticks(xs, [f"{i + 1}\n{b.get('after') or ''}" for i, b in enumerate(bars)], fontsize=7)
    ax.set_xlim(-0.75, max(len(bars), 4) - 0.25)  # a lone bar stays a bar, not a wall
    ax.set_ylim(0, max(max(bottoms), 1e-3) * 1.5)  # head room for the legend
    ax.set_xlabel("restart (and why the attempt before it ended)")
    ax.set_ylabel("seconds")
    ax.grid(True, axis="y", alpha=0.25)
    if handles:
        ax.legend(handles=handles, loc="upper left", fontsize=7, ncols=3, framealpha=0.9)
    notes = []
    for label, which in unknown.items():
        if label == "detect":
            bounds = [_num(bars[i - 1].get("detect_max_s")) for i in which]
            known = [v for v in bounds if v is not None]
            if known:
                notes.append(f"detect of an exit: <= {max(known):.2f} s (one poll; the moment of death is unknown)")
                which = [i for i, v in zip(which, bounds, strict=True) if v is None]
                if not which:
                    continue
        notes.append(f"{label}: unknown in {_ranges(which)}")
    k2s = [v for b in bars if (v := _num(b.get("kill_to_next_step_s"))) is not None]
    head = "restart latency" + (f" (kill to next step, median {statistics.median(k2s):.2f} s)" if k2s else "")
    ax.set_title(head + ("; not drawn: " + "; ".join(notes) if notes else ""), fontsize=8, wrap=True)


def _ranges(items: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"restarts 1-3, 5"``."""
    parts: list[str] = []
    start = prev = items[0]
    for i in [*items[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ("restart " if items == [items[0]] else "restarts ") + ", ".join(parts)


def _title(run: RunData) -> str:
    st = run.stats()
    if run.summaries:
        s = run.summaries[-1]
        lost = s.get("lost_steps")
        ratio = s.get("effective_ratio")
        redone = "unknown steps redone" if lost is None else f"{lost} steps redone"
        effective = "effective training time unknown" if ratio is None else f"{100 * float(ratio):.0f}% effective"
        return (
            f"resumekit run: {s.get('starts')} starts, {s.get('failures')} failures (hangs: {s.get('hangs')}), "
            f"{redone}, {effective}" + ("" if ratio is None else " training time")
        )
    return f"resumekit run: {st['segments']} starts, {st['restarts']} restarts (hangs: {st['hangs']})"


__all__ = ["log_metrics", "load_run", "plot_report", "RunData", "Segment", "Marker", "METRICS_EVENT"]
