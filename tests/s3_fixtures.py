"""A real S3 endpoint for the tests: moto's server in a subprocess on 127.0.0.1, a bucket per test, and a
fault-injecting TCP proxy that cuts connections mid-transfer.

Imported by conftest.py, so the fixtures are available everywhere; nothing starts unless a test asks for them.
"""

from __future__ import annotations

import math
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

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


@dataclass
class MotoServer:
    endpoint: str
    proc: subprocess.Popen

    def env(self, endpoint: Optional[str] = None) -> dict:
        """The AWS environment pointing at this server (or at ``endpoint``, e.g. a proxy in front of it)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
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
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
        return self._client


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server as a subprocess (its own GIL: it is the "remote", the test process is the client)."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
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

    def keys(self, prefix: str = "") -> List[str]:
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
    """A fresh bucket, with the AWS environment of this process pointing at the moto server."""
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    name = f"rk-{uuid.uuid4().hex[:12]}"
    moto_server.client().create_bucket(Bucket=name)
    return Bucket(name, moto_server)


# ----------------------------------------------------------------------------------------------------------------
# Fault-injecting TCP proxy
# ----------------------------------------------------------------------------------------------------------------

#: A per-connection plan: None (pass everything) or (direction "up"|"down", bytes to let through before the cut).
Plan = Optional[Tuple[str, int]]


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target``; each new connection asks ``decide(n)`` (n: connection
    number) whether and where to cut it: after K bytes client->server ("up", i.e. mid-upload) or server->client
    ("down", mid-download). A cut is a reset (SO_LINGER 0), as a crashed middlebox or a dead link produces."""

    def __init__(self, target_port: int, decide: Callable[[int], Plan]):
        self.target_port = target_port
        self.decide = decide
        self.connections = 0
        self.cuts = 0
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
            plan = self.decide(n)
            threading.Thread(target=self._pipe, args=(client, plan), daemon=True).start()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()

    def _pipe(self, client: socket.socket, plan: Plan) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            self._reset(client)
            return
        budget = {"up": float("inf"), "down": float("inf")}
        if plan is not None:
            budget[plan[0]] = plan[1]
        peers = {client: (server, "up"), server: (client, "down")}
        try:
            while not self._stop.is_set():
                r, _, _ = select.select(list(peers), [], [], 0.2)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    dst, direction = peers[s]
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
    """Make a :class:`FaultProxy` in front of the moto server: ``fault_proxy(decide)``; closed after the test."""
    made: List[FaultProxy] = []
    port = int(moto_server.endpoint.rsplit(":", 1)[1])

    def make(decide: Callable[[int], Plan]) -> FaultProxy:
        p = FaultProxy(port, decide)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
