"""The verified token: the supervisor's proof that it hashed a local checkpoint, handed to the job so the job's
restore does not hash the same bytes again.

Before each start ``resumekit run`` verifies the newest checkpoint in full (every file's xxh3 against the
manifest). It then sets ``RESUMEKIT_VERIFIED`` to a small JSON token: the checkpoint directory (real path), the
SHA-256 of the exact manifest bytes it verified against, and for every listed file the identity it had while it
was hashed, taken with ``fstat`` on the descriptor that was read (size, device, inode, ``mtime_ns``,
``ctime_ns``). The job's restore (:func:`resumekit.checkpointers.native.read_checkpoint`) skips hashing a file
only when the token is for this directory and these manifest bytes and ``fstat`` of the descriptor it reads from
gives the same identity; every other check (sizes, caps, headers, the tree check, decode validation) still runs.
A checkpoint the supervisor pre-downloaded into the local tier is covered too: the download hashed every byte it
wrote, and the identity is that of the written file (:func:`resumekit.storage.transfer.copy_step`). Anything
else (no token, a malformed or oversized one, another checkpoint, another manifest, a changed file) means hashing
while reading, as without a supervisor.

What the identity cannot see: a change that keeps size, inode, ``mtime_ns`` and ``ctime_ns``. Every write through
the file system sets ``ctime`` to the current time and no call sets it back, so that takes a write within the same
timestamp tick as the file's last change; a file is vouched for only when its last change was at least
:data:`SETTLE_NS` before the read began, or when it still has its identity after that margin (the supervisor waits
out the rest, at most 20 ms; on file systems with whole-second timestamps it never waits, and such a recent file
gets no token). Damage below the file system (a disk returning other bytes than were written, without an I/O
error) is not seen either; the job's own pass over the page cache would not see it for pages already cached.
Foreign layouts are not affected: the supervisor verifies them in full, and the token only names resumekit's
native format. Sharded (torchrun) restores honour the token too, in the pass where every rank verifies the
files it will read (:class:`Vouch`): a file the token vouches for (the shared directory's step, or the node tier's
pre-downloaded copy) is not hashed again there.

The same identity rule lets a sharded restore that just downloaded a step into its node tier (verified while
streaming) skip hashing those bytes again: :class:`Vouch` takes the download's own records ("fresh": the identity
of each file right after its last write), waits out the settle margin once (:func:`settle_fresh`) and vouches for
a file only when ``fstat`` of the descriptor it opens still gives that identity.

Imports no torch and nothing above storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..verify import FileIdentity, Hashed, Readable, check_checkpoint_raw, fd_identity

#: the environment variable that carries the token from ``resumekit run`` to the job
ENV_VERIFIED = "RESUMEKIT_VERIFIED"
#: tokens are small (a native checkpoint lists 2 files); a longer value is ignored, never parsed
MAX_TOKEN_BYTES = 64 << 10
#: at most this many files per token (the bound that keeps :data:`MAX_TOKEN_BYTES`)
MAX_TOKEN_FILES = 512
#: a file whose last change is closer than this to the start of its hashing is not vouched for as it stands: a
#: write in the same timestamp tick could have left ``ctime`` unchanged. File timestamps come from the kernel's
#: coarse clock, which ticks every 1-10 ms (HZ 1000-100): two ticks of the slowest. :func:`issue_token` waits out
#: the rest of this margin (at most this long) and checks the identity again.
SETTLE_NS = 20_000_000
#: the same on file systems that store whole seconds (FAT, some NFS servers)
SETTLE_COARSE_NS = 2_000_000_000
_VERSION = 1


def manifest_digest(raw: bytes) -> str:
    """What a token is bound to: the SHA-256 of the manifest's exact bytes."""
    return hashlib.sha256(raw).hexdigest()


def _coarse(identity: FileIdentity) -> bool:
    # Whole seconds in both stamps: a file system (or server) that keeps no finer time.
    return identity.mtime_ns % 1_000_000_000 == 0 and identity.ctime_ns % 1_000_000_000 == 0


def settled(identity: FileIdentity, started_ns: int) -> bool:
    """Whether the file's last change lies safely before ``started_ns`` (see :data:`SETTLE_NS`)."""
    last = max(identity.mtime_ns, identity.ctime_ns)
    return last < started_ns - (SETTLE_COARSE_NS if _coarse(identity) else SETTLE_NS)


@dataclass(frozen=True)
class VerifiedToken:
    """Evidence that every file of one local checkpoint hashed to its manifest's checksum while it had a given
    identity.

    Attributes:
        path: the checkpoint directory, resolved (``os.path.realpath``).
        manifest_sha256: :func:`manifest_digest` of the manifest the files were checked against.
        files: manifest-relative name -> identity while hashed.
        verified_at: epoch seconds of the verification (for messages and events).
    """

    path: str
    manifest_sha256: str
    files: Mapping[str, FileIdentity]
    verified_at: float

    def to_env(self) -> str | None:
        """The token as the environment value; None when it would exceed :data:`MAX_TOKEN_BYTES`."""
        text = json.dumps(
            {
                "v": _VERSION,
                "path": self.path,
                "manifest_sha256": self.manifest_sha256,
                "files": {rel: list(ident) for rel, ident in sorted(self.files.items())},
                "verified_at": round(self.verified_at, 3),
            },
            separators=(",", ":"),
        )
        return text if len(text.encode()) <= MAX_TOKEN_BYTES and len(self.files) <= MAX_TOKEN_FILES else None

    @classmethod
    def from_env(cls, text: str | None) -> VerifiedToken | None:
        """Parse an environment value; None for anything that is not exactly a token of this version (it is
        untrusted input: size-capped before parsing, every field type-checked)."""
        if not text or len(text) > MAX_TOKEN_BYTES:
            return None
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(doc, dict) or doc.get("v") != _VERSION:
            return None
        path, digest, files, at = doc.get("path"), doc.get("manifest_sha256"), doc.get("files"), doc.get("verified_at")
        if (
            not isinstance(path, str)
            or not os.path.isabs(path)
            or not isinstance(digest, str)
            or len(digest) != 64
            or not isinstance(files, dict)
            or len(files) > MAX_TOKEN_FILES
            or not isinstance(at, (int, float))
            or isinstance(at, bool)
        ):
            return None
        idents: dict[str, FileIdentity] = {}
        for rel, v in files.items():
            if not isinstance(v, list) or len(v) != 5 or not all(type(x) is int and x >= 0 for x in v):
                return None
            idents[rel] = FileIdentity(*v)
        return cls(path, digest, idents, float(at))

    def matches(self, directory: str, raw_manifest: bytes) -> bool:
        """Whether the token is for checkpoint ``directory`` with exactly these manifest bytes."""
        return os.path.realpath(directory) == self.path and manifest_digest(raw_manifest) == self.manifest_sha256

    def vouches(self, rel: str, f: Any, size: int) -> bool:
        """Whether the open file ``f`` (checkpoint file ``rel``, listed with ``size`` bytes) is the very file the
        supervisor hashed: the same identity, from ``fstat`` of ``f``'s own descriptor."""
        ident = self.files.get(rel)
        return ident is not None and ident.size == size and fd_identity(f) == ident


def issue_token(
    storage: Readable, name: str, hashed: Mapping[str, Hashed], now: float | None = None, *, wait: bool = True
) -> str | None:
    """The token for local checkpoint ``name`` after a full verification recorded in ``hashed`` (see
    :func:`resumekit.verify.record_hashed`), as the environment value; None unless every listed file was hashed
    and matched this manifest's checksum and size.

    The manifest is read again here, so the token names the manifest the recorded digests match now; a checkpoint
    replaced since its verification gets no token. A file changed within :data:`SETTLE_NS` of its hashing (a save
    just before the job was killed, or a download just written) is vouched for only after that margin has passed
    and ``fstat`` of the file shows the same identity (``wait``: at most about :data:`SETTLE_NS` of sleep; files
    with whole-second timestamps are never waited for).
    """
    local = getattr(storage, "local_path", lambda _rel: None)(name)
    if not local:
        return None
    try:
        raw, man = check_checkpoint_raw(storage, name, full=False)
    except (OSError, ValueError):  # CorruptCheckpointError is a ValueError
        return None
    files: dict[str, FileIdentity] = {}
    unsettled: list[str] = []
    for rel, ent in man.files.items():
        rec = hashed.get(storage.join(f"{name}/{rel}"))
        if rec is None or rec.digest != ent.xxh3 or rec.identity.size != ent.size:
            return None
        if not settled(rec.identity, rec.started_ns):
            unsettled.append(rel)
        files[rel] = rec.identity
    if unsettled and not _settle(storage, name, {rel: files[rel] for rel in unsettled}, wait):
        return None
    token = VerifiedToken(os.path.realpath(local), manifest_digest(raw), files, time.time() if now is None else now)
    return token.to_env()


def _settle(storage: Readable, name: str, files: Mapping[str, FileIdentity], wait: bool) -> bool:
    """Wait out the settle margin of recently changed files, then check that each still has its identity."""
    if not wait or any(_coarse(i) for i in files.values()):
        return False  # a whole-second file system: waiting would take seconds
    last = max(max(i.mtime_ns, i.ctime_ns) for i in files.values())
    delay = (last + SETTLE_NS + 1_000_000 - time.time_ns()) / 1e9
    if delay > 2 * SETTLE_NS / 1e9:
        return False  # a timestamp in the future (another clock): not ours to wait for
    if delay > 0:
        time.sleep(delay)
    started = time.time_ns()
    for rel, ident in files.items():
        try:
            with storage.open_read(f"{name}/{rel}") as f:
                if fd_identity(f) != ident:
                    return False
        except OSError:
            return False
        if not settled(ident, started):
            return False
    return True


def settle_fresh(fresh: Mapping[str, Hashed]) -> dict[str, Hashed]:
    """The records of files this process just wrote and hashed (a verified download) that may vouch for them: the
    settle margin after their last change is waited out once (at most about :data:`SETTLE_NS`), so a later write
    would show in ``ctime``. Records on a whole-second file system, or stamped in the future (another clock: not
    ours to wait for), are dropped, and only their files are hashed again."""
    now = time.time_ns()
    ok = {
        rel: rec
        for rel, rec in fresh.items()
        if not _coarse(rec.identity) and max(rec.identity.mtime_ns, rec.identity.ctime_ns) <= now + SETTLE_NS
    }
    if not ok:
        return {}
    last = max(max(r.identity.mtime_ns, r.identity.ctime_ns) for r in ok.values())
    delay = (last + SETTLE_NS + 1_000_000 - time.time_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)  # at most 2 x SETTLE_NS + 1 ms: every kept stamp is at most SETTLE_NS ahead of `now`
    return ok


class Vouch:
    """What lets a restore skip hashing a local file it verifies: the supervisor's token for this very checkpoint
    and manifest, or this process's own verified download of the file (see the module docstring). Every other
    check (sizes, the manifest, parsing) still runs.

    Args:
        directory: the checkpoint directory being verified (a local path), or None (nothing is vouched for).
        raw: the exact manifest bytes it is verified against.
        files: that manifest's file table (a later read against another manifest's entries is never vouched for).
        token: the supervisor's token (default: ``RESUMEKIT_VERIFIED``).
        fresh: manifest-relative name -> record of a file this process just wrote into ``directory`` after checking
            its bytes (settled here, :func:`settle_fresh`).
    """

    def __init__(
        self,
        directory: str | None,
        raw: bytes,
        files: Mapping[str, Any],
        token: VerifiedToken | None = None,
        fresh: Mapping[str, Hashed] | None = None,
    ):
        self.listed = {rel: (ent.size, ent.xxh3) for rel, ent in files.items()}
        token = token if token is not None else token_from_env()
        self.token = token if token is not None and directory is not None and token.matches(directory, raw) else None
        self.fresh = settle_fresh(fresh) if fresh and directory is not None else {}

    def covers(self, rel: str, f: Any, ent: Any) -> bool:
        """Whether the open file ``f`` (``rel``, listed as ``ent``: size and xxh3) need not be hashed: ``fstat`` of its
        own descriptor gives the identity it had when its bytes were checked against this manifest's checksum."""
        if self.listed.get(rel) != (ent.size, ent.xxh3):
            return False
        if self.token is not None and self.token.vouches(rel, f, ent.size):
            return True
        rec = self.fresh.get(rel)
        if rec is None or rec.digest != ent.xxh3 or rec.identity.size != ent.size:
            return False
        return fd_identity(f) == rec.identity and settled(rec.identity, time.time_ns())


def token_from_env(environ: Mapping[str, str] | None = None) -> VerifiedToken | None:
    """The token the supervisor handed this process, or None."""
    return VerifiedToken.from_env((os.environ if environ is None else environ).get(ENV_VERIFIED))


__all__ = [
    "ENV_VERIFIED",
    "MAX_TOKEN_BYTES",
    "MAX_TOKEN_FILES",
    "SETTLE_NS",
    "SETTLE_COARSE_NS",
    "VerifiedToken",
    "Vouch",
    "issue_token",
    "settle_fresh",
    "manifest_digest",
    "settled",
    "token_from_env",
]
