"""Watching one running job (:class:`JobMonitor`): start it in its own session with its output passed through,
forward preemption, judge it hung (heartbeat, else output and checkpoint activity; dump its stacks, kill its tree),
kill what it left behind, and record what it reported and why it ended.

The job lives in its own session and process group; everything it started is found through
:mod:`~resumekit.supervisor.proctree`, including helpers that left the group.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..events import HEARTBEAT_FILE, EventTail, heartbeat_age
from .activity import DirActivity, HangMode, hang_detection_mode, scan_interval
from .context import RunContext, StartPlan, modelarts_counters
from .decisions import (
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    exit_code_of,
    grace_expired,
    hang_reason,
    hang_target,
)
from .evidence import JobReport, account_attempt, attempt_evidence, failure_line, job_report, read_heartbeat
from .latency import attempt_fields
from .output import OutputPump
from .proctree import children, descendants, kill_tree, reap, send_signal, signal_name, wait_gone
from .standby import WarmStarter
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
    first_sign: float | None = None
    preempt_signal: int | None = None
    preempt_received: int | None = None
    preempt_time: float | None = None
    preempt_logged: bool = False
    kill_now: bool = False
    killed: str | None = None
    hung: bool = False
    last_beat_step: int | None = None
    baseline_children: set = field(default_factory=set)
    output: OutputPump | None = None
    files: DirActivity | None = None
    #: the attempt runs in a warm standby (:mod:`.standby`), not a fresh interpreter
    warm: bool = False
    #: its environment (a standby behind it starts with it, less the per-attempt hand-off)
    env: dict = field(default_factory=dict)


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


def catches_signal(pid: int, signum: int) -> bool | None:
    """Whether process ``pid`` has a handler installed for ``signum`` (``SigCgt`` in ``/proc/PID/status``); None
    where that cannot be read (not Linux, process gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def dump_stacks(
    target: int,
    tree: Sequence[int],
    *,
    out_path: str,
    settle_s: float,
    say: Callable[[str], None],
    signum: int | None = None,
) -> tuple[str | None, str]:
    """Python stacks of a hung job before it is killed: py-spy when installed, else the job's own dump signal.

    The signal (the heartbeat's ``dump_signal``, what :class:`~resumekit.manager.CheckpointManager` registers with
    ``faulthandler``; SIGUSR1 when the job did not say) is sent only to a process that handles it, as
    ``/proc/PID/status`` shows; where that cannot be read, only when the job announced it. A job without a handler
    would die of the signal (``exit 138``) without printing anything.

    Args:
        target: the process whose stacks matter most (the one that wrote the heartbeat).
        tree: the job's processes; up to 15 others are dumped after ``target``.
        out_path: the file py-spy's dumps go to.
        settle_s: how long to give ``faulthandler`` to print after the signal.
        say: prints one progress line.
        signum: the signal the job announced for stack dumps in its heartbeat; None: it announced none.

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
    announced = isinstance(signum, int) and not isinstance(signum, bool) and 0 < signum < 65
    sig = signum if announced else signal.SIGUSR1
    caught = catches_signal(target, sig)  # type: ignore[arg-type]
    if not (caught or (caught is None and announced)):
        return None, "none (the job registered no stack-dump handler; install py-spy to get its stacks)"
    if send_signal(target, sig):  # type: ignore[arg-type]
        time.sleep(settle_s)
        return None, f"{signal_name(sig)} (faulthandler output on the job's stderr)"  # type: ignore[arg-type]
    return None, "none (process gone)"


class JobMonitor:
    """Starts, watches, kills and accounts for one attempt at a time.

    Args:
        ctx: the run's options, paths (heartbeat, event log, stack dumps), event log and progress output.
    """

    def __init__(self, ctx: RunContext):
        self.opts, self.paths, self.log, self.say = ctx.options, ctx.paths, ctx.log, ctx.say
        #: the attempt in progress (read by the supervisor's signal handler)
        self.running: RunningJob | None = None
        #: how hangs are detected (announced at start; heartbeat once the job beats)
        self.hang_mode = HangMode(ctx)
        self._stdout = ctx.job_stdout
        self._stderr = ctx.job_stderr
        #: set (from the signal handler) once the supervisor was asked to stop
        self.stop_requested = False
        #: the standby interpreter that becomes the next attempt (warm restart)
        self.warm = WarmStarter(
            self.opts.command,
            enabled=self.opts.warm,
            preload=self.opts.preload,
            warm_delay=self.opts.warm_delay,
            pump=lambda: OutputPump(self._stdout, self._stderr),
            emit=self.log.emit,
            say=self.say,
            path=(self.opts.env or {}).get("PATH", os.environ.get("PATH")),
        )

    def launch(self, plan: StartPlan, index: int, env: dict[str, str]) -> RunningJob:
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
        warm = self.warm.take(env, lambda: self.stop_requested)
        if warm is not None:
            proc, pump, warm_wait = warm
            baseline.discard(proc.pid)
        else:
            (proc, pump), warm_wait = self._cold_start(env, index), None
        run = RunningJob(
            proc=proc,
            index=index,
            start=start,
            events_offset=offset,
            plan=plan,
            baseline_children=baseline,
            output=pump,
            files=DirActivity(
                self.paths.watch_dir if self.opts.hang_timeout else None,
                scan_interval(self.opts.hang_timeout, self.opts.poll_interval),
            ),
            warm=warm is not None,
            env=env,
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
            warm=run.warm,
            warm_wait_s=None if warm_wait is None else round(warm_wait, 3),
            **modelarts_counters(),
        )
        origin = f"resuming from {plan.resume_path}" if plan.resume_path else "from scratch"
        self.say(f"start {index} (pid {proc.pid}{', warm' if run.warm else ''}) {origin}")
        return run

    def _cold_start(self, env: dict[str, str], index: int) -> tuple[subprocess.Popen, OutputPump]:
        """A fresh interpreter: ``Popen`` in a new session, its output passed through a new pump."""
        pump = OutputPump(self._stdout, self._stderr)
        try:
            proc = subprocess.Popen(self.opts.command, env=env, start_new_session=True, **pump.popen_kwargs())
        except (FileNotFoundError, PermissionError) as e:
            pump.abandon()
            missing = isinstance(e, FileNotFoundError)
            fix = "check the command and PATH" if missing else "is it executable?"
            error = f"cannot start {self.opts.command[0]!r}: {e.strerror}; {fix}"
            self.say(error)
            self.log.emit("start_failed", attempt=index, error=error)
            raise JobStartError(error, EXIT_NOT_FOUND if missing else EXIT_NOT_EXECUTABLE) from None
        except BaseException:
            pump.abandon()
            raise
        pump.start()
        return proc, pump

    def preempt(self, signum: int) -> None:
        """Forward a preemption to the running job as SIGTERM; a second SIGINT asks for an immediate kill.

        Safe in a signal handler: it only sets flags and calls ``os.killpg``. Logging, printing and killing
        happen in :meth:`watch`, which would otherwise risk re-entering a half-done write or Popen's wait lock.

        Args:
            signum: the signal the supervisor received.
        """
        self.stop_requested = True
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
                else:
                    self.hang_mode.note_beat(run.index)
                    if not run.warm:
                        self.warm.cold_startup_s = max(0.0, run.first_sign - run.start)
            if run.preempt_signal is None and run.killed is None:
                self.warm.maybe_spawn(run.index, run.start, time.time(), run.first_sign is not None, run.env)
                self.warm.poll()
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
                why = hang_reason(
                    self.opts.hang_timeout,
                    time.time(),
                    age,
                    run.output.last_output if run.output else run.start,
                    run.files.poll() if run.files else run.start,
                )
                if why:
                    self._handle_hang(run, age, why)
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

    def _handle_hang(self, run: RunningJob, age: float | None, why: str) -> None:
        beat = read_heartbeat(self.paths.heartbeat_path)
        pid = beat.get("pid") if isinstance(beat.get("pid"), int) else None
        tree = [run.proc.pid] + descendants(run.proc.pid)
        target = hang_target(pid, tree)
        detected = time.time()
        self.say(
            f"the job is hung: {why} (--hang-timeout {self.opts.hang_timeout:g}) "
            f"at step {beat.get('step')}; dumping its stacks, then killing it and its children"
        )
        stamp = time.strftime("%Y%m%dT%H%M%S")
        dump_path, method = dump_stacks(
            target,
            tree,
            out_path=os.path.join(self.paths.state_dir, f"hang-{run.index}-{target}-{stamp}.txt"),
            settle_s=min(1.0, max(0.2, self.opts.poll_interval * 5)),
            say=self.say,
            signum=beat.get("dump_signal") if pid == target else None,
        )
        run.hung = True
        run.killed = "hang"
        self.log.emit(
            "hang",
            attempt=run.index,
            pid=target,
            job_pid=run.proc.pid,
            step=beat.get("step"),
            heartbeat_age_s=round(age, 3) if age is not None else None,
            output_idle_s=round(detected - run.output.last_output, 3) if run.output else None,
            mode=hang_detection_mode(self.opts.hang_timeout, age is not None),
            reason=why,
            detected_time=round(detected, 6),
            hang_timeout_s=self.opts.hang_timeout,
            dump=method,
            dump_path=dump_path,
        )
        self.say(f"stacks of pid {target}: {dump_path or method}")
        killed = self.kill(run)
        self.log.emit("kill", attempt=run.index, pid=run.proc.pid, reason="hang", pids=killed)

    def _new_children(self, run: RunningJob) -> list[int]:
        # Our children that were not there before the job started: the job, and orphans re-parented to us
        # (subreaper). Children the caller had before are not ours to reap.
        # The standby is neither: it is not the job's, and reaping it would take its exit status from its Popen.
        standby = self.warm.pids()
        return [p for p in children() if p not in run.baseline_children and p not in standby]

    def kill(self, run: RunningJob) -> list[int]:
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

    def close_output(self, run: RunningJob) -> None:
        """Forward what the job wrote last and stop passing its output through (after it and its leftovers are
        gone; a detached process still holding the streams open costs at most a couple of seconds)."""
        if run.output is not None:
            run.output.close()

    def record(self, run: RunningJob, rc: int, end: float, backoff_s: float) -> AttemptRecord:
        """Account for an attempt that ended: what it reported loading, how far it got, why it ended.

        Args:
            run: the attempt.
            rc: its ``Popen.returncode``.
            end: wall time of the exit.
            backoff_s: the backoff slept before it.

        Returns:
            The attempt's record (also logged as the ``exit`` event).
        """
        tail = run.output.stderr_tail() if run.output is not None else ""
        rec, rep = account_attempt(
            index=run.index,
            plan=run.plan,
            start=run.start,
            end=end,
            returncode=rc,
            backoff_s=backoff_s,
            preempt_signal=run.preempt_signal,
            hung=run.hung,
            first_sign=run.first_sign,
            stderr_tail=tail,
            beat=read_heartbeat(self.paths.heartbeat_path),
            events=EventTail(self.paths.events_path, run.events_offset).read(final=True),
            poll_interval=self.opts.poll_interval,
        )
        rec.warm = run.warm  # the breakdown tells warm restarts from cold ones
        start, failure, cause = run.start, rec.failure, rec.cause
        resume_step, last_step = rec.resume_step, rec.last_step
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
            cause=cause,
            reported=rep.reported,
            loaded=rep.restored_path if rep.restore_reported else None,
            loaded_reported=rep.restore_reported,
            # The restart-latency evidence of this attempt (the run summary puts the restarts' breakdowns together).
            detect_s=None if rec.detect_s is None else round(rec.detect_s, 3),
            detect_max_s=None if rec.detect_max_s is None else round(rec.detect_max_s, 3),
            **attempt_fields(rec.timings, start),
        )
        if failure:
            self.say(failure_line(rec, rep, run.hung))
        return rec


__all__ = [
    "JobMonitor",
    "JobReport",
    "job_report",
    "JobStartError",
    "RunningJob",
    "attempt_evidence",
    "clear_heartbeat",
    "catches_signal",
    "dump_stacks",
    "read_heartbeat",
]
