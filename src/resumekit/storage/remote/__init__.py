"""Object stores (AWS S3, Huawei OBS, MinIO, Ceph RGW, anything S3-compatible) through s3fs: manifest-last commit.
Roots are ``s3://bucket/prefix`` or ``obs://bucket/prefix`` (the same protocol, Huawei Cloud's spelling).

Object stores have no rename, so the commit strategy differs from the local one:

* A :class:`RemoteTransaction` writes the data objects straight under ``prefix/step_N/`` (one PUT for small files;
  a multipart upload with several parts in flight for large ones) and :meth:`RemoteTransaction.commit` PUTs
  ``manifest.json`` last, in a single request, after checking that every data object is there with its size.
  A step counts only when its manifest exists and every object it lists exists with the listed size (the native
  layout's quick validation); checksums are verified while downloading.
* :meth:`RemoteStorage.remove_tree` deletes the manifest *first*, so a half-deleted step never looks valid;
  :meth:`RemoteStorage.rename` (quarantine) copies the data, then the manifest, then removes the source.
* Every request is retried with exponential backoff and jitter on transient errors (timeouts, 5xx, throttling,
  dropped or reset connections) and never on errors retries cannot fix (missing bucket, wrong credentials, access
  denied): those become one-line :class:`~resumekit.errors.StorageError` s naming the bucket, the endpoint and the
  fix. A request that fails past its retry budget raises :class:`~resumekit.errors.RemoteTransferError`.
* Every request is bounded: one retry layer (ours: each attempt is exactly one request), no ``Expect:
  100-continue``, a hard time limit per attempt, and the preemption deadline of :mod:`resumekit.storage.deadline`.

Configuration is the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``/``AWS_REGION``, ``AWS_PROFILE``) plus the
``RESUMEKIT_S3_*`` tuning variables of :class:`RemoteOptions`; for ``obs://`` roots also the OBS tools' variables
(:func:`~.client.endpoint_from_env`).

The modules, lowest first: ``options`` (the URI, S3's limits, :class:`RemoteOptions`), ``retry`` (what is
retried, the backoff, the wording of permanent errors), ``client`` (the s3fs session and the retry loop every
request goes through), ``reader`` and ``writer`` (one object read or written as a file), ``backend``
(:class:`RemoteStorage` and its :class:`RemoteTransaction`). s3fs is imported only when a client is first built.
"""

from __future__ import annotations

from .backend import RemoteStorage, RemoteTransaction
from .client import _new_fs  # noqa: F401 - benchmarks/bench_remote.py builds a bare client with resumekit's settings
from .options import RemoteOptions
from .retry import MISSING, OTHER, PERMANENT, TRANSIENT, classify, transfer_backoff

__all__ = [
    "RemoteStorage",
    "RemoteTransaction",
    "RemoteOptions",
    "classify",
    "transfer_backoff",
    "PERMANENT",
    "MISSING",
    "TRANSIENT",
    "OTHER",
]
