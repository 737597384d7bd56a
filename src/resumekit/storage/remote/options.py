"""Where and how the object-store backend connects: the ``s3://`` URI, S3's size limits and the
``RESUMEKIT_S3_*`` tuning of :class:`RemoteOptions`."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ...errors import ConfigError

MiB = 1 << 20
#: S3's smallest allowed part (all but the last), largest single PUT / copy, most parts per upload, and most keys
#: per DeleteObjects request.
MIN_PART = 5 * MiB
MAX_SINGLE = 5 * 1024 * MiB
MAX_PARTS = 10_000
DELETE_BATCH = 1000


#: URI schemes of S3-protocol stores: ``obs://`` is how Huawei Cloud (ModelArts, MoXing) users write OBS paths.
SCHEMES = ("s3", "s3a", "obs")


def uri_scheme(uri: str) -> str:
    """The scheme of an object-store URI as it is written back in paths and messages: ``obs`` or ``s3``."""
    return "obs" if uri.partition("://")[0].lower() == "obs" else "s3"


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")`` (``s3a://`` and ``obs://`` too).

    Raises:
        ConfigError: another scheme, or no bucket.
    """
    scheme, _, rest = uri.partition("://")
    if scheme.lower() not in SCHEMES:
        raise ConfigError(
            f"unsupported storage URI {uri!r}: only s3://bucket/prefix is supported (and obs://bucket/prefix; "
            "Huawei OBS and MinIO through their S3-compatible endpoint: set AWS_ENDPOINT_URL)"
        )
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"storage URI {uri!r} names no bucket; use {scheme.lower()}://bucket/prefix")
    return bucket, prefix.strip("/")


def _env_number(name: str, default: Any, kind: type) -> Any:
    """The number in environment variable ``name`` as ``kind`` (``"16e6"`` is a valid int), else ``default``."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


@dataclass(kw_only=True)
class RemoteOptions:
    """Tuning of the object-store backend. Each field can be set by the environment variable named below.

    Attributes:
        part_size: bytes per multipart part (``RESUMEKIT_S3_PART_SIZE``); files up to this size go in one PUT. It
            doubles every 1000 parts so a file of any size fits S3's 10,000-part limit.
        concurrency: requests in flight per file: parts of one upload, ranges of one download
            (``RESUMEKIT_S3_CONCURRENCY``). Memory per open file is about ``part_size * (concurrency + 1)``.
        read_chunk: bytes per ranged GET when reading (``RESUMEKIT_S3_READ_CHUNK``); up to ``concurrency`` of
            them are in flight ahead of the reader. Fewer, larger ranges measured faster than 8 MiB ones (see
            benchmarks/bench_remote.py); every range is retried on its own.
        retries: attempts per request before giving up on transient errors (``RESUMEKIT_S3_RETRIES``).
        backoff: first retry delay in seconds; doubles per attempt, with jitter (``RESUMEKIT_S3_BACKOFF``).
        backoff_max: largest retry delay in seconds (``RESUMEKIT_S3_BACKOFF_MAX``).
        connect_timeout: seconds to open a connection (``RESUMEKIT_S3_CONNECT_TIMEOUT``).
        read_timeout: seconds without a byte from the server before a request counts as failed
            (``RESUMEKIT_S3_READ_TIMEOUT``); also the longest wait for an answer once a request is sent.
        min_throughput: bytes per second below which a request counts as stuck even while bytes trickle
            (``RESUMEKIT_S3_MIN_THROUGHPUT``): every request is cut after ``connect_timeout + read_timeout +
            its bytes / min_throughput`` seconds, whatever the HTTP stack does, so one attempt is always bounded.
    """

    # Defaults from benchmarks/bench_remote.py --sweep: 8-16 MiB parts with 4-16 in flight were equally fast,
    # 32+ MiB parts slower (fewer parts to overlap); 16 MiB x 8 bounds an upload's buffers to ~144 MiB.
    part_size: int = 16 * MiB
    concurrency: int = 8
    read_chunk: int = 32 * MiB
    retries: int = 6
    backoff: float = 0.2
    backoff_max: float = 8.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # A floor far below any working link (a 16 MiB part gets 64 s on top of the timeouts): it only catches
    # pathologies, such as a server that answers one byte a minute.
    min_throughput: int = 256 * 1024

    _ENV: ClassVar[dict[str, str]] = {  # a class constant, not a dataclass field
        "part_size": "RESUMEKIT_S3_PART_SIZE",
        "concurrency": "RESUMEKIT_S3_CONCURRENCY",
        "read_chunk": "RESUMEKIT_S3_READ_CHUNK",
        "retries": "RESUMEKIT_S3_RETRIES",
        "backoff": "RESUMEKIT_S3_BACKOFF",
        "backoff_max": "RESUMEKIT_S3_BACKOFF_MAX",
        "connect_timeout": "RESUMEKIT_S3_CONNECT_TIMEOUT",
        "read_timeout": "RESUMEKIT_S3_READ_TIMEOUT",
        "min_throughput": "RESUMEKIT_S3_MIN_THROUGHPUT",
    }

    def __post_init__(self) -> None:
        if not isinstance(self.part_size, int) or self.part_size < MIN_PART:
            raise ConfigError(
                f"RemoteOptions.part_size must be >= {MIN_PART} bytes (S3's minimum part), got {self.part_size!r}"
            )
        for name in ("concurrency", "read_chunk", "retries", "min_throughput"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"RemoteOptions.{name} must be a positive integer, got {v!r}")
        for name in ("backoff", "backoff_max", "connect_timeout", "read_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"RemoteOptions.{name} must be a number of seconds >= 0, got {v!r}")

    def attempt_limit(self, nbytes: int = 0) -> float:
        """The most seconds one request moving ``nbytes`` (body sent or received) may take."""
        return self.connect_timeout + self.read_timeout + nbytes / self.min_throughput

    def budget(self, nbytes: int = 0) -> float:
        """The most seconds one request may take with all its retries: attempts plus the backoff between them."""
        delays = sum(min(self.backoff_max, self.backoff * 2.0 ** (a - 1)) for a in range(1, self.retries))
        return self.retries * self.attempt_limit(nbytes) + delays

    @classmethod
    def from_env(cls, **overrides: Any) -> RemoteOptions:
        """Defaults, then the ``RESUMEKIT_S3_*`` environment, then ``overrides``."""
        kw: dict[str, Any] = {}
        types = {f.name: type(f.default) for f in fields(cls)}
        for name, var in cls._ENV.items():
            kw[name] = _env_number(var, getattr(cls, name), types[name])
        kw.update(overrides)
        return cls(**kw)


__all__ = [
    "RemoteOptions",
    "parse_uri",
    "uri_scheme",
    "SCHEMES",
    "MiB",
    "MIN_PART",
    "MAX_SINGLE",
    "MAX_PARTS",
    "DELETE_BATCH",
]
