"""Pre-checks run before every start: a writable checkpoint directory, enough free space, a reachable remote root,
a valid ``--resume`` checkpoint, and accelerators that answer. Each failure is a :class:`PrecheckError` whose
message names the fix, and says whether trying again later may help. Imports no torch: the hardware check runs
torch in a child Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from typing import Any

from ..units import format_bytes, one_line


class PrecheckError(Exception):
    """A pre-check failed. ``retry`` says whether starting again later may help (hardware, network).

    Attributes:
        check: which check failed (``directory``, ``free-space``, ``remote``, ``hardware``, ``checkpoint``,
            ``resume``, ``config``).
        message: one line naming the problem and the fix.
        retry: whether a later start may pass (it then uses up one restart of the budget).
    """

    def __init__(self, check: str, message: str, retry: bool = False):
        self.check = check
        self.message = message
        self.retry = retry
        super().__init__(message)


def check_directory(path: str, create: bool = True) -> None:
    """The checkpoint directory exists or can be created, and a file can be written and removed in it.

    Args:
        path: the local checkpoint root.
        create: make it when missing. With False a missing directory is left for the job to make, and the probe
            goes to its nearest existing parent: Lightning's loggers number their run directories (``version_0``,
            ``version_1``, ...) after the ones that exist, so a ``version_0/checkpoints`` made here would send the
            job to ``version_1``.

    Raises:
        PrecheckError: it cannot be created, is not a directory, or is not writable.
    """
    path = os.path.abspath(os.path.expanduser(path))
    probe_dir = path
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise PrecheckError(
                "directory",
                f"cannot create checkpoint directory {path}: {e.strerror or e}; "
                "choose a writable --dir or fix its permissions",
            ) from None
    else:
        while not os.path.lexists(probe_dir) and os.path.dirname(probe_dir) != probe_dir:
            probe_dir = os.path.dirname(probe_dir)
        if probe_dir != path and not os.path.isdir(probe_dir):
            raise PrecheckError(
                "directory",
                f"cannot create checkpoint directory {path}: {probe_dir} is not a directory; choose another --dir",
            )
    if not os.path.isdir(probe_dir):
        raise PrecheckError("directory", f"checkpoint directory {path} is not a directory; choose another --dir")
    probe = os.path.join(probe_dir, f".resumekit-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        try:
            os.unlink(probe)
        except OSError:
            pass
        raise PrecheckError(
            "directory",
            f"checkpoint directory {path} is not writable ({e.strerror or e}); "
            "choose a writable --dir or fix its permissions",
        ) from None


def check_free_space(where: str, free: int | None, last_size: int, min_free: int | None) -> None:
    """At least twice the last checkpoint's size (a save writes a new one beside it) and ``min_free`` are free.

    Args:
        where: the root, as named in the message.
        free: free bytes there; None when unknown (nothing is checked).
        last_size: size of the newest checkpoint in bytes (0: none).
        min_free: the floor from ``--min-free``.

    Raises:
        PrecheckError: less is free than needed.
    """
    if free is None:
        return
    need = max(2 * last_size, min_free or 0)
    if free < need:
        why = f"2x the last checkpoint, {format_bytes(last_size)}" if 2 * last_size >= (min_free or 0) else "--min-free"
        have_h, need_h = format_bytes(free), format_bytes(need)
        if have_h == need_h:  # rounding would print "2.0 KiB free, need 2.0 KiB"
            have_h, need_h = f"{free} B", f"{need} B"
        raise PrecheckError(
            "free-space",
            f"not enough free space at {where}: {have_h} free, need {need_h} "
            f"({why}); free some space (resumekit gc) or lower --min-free",
        )


def check_remote(uri: str, timeout: float) -> None:
    """The remote root answers a listing within ``timeout`` seconds (through the storage backend).

    The listing runs in a daemon thread so a hung connection cannot hold up the supervisor past ``timeout``.

    Args:
        uri: the remote root, e.g. ``s3://bucket/prefix``.
        timeout: seconds to wait for the answer.

    Raises:
        PrecheckError: no answer in time, a missing backend, or the listing failed; ``retry`` is set for failures
            a later start may not meet (network), not for ones no restart fixes (a missing bucket, credentials).
    """
    result: dict[str, BaseException] = {}

    def probe() -> None:
        try:
            from ..storage import open_storage

            open_storage(uri, create=False).listdir("")
        except BaseException as e:  # noqa: BLE001 - reported to the main thread as a one-line message
            result["error"] = e

    t = threading.Thread(target=probe, name="resumekit-remote-check", daemon=True)
    t.start()
    t.join(timeout)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
    if t.is_alive():
        raise PrecheckError(
            "remote",
            f"cannot reach {uri}: no answer from {endpoint} within {timeout:.0f} s; "
            "check AWS_ENDPOINT_URL and the network",
            retry=True,
        )
    err = result.get("error")
    if err is None:
        return
    if isinstance(err, ImportError):
        raise PrecheckError(
            "remote",
            f"cannot reach {uri}: the remote storage backend is not available "
            f"({one_line(err)}); install it with pip install 'resumekit[s3]'",
        )
    from ..errors import StorageError

    # StorageError: a missing bucket or wrong credentials, which no restart fixes; network trouble may pass.
    retry = not isinstance(err, (StorageError, PermissionError, ValueError, TypeError, KeyError))
    raise PrecheckError(
        "remote",
        f"cannot reach {uri} at {endpoint}: {one_line(err)}; check AWS_ENDPOINT_URL, "
        "the bucket name and the credentials",
        retry=retry,
    )


def check_resume(path: str, layout: str) -> Any:
    """An explicit ``--resume`` checkpoint exists and verifies in full (checksums included).

    Args:
        path: the checkpoint's path or URI.
        layout: the layout to read it with (``auto`` detects).

    Returns:
        The verified checkpoint (its ``path`` and ``step``).

    Raises:
        PrecheckError: it cannot be read or is not valid.
    """
    from ..layouts import resolve_layout
    from ..layouts.base import CheckpointInfo
    from ..storage import open_storage

    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    try:
        st = open_storage(parent or ".", create=False)
        lay = resolve_layout(st, layout)
        found = {i.name: i for i in lay.list(st)}
        info = found.get(name) or CheckpointInfo(step=-1, name=name, path=st.join(name), layout=lay.name)
        checked = lay.validate(st, info, full=True)
    except (OSError, ImportError) as e:
        raise PrecheckError("resume", f"cannot read --resume {path}: {one_line(e)}") from None
    if not checked.valid:
        raise PrecheckError(
            "resume", f"--resume {path} is not a valid checkpoint: {checked.reason}; pass a valid one, or --resume auto"
        )
    return checked


#: Run by ``python -c`` so the supervisor never imports torch: count accelerators and run a tiny kernel on each.
HARDWARE_CHECK = r"""
import json, sys
need = int(sys.argv[1])
import torch
kind, count = "cuda", 0
if torch.cuda.is_available():
    count = torch.cuda.device_count()
else:
    try:
        import torch_npu  # noqa: F401  (Ascend NPUs, e.g. on ModelArts)
        if torch.npu.is_available():
            kind, count = "npu", torch.npu.device_count()
    except Exception:
        pass
out = {"kind": kind, "count": count, "need": need, "bad": []}
if count >= need:
    for i in range(need):
        try:
            x = torch.arange(1024, dtype=torch.float32, device=torch.device(kind, i))
            if float((x * 2).sum().item()) != 1047552.0:  # .item() waits for the kernel
                out["bad"].append([i, "wrong result"])
        except Exception as e:
            out["bad"].append([i, repr(e)[:200]])
print("RESUMEKIT-HW " + json.dumps(out))
sys.exit(0 if count >= need and not out["bad"] else 3)
"""


def check_hardware(gpus: int, timeout: float, python: str | None = None) -> dict[str, Any]:
    """``gpus`` accelerators are visible and each runs a small kernel; checked in a child Python with torch.

    Args:
        gpus: accelerators needed.
        timeout: seconds the check may take (a stuck driver fails it).
        python: the interpreter to check with (default: this one).

    Returns:
        The check's report: ``{"kind": "cuda"|"npu", "count": N, "need": gpus, "bad": []}``.

    Raises:
        PrecheckError: too few devices, a device that cannot run a kernel, no torch, or no answer in time.
    """
    python = python or sys.executable
    try:
        proc = subprocess.run(
            [python, "-c", HARDWARE_CHECK, str(gpus)],
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise PrecheckError(
            "hardware",
            f"hardware check did not finish within {timeout:.0f} s (a stuck driver or device?) for --gpus {gpus}",
            retry=True,
        ) from None
    except OSError as e:
        raise PrecheckError("hardware", f"cannot run the hardware check with {python}: {e}") from None
    report: dict[str, Any] | None = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESUMEKIT-HW "):
            report = json.loads(line[len("RESUMEKIT-HW ") :])
    if report is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "No module named 'torch'" in proc.stderr:
            raise PrecheckError(
                "hardware", f"the --gpus check needs torch importable by {python}; install torch there or drop --gpus"
            )
        raise PrecheckError("hardware", f"hardware check failed for --gpus {gpus}: {tail}", retry=True)
    if report["count"] < gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))
        raise PrecheckError(
            "hardware",
            f"hardware check failed: --gpus {gpus} requested, {report['count']} "
            f"{report['kind']} device(s) visible (visible devices: {visible!r})",
            retry=True,
        )
    if report["bad"]:
        i, why = report["bad"][0]
        raise PrecheckError(
            "hardware", f"hardware check failed: {report['kind']}:{i} cannot run a kernel ({why})", retry=True
        )
    return report


__all__ = [
    "PrecheckError",
    "check_directory",
    "check_free_space",
    "check_remote",
    "check_resume",
    "check_hardware",
    "HARDWARE_CHECK",
]
