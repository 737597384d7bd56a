"""The ``resumekit`` command line: a thin layer over the library objects.

Exit codes (scripts rely on them): 0 success, 1 nothing found / invalid, 2 usage error, 3 the root's writer lease
is held by another live process (``gc``; ``--force`` takes it from a dead holder). Listing commands take ``--json``;
``latest`` and ``ls`` say (and ``--json`` counts) whether nothing was found or everything found was invalid.
``resumekit run`` exits with the job's status, and with 128+N after it forwarded signal N (SIGINT: 130, SIGTERM:
143) even when the job saved and exited 0 (``--preempt-exit-code`` changes that). Heavy imports (torch) happen
inside the commands that need them, so ``resumekit ls`` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .errors import ResumekitError
from .units import format_bytes

if TYPE_CHECKING:  # for annotations only: the commands import these lazily, to start fast
    from .layouts.base import Layout
    from .storage import Storage

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


def _out(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=None, default=str) if as_json else text)


def _fail(message: str, code: int = EXIT_NOT_FOUND) -> click.exceptions.Exit:
    click.echo(f"resumekit: {message}", err=True)
    return click.exceptions.Exit(code)


def _open(uri: str) -> Storage:
    from .storage import open_storage

    try:
        return open_storage(uri, create=False)
    except ResumekitError as e:
        raise _fail(str(e)) from None


def _layout(storage: Storage, name: str) -> Layout:
    from .layouts import resolve_layout

    try:
        return resolve_layout(storage, name)
    except ResumekitError as e:
        raise click.UsageError(str(e)) from None


layout_option = click.option(
    "--layout",
    default="auto",
    show_default=True,
    help="checkpoint layout: auto, native, hf, llamafactory, megatron, mindspeed, verl, "
    "deepspeed, lightning, torchfiles",
)
json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


class _Group(click.Group):
    """Storage failures that no retry fixes (missing bucket, bad credentials, an unreachable endpoint after the
    retry budget, s3fs not installed) end a command with their one-line message and exit 1, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from .errors import LeaseHeldError, RemoteTransferError, StorageError

        try:
            return super().invoke(ctx)
        except LeaseHeldError as e:
            raise _fail(str(e), EXIT_BUSY) from None
        except (StorageError, RemoteTransferError) as e:
            raise _fail(str(e)) from None
        except ImportError as e:
            if "resumekit[" not in str(e):
                raise
            raise _fail(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resumekit")
@click.option("-v", "--verbose", count=True, help="log more (-vv for debug)")
def main(verbose: int) -> None:
    """Crash-safe checkpoints, exact resume and a restart supervisor for PyTorch training."""
    import logging

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="resumekit: %(message)s")


@main.command("ls")
@click.argument("uri")
@layout_option
@click.option("--full", is_flag=True, help="verify checksums too (default: manifest and sizes)")
@json_option
def ls_cmd(uri: str, layout: str, full: bool, as_json: bool) -> None:
    """List every checkpoint under URI: step, layout, valid or why not, size, time."""
    from .layouts import order_by_step

    st = _open(uri)
    lay = _layout(st, layout)
    infos = [lay.validate(st, i, full=full) for i in order_by_step(lay.list(st))]
    if as_json:
        _out([i.as_dict() for i in infos], True, "")
    else:
        if not infos:
            click.echo(f"no checkpoints under {st.uri} (layout {lay.name})")
        for i in infos:
            status = "valid" if i.valid else f"INVALID: {i.reason}"
            size = format_bytes(i.size or None, sep="", missing="-")  # an empty size reads "-", like an unknown one
            click.echo(f"{i.step:>12}  {lay.name:<10} {size:>10}  {i.path}  {status}")
        if st.is_local:
            # A tiered run's local tier: how far its remote is behind, as the uploader's newest event says.
            from .storage.uploader import describe_lag, upload_status

            up = upload_status(st.local_path() or uri)
            if up is not None:
                click.echo(describe_lag(up))
    if not any(i.valid for i in infos):
        raise SystemExit(EXIT_NOT_FOUND)


@main.command("latest")
@click.argument("uri")
@layout_option
@click.option("--quick", is_flag=True, help="check sizes only, not checksums")
@json_option
def latest_cmd(uri: str, layout: str, quick: bool, as_json: bool) -> None:
    """Print the path of the newest valid checkpoint under URI (exit 1 if none)."""
    st = _open(uri)
    lay = _layout(st, layout)
    best, skipped = lay.latest(st, full=not quick)
    for s in skipped:
        click.echo(f"resumekit: skipped {s.path}: {s.reason}", err=True)
    if as_json:
        _out({"latest": best.as_dict() if best else None, "skipped": [s.as_dict() for s in skipped]}, True, "")
    elif best:
        click.echo(best.path)
    if best is None:
        if not as_json:
            found = f"{len(skipped)} found, all invalid" if skipped else "none found"
            click.echo(f"resumekit: no valid checkpoint under {st.uri} (layout {lay.name}): {found}", err=True)
        raise SystemExit(EXIT_NOT_FOUND)


@main.command("verify")
@click.argument("path")
@layout_option
@click.option("--quick", is_flag=True, help="check sizes only, not checksums")
@json_option
def verify_cmd(path: str, layout: str, quick: bool, as_json: bool) -> None:
    """Fully verify one checkpoint; exit 0 if valid, 1 with the reason if not."""
    from .layouts.base import CheckpointInfo
    from .storage import open_storage

    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    st = open_storage(parent or ".", create=False)
    lay = _layout(st, layout)
    cands = {i.name: i for i in lay.list(st)}
    info = cands.get(name) or CheckpointInfo(step=-1, name=name, path=st.join(name), layout=lay.name)
    checked = lay.validate(st, info, full=not quick)
    if as_json:
        _out(checked.as_dict(), True, "")
    else:
        click.echo(
            f"{checked.path}: valid (step {checked.step})"
            if checked.valid
            else f"{checked.path}: INVALID: {checked.reason}"
        )
    if not checked.valid:
        raise SystemExit(EXIT_NOT_FOUND)


@main.command("repair")
@click.argument("uri")
@layout_option
@click.option("--quick", is_flag=True, help="check sizes only, not checksums")
@click.option("--dry-run", is_flag=True, help="say what would change, change nothing")
@json_option
def repair_cmd(uri: str, layout: str, quick: bool, dry_run: bool, as_json: bool) -> None:
    """Point the layout's tracker (latest_checkpointed_iteration.txt, latest) at the newest valid checkpoint.

    The old content is kept in TRACKER.bak. Exit 0 when the tracker is (now) right or the layout keeps none,
    1 when there is no valid checkpoint to point at.
    """
    st = _open(uri)
    lay = _layout(st, layout)
    try:
        res = lay.repair(st, full=not quick, dry_run=dry_run)
    except ResumekitError as e:
        raise _fail(str(e)) from None
    if res is None:
        _out(
            {"layout": lay.name, "tracker": None, "changed": False, "dry_run": dry_run},
            as_json,
            f"layout {lay.name} keeps no tracker: nothing to repair",
        )
        return
    data = {
        "layout": lay.name,
        "tracker": st.join(res.tracker),
        "old": res.old,
        "new": res.new,
        "changed": res.changed,
        "backup": st.join(res.backup) if res.backup else None,
        "dry_run": dry_run,
        "message": res.message,
    }
    _out(data, as_json, res.message)
    if res.new is None:
        raise SystemExit(EXIT_NOT_FOUND)


@main.command("resolve")
@click.argument("yaml_path", metavar="YAML", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", default="resume_from_checkpoint", show_default=True, help="the key to set")
@click.option("--dir-key", default="output_dir", show_default=True, help="the key naming the checkpoint directory")
@click.option("--layout", default="hf", show_default=True, help="checkpoint layout of that directory (auto detects)")
@click.option("--quick", is_flag=True, help="check sizes only, not checksums")
@click.option("--dry-run", is_flag=True, help="say what would change, write nothing")
@json_option
def resolve_cmd(yaml_path: str, key: str, dir_key: str, layout: str, quick: bool, dry_run: bool, as_json: bool) -> None:
    """Set KEY in a LLaMA-Factory / HF YAML to the newest valid checkpoint (or null); comments kept, atomic write.

    Exit 0 when a valid checkpoint was found, 1 when there is none (KEY is then null), 2 on a bad file or option.
    """
    try:
        from .yamlconfig import resolve_config

        res = resolve_config(yaml_path, key=key, dir_key=dir_key, layout=layout, dry_run=dry_run, full=not quick)
    except ImportError as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except ResumekitError as e:
        raise click.UsageError(str(e)) from None
    for s in res.skipped:
        click.echo(f"resumekit: skipped {s.path}: {s.reason}", err=True)
    if res.changed:
        verb = "would set" if dry_run else ("added" if res.key_added else "set")
        text = f"{yaml_path}: {verb} {key}: {res.new if res.new is not None else 'null'} (was {res.old or 'null'})"
    elif res.new is not None:
        text = f"{yaml_path}: {key} already {res.new}"
    else:
        where = ", ".join(res.searched) or f"(no {dir_key} set)"
        text = f"{yaml_path}: no valid checkpoint under {where}; {key} left {'null' if res.key_present else 'unset'}"
    _out({**res.as_dict(), "dry_run": dry_run}, as_json, text)
    if res.new is None:
        raise SystemExit(EXIT_NOT_FOUND)


@main.command("gc")
@click.argument("uri")
@click.option("--keep-last", type=click.IntRange(min=1), default=None, help="keep the newest N valid checkpoints")
@click.option("--keep-every", type=click.IntRange(min=1), default=None, help="also keep every step divisible by K")
@click.option(
    "--tmp-age",
    type=float,
    default=600.0,
    show_default=True,
    help="remove in-progress (.tmp-) directories older than this many seconds",
)
@click.option("--dry-run", is_flag=True, help="print what would be removed")
@click.option("--force", is_flag=True, help="take the writer lease even from a holder that looks alive (it is dead)")
@json_option
def gc_cmd(
    uri: str,
    keep_last: int | None,
    keep_every: int | None,
    tmp_age: float,
    dry_run: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Apply retention and remove stale tmp directories; never removes the newest valid checkpoint.

    Deleting makes gc a writer: it takes the root's writer lease and exits 3 naming the holder when a live job
    writes there (``--dry-run`` only reads and needs no lease).
    """
    from .gc import collect_garbage
    from .policy import RetentionPolicy
    from .storage.lease import acquire_lease

    st = _open(uri)
    policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
    lease = None if dry_run else acquire_lease(st, takeover=force, purpose="resumekit gc")
    try:
        result = collect_garbage(st, policy, tmp_age=tmp_age, dry_run=dry_run)
    finally:
        if lease is not None:
            lease.release()
    verb = "would remove" if dry_run else "removed"
    text = "\n".join(
        [f"{verb} {p}" for p in result["removed"]]
        + [f"kept {p}" for p in result["kept"]]
        # Incomplete multipart uploads are invisible to `ls` but hold space: every one is named with its age.
        + [
            f"incomplete upload {u['uri']}, age "
            + ("unknown" if u["age_s"] is None else f"{u['age_s'] / 3600:.1f} h")
            + f": {u['action']}"
            for u in result.get("uploads", [])
        ]
    )
    _out(result, as_json, text or "nothing to do")


@main.command("demo")
@click.option("--dir", "directory", default="demo-run", show_default=True, help="where the demo writes")
@click.option("--crashes", type=click.IntRange(min=0), default=6, show_default=True, help="SIGKILLs to inject")
@click.option("--steps", type=click.IntRange(min=10), default=300, show_default=True, help="training steps")
@click.option("--seed", type=int, default=None, help="seed of the kill schedule (default: random)")
@click.option(
    "--nproc", type=click.IntRange(min=1), default=1, show_default=True, help="processes (torchrun; per node)"
)
@click.option(
    "--nnodes",
    type=click.IntRange(min=1, max=8),
    default=1,
    show_default=True,
    help="torchrun nodes on this machine (c10d on 127.0.0.1), each under its own `resumekit run`; the kills "
    "then take whole nodes",
)
@click.option(
    "--root",
    default=None,
    metavar="URI",
    help="with --nnodes: the nodes' shared checkpoint root, a directory or s3://bucket/prefix (obs:// alike, "
    "configured by the standard AWS variables; each node then has a local tier of its own); the runs write under "
    "URI/straight and URI/crashy, emptied first (default: --dir)",
)
@click.option(
    "--node-tiers",
    is_flag=True,
    default=False,
    help="with --nnodes: a local tier directory per node (DIR/crashy-nodes/node<i>/tier); implied by an "
    "object-store --root",
)
@click.option(
    "--save-every", type=click.IntRange(min=1), default=20, show_default=True, help="the job's checkpoint interval"
)
@json_option
def demo_cmd(
    directory: str,
    crashes: int,
    steps: int,
    seed: int | None,
    nproc: int,
    nnodes: int,
    root: str | None,
    node_tiers: bool,
    save_every: int,
    as_json: bool,
) -> None:
    """Train straight, then again under random SIGKILLs; exit 0 only if both end bitwise identical."""
    from .demo import run_demo

    code = run_demo(
        directory,
        crashes=crashes,
        steps=steps,
        seed=seed,
        nproc=nproc,
        nnodes=nnodes,
        save_every=save_every,
        as_json=as_json,
        root=root,
        node_tiers=node_tiers,
    )
    raise SystemExit(code)


# Not ParamType[int]: a base class is evaluated at run time, and ParamType is not subscriptable in older click 8.
class _SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        from .units import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ResumekitError as e:
            self.fail(str(e), param, ctx)


@main.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--dir",
    "directory",
    default=None,
    metavar="URI",
    help="checkpoint root (path or s3://bucket/prefix; default: --config's output_dir); needed for "
    "resume and storage checks",
)
@layout_option
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    default=None,
    help="LLaMA-Factory/HF YAML whose resume_from_checkpoint is set before every start",
)
@click.option(
    "--resume",
    default="auto",
    show_default=True,
    metavar="auto|never|PATH",
    help="newest valid checkpoint, always fresh, or this checkpoint for the first start",
)
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    metavar="N",
    help="restarts allowed (retried pre-checks count too)",
)
@click.option(
    "--hang-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="S",
    help="kill and restart a job whose heartbeat is older than S seconds or, for a job that does not beat it, "
    "that wrote no output for S seconds; never while files under --dir grow (a save) (default: off)",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="S",
    help="seconds a preempted job gets to save and exit before SIGKILL",
)
@click.option(
    "--gpus",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="require N visible accelerators that run a test kernel before each start",
)
@click.option(
    "--crash-loop",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    metavar="K",
    help="quarantine the checkpoint after K crashes in a row right after the job reported loading it, without "
    "progress (kills from outside never count)",
)
@click.option(
    "--backoff",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="S",
    help="delay before the first restart; doubles each restart, with jitter",
)
@click.option(
    "--backoff-max",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="S",
    help="largest restart delay",
)
@click.option(
    "--reset-after",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    metavar="S",
    help="an attempt that made progress and ran this long resets the backoff and the restart budget",
)
@click.option(
    "--preempt-exit-code",
    type=click.IntRange(0, 255),
    default=None,
    metavar="N",
    help="exit status after a forwarded SIGTERM/SIGINT the job saved and stopped on (default: 128+signal, "
    "130 for SIGINT, 143 for SIGTERM)",
)
@click.option(
    "--force",
    is_flag=True,
    help="let the first start take the checkpoint root's writer lease from a holder that looks alive (it is dead)",
)
@click.option(
    "--min-free",
    type=_SizeType(),
    default=None,
    help="free space required at the checkpoint root (bytes, or 500M, 10GiB, ...)",
)
@click.option(
    "--events",
    default=None,
    metavar="PATH",
    help="event log (default: URI/events.jsonl for local roots, the --local-tier for remote ones)",
)
@click.option(
    "--local-tier",
    default=None,
    metavar="PATH",
    help="fast local directory in front of --dir: the newest checkpoint of either tier is chosen and a "
    "newer remote one downloaded into it before each start (exported as RESUMEKIT_LOCAL_TIER)",
)
@click.option(
    "--warm/--no-warm",
    default=True,
    show_default=True,
    help="keep a standby interpreter with torch, numpy and resumekit imported that becomes the next attempt at "
    "once (python script.py / python -m module / Python console scripts such as torchrun; others start cold)",
)
@click.option(
    "--preload",
    multiple=True,
    metavar="MOD",
    help="another module for the standby to import ahead, e.g. transformers (repeatable; skipped if missing)",
)
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_cmd(
    directory: str | None,
    layout: str,
    config: str | None,
    resume: str,
    max_restarts: int,
    hang_timeout: float | None,
    grace: float,
    gpus: int,
    crash_loop: int,
    backoff: float,
    backoff_max: float,
    reset_after: float,
    preempt_exit_code: int | None,
    force: bool,
    min_free: int | None,
    events: str | None,
    local_tier: str | None,
    warm: bool,
    preload: tuple[str, ...],
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND and bring it back by itself: resume hand-off, restarts, hang and crash-loop handling.

    Example: resumekit run --dir ckpt --hang-timeout 600 -- python train.py --lr 3e-4
    """
    from .supervisor import Supervisor, SupervisorOptions

    try:
        opts = SupervisorOptions(
            command=list(command),
            directory=directory,
            layout=layout,
            config=config,
            resume=resume,
            max_restarts=max_restarts,
            hang_timeout=hang_timeout,
            grace=grace,
            gpus=gpus,
            crash_loop=crash_loop,
            backoff=backoff,
            backoff_max=max(backoff_max, backoff),
            reset_after=reset_after,
            preempt_exit_code=preempt_exit_code,
            force=force,
            min_free=min_free,
            events=events,
            local_tier=local_tier,
            warm=warm,
            preload=list(preload),
        )
    except ResumekitError as e:
        raise click.UsageError(str(e)) from None
    sup = Supervisor(opts)
    code = sup.run()
    if as_json and sup.summary is not None:
        click.echo(json.dumps(sup.summary.as_dict()))
    raise SystemExit(code)


@main.command("report")
@click.argument("uri")
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="FILE.png",
    help="where to write the plot (default: URI/report.png for local roots, else ./report.png)",
)
@click.option("--events", default=None, metavar="PATH", help="event log (default: URI/events.jsonl)")
@json_option
def report_cmd(uri: str, output: str | None, events: str | None, as_json: bool) -> None:
    """Plot loss and step time against step, with restart and hang markers, from the event log."""
    import os

    from .events import EVENTS_FILE
    from .report import load_run, plot_report
    from .storage import is_remote

    local = None if is_remote(uri) else (uri[len("file://") :] if uri.startswith("file://") else uri)
    if events is None:
        if local is None:
            raise click.UsageError(f"{uri} is remote: pass --events PATH (the log resumekit run wrote)")
        events = os.path.join(local, EVENTS_FILE)
    if not os.path.isfile(events):
        raise _fail(f"no event log at {events}; pass --events PATH or run the job under `resumekit run`")
    if output is None:
        output = os.path.join(local, "report.png") if local else "report.png"
    try:
        path = plot_report(events, output)
    except ImportError as e:
        raise _fail(str(e)) from None
    run = load_run(events)
    empty = run.empty_reason()
    _out(
        {"output": path, **run.stats(), "empty_reason": empty},
        as_json,
        f"wrote {path}" + (f" (the loss plot is empty: {empty})" if empty else ""),
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
