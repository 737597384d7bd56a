"""Watching one running job (:class:`JobMonitor`): start it in its own session, forward preemption, judge it hung
from its heartbeat (dump its stacks, kill its tree), kill what it left behind, and record what it achieved.

The job lives in its own session and process group; everything it started is found through
:mod:`~resumekit.supervisor.proctree`, including helpers that left the group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..events import HEARTBEAT_FILE, EventTail, heartbeat_age
from .context import RunContext, StartPlan, modelarts_counters
from .decisions import (
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    describe_exit,
    exit_code_of,
    grace_expired,
    hang_target,
    is_failure,
    is_hung,
)
from .proctree import children, descendants, kill_tree, reap, send_signal, signal_name, wait_gone
from .summary import AttemptRecord


class JobStartError(Exception):
    """The command could not be started at all (not found, not executable).

    Attributes:
        message: one line naming the command and the fix.
        exit_code: the shell's code for it (127 or 126).
    """

    def __init__(self, message: str, exit_code: int):
        self.message = message
        self.exit_code = exit_code
        super().__init__(message)


@dataclass
class RunningJob:
    """Book-keeping of the attempt in progress."""

    proc: subprocess.Popen
    index: int
    start: float
    events_offset: int
    plan: StartPlan
    first_sign: Optional[float] = None
    preempt_signal: Optional[int] = None
    preempt_received: Optional[int] = None
    preempt_time: Optional[float] = None
    preempt_logged: bool = False
    kill_now: bool = False
    killed: Optional[str] = None
    hung: bool = False
    last_beat_step: Optional[int] = None
    baseline_children: set = field(default_factory=set)


def read_heartbeat(path: str) -> Dict[str, Any]:
    """The heartbeat's JSON (``time``, ``step``, ``pid``); {} when missing or torn.

    Args:
        path: the heartbeat file.

    Returns:
        Its content.
    """
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def clear_heartbeat(state_dir: str, say: Callable[[str], None]) -> None:
    """Remove the heartbeat (and its leftover temp files) before a start.

    A stale beat from the previous attempt would make a slow-starting job look hung (or alive).

    Args:
        state_dir: the directory the heartbeat lives in.
        say: prints one progress line.
    """
    path = os.path.join(state_dir, HEARTBEAT_FILE)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        say(f"cannot remove the stale heartbeat {path}: {e.strerror}")
    try:
        for entry in os.listdir(state_dir):
            if entry.startswith(HEARTBEAT_FILE + ".") and entry.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(state_dir, entry))
                except OSError:
                    pass
    except OSError:
        pass


def dump_stacks(
    target: int, tree: Sequence[int], *, out_path: str, settle_s: float, say: Callable[[str], None]
) -> Tuple[Optional[str], str]:
    """Python stacks of a hung job before it is killed: py-spy when installed, else SIGUSR1.

    Args:
        target: the process whose stacks matter most (the one that wrote the heartbeat).
        tree: the job's processes; up to 15 others are dumped after ``target``.
        out_path: the file py-spy's dumps go to.
        settle_s: how long to give ``faulthandler`` to print after SIGUSR1.
        say: prints one progress line.

    Returns:
        ``(file with the dumps or None, how they were taken)``.
    """
    pyspy = shutil.which("py-spy")
    if pyspy:
        pids = [target] + [p for p in tree if p != target][:15]
        try:
            with open(out_path, "w") as out:
                for p in pids:
                    out.write(f"==== py-spy dump --pid {p}\n")
                    out.flush()
                    try:
                        subprocess.run(
                            [pyspy, "dump", "--pid", str(p)], stdout=out, stderr=subprocess.STDOUT, timeout=20
                        )
                    except subprocess.TimeoutExpired:
                        out.write("(py-spy timed out)\n")
            return out_path, "py-spy"
        except OSError as e:
            say(f"py-spy dump failed: {e}")
    # faulthandler.register(SIGUSR1) in the job prints every thread's stack to its stderr; a job without it
    # dies of SIGUSR1, which is fine: it is about to be killed anyway.
    if send_signal(target, signal.SIGUSR1):
        time.sleep(settle_s)
        return None, "SIGUSR1 (faulthandler output on the job's stderr)"
    return None, "none (process gone)"


def attempt_evidence(
    beat: Mapping[str, Any], events: Sequence[Mapping[str, Any]], first_sign: Optional[float]
) -> Tuple[Optional[int], Optional[int], Optional[float]]:
    """What an attempt reported about itself, from its last heartbeat and its own events (pure).

    Args:
        beat: the last heartbeat (:func:`read_heartbeat`).
        events: the events appended during the attempt.
        first_sign: the heartbeat's first mtime, if seen.

    Returns:
        ``(step it restored, highest step reported, time of its first sign of training)``; None where unknown.
    """
    steps: List[int] = []
    if isinstance(beat.get("step"), int):
        steps.append(beat["step"])
    restored: Optional[int] = None
    for ev in events:
        if ev.get("source") == "supervisor":
            continue
        step = ev.get("step")
        name = ev.get("event")
        if name == "restore" and isinstance(step, int):
            restored = step
        if isinstance(step, int) and name in ("save", "metrics", "restore", "step"):
            steps.append(step)
        if name in ("restore", "metrics", "save") and isinstance(ev.get("time"), (int, float)):
            first_sign = min(first_sign, ev["time"]) if first_sign else ev["time"]
    return restored, (max(steps) if steps else None), first_sign


class JobMonitor:
    """Starts, watches, kills and accounts for one attempt at a time.

    Args:
        ctx: the run's options, paths (heartbeat, event log, stack dumps), event log and progress output.
    """

    def __init__(self, ctx: RunContext):
        self.opts, self.paths, self.log, self.say = ctx.options, ctx.paths, ctx.log, ctx.say
        #: the attempt in progress (read by the supervisor's signal handler)
        self.running: Optional[RunningJob] = None

    def launch(self, plan: StartPlan, index: int, env: Dict[str, str]) -> RunningJob:
        """Start the command in a new session and log the start.

        Args:
            plan: what this start resumes from.
            index: 1 for the first start.
            env: the job's environment (:meth:`StartPlanner.job_env`).

        Returns:
            The attempt in progress (also :attr:`running`).

        Raises:
            JobStartError: the command is missing or not executable.
        """
        os.makedirs(self.paths.state_dir, exist_ok=True)
        clear_heartbeat(self.paths.state_dir, self.say)
        offset = EventTail.size_of(self.paths.events_path)
        baseline = set(children())
        start = time.time()
        try:
            proc = subprocess.Popen(self.opts.command, env=env, start_new_session=True)
        except (FileNotFoundError, PermissionError) as e:
            missing = isinstance(e, FileNotFoundError)
            fix = "check the command and PATH" if missing else "is it executable?"
            error = f"cannot start {self.opts.command[0]!r}: {e.strerror}; {fix}"
            self.say(error)
            self.log.emit("start_failed", attempt=index, error=error)
            raise JobStartError(error, EXIT_NOT_FOUND if missing else EXIT_NOT_EXECUTABLE) from None
        run = RunningJob(
            proc=proc, index=index, start=start, events_offset=offset, plan=plan, baseline_children=baseline
        )
        self.running = run
        self.log.emit(
            "start",
            attempt=index,
            restart_count=index - 1,
            pid=proc.pid,
            command=self.opts.command,
            resume_from=plan.resume_path or None,
            resume_step=plan.resume_step,
            newest_valid_step=plan.newest_step,
            precheck_s=round(plan.precheck_s, 3),
            **modelarts_counters(),
        )
        origin = f"resuming from {plan.resume_path}" if plan.resume_path else "from scratch"
        self.say(f"start {index} (pid {proc.pid}) {origin}")
        return run

    def preempt(self, signum: int) -> None:
        """Forward a preemption to the running job as SIGTERM; a second SIGINT asks for an immediate kill.

        Safe in a signal handler: it only sets flags and calls ``os.killpg``. Logging, printing and killing
        happen in :meth:`watch`, which would otherwise risk re-entering a half-done write or Popen's wait lock.

        Args:
            signum: the signal the supervisor received.
        """
        run = self.running
        if run is None or run.proc.returncode is not None:
            return
        if run.preempt_signal is None:
            # SIGINT goes on as SIGTERM: that is the signal training libraries (resumekit's manager, HF, Lightning)
            # treat as "save at the next step and exit 0"; SIGINT would raise KeyboardInterrupt mid-step instead.
            run.preempt_signal = signal.SIGTERM
            run.preempt_received = signum
            run.preempt_time = time.monotonic()
            send_signal(run.proc.pid, signal.SIGTERM, group=True)
        elif signum == signal.SIGINT:
            run.kill_now = True  # a second Ctrl-C means "now": do not wait out the grace period

    def watch(self, run: RunningJob) -> int:
        """Wait for the job while watching its heartbeat and the preemption grace period.

        Args:
            run: the attempt in progress.

        Returns:
            The job's ``Popen.returncode``.
        """
        proc = run.proc
        next_reap = time.monotonic() + 1.0
        while True:
            self._log_preempt(run)
            rc = proc.poll()
            if rc is not None:
                self._log_preempt(run)  # the signal may have come during poll()
                return rc
            now = time.monotonic()
            if run.first_sign is None:
                try:
                    run.first_sign = os.stat(self.paths.heartbeat_path).st_mtime
                except OSError:
                    pass
            if run.kill_now and run.killed is None:
                run.killed = "second SIGINT"
                self.log.emit("kill", attempt=run.index, pid=proc.pid, reason="second SIGINT")
                self.say("second SIGINT: killing the job now")
                self.kill(run)
            elif run.killed is None and grace_expired(run.preempt_time, now, self.opts.grace):
                run.killed = "grace expired"
                self.log.emit(
                    "kill", attempt=run.index, pid=proc.pid, reason="grace period expired", grace_s=self.opts.grace
                )
                self.say(f"the job did not exit within --grace {self.opts.grace:g} s: killing its process group")
                self.kill(run)
            elif run.preempt_signal is None and run.killed is None and self.opts.hang_timeout:
                age = heartbeat_age(self.paths.heartbeat_path)
                if is_hung(age, self.opts.hang_timeout):
                    self._handle_hang(run, age)  # type: ignore[arg-type]
            if now >= next_reap:
                next_reap = now + 1.0
                reap([p for p in self._new_children(run) if p != proc.pid])
            time.sleep(self.opts.poll_interval)

    def _log_preempt(self, run: RunningJob) -> None:
        if run.preempt_signal is None or run.preempt_logged:
            return
        run.preempt_logged = True
        name = signal_name(run.preempt_received or run.preempt_signal)
        self.log.emit(
            "preempt",
            attempt=run.index,
            signal=name,
            forwarded=signal_name(run.preempt_signal),
            job_pid=run.proc.pid,
            grace_s=self.opts.grace,
        )
        self.say(
            f"{name} received: sent SIGTERM to the job (pid {run.proc.pid}); it has {self.opts.grace:g} s "
            "to save and exit"
        )

    def _handle_hang(self, run: RunningJob, age: float) -> None:
        beat = read_heartbeat(self.paths.heartbeat_path)
        pid = beat.get("pid") if isinstance(beat.get("pid"), int) else None
        tree = [run.proc.pid] + descendants(run.proc.pid)
        target = hang_target(pid, tree)
        detected = time.time()
        self.say(
            f"the job is hung: no heartbeat for {age:.1f} s (--hang-timeout {self.opts.hang_timeout:g}) "
            f"at step {beat.get('step')}; dumping its stacks, then killing it and its children"
        )
        stamp = time.strftime("%Y%m%dT%H%M%S")
        dump_path, method = dump_stacks(
            target,
            tree,
            out_path=os.path.join(self.paths.state_dir, f"hang-{run.index}-{target}-{stamp}.txt"),
            settle_s=min(1.0, max(0.2, self.opts.poll_interval * 5)),
            say=self.say,
        )
        run.hung = True
        run.killed = "hang"
        self.log.emit(
            "hang",
            attempt=run.index,
            pid=target,
            job_pid=run.proc.pid,
            step=beat.get("step"),
            heartbeat_age_s=round(age, 3),
            detected_time=round(detected, 6),
            hang_timeout_s=self.opts.hang_timeout,
            dump=method,
            dump_path=dump_path,
        )
        self.say(f"stacks of pid {target}: {dump_path or method}")
        killed = self.kill(run)
        self.log.emit("kill", attempt=run.index, pid=run.proc.pid, reason="hang", pids=killed)

    def _new_children(self, run: RunningJob) -> List[int]:
        # Our children that were not there before the job started: the job, and orphans re-parented to us
        # (subreaper). Children the caller had before are not ours to reap.
        return [p for p in children() if p not in run.baseline_children]

    def kill(self, run: RunningJob) -> List[int]:
        """SIGKILL the job's process group and every descendant, including ones that left the group (setsid).

        Args:
            run: the attempt to kill.

        Returns:
            The pids signalled, the job's first.
        """
        killed = kill_tree(run.proc.pid)
        try:
            run.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL of an uninterruptible (D state) process
            self.say(f"pid {run.proc.pid} did not die within 10 s of SIGKILL (stuck in the kernel?)")
        # Orphans re-parent to us (subreaper) only after their parent died: reap until every one is gone.
        wait_gone(killed[1:], reapable=lambda: self._new_children(run))
        return killed

    def cleanup_leftovers(self, run: RunningJob) -> None:
        """Kill what the job left running (dataloader workers, detached helpers) before the next start.

        Args:
            run: the attempt that just exited.
        """
        pgid = run.proc.pid
        stray = [p for p in self._new_children(run) if p != pgid]
        stray_all = stray + [d for p in stray for d in descendants(p)]
        group_alive = send_signal(pgid, 0, group=True)
        if not stray_all and not group_alive:
            return
        send_signal(pgid, signal.SIGKILL, group=True)
        for p in stray_all:
            send_signal(p, signal.SIGKILL)
        wait_gone(stray_all, reapable=lambda: self._new_children(run))
        self.log.emit("cleanup", attempt=run.index, pids=stray_all, process_group=group_alive)

    def record(self, run: RunningJob, rc: int, end: float, backoff_s: float) -> AttemptRecord:
        """Account for an attempt that ended: what it resumed from, how far it got, how it exited.

        Args:
            run: the attempt.
            rc: its ``Popen.returncode``.
            end: wall time of the exit.
            backoff_s: the backoff slept before it.

        Returns:
            The attempt's record (also logged as the ``exit`` event).
        """
        restored, last_step, first_sign = attempt_evidence(
            read_heartbeat(self.paths.heartbeat_path),
            EventTail(self.paths.events_path, run.events_offset).read(final=True),
            run.first_sign,
        )
        resume_step = restored if restored is not None else run.plan.resume_step
        start = run.start
        failure = is_failure(rc, run.preempt_signal)
        rec = AttemptRecord(
            index=run.index,
            resume_step=resume_step,
            last_step=last_step,
            start=start,
            end=end,
            returncode=rc,
            failure=failure,
            hung=run.hung,
            preempted=run.preempt_signal is not None,
            backoff_s=backoff_s,
            precheck_s=run.plan.precheck_s,
            startup_s=(max(0.0, first_sign - start) if first_sign else None),
        )
        self.log.emit(
            "exit",
            attempt=run.index,
            pid=run.proc.pid,
            returncode=rc,
            exit_code=exit_code_of(rc),
            signal=signal_name(-rc) if rc < 0 else None,
            failure=failure,
            hung=run.hung,
            preempted=rec.preempted,
            killed=run.killed,
            duration_s=round(end - start, 3),
            resume_step=resume_step,
            last_step=last_step,
        )
        if failure:
            what = "was killed as hung" if run.hung else "failed"
            self.say(
                f"the job {what}: exit {describe_exit(rc)} after {end - start:.1f} s "
                f"(last step {last_step}, resumed from {resume_step})"
            )
        return rec


__all__ = [
    "JobMonitor",
    "JobStartError",
    "RunningJob",
    "attempt_evidence",
    "clear_heartbeat",
    "dump_stacks",
    "read_heartbeat",
]
