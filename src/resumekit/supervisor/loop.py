"""The restart loop (:class:`Supervisor`): plan a start, run and watch the job, decide whether to start it again.

Each piece lives in its own module: what a start resumes from in :mod:`.planning`, watching the job in
:mod:`.monitor`, the rules in :mod:`.decisions`, the account in :mod:`.summary`.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from typing import Any, TextIO

from ..events import EventLog, EventTail
from ..storage.uploader import describe_lag, upload_status
from .context import RunContext, RunPaths, StartPlan, directory_warnings, modelarts_counters
from .crashloop import GiveUp
from .decisions import (
    EXIT_NOT_FOUND,
    EXIT_PRECHECK,
    describe_exit,
    exit_code_of,
    made_progress,
    preempted_exit_code,
    resets_budget,
    restart_backoff,
)
from .monitor import JobMonitor, JobStartError
from .options import SupervisorOptions
from .planning import StartPlanner
from .prechecks import PrecheckError
from .proctree import set_subreaper, signal_name
from .summary import AttemptRecord, RunSummary, summarize


class Supervisor:
    """Runs a command until it succeeds, is preempted, or the restart budget runs out.

    Example::

        opts = SupervisorOptions(command=["python", "train.py"], directory="/ckpt", hang_timeout=600)
        code = Supervisor(opts).run()

    ``run()`` installs SIGTERM/SIGINT handlers when called from the main thread (and restores the old ones).

    Args:
        options: what to run and how.
        stderr: where progress lines and the summary go (default: ``sys.stderr``).
        job_stdout: where the job's stdout is passed on to (default: ``sys.stdout``).
        job_stderr: where the job's stderr is passed on to (default: ``sys.stderr``).
    """

    def __init__(
        self,
        options: SupervisorOptions,
        *,
        stderr: TextIO | None = None,
        job_stdout: TextIO | None = None,
        job_stderr: TextIO | None = None,
    ):
        self.opts = options
        self._err = stderr
        self._rng = random.Random(options.seed)
        self.summary: RunSummary | None = None
        self.attempts: list[AttemptRecord] = []
        self._stop_signal: int | None = None
        self._precheck_retries = 0
        self._extra_backoff = 0.0
        self._budget_used = 0
        self._last_exit: int | None = None
        self._pending_backoff = 0.0
        #: failures without progress in a row: the exponent of the backoff
        self._no_progress = 0
        self._last_plan = StartPlan()
        self._start_error = ""
        self._events_offset0 = 0
        self.paths = RunPaths.for_options(options)
        #: the checkpoint root: --dir, else the output_dir of --config
        self.directory: str | None = self.paths.directory
        self.log = EventLog(self.paths.events_path, source="supervisor")
        ctx = RunContext(
            options=options, paths=self.paths, log=self.log, say=self._say, job_stdout=job_stdout, job_stderr=job_stderr
        )
        self.planner = StartPlanner(ctx)
        self.monitor = JobMonitor(ctx)

    def _say(self, msg: str) -> None:
        if self.opts.quiet:
            return
        err = self._err or sys.stderr
        try:
            err.write(f"resumekit run: {msg}\n")
            err.flush()
        except (OSError, ValueError):
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: only flags and forwarding (see JobMonitor.preempt).
        if self._stop_signal is None:
            self._stop_signal = signum
        self.monitor.preempt(signum)

    def _install_signals(self) -> dict[int, Any]:
        old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return old
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    def run(self) -> int:
        """Supervise the command.

        Returns:
            The exit code for ``resumekit run`` (the job's final one); :attr:`summary` holds the account.
        """
        t0 = time.time()
        self._events_offset0 = EventTail.size_of(self.paths.events_path)
        old = self._install_signals()
        reaper = self.opts.subreaper and set_subreaper(True)
        if self.directory and not self.opts.directory:
            self._say(f"checkpoint root from --config {self.opts.config}: {self.directory}")
        for msg in directory_warnings(self.opts, self.paths):
            self.log.emit("warning", message=msg)
            self._say(msg)
        self.log.emit(
            "supervisor_start",
            command=self.opts.command,
            directory=self.directory,
            layout=self.opts.layout,
            resume=self.opts.resume,
            max_restarts=self.opts.max_restarts,
            hang_timeout=self.opts.hang_timeout,
            grace=self.opts.grace,
            gpus=self.opts.gpus,
            crash_loop=self.opts.crash_loop,
            events=self.paths.events_path,
            heartbeat=self.paths.heartbeat_path,
            warm=self.monitor.warm.enabled,
            warm_note=self.monitor.warm.describe(),
            **modelarts_counters(),
        )
        self.monitor.hang_mode.announce()
        self._say(self.monitor.warm.describe())
        outcome, reason, code = "failed", "", EXIT_PRECHECK
        try:
            outcome, reason, code = self._loop()
        finally:
            running = self.monitor.running
            if running is not None and running.proc.poll() is None:
                self.monitor.kill(running)  # never leave a job behind (exceptions, KeyboardInterrupt)
            self.monitor.warm.close()  # nor a standby
            if reaper:
                set_subreaper(False)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.planner.restore_config()
            self.summary = summarize(
                self.attempts,
                exit_code=code,
                outcome=outcome,
                reason=reason,
                wall_s=time.time() - t0,
                save_blocking_s=self._save_blocking(),
                quarantined=self.planner.crash_loop.quarantined,
                precheck_retries=self._precheck_retries,
                extra_backoff_s=self._extra_backoff,
                hidden_invalid=self.planner.hidden,
            )
            # A tiered run: how far the object store is behind the local tier at the end (the uploader's events).
            lag = upload_status(self.opts.local_tier) if self.opts.local_tier else None
            self.log.emit("summary", **self.summary.as_dict(), **({"remote_lag": lag} if lag else {}))
            if not self.opts.quiet:
                err = self._err or sys.stderr
                err.write(self.summary.format_text() + (f"\n  {describe_lag(lag)}" if lag else "") + "\n")
                err.flush()
        return code

    def _loop(self) -> tuple[str, str, int]:
        """The restart loop; returns (outcome, reason, exit code)."""
        while True:
            if self._stop_signal is not None:
                return self._stopped_before_start()
            t_pre = time.monotonic()
            try:
                plan = self.planner.plan(self.attempts[-1] if self.attempts else None, self._last_plan)
            except PrecheckError as e:
                self.log.emit("precheck_failed", check=e.check, message=e.message, retry=e.retry)
                self._say(e.message)
                if not e.retry:
                    return "failed", e.message, EXIT_PRECHECK
                if not self._take_budget():
                    return (
                        "gave-up",
                        f"{e.message}; restart budget ({self.opts.max_restarts}) used up",
                        self._last_exit if self._last_exit else EXIT_PRECHECK,
                    )
                self._precheck_retries += 1
                self._say(f"retrying the pre-checks (restart {self._budget_used} of {self.opts.max_restarts})")
                self._extra_backoff += self._sleep_backoff()
                continue
            except GiveUp as e:
                self.log.emit("give_up", reason=str(e))
                self._say(str(e))
                return "gave-up", str(e), self._last_exit if self._last_exit else EXIT_PRECHECK
            plan.precheck_s = time.monotonic() - t_pre
            if self._stop_signal is not None:
                return self._stopped_before_start()
            rec = self._run_once(plan)
            if rec is None:  # could not start the command at all
                return "failed", self._start_error, self._last_exit or EXIT_NOT_FOUND
            if not rec.failure:
                if rec.preempted:
                    # 128 + the signal received (130 after Ctrl-C, 143 after SIGTERM), as a shell reports it, so
                    # `resumekit run ... && next` stops here; --preempt-exit-code 0 reports success instead.
                    return (
                        "preempted",
                        f"stopped by {signal_name(self._stop_signal or signal.SIGTERM)}",
                        preempted_exit_code(
                            self._stop_signal, rec.returncode, signal.SIGTERM, self.opts.preempt_exit_code
                        ),
                    )
                return "success", "the job exited 0", 0
            if rec.preempted:
                why = (
                    "killed after the grace period"
                    if rec.returncode == -signal.SIGKILL
                    else f"exited {exit_code_of(rec.returncode)} after the preemption signal"
                )
                return "preempted", f"not restarted: the job was preempted and {why}", exit_code_of(rec.returncode)
            self._maybe_reset_budget(rec)
            if not self._take_budget():
                reason = (
                    f"restart budget used up (--max-restarts {self.opts.max_restarts}); last exit "
                    f"{describe_exit(rec.returncode)}"
                )
                self.log.emit("give_up", reason=reason)
                self._say(reason)
                return "gave-up", reason, exit_code_of(rec.returncode)
            progressed = made_progress(None, None, rec.resume_step, rec.last_step)
            self._no_progress = 0 if progressed else self._no_progress + 1
            self._pending_backoff = self._sleep_backoff(announce=rec, progressed=progressed)

    def _run_once(self, plan: StartPlan) -> AttemptRecord | None:
        """One start: launch, watch until it exits, clean up, account. None when the command cannot start."""
        index = len(self.attempts) + 1
        try:
            run = self.monitor.launch(plan, index, self.planner.job_env(plan, index))
        except JobStartError as e:
            self._start_error, self._last_exit = e.message, e.exit_code
            return None
        self._last_plan = plan
        if self._stop_signal is not None and run.preempt_signal is None:
            # A signal that came while the job was being started: forward it now.
            self.monitor.preempt(self._stop_signal)
        try:
            rc = self.monitor.watch(run)
        finally:
            self.monitor.running = None
        end = time.time()
        self.monitor.cleanup_leftovers(run)
        self.monitor.close_output(run)
        rec = self.monitor.record(run, rc, end, backoff_s=self._pending_backoff if index > 1 else 0.0)
        self._pending_backoff = 0.0
        self.attempts.append(rec)
        self._last_exit = exit_code_of(rc)
        return rec

    def _stopped_before_start(self) -> tuple[str, str, int]:
        sig = self._stop_signal or signal.SIGTERM
        reason = f"{signal_name(sig)} received while no job was running; not starting it again"
        self.log.emit("preempt", attempt=None, signal=signal_name(sig), job_pid=None)
        self._say(reason)
        return "preempted", reason, self._last_exit if self._last_exit else 128 + sig

    def _maybe_reset_budget(self, rec: AttemptRecord) -> None:
        """After a window of progress the restart count starts again: the backoff goes back to ``--backoff`` and
        ``--max-restarts`` counts restarts since then."""
        progressed = made_progress(None, None, rec.resume_step, rec.last_step)
        if self._budget_used and resets_budget(progressed, rec.end - rec.start, self.opts.reset_after):
            self.log.emit(
                "budget_reset",
                attempt=rec.index,
                restarts_before=self._budget_used,
                ran_s=round(rec.end - rec.start, 3),
                last_step=rec.last_step,
            )
            self._budget_used = 0

    def _take_budget(self) -> bool:
        if self._budget_used >= self.opts.max_restarts:
            return False
        self._budget_used += 1
        return True

    def _sleep_backoff(self, announce: AttemptRecord | None = None, progressed: bool = False) -> float:
        # An attempt that trained restarts at once (but for a little jitter); failures without progress back off,
        # doubling with each one in a row (a retried pre-check counts its restart budget instead).
        restart = self._no_progress if announce is not None else self._budget_used
        delay = restart_backoff(
            restart,
            self.opts.backoff,
            self.opts.backoff_max,
            self.opts.jitter,
            self._rng.random(),
            progressed=progressed,
            progress_jitter=self.opts.progress_jitter,
        )
        if announce is not None:
            self.log.emit(
                "restart",
                attempt=announce.index + 1,
                restart_count=self._budget_used,
                after_exit=exit_code_of(announce.returncode),
                delay_s=round(delay, 3),
                after_progress=progressed,
                budget_left=self.opts.max_restarts - self._budget_used,
            )
            why = "after progress" if progressed else f"backoff after {self._no_progress} failure(s) without progress"
            self._say(f"restarting in {delay:.2f} s ({why}; restart {self._budget_used} of {self.opts.max_restarts})")
        deadline = time.monotonic() + delay
        # The stop signal cuts the wait short: a preempted supervisor must not sleep out a long backoff.
        while self._stop_signal is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, self.opts.poll_interval))
        return delay

    def _save_blocking(self) -> float | None:
        """Training time blocked by this run's saves, from the job's ``save`` events; None when the job logged no
        event at all (it does not report, so its saves are unknown, not free)."""
        total, reported = 0.0, False
        for ev in EventTail(self.paths.events_path, self._events_offset0).read(final=True):
            if ev.get("source") == "supervisor":
                continue
            reported = True
            if ev.get("event") == "save" and isinstance(ev.get("blocking_s"), (int, float)):
                total += float(ev["blocking_s"])
        return total if reported or not self.attempts else None


__all__ = ["Supervisor"]
