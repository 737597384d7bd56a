"""The warm standby's own code: the interpreter that becomes the next attempt (see :mod:`.standby`).

The supervisor does not import this module: it passes its source to the job's own interpreter with ``-c``, so
the job's Python needs nothing installed but what the job itself needs, and only the standard library runs here
before the job. Started as ``PYTHON [the job's flags] -c <this source> SPEC``, where SPEC is one JSON object:

``ctl``/``ready`` (inherited pipe descriptors), ``ppid`` (the supervisor), ``path0`` (the ``sys.path[0]`` a
fresh ``python script.py`` / ``python -m module`` gets), ``argv`` (the job's ``sys.argv``), ``orig_argv``,
``mode`` (``script`` or ``module``), ``target`` (the script's absolute ``__file__`` or the module name) and
``preload`` (module names).

The protocol, every step bounded by the supervisor: import the preload modules (an ``ImportError`` skips one),
write one JSON line ``{"ready": true, ...}`` on ``ready``, block reading one JSON line ``{"env", "cwd"}`` on
``ctl`` (end of file: the supervisor is gone, exit), make the process look like a fresh interpreter (environment,
working directory, signal dispositions and mask, global RNGs, ``sys.argv``, ``sys.path[0]``, a new ``__main__``),
write ``{"started": true}``, close both pipes and run the job as ``python`` itself would.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

#: prctl(2) option: the signal this process gets when its parent dies
_PR_SET_PDEATHSIG = 1
#: largest activation message read (an environment of a few hundred KiB is already unusual)
_MAX_MESSAGE = 64 << 20


def _prctl_pdeathsig(sig: int) -> None:
    # A safety net while importing: a supervisor that dies takes its standby with it (the pipe's end of file covers
    # the wait for activation). Cleared on activation, as a fresh job has none.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _write_line(fd: int, obj: Any) -> None:
    import json

    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def _read_line(fd: int) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(fd, 1 << 16)
        if not chunk or len(buf) > _MAX_MESSAGE:
            os._exit(0)  # the supervisor is gone (or talks nonsense): never run anything
        buf += chunk
    return buf.split(b"\n", 1)[0]


def _trimmed(tb: Any) -> Any:
    # Drop this file's frames, so an uncaught exception's traceback reads as under a fresh interpreter.
    while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
        tb = tb.tb_next
    return tb


def _run_script(target: str, argv0: str) -> None:
    # What `python script.py` does: compile the file and run it in a new __main__ module's namespace.
    import builtins
    import types
    from importlib.machinery import SourceFileLoader

    try:
        with open(target, "rb") as f:
            source = f.read()
    except OSError as e:
        sys.stderr.write(f"{argv0}: can't open file {target!r}: [Errno {e.errno}] {e.strerror}\n")
        raise SystemExit(2) from None
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=target, __cached__=None, __builtins__=builtins)
    main.__loader__ = SourceFileLoader("__main__", target)
    sys.modules["__main__"] = main
    code = compile(source, target, "exec", dont_inherit=True)
    exec(code, main.__dict__)  # noqa: S102 - running the job's script is this module's purpose


def _run_module(name: str) -> None:
    # What `python -m module` does: runpy's own entry point, run in a new __main__ module's namespace.
    import builtins
    import runpy
    import types

    main = types.ModuleType("__main__")
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    as_main = getattr(runpy, "_run_module_as_main", None)
    if as_main is not None:
        as_main(name, alter_argv=True)
    else:  # pragma: no cover - every CPython 3 has it
        runpy.run_module(name, run_name="__main__", alter_sys=True)


def _main() -> None:
    import json

    spec = json.loads(sys.argv[1])
    ctl, ready = int(spec["ctl"]), int(spec["ready"])
    # The dispositions and mask this interpreter started with are a fresh interpreter's (the supervisor starts the
    # standby exactly as it starts a job); a preloaded module may change them, so they are put back on activation.
    sigs = {}
    for s in signal.valid_signals():
        if s in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            sigs[s] = signal.getsignal(s)
        except (OSError, ValueError):
            pass
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    _prctl_pdeathsig(signal.SIGKILL)
    if os.getppid() != int(spec["ppid"]):
        os._exit(0)  # the supervisor died before the safety net was in place
    # Imports resolve as in the job: its sys.path[0] and argv (modules that read them at import time).
    sys.path[0] = spec["path0"]
    sys.argv = list(spec["argv"])
    if spec["mode"] == "module":
        # `python -m pkg.mod` imports the parent packages with argv[0] "-m", then sets it to the module's file
        # before the module (and whatever it imports) runs.
        try:
            import runpy

            sys.argv[0] = runpy._get_module_details(spec["target"])[1].origin  # type: ignore[attr-defined]
        except BaseException:  # noqa: BLE001 - the job's own start reports it
            pass
    t0 = time.monotonic()
    loaded, skipped = [], []
    torch_seed = None
    for name in spec["preload"]:
        try:
            __import__(name)
        except ImportError:
            skipped.append(name)
            continue
        except BaseException as e:  # noqa: BLE001 - any failure means no standby, never a half-imported one
            _write_line(ready, {"ready": False, "error": f"import {name}: {type(e).__name__}: {e}"[:500]})
            os._exit(3)
        loaded.append(name)
        torch_mod = sys.modules.get("torch")
        if torch_seed is None and torch_mod is not None:
            # torch seeds its default CPU generator at random on start-up; this value, re-applied on activation,
            # gives back exactly that fresh state whatever the other imports drew.
            torch_seed = torch_mod.initial_seed()
    _write_line(
        ready, {"ready": True, "import_s": round(time.monotonic() - t0, 4), "loaded": loaded, "skipped": skipped}
    )

    msg = json.loads(_read_line(ctl))
    try:
        os.chdir(msg["cwd"])
    except OSError as e:
        _write_line(ready, {"started": False, "error": f"cannot enter {msg['cwd']}: {e.strerror}"})
        os._exit(3)
    os.environ.clear()
    os.environ.update(msg["env"])
    for s, handler in sigs.items():
        if handler is None:
            continue  # installed outside Python before we started: nothing to put back
        try:
            if signal.getsignal(s) != handler:
                signal.signal(s, handler)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _prctl_pdeathsig(0)
    # Fresh global RNG states: what the imports drew (or seeded) must not show in the job's results.
    rnd = sys.modules.get("random")
    if rnd is not None:
        rnd.seed()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        try:
            np_random.seed()
        except Exception:  # noqa: BLE001 - an exotic numpy: left as imported
            pass
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and torch_seed is not None:
        torch_mod.default_generator.manual_seed(torch_seed)
    sys.argv = list(spec["argv"])
    sys.path[0] = spec["path0"]
    if hasattr(sys, "orig_argv"):
        sys.orig_argv = list(spec["orig_argv"])
    _write_line(ready, {"started": True})
    os.close(ctl)
    os.close(ready)
    del spec["preload"], msg
    try:
        if spec["mode"] == "module":
            _run_module(spec["target"])
        else:
            _run_script(spec["target"], spec["orig_argv"][0])
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # noqa: BLE001 - reported like an uncaught exception: traceback, exit 1
        tb = _trimmed(e.__traceback__)
        e.__traceback__ = tb  # the traceback printed is the exception's own, not the argument, when it has one
        sys.excepthook(type(e), e, tb)
        del e, tb
        raise SystemExit(1) from None


if __name__ == "__main__":
    _main()
