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
"""

from __future__ import annotations

import math
import os
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
    summaries: list[dict[str, Any]] = field(default_factory=list)
    t0: float | None = None

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
        elif not sup and name in STEP_EVENTS and step is not None:
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
    fig = Figure(figsize=(10, 8.2), layout="constrained")
    FigureCanvasAgg(fig)
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
