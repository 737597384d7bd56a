"""Point a training YAML (LLaMA-Factory, HF ``TrainingArguments``) at the newest valid checkpoint.

LLaMA-Factory reads ``resume_from_checkpoint`` from its YAML and hands it to the HF Trainer, which needs the path of
one ``checkpoint-N`` directory. Recipes often set it to ``output_dir`` itself (``resume_from_checkpoint:
${train_output}``), which the Trainer cannot load, or to the highest ``checkpoint-N``, which may be half-written.
:func:`resolve_config` rewrites the key to the newest checkpoint that validates, or to ``null`` when there is none.

The file is edited surgically: ruamel.yaml's round-trip parser locates the key and its value (and how the value is
quoted), only that value is replaced in the original text, and the result is parsed again to prove that nothing
else changed. So comments, key order, quoting, indentation and spacing stay byte-for-byte as they were (a full
ruamel dump would normalise ``~`` and extra spaces). The write is atomic: temp file, fsync, rename, fsync of the
directory. ruamel.yaml is an optional dependency (``pip install 'resumekit[yaml]'``).

``null`` is not "from scratch" for the frameworks: LLaMA-Factory (``resume_from_checkpoint is None`` and
``overwrite_output_dir`` false) and the HF examples then call ``get_last_checkpoint(output_dir)``, which takes the
highest ``checkpoint-N`` without looking inside. So whenever the directory holds no valid checkpoint, the invalid
ones are first moved into ``output_dir/quarantine/`` (renamed, never deleted; :meth:`Layout.hide_invalid`): after
that the framework's own search finds nothing, and ``null`` does mean a fresh start.

LLaMA-Factory does not expand ``${VAR}`` in its YAML (OmegaConf leaves an unknown interpolation as text), so a
recipe's ``output_dir: ${train_output}`` makes it write into a folder literally named ``${train_output}``.
``expand=True`` (what ``resumekit run --config`` uses) writes expanded paths: the new ``resume_from_checkpoint``
and ``output_dir`` itself, an unset variable being a one-line error naming the key. :func:`restore_config` puts the
user's text back after the run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, ResumekitError
from .layouts import CheckpointInfo, get_layout, resolve_layout
from .storage import open_storage

_PLAIN_SAFE = re.compile(r"[A-Za-z0-9_./~$+=@%,{}-]+")
_PLAIN_BAD_START = set("-?:,[]{}#&*!|>'\"%@`")


class MissingDependencyError(ResumekitError, ImportError):
    """An optional dependency needed for this feature is not installed."""


@dataclass
class ResolveResult:
    """What :func:`resolve_config` found and did.

    Attributes:
        yaml_path: the YAML file.
        key: the key that was (or would be) set.
        old: the key's value before, as a string (None when null or absent).
        new: the value after (None: null, or absent and left absent).
        changed: whether the file's content changed (or would, with ``dry_run``).
        written: whether the file was rewritten.
        checkpoint: the checkpoint chosen, if any.
        skipped: newer checkpoints that were invalid, with their reasons.
        searched: the directories searched for checkpoints.
        key_added: the key was absent and has been added.
        key_present: the key was in the file before.
        dir_old: ``dir_key``'s value as written before (None when absent).
        dir_new: its value after: the expanded path with ``expand``, else unchanged.
        hidden: invalid checkpoints moved out of the framework's sight (``quarantine/``), as dicts.
        original_text: the file's text before the edit (for :func:`restore_config`); None when nothing was read.
        new_text: the file's text after the edit (what was, or would be, written).
    """

    yaml_path: str
    key: str
    old: str | None
    new: str | None
    changed: bool
    written: bool = False
    checkpoint: CheckpointInfo | None = None
    skipped: list[CheckpointInfo] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)
    key_added: bool = False
    key_present: bool = True
    dir_old: str | None = None
    dir_new: str | None = None
    hidden: list[dict[str, Any]] = field(default_factory=list)
    original_text: str | None = field(default=None, repr=False)
    new_text: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "yaml": self.yaml_path,
            "key": self.key,
            "old": self.old,
            "new": self.new,
            "changed": self.changed,
            "written": self.written,
            "key_added": self.key_added,
            "key_present": self.key_present,
            "searched": list(self.searched),
            "checkpoint": self.checkpoint.as_dict() if self.checkpoint else None,
            "skipped": [s.as_dict() for s in self.skipped],
            "dir_old": self.dir_old,
            "dir_new": self.dir_new,
            "hidden": list(self.hidden),
        }


# ruamel's round-trip YAML object and the CommentedMap it loads are typed as Any: ruamel is an optional dependency.
def _yaml() -> Any:
    try:
        from ruamel.yaml import YAML
    except ImportError:
        raise MissingDependencyError(
            "resolving a YAML config needs ruamel.yaml, which is not installed: pip install 'resumekit[yaml]'"
        ) from None
    y = YAML(typ="rt")
    y.preserve_quotes = True
    return y


def resolve_config(
    yaml_path: str,
    key: str = "resume_from_checkpoint",
    dir_key: str = "output_dir",
    layout: str = "hf",
    *,
    checkpoint: str | None = None,
    fresh: bool = False,
    dry_run: bool = False,
    full: bool = True,
    base_dir: str | None = None,
    expand: bool = False,
    hide_invalid: bool = True,
) -> ResolveResult:
    """Set ``key`` in a YAML file to the newest valid checkpoint under the run's directory, or to null.

    Where to look: the directory in ``dir_key`` (``output_dir``), and also the key's current value when that is a
    directory rather than a checkpoint (the recipe that sets ``resume_from_checkpoint`` to ``output_dir``).
    ``$VAR``/``${VAR}`` and ``~`` are expanded and relative paths are taken from ``base_dir`` (default: the
    current directory, as the trainer does). The new value is written in the same form as the directory's value
    (``${train_output}/checkpoint-400`` stays portable). When nothing valid is found but the key already names a
    valid checkpoint elsewhere (fine-tuning on from another run), it is kept; otherwise the key becomes ``null``.
    An absent key is added (right after ``dir_key``) only when a checkpoint is found.

    Args:
        yaml_path: the YAML file to edit.
        key: the top-level key to set.
        dir_key: the top-level key holding the directory the checkpoints are written to.
        layout: the checkpoint layout (``hf`` for LLaMA-Factory / HF Trainer; ``auto`` detects).
        checkpoint: use this checkpoint path instead of searching (the supervisor has already chosen one).
        fresh: set the key to null without searching (a deliberate fresh start).
        dry_run: compute the result without writing.
        full: verify checksums / CRCs (False: sizes and headers only).
        base_dir: the directory relative paths are resolved against.
        expand: write paths the framework can open as they are: ``$VAR``/``${VAR}``/``~`` expanded in the new
            value and in ``dir_key`` (for frameworks that do not expand them, such as LLaMA-Factory).
        hide_invalid: when a searched directory holds no valid checkpoint, move its invalid ones into
            ``quarantine/`` (not with ``dry_run``), so the framework's own search cannot pick one.

    Returns:
        A :class:`ResolveResult`.

    Raises:
        MissingDependencyError: ruamel.yaml is not installed.
        ConfigError: the file is not a YAML mapping, the key holds a non-scalar, or a path uses an unset variable.
        FileNotFoundError: the YAML file does not exist.
    """
    y = _yaml()
    real = os.path.realpath(yaml_path)
    with open(real, encoding="utf-8", newline="") as f:
        text = f.read()
    data = _load(y, text, yaml_path)
    base = base_dir or os.getcwd()

    present = key in data
    old_raw = data.get(key) if present else None
    flag = isinstance(old_raw, bool)
    if flag:
        # HF's `resume_from_checkpoint: true` means "the last checkpoint-N in output_dir", unvalidated: the same
        # search is done here with validation, and the flag is replaced by the path found (or null).
        old_raw = None
    elif old_raw is not None and not isinstance(old_raw, str):
        raise ConfigError(f"{yaml_path}: {key} is a {type(old_raw).__name__}, expected a path or null")
    old = str(old_raw) if old_raw is not None else None
    dir_raw = data.get(dir_key)
    if dir_raw is not None and not isinstance(dir_raw, str):
        raise ConfigError(f"{yaml_path}: {dir_key} is a {type(dir_raw).__name__}, expected a path")

    searched: list[str] = []
    skipped: list[CheckpointInfo] = []
    hidden: list[dict[str, Any]] = []
    best: CheckpointInfo | None = None
    hide = hide_invalid and not dry_run
    if fresh:
        new: str | None = None
    elif checkpoint is not None:
        new = checkpoint
    else:
        best, new = _search(
            old,
            str(dir_raw) if dir_raw else None,
            key,
            dir_key,
            layout,
            yaml_path,
            base,
            full,
            searched,
            skipped,
            hidden if hide else None,
            expand,
        )
    dir_new = str(dir_raw) if dir_raw is not None else None
    if expand and dir_new is not None and _needs_expansion(dir_new):
        dir_new = _expand(dir_new, dir_key, yaml_path, base)
    if expand and new is not None and _needs_expansion(new):
        new = _expand(new, key, yaml_path, base)

    shown_old = str(data.get(key)).lower() if flag else old
    result = ResolveResult(
        yaml_path,
        key,
        shown_old,
        new,
        False,
        checkpoint=best,
        skipped=skipped,
        searched=searched,
        key_present=present,
        dir_old=str(dir_raw) if dir_raw is not None else None,
        dir_new=dir_new,
        hidden=hidden,
        original_text=text,
        new_text=text,
    )
    if new is not None and old is not None and new != old and _same_path(new, old, key, yaml_path, base):
        result.new = new = old  # same checkpoint, spelled differently: leave the file alone
    key_same = (new == old and not flag) or (not present and new is None)
    dir_same = dir_new == result.dir_old
    if key_same and dir_same:
        return result
    result.changed = True
    new_text = text
    if not dir_same:
        new_text = _splice(y, new_text, _load(y, new_text, yaml_path), dir_key, dir_key, dir_new, yaml_path)
    if not key_same:
        result.key_added = not present
        new_text = _splice(y, new_text, _load(y, new_text, yaml_path), key, dir_key, new, yaml_path)
    result.new_text = new_text
    if not dry_run:
        _write_atomic(real, new_text)
        result.written = True
    return result


def restore_config(yaml_path: str, original_text: str, written_text: str) -> bool:
    """Put a YAML back as it was before :func:`resolve_config` rewrote it, unless someone edited it since.

    ``resumekit run --config`` calls it when the run ends, so the user's file keeps their own values (a plain
    ``llamafactory-cli train`` later does not silently resume from this run's checkpoint, and
    ``output_dir: ${train_output}`` stays portable). The file is restored byte for byte, atomically, only when it
    still holds exactly what was written; a file changed by someone else is left alone.

    Args:
        yaml_path: the YAML file.
        original_text: its text before the first rewrite.
        written_text: the text last written.

    Returns:
        True when the file was restored.

    Raises:
        OSError: the file could not be read or written.
    """
    real = os.path.realpath(yaml_path)
    with open(real, encoding="utf-8", newline="") as f:
        current = f.read()
    if current != written_text or current == original_text:
        return False
    _write_atomic(real, original_text)
    return True


def _search(
    old: str | None,
    dir_raw: str | None,
    key: str,
    dir_key: str,
    layout: str,
    where: str,
    base: str,
    full: bool,
    searched: list[str],
    skipped: list[CheckpointInfo],
    hidden: list[dict[str, Any]] | None = None,
    expand: bool = False,
) -> tuple[CheckpointInfo | None, str | None]:
    """The newest valid checkpoint for a config and how to write its path; (None, None) when there is none.

    With ``hidden`` (a list to fill), a directory without any valid checkpoint has its invalid ones moved aside.
    """
    dirs: list[tuple[str, str]] = []  # (as written in the YAML, expanded)
    if dir_raw:
        dirs.append((dir_raw, _expand(dir_raw, dir_key, where, base)))
    old_is_ckpt = False
    if old:
        old_path = _expand(old, key, where, base)
        old_is_ckpt = _as_checkpoint(old_path, layout) is not None
        # The recipe that sets resume_from_checkpoint to the run directory itself: search it too.
        if (
            not old_is_ckpt
            and os.path.isdir(old_path)
            and all(os.path.realpath(old_path) != os.path.realpath(d) for _, d in dirs)
        ):
            dirs.append((old, old_path))
    for written_as, path in dirs:
        searched.append(path)
        if not os.path.isdir(path):
            continue
        st = open_storage(path, create=False)
        lay = resolve_layout(st, layout)
        found, skip = lay.latest(st, full=full)
        skipped.extend(skip)
        if found is not None:
            return found, (path if expand else written_as).rstrip("/") + "/" + found.name
        if hidden is not None and skip:
            hidden.extend(h.as_dict() for h in lay.hide_invalid(st, full=full, found=(None, skip)))
    if old and old_is_ckpt:
        checked = _validate_path(_expand(old, key, where, base), layout, full)
        if checked is not None and checked.valid:
            return checked, old
        if checked is not None:
            skipped.append(checked)
    return None, None


def _load(y: Any, text: str, where: str) -> Any:
    try:
        data = y.load(text)
    except Exception as e:  # noqa: BLE001 - ruamel raises a family of YAMLError subclasses
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if data is None or not hasattr(data, "lc") or not isinstance(data, dict):
        raise ConfigError(f"{where} is not a YAML mapping of options")
    return data


def _needs_expansion(value: str) -> bool:
    return "$" in value or value.startswith("~")


def _expand(value: str, key: str, where: str, base: str) -> str:
    path = os.path.expanduser(os.path.expandvars(value))
    m = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", path)
    if m:
        raise ConfigError(
            f"{where}: {key} is {value!r} but ${m.group(1)} is not set; export it before resolving, "
            "or write the path out"
        )
    return os.path.normpath(os.path.join(base, path))


def _same_path(a: str, b: str, key: str, where: str, base: str) -> bool:
    try:
        return os.path.realpath(_expand(a, key, where, base)) == os.path.realpath(_expand(b, key, where, base))
    except ConfigError:
        return False


def _as_checkpoint(path: str, layout: str) -> CheckpointInfo | None:
    """The checkpoint ``path`` names, when its parent's layout lists it as one; else None."""
    parent, name = os.path.split(path.rstrip("/"))
    if not name or not os.path.isdir(parent):
        return None
    st = open_storage(parent, create=False)
    lay = resolve_layout(st, layout)
    return next((i for i in lay.list(st) if i.name == name), None)


def _validate_path(path: str, layout: str, full: bool) -> CheckpointInfo | None:
    info = _as_checkpoint(path, layout)
    if info is None:
        return None
    st = open_storage(os.path.dirname(path.rstrip("/")), create=False)
    lay = get_layout(info.layout)
    return lay.validate(st, info, full=full)


# --- the surgical edit ------------------------------------------------------------------------------------------


def format_scalar(value: str | None, style: str | None) -> str:
    """YAML text for ``value``: ``null``, or the string quoted like the old value (``'``, ``"``, or plain when safe)."""
    if value is None:
        return "null"
    if style == '"':
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if style == "'" or not _plain_ok(value):
        return "'" + value.replace("'", "''") + "'"
    return value


def _plain_ok(value: str) -> bool:
    if not value or not _PLAIN_SAFE.fullmatch(value) or value[0] in _PLAIN_BAD_START:
        return False
    # Words YAML would read as something other than a string must be quoted.
    if value.lower() in ("null", "~", "true", "false", "yes", "no", "on", "off"):
        return False
    return not re.fullmatch(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?", value)


def _splice(y: Any, text: str, data: Any, key: str, dir_key: str, new: str | None, where: str) -> str:
    lines = text.splitlines(keepends=True)
    eol = "\r\n" if text.endswith("\r\n") or "\r\n" in text[:200] else "\n"
    if key in data:
        line_no, col = data.lc.key(key)
        line = lines[line_no]
        start, end, style = _value_span(line, col)
        value = format_scalar(new, style)
        if line[start - 1] == ":":  # `key:` with nothing after the colon
            value = " " + value
        if start == end and line[end : end + 1] == "#":  # `key:  # comment` (null): keep the comment apart
            value += " "
        lines[line_no] = line[:start] + value + line[end:]
    else:
        if dir_key in data:
            line_no, col = data.lc.key(dir_key)
            at, indent = line_no + 1, " " * col
        else:
            at, indent = len(lines), ""
        if at > 0 and at == len(lines) and lines and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += eol
        lines.insert(at, f"{indent}{key}: {format_scalar(new, None)}{eol}")
    out = "".join(lines)
    # Prove the edit: the new text must parse to the same options with only `key` changed.
    check = _load(y, out, where)
    expected = {k: v for k, v in data.items() if k != key}
    if check.get(key) != new or {k: v for k, v in check.items() if k != key} != expected:
        raise ConfigError(
            f"{where}: cannot edit {key} in place (its value spans several lines?); set it by hand "
            "to a single-line value or null first"
        )
    return out


def _value_span(line: str, key_col: int) -> tuple[int, int, str | None]:
    """(start, end, quote style) of the scalar value on a ``key: value`` line; end excludes comments/EOL."""
    i = key_col
    if line[i] in "'\"":
        q = line[i]
        i += 1
        while i < len(line) and line[i] != q:
            i += 2 if (q == '"' and line[i] == "\\") or (q == "'" and line[i : i + 2] == "''") else 1
        i += 1
    i = line.index(":", i) + 1
    while i < len(line) and line[i] in " \t":
        i += 1
    start = i
    if i < len(line) and line[i] in "'\"":
        q = line[i]
        i += 1
        while i < len(line):
            if q == "'" and line[i : i + 2] == "''":
                i += 2
                continue
            if q == '"' and line[i] == "\\":
                i += 2
                continue
            if line[i] == q:
                return start, i + 1, q
            i += 1
        return start, len(line.rstrip("\r\n")), q  # unterminated on this line: the re-parse check will refuse
    body = line.rstrip("\r\n")
    m = re.search(r"\s#", body[start:])
    end = start + m.start() if m else len(body)
    while end > start and body[end - 1] in " \t":
        end -= 1
    if start < len(body) and body[start] == "#":  # `key:  # comment` (null value): insert before the comment
        end = start
    return start, end, None if start == end or body[start:end] in ("~", "null", "Null", "NULL") else "plain"


def _write_atomic(path: str, text: str) -> None:
    """Replace the YAML atomically, keeping its permission bits."""
    from .storage.local import atomic_write

    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = None
    atomic_write(path, text.encode("utf-8"), mode=mode)
