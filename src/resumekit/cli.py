"""The ``resumekit`` command line: a thin layer over the library objects.

Exit codes (scripts rely on them): 0 success, 1 nothing found / invalid, 2 usage error. Listing commands take
``--json``. Heavy imports (torch) happen inside the commands that need them, so ``resumekit ls`` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import click

from . import __version__
from .errors import ResumekitError

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE = 0, 1, 2


def _out(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=None, default=str) if as_json else text)


def _human_size(n: Optional[int]) -> str:
    if not n:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return str(n)


def _fail(message: str, code: int = EXIT_NOT_FOUND) -> "click.exceptions.Exit":
    click.echo(f"resumekit: {message}", err=True)
    return click.exceptions.Exit(code)


def _open(uri: str):
    from .storage import open_storage

    try:
        return open_storage(uri, create=False)
    except ResumekitError as e:
        raise _fail(str(e)) from None


def _layout(storage, name: str):
    from .layouts import resolve_layout

    try:
        return resolve_layout(storage, name)
    except ResumekitError as e:
        raise click.UsageError(str(e)) from None


layout_option = click.option("--layout", default="auto", show_default=True,
                             help="checkpoint layout: auto, native, hf, llamafactory, megatron, mindspeed, verl, "
                                  "deepspeed, lightning, torchfiles")
json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
            click.echo(f"{i.step:>12}  {lay.name:<10} {_human_size(i.size):>10}  {i.path}  {status}")
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
            click.echo(f"resumekit: no valid checkpoint under {st.uri} (layout {lay.name})", err=True)
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
        click.echo(f"{checked.path}: valid (step {checked.step})" if checked.valid
                   else f"{checked.path}: INVALID: {checked.reason}")
    if not checked.valid:
        raise SystemExit(EXIT_NOT_FOUND)


@main.command("gc")
@click.argument("uri")
@click.option("--keep-last", type=click.IntRange(min=1), default=None, help="keep the newest N valid checkpoints")
@click.option("--keep-every", type=click.IntRange(min=1), default=None, help="also keep every step divisible by K")
@click.option("--tmp-age", type=float, default=600.0, show_default=True,
              help="remove in-progress (.tmp-) directories older than this many seconds")
@click.option("--dry-run", is_flag=True, help="print what would be removed")
@json_option
def gc_cmd(uri: str, keep_last: Optional[int], keep_every: Optional[int], tmp_age: float, dry_run: bool,
           as_json: bool) -> None:
    """Apply retention and remove stale tmp directories; never removes the newest valid checkpoint."""
    from .gc import collect_garbage
    from .policy import RetentionPolicy

    st = _open(uri)
    policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
    result = collect_garbage(st, policy, tmp_age=tmp_age, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    text = "\n".join([f"{verb} {p}" for p in result["removed"]] + [f"kept {p}" for p in result["kept"]])
    _out(result, as_json, text or "nothing to do")


@main.command("demo")
@click.option("--dir", "directory", default="demo-run", show_default=True, help="where the demo writes")
@click.option("--crashes", type=click.IntRange(min=0), default=6, show_default=True, help="SIGKILLs to inject")
@click.option("--steps", type=click.IntRange(min=10), default=300, show_default=True, help="training steps")
@click.option("--seed", type=int, default=None, help="seed of the kill schedule (default: random)")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True, help="processes (torchrun)")
@json_option
def demo_cmd(directory: str, crashes: int, steps: int, seed: Optional[int], nproc: int, as_json: bool) -> None:
    """Train straight, then again under random SIGKILLs; exit 0 only if both end bitwise identical."""
    from .demo import run_demo

    code = run_demo(directory, crashes=crashes, steps=steps, seed=seed, nproc=nproc, as_json=as_json)
    raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
