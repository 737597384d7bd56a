"""A real S3 endpoint for the tests: moto's server in a subprocess on 127.0.0.1 (or any S3 endpoint named by
``RESUMEKIT_TEST_S3_ENDPOINT``), a bucket per test, and a fault-injecting TCP proxy that cuts connections
mid-transfer, never answers, stalls, or goes down.

Against another S3 implementation (MinIO, Ceph RGW, OBS)::

    RESUMEKIT_TEST_S3_ENDPOINT=http://127.0.0.1:9000 RESUMEKIT_TEST_S3_ACCESS_KEY=... \
    RESUMEKIT_TEST_S3_SECRET_KEY=... [RESUMEKIT_TEST_S3_REGION=us-east-1] \
    make test PYTEST_ARGS="tests/test_storage_suite.py tests/test_remote.py tests/test_tiered.py"

Each test creates (and afterwards empties and deletes) its own bucket, so the keys need bucket create/delete
rights. The fault-proxy tests need a plain-HTTP endpoint (the proxy is a TCP relay on 127.0.0.1). Tests that rely on
moto's quirks (e.g. how it dates multipart uploads) skip themselves elsewhere.

Imported by conftest.py, so the fixtures are available everywhere; nothing starts unless a test asks for them.
"""

from __future__ import annotations

import math
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

#: Retry fast in tests: the behaviour is the same, the waiting is not.
FAST_RETRY_ENV = {
    "RESUMEKIT_S3_BACKOFF": "0.02",
    "RESUMEKIT_S3_BACKOFF_MAX": "0.2",
    "RESUMEKIT_S3_PART_SIZE": str(5 << 20),
    "RESUMEKIT_S3_READ_CHUNK": str(1 << 20),
}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


#: Set to run the S3 tests against that endpoint instead of moto (with the keys and region below).
ENV_TEST_ENDPOINT = "RESUMEKIT_TEST_S3_ENDPOINT"


@dataclass
class MotoServer:
    """The S3 endpoint the tests use: moto's server (``proc`` set) or an external one (``proc`` None)."""

    endpoint: str
    proc: subprocess.Popen | None
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    @property
    def is_moto(self) -> bool:
        return self.proc is not None

    @property
    def host_port(self) -> tuple[str, int]:
        u = urllib.parse.urlsplit(self.endpoint)
        return u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)

    def env(self, endpoint: str | None = None) -> dict:
        """The AWS environment pointing at this server (or at ``endpoint``, e.g. a proxy in front of it)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            **FAST_RETRY_ENV,
        }

    def client(self):
        """A boto3 client for setting up and inspecting (created once: clients are slow to build)."""
        if getattr(self, "_client", None) is None:
            import boto3

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
            )
        return self._client


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server as a subprocess (its own GIL: it is the "remote", the test process is the client), or the
    external endpoint of ``RESUMEKIT_TEST_S3_ENDPOINT``."""
    pytest.importorskip("s3fs")
    external = os.environ.get(ENV_TEST_ENDPOINT, "").strip()
    if external:
        yield MotoServer(
            external,
            None,
            access_key=os.environ.get("RESUMEKIT_TEST_S3_ACCESS_KEY", ""),
            secret_key=os.environ.get("RESUMEKIT_TEST_S3_SECRET_KEY", ""),
            region=os.environ.get("RESUMEKIT_TEST_S3_REGION", "us-east-1"),
        )
        return
    pytest.importorskip("moto")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start on port {port}")
            time.sleep(0.1)
    try:
        yield MotoServer(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Bucket:
    name: str
    server: MotoServer

    def uri(self, prefix: str = "run") -> str:
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"

    @property
    def client(self):
        return self.server.client()

    def keys(self, prefix: str = "") -> list[str]:
        out, token = [], None
        while True:
            kw = {"Bucket": self.name, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self.client.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents") or []]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket, with the AWS environment of this process pointing at the S3 endpoint."""
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    name = f"rk-{uuid.uuid4().hex[:12]}"
    moto_server.client().create_bucket(Bucket=name)
    bucket = Bucket(name, moto_server)
    yield bucket
    if not moto_server.is_moto:
        _drop_bucket(bucket)


def _drop_bucket(bucket: Bucket) -> None:
    """Empty and delete a test bucket on an external endpoint (moto's vanish with the server)."""
    c = bucket.client
    try:
        for u in c.list_multipart_uploads(Bucket=bucket.name).get("Uploads") or []:
            c.abort_multipart_upload(Bucket=bucket.name, Key=u["Key"], UploadId=u["UploadId"])
        keys = bucket.keys()
        for i in range(0, len(keys), 1000):
            c.delete_objects(Bucket=bucket.name, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
        c.delete_bucket(Bucket=bucket.name)
    except Exception as e:  # noqa: BLE001 - cleanup of a test bucket must not fail the test
        print(f"could not delete test bucket {bucket.name}: {e}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Fault-injecting TCP proxy
# ----------------------------------------------------------------------------------------------------------------

#: A per-connection plan: None (pass everything) or (direction "up"|"down", bytes to let through before the cut).
Plan = tuple[str, int] | None

#: The start of an HTTP/1.1 request: what the proxy counts as one request sent.
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(?:GET|PUT|POST|HEAD|DELETE) /\S* HTTP/1\.[01]\r\n")


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target``; each new connection asks ``decide(n)`` (n: connection
    number) whether and where to cut it: after K bytes client->server ("up", i.e. mid-upload) or server->client
    ("down", mid-download). A cut is a reset (SO_LINGER 0), as a crashed middlebox or a dead link produces.

    Whole-endpoint modes, switched at any time and applying to open connections too:

    * :meth:`blackhole`: accept connections and read every byte, never answer (a frozen gateway, a full cluster);
    * :meth:`stall`: hold every byte, both ways, for N seconds, then carry on (a gateway pausing);
    * :meth:`down`: reset every connection at once (the endpoint is gone);
    * :meth:`heal`: pass everything again.

    :attr:`requests` counts the HTTP requests clients sent through it, in every mode: what the server would count.
    """

    def __init__(self, target_port: int, decide: Callable[[int], Plan], target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.decide = decide
        self.connections = 0
        self.cuts = 0
        self.requests = 0
        self.saw_expect_continue = False
        self.mode = "pass"
        self._stall_until = 0.0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    # -- modes -----------------------------------------------------------------------------------------------------

    def blackhole(self) -> None:
        """Accept and read, never answer."""
        self.mode = "blackhole"

    def stall(self, seconds: float) -> None:
        """Hold all traffic for ``seconds`` from now, then pass it on."""
        self._stall_until = time.monotonic() + seconds
        self.mode = "pass"

    def down(self) -> None:
        """Reset every connection, open or new."""
        self.mode = "down"

    def heal(self) -> None:
        self.mode = "pass"
        self._stall_until = 0.0

    # -- plumbing --------------------------------------------------------------------------------------------------

    def _count(self, data: bytes) -> None:
        n = len(_REQUEST_LINE.findall(data))
        if n or b"100-continue" in data.lower():
            with self._lock:
                self.requests += n
                self.saw_expect_continue |= b"expect: 100-continue" in data.lower()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self._sock], [], [], 0.1)
                if not r:
                    continue
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                n = self.connections
            if self.mode == "down":
                self._reset(client)
                continue
            plan = self.decide(n)
            threading.Thread(target=self._pipe, args=(client, plan), daemon=True).start()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()

    def _swallow(self, client: socket.socket) -> None:
        """Blackhole: read and count until the client gives up."""
        while not self._stop.is_set() and self.mode == "blackhole":
            r, _, _ = select.select([client], [], [], 0.2)
            if r:
                data = client.recv(65536)
                if not data:
                    return
                self._count(data)

    def _pipe(self, client: socket.socket, plan: Plan) -> None:
        server = None
        try:
            if self.mode == "blackhole":
                self._swallow(client)
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                return
            budget = {"up": float("inf"), "down": float("inf")}
            if plan is not None:
                budget[plan[0]] = plan[1]
            peers = {client: (server, "up"), server: (client, "down")}
            while not self._stop.is_set():
                if self.mode == "down":
                    return
                r, _, _ = select.select(list(peers), [], [], 0.2)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    dst, direction = peers[s]
                    if direction == "up":
                        self._count(data)
                    while time.monotonic() < self._stall_until and not self._stop.is_set():
                        time.sleep(0.02)
                    if self.mode == "blackhole":
                        if direction == "up":
                            self._swallow(client)
                            return
                        continue  # an answer to a request sent before the blackhole: dropped
                    if len(data) >= budget[direction]:
                        dst.sendall(data[: int(budget[direction])])
                        with self._lock:
                            self.cuts += 1
                        return
                    budget[direction] -= len(data)
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            self._reset(client)
            if server is not None:
                self._reset(server)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def flaky(seed: int, p: float, max_bytes: int = 3 << 20) -> Callable[[int], Plan]:
    """Cut a fraction ``p`` of connections, in a random direction, after a log-uniform random number of bytes
    (so headers, small bodies and large parts all get cut sometimes)."""
    rng = random.Random(seed)

    def decide(n: int) -> Plan:
        if rng.random() >= p:
            return None
        return (rng.choice(["up", "down"]), int(math.exp(rng.uniform(math.log(50), math.log(max_bytes)))))

    return decide


@pytest.fixture
def fault_proxy(moto_server):
    """Make a :class:`FaultProxy` in front of the S3 endpoint: ``fault_proxy(decide)`` (``decide`` defaults to
    passing everything); closed after the test."""
    made: list[FaultProxy] = []
    if moto_server.endpoint.startswith("https://"):
        pytest.skip("the fault proxy relays plain HTTP only; RESUMEKIT_TEST_S3_ENDPOINT is https")
    host, port = moto_server.host_port

    def make(decide: Callable[[int], Plan] = lambda n: None) -> FaultProxy:
        p = FaultProxy(port, decide, target_host=host)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
