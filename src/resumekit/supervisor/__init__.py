"""The restart loop behind ``resumekit run``: it brings a training job back by itself. Imports no torch.

The supervisor runs any command (a script using resumekit, ``llamafactory-cli train``, ``torchrun ...``) and talks
to it only through the environment, the heartbeat file and the event log, so it works for every framework:

* **Before every start** it runs pre-checks (checkpoint directory writable, enough free space, newest checkpoint
  verifies, remote storage reachable, ``--gpus`` accelerators answer), moves the invalid checkpoints a framework
  would pick by itself (the highest ``checkpoint-N``, ``last.ckpt``, a tracker's target) into ``quarantine/``
  (never deleted), repairs the layout's tracker or rewrites ``--config`` (paths expanded; the user's text is put
  back when the run ends), and exports where to resume from::

      RESUMEKIT_RESUME_FROM   path of the newest valid checkpoint; unset when there is none (or --resume never)
      RESUMEKIT_RESTART_COUNT 0 on the first start, then 1, 2, ...
      RESUMEKIT_DIR           the checkpoint root (path or URI)
      RESUMEKIT_HEARTBEAT     the file the job touches every step (events.Heartbeat)
      RESUMEKIT_EVENTS        the JSONL event log the job appends to (events.EventLog)

* **While it runs** the job lives in its own session and process group; its stdout and stderr pass through the
  supervisor unchanged (a pseudo-terminal when the supervisor's own output is a terminal). With ``hang_timeout``
  (announced at start as "hang detection: ..."), a job is hung when its heartbeat is older than the timeout (once
  it has beaten: an integration is present) or, without one, when it wrote no output for the timeout; either way
  only when no file under the checkpoint directory grew meanwhile (a save still writing is never a hang). A hung
  job is stack-dumped (py-spy, else SIGUSR1 for ``faulthandler``) and killed with every descendant.
  SIGTERM/SIGINT to the supervisor are forwarded to the job's process group as SIGTERM (the signal training
  libraries treat as preemption); the job saves at the next step and exits 0; after ``grace`` seconds the group is
  SIGKILLed (a second SIGINT kills at once). A preempted job is not restarted.
* **After a failure** (non-zero exit or death by a signal) it restarts after an exponential backoff with jitter,
  up to ``max_restarts``. It acts on evidence (:mod:`.crashloop`): when the job crashed ``crash_loop`` times in a
  row right after reporting that it loaded the same checkpoint, before any progress, that checkpoint is
  re-verified and quarantined (renamed, never deleted) and the next start resumes from the previous one. Deaths by
  an outside signal (SIGKILL/SIGTERM without a traceback: the OOM killer, preemption) never count, and a job that
  does not report what it loaded gets "unknown", never a quarantine.

Every start, exit, restart, hang, preemption and quarantine is a line in the event log; the run ends with a summary
(restarts, failures, hangs, lost steps, time in saves and restarts, effective training time ratio), where what the
supervisor cannot know is "unknown" (``null``), not 0.

What the supervisor reads from the job (all optional; a job that provides none is still restarted, watched for
hangs through its output, and summarised with "unknown" where it said nothing):

* the heartbeat file, JSON ``{"time": ..., "step": <completed steps>, "pid": <the beating process>}`` replaced
  atomically (``events.Heartbeat``); its mtime is the liveness signal, ``step`` the progress, ``pid`` the process
  whose stacks are dumped on a hang;
* job events in the log: ``restore`` (``step`` resumed from, 0 when fresh, and ``path``: what it loaded, None when
  fresh; ``restored`` is read the same way), ``save`` (``step``, ``blocking_s``), ``metrics`` and ``step``
  (``step``, ``loss``, ``step_time``; see :mod:`resumekit.report`);
* the end of its stderr: a Python traceback tells a crash from a death by an outside signal.

Supervisor events (``"source": "supervisor"``): ``supervisor_start``, ``hang_detection``, ``warning``,
``precheck_failed``, ``hardware_check``, ``skip_invalid``, ``hide_invalid``, ``repair``, ``config_resolved``,
``start``, ``start_failed``, ``preempt``, ``hang``, ``kill``, ``cleanup``, ``exit``, ``restart``, ``crash_loop``,
``quarantine``, ``give_up``, ``config_restored``, ``summary``.

Where things are:

* :mod:`.decisions`: the rules as pure functions: restart backoff, exit codes, what is a failure, progress, the
  crash-loop rule, the hang verdict;
* :mod:`.summary`: one record per attempt and the end-of-run account;
* :mod:`.options`: :class:`SupervisorOptions`;
* :mod:`.context`: what the parts share: options, where the event log, the heartbeat and stack dumps go;
* :mod:`.prechecks`: the checks before every start;
* :mod:`.crashloop`: the failure streak and the quarantine of a crash-looping checkpoint;
* :mod:`.planning`: everything decided before a start (checkpoint, tracker repair, ``--config``, environment);
* :mod:`.monitor`: starting and watching the job (preemption, hangs, kills, leftovers, the attempt's record);
* :mod:`.output`: passing the job's stdout/stderr through (when it last wrote, the end of its stderr);
* :mod:`.activity`: file activity under the checkpoint directory, and the hang detection mode;
* :mod:`.proctree`: process trees through psutil;
* :mod:`.loop`: :class:`Supervisor`, the restart loop over the planner and the monitor.
"""

from ..units import parse_size
from .crashloop import quarantine
from .decisions import (
    EXIT_PRECHECK,
    exit_code_of,
    is_crash_loop,
    is_failure,
    made_progress,
    next_streak,
    restart_backoff,
)
from .loop import Supervisor
from .options import SupervisorOptions
from .prechecks import PrecheckError, check_directory, check_free_space, check_hardware, check_remote
from .proctree import descendants, pid_alive
from .summary import AttemptRecord, RunSummary, lost_steps_of, summarize

__all__ = [
    "SupervisorOptions",
    "Supervisor",
    "RunSummary",
    "AttemptRecord",
    "PrecheckError",
    "restart_backoff",
    "exit_code_of",
    "is_failure",
    "made_progress",
    "next_streak",
    "is_crash_loop",
    "lost_steps_of",
    "summarize",
    "parse_size",
    "quarantine",
    "check_directory",
    "check_free_space",
    "check_remote",
    "check_hardware",
    "descendants",
    "pid_alive",
    "EXIT_PRECHECK",
]
