"""The object-store backend on its own: error classification (pure), the commit protocol's order of requests,
clear one-line errors, multipart uploads, gc of abandoned saves. Against moto's S3 server over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as hs

from resumekit.errors import RemoteTransferError, StorageError
from resumekit.format import MANIFEST
from resumekit.layouts.native import NativeLayout
from resumekit.storage import open_storage
from resumekit.storage.remote import (
    MISSING,
    OTHER,
    PERMANENT,
    TRANSIENT,
    RemoteOptions,
    RemoteStorage,
    classify,
    transfer_backoff,
)
from resumekit.storage.remote.options import parse_uri
from resumekit.storage.remote.retry import permanent_error
from resumekit.storage.remote.writer import part_size_for


def client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


# -- pure ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code,status,kind",
    [
        ("NoSuchBucket", 404, PERMANENT),
        ("AccessDenied", 403, PERMANENT),
        ("InvalidAccessKeyId", 403, PERMANENT),
        ("SignatureDoesNotMatch", 403, PERMANENT),
        ("403", 403, PERMANENT),
        ("NoSuchKey", 404, MISSING),
        ("404", 404, MISSING),
        ("InternalError", 500, TRANSIENT),
        ("ServiceUnavailable", 503, TRANSIENT),
        ("SlowDown", 503, TRANSIENT),
        ("RequestTimeout", 400, TRANSIENT),
        ("502", 502, TRANSIENT),
        ("InvalidArgument", 400, OTHER),
        ("PreconditionFailed", 412, OTHER),
    ],
)
def test_client_errors_are_classified(code, status, kind):
    assert classify(client_error(code, status)) == kind


def test_network_errors_are_transient():
    import aiohttp
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    for e in (
        ConnectionResetError(104, "reset"),
        asyncio.TimeoutError(),
        TimeoutError(),
        EndpointConnectionError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        ConnectTimeoutError(endpoint_url="http://x"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("cut"),
    ):
        assert classify(e) == TRANSIENT, e
    assert classify(NoCredentialsError()) == PERMANENT
    assert classify(ValueError("bug")) == OTHER


def test_backoff_grows_and_is_capped():
    assert transfer_backoff(1, 0.2, 8, 0.0) == 0.1 and transfer_backoff(1, 0.2, 8, 1.0) == 0.2
    assert transfer_backoff(3, 0.2, 8, 1.0) == pytest.approx(0.8)
    assert transfer_backoff(30, 0.2, 8, 1.0) == 8


@given(attempt=hs.integers(1, 60), base=hs.floats(0, 10), cap=hs.floats(0, 60), rand=hs.floats(0, 1))
def test_backoff_jitters_the_upper_half_and_never_passes_the_cap(attempt, base, cap, rand):
    full = min(cap, base * 2 ** (attempt - 1))
    d = transfer_backoff(attempt, base, cap, rand)
    assert full / 2 - 1e-9 <= d <= full + 1e-9 and d <= cap + 1e-9
    assert transfer_backoff(attempt, base, cap, 0.0) <= d <= transfer_backoff(attempt, base, cap, 1.0)


def test_uris_name_a_bucket_and_a_prefix():
    assert parse_uri("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert parse_uri("S3A://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match=r"storage URI 's3:///x' names no bucket; use s3://bucket/prefix"):
        parse_uri("s3:///x")
    # obs:// is how Huawei Cloud users write OBS paths: the same S3 protocol (issue 16; it used to be refused).
    assert parse_uri("obs://b/x") == ("b", "x")
    with pytest.raises(ValueError, match=r"unsupported storage URI 'gs://b/x'"):
        parse_uri("gs://b/x")


def test_parts_double_every_thousand_so_any_stream_fits_ten_thousand():
    assert [part_size_for(n, 5 << 20) for n in (1, 1000, 1001, 2001)] == [5 << 20, 5 << 20, 10 << 20, 20 << 20]
    # with the default part size, 10,000 parts hold more than S3's largest object (5 TiB)
    assert sum(part_size_for(n, RemoteOptions().part_size) for n in range(1, 10_001)) > 5 << 40


def test_permanent_errors_name_the_bucket_the_endpoint_and_the_fix():
    from botocore.exceptions import NoCredentialsError

    e = permanent_error("list s3://b/x/", client_error("NoSuchBucket", 404), "b", "http://h:9000")
    assert isinstance(e, StorageError) and str(e) == (
        "list s3://b/x/: bucket 'b' does not exist at http://h:9000; create it (e.g. aws s3 mb s3://b) or fix the "
        "bucket name / AWS_ENDPOINT_URL"
    )
    assert str(permanent_error("read k", NoCredentialsError(), "b", "ep")) == (
        "read k: no usable AWS credentials (NoCredentialsError); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE) for bucket 'b'"
    )
    assert "refresh AWS_SESSION_TOKEN" in str(permanent_error("w", client_error("ExpiredToken", 400), "b", "ep"))


def test_options_are_validated_and_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("RESUMEKIT_S3_PART_SIZE", str(8 << 20))
    monkeypatch.setenv("RESUMEKIT_S3_RETRIES", "3")
    o = RemoteOptions.from_env()
    assert o.part_size == 8 << 20 and o.retries == 3
    with pytest.raises(ValueError, match=r"part_size must be >= 5242880 bytes"):
        RemoteOptions(part_size=1 << 20)


def test_only_s3_uris(s3_bucket):
    with pytest.raises(ValueError, match=r"only s3://bucket/prefix is supported .*AWS_ENDPOINT_URL"):
        open_storage("gs://bucket/x")


def test_missing_s3fs_names_the_extra(monkeypatch):
    import resumekit.storage.remote.client as remote_client

    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.setattr(remote_client, "_FS_CACHE", {})
    with pytest.raises(ImportError, match=r"install it with pip install 'resumekit\[s3\]'"):
        RemoteStorage("s3://b/x", create=False)


# -- retries ---------------------------------------------------------------------------------------------------


def _storage(**opts) -> RemoteStorage:
    return RemoteStorage("s3://b/x", create=False, options=RemoteOptions(backoff=0, **opts))


def test_transient_errors_are_retried_then_reported(s3_bucket):
    st = _storage(retries=4)
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise client_error("ServiceUnavailable", 503)
        return "ok"

    assert st._sync(st._retry("put s3://b/x/k", flaky)) == "ok" and len(calls) == 3
    calls.clear()

    async def dead():
        calls.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(RemoteTransferError) as ei:
        st._sync(st._retry("put s3://b/x/k", dead))
    assert len(calls) == 4
    assert str(ei.value).startswith("put s3://b/x/k failed after 4 attempts in ")
    assert "ConnectionResetError" in str(ei.value) and "AWS_ENDPOINT_URL" in str(ei.value)


@pytest.mark.parametrize(
    "code,expect",
    [
        ("NoSuchBucket", "bucket 'b' does not exist at http://127.0.0.1:"),
        ("InvalidAccessKeyId", "the access key is not known to http://127.0.0.1:"),
        ("SignatureDoesNotMatch", "the secret key is wrong; check AWS_SECRET_ACCESS_KEY"),
        ("AccessDenied", "access to bucket 'b' at http://127.0.0.1:"),
    ],
)
def test_permanent_errors_are_not_retried_and_say_the_fix(s3_bucket, code, expect):
    st = _storage(retries=5)
    calls = []

    async def denied():
        calls.append(1)
        raise client_error(code, 404 if code == "NoSuchBucket" else 403)

    with pytest.raises(StorageError) as ei:
        st._sync(st._retry("put s3://b/x/k", denied))
    assert calls == [1]
    msg = str(ei.value)
    assert msg.startswith("put s3://b/x/k: ") and expect in msg and "\n" not in msg


def test_missing_bucket_end_to_end(s3_bucket):
    with pytest.raises(StorageError) as ei:
        RemoteStorage("s3://no-such-bucket-rk/run")
    assert str(ei.value) == (
        f"list s3://no-such-bucket-rk/run/: bucket 'no-such-bucket-rk' does not exist at "
        f"{s3_bucket.server.endpoint}; create it (e.g. aws s3 mb s3://no-such-bucket-rk) or fix "
        "the bucket name / AWS_ENDPOINT_URL"
    )
    r = CliRunner().invoke(__import__("resumekit.cli", fromlist=["main"]).main, ["ls", "s3://no-such-bucket-rk/r"])
    assert r.exit_code == 1 and "bucket 'no-such-bucket-rk' does not exist" in r.output


def test_supervisor_does_not_retry_a_missing_bucket(s3_bucket):
    from resumekit.supervisor import PrecheckError, check_remote

    with pytest.raises(PrecheckError) as ei:
        check_remote("s3://no-such-bucket-rk/run", timeout=30)
    assert ei.value.retry is False and "does not exist" in ei.value.message


# -- the commit protocol ---------------------------------------------------------------------------------------


def _record_calls(st: RemoteStorage, log: list) -> None:
    real = st._call

    async def spy(what, method, **kw):
        log.append((method, kw.get("Key") or kw.get("Prefix") or ""))
        return await real(what, method, **kw)

    st._call = spy  # type: ignore[method-assign]


def _write_step(st, name="step_000000001", size=12 << 20, manifest=b'{"m": 1}'):
    txn = st.begin(name)
    with txn.open_write("big.bin") as f:
        for _ in range(size >> 20):
            f.write(b"x" * (1 << 20))
    with txn.open_write("small.json") as f:
        f.write(b"{}")
    return txn, txn.commit(manifest)


def test_multipart_upload_and_manifest_last(s3_bucket):
    st = RemoteStorage(s3_bucket.uri("run"))
    log: list = []
    _record_calls(st, log)
    _, path = _write_step(st)
    assert path == s3_bucket.uri("run") + "/step_000000001"
    methods = [m for m, _ in log]
    assert methods.count("upload_part") == 3  # 12 MiB in 5 MiB parts
    assert methods.index("complete_multipart_upload") < methods.index("put_object")
    # the manifest is the very last PUT, after every data object was confirmed
    puts = [k for m, k in log if m == "put_object"]
    assert puts[-1].endswith(f"step_000000001/{MANIFEST}")
    last_data = max(
        i
        for i, (m, k) in enumerate(log)
        if m in ("complete_multipart_upload", "put_object") and not k.endswith(MANIFEST)
    )
    assert log.index(("put_object", f"run/step_000000001/{MANIFEST}")) > last_data
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="run/step_000000001/big.bin")
    assert head["ContentLength"] == 12 << 20 and head["ETag"].strip('"').endswith("-3")
    with st.open_read("step_000000001/big.bin") as f:
        assert f.read() == b"x" * (12 << 20)


def test_abort_leaves_nothing(s3_bucket):
    st = RemoteStorage(s3_bucket.uri("run"))
    txn = st.begin("step_000000002")
    f = txn.open_write("big.bin")
    f.write(b"y" * (11 << 20))  # two parts in flight, not completed
    txn.abort()
    assert s3_bucket.keys() == []
    assert s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []


def test_remove_tree_deletes_the_manifest_first(s3_bucket):
    st = RemoteStorage(s3_bucket.uri("run"))
    _write_step(st, size=1 << 20)
    real = st._delete_keys

    async def crash(keys):  # the process dies after the manifest went, before the rest
        raise RuntimeError("killed")

    st._delete_keys = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="killed"):
        st.remove_tree("step_000000001")
    st._delete_keys = real  # type: ignore[method-assign]
    left = s3_bucket.keys()
    assert sorted(k.rsplit("/", 1)[1] for k in left) == ["big.bin", "small.json"]
    info = NativeLayout().list(st)[0]
    assert NativeLayout().validate(st, info).reason == "manifest.json is missing (the save never finished)"
    st.remove_tree("step_000000001")
    assert s3_bucket.keys() == []


def test_rename_copies_the_manifest_last(s3_bucket):
    st = RemoteStorage(s3_bucket.uri("run"))
    _write_step(st, size=1 << 20)
    log: list = []
    _record_calls(st, log)
    st.rename("step_000000001", "quarantined-step_000000001-x")
    copies = [k for m, k in log if m == "copy_object"]
    assert copies[-1].endswith(f"quarantined-step_000000001-x/{MANIFEST}") and len(copies) == 3
    deletes = [(m, k) for m, k in log if m.startswith("delete")]
    assert deletes[0] == ("delete_object", f"run/step_000000001/{MANIFEST}")
    assert [e.name for e in st.listdir("")] == ["quarantined-step_000000001-x"]
    assert st.read_bytes(f"quarantined-step_000000001-x/{MANIFEST}") == b'{"m": 1}'


def test_replacing_an_invalid_step_drops_its_manifest_before_writing(s3_bucket):
    st = RemoteStorage(s3_bucket.uri("run"))
    _write_step(st, size=1 << 20)
    log: list = []
    _record_calls(st, log)
    st.begin("step_000000001")
    first_write = (
        next(i for i, (m, _) in enumerate(log) if m in ("put_object", "create_multipart_upload"))
        if any(m in ("put_object", "create_multipart_upload") for m, _ in log)
        else len(log)
    )
    assert log.index(("delete_object", f"run/step_000000001/{MANIFEST}")) < first_write
    assert s3_bucket.keys() == []


def test_listing_sizes_and_errors(s3_bucket):
    st = RemoteStorage(s3_bucket.uri("run"))
    assert st.listdir("") == [] and not st.exists("step_000000001")
    _write_step(st, size=1 << 20)
    assert [(e.name, e.is_dir) for e in st.listdir("")] == [("step_000000001", True)]
    assert st.exists("step_000000001") and st.size("step_000000001/big.bin") == 1 << 20
    assert st.mtime("step_000000001") is not None
    with pytest.raises(FileNotFoundError, match=r"s3://.*/run/step_000000001/nope does not exist"):
        st.size("step_000000001/nope")
    with pytest.raises(FileNotFoundError):
        st.read_bytes("nope")


def test_gc_removes_abandoned_steps_and_uploads(s3_bucket):
    from resumekit.cli import main

    st = RemoteStorage(s3_bucket.uri("run"))
    _write_step(st, size=1 << 20, manifest=b"not a manifest")  # invalid evidence: kept
    s3_bucket.put("run/step_000000002/big.bin", b"partial")  # an abandoned save
    s3_bucket.client.create_multipart_upload(Bucket=s3_bucket.name, Key="run/step_000000003/big.bin")
    r = CliRunner().invoke(main, ["gc", s3_bucket.uri("run"), "--json"])
    # Younger than --tmp-age: may be a save in progress. (moto reports every multipart upload as initiated in 2010,
    # so only the step directory's age can be checked here.)
    assert not [p for p in json.loads(r.output)["removed"] if "step_000000002" in p]
    assert st.exists("step_000000002")
    r = CliRunner().invoke(main, ["gc", s3_bucket.uri("run"), "--tmp-age", "0", "--json"])
    removed = json.loads(r.output)["removed"]
    assert removed[0] == s3_bucket.uri("run") + "/step_000000002"
    assert [e.name for e in st.listdir("")] == ["step_000000001"]
    assert s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []


def test_gc_reports_incomplete_uploads_with_their_age(s3_bucket):
    from resumekit.cli import main

    s3_bucket.client.create_multipart_upload(Bucket=s3_bucket.name, Key="run/step_000000003/big.bin")
    st = RemoteStorage(s3_bucket.uri("run"))
    (u,) = st.list_uploads()
    assert u["uri"] == s3_bucket.uri("run") + "/step_000000003/big.bin" and u["age_s"] is not None
    age = u["age_s"]
    r = CliRunner().invoke(main, ["gc", s3_bucket.uri("run"), "--tmp-age", str(age + 3600), "--json"])
    (rep,) = json.loads(r.output)["uploads"]
    assert rep["uri"] == u["uri"] and rep["age_s"] >= age and rep["action"] == "kept (younger than --tmp-age)"
    r = CliRunner().invoke(main, ["gc", s3_bucket.uri("run"), "--tmp-age", "0", "--dry-run"])
    assert f"incomplete upload {u['uri']}, age " in r.output and ": would abort" in r.output
    r = CliRunner().invoke(main, ["gc", s3_bucket.uri("run"), "--tmp-age", "0"])
    assert ": aborted" in r.output and st.list_uploads() == []


def test_obs_endpoint_and_region_from_the_obs_variables():
    from resumekit.storage.remote.client import endpoint_from_env, obs_region

    aws = {"AWS_ENDPOINT_URL": "http://minio:9000", "OBS_ENDPOINT": "obs.cn-north-4.myhuaweicloud.com"}
    assert endpoint_from_env("obs", aws) == "http://minio:9000"  # the AWS variable wins everywhere
    assert endpoint_from_env("s3", {"OBS_ENDPOINT": "x"}) is None  # s3:// keeps AWS's default endpoint
    assert endpoint_from_env("obs", {"OBS_ENDPOINT": "obs.cn-north-4.myhuaweicloud.com"}) == (
        "https://obs.cn-north-4.myhuaweicloud.com"
    )
    # ModelArts / MoXing spelling
    assert endpoint_from_env("obs", {"S3_ENDPOINT": "obs.ap-southeast-1.myhuaweicloud.com", "S3_USE_HTTPS": "0"}) == (
        "http://obs.ap-southeast-1.myhuaweicloud.com"
    )
    assert obs_region("https://obs.cn-north-4.myhuaweicloud.com") == "cn-north-4"
    assert obs_region("http://127.0.0.1:9000") is None


def test_obs_uris_round_trip_with_their_scheme(s3_bucket):
    st = open_storage(f"obs://{s3_bucket.name}/run")
    assert st.uri == f"obs://{s3_bucket.name}/run"
    _write_step(st, size=1 << 20)
    assert st.join("step_000000001") == f"obs://{s3_bucket.name}/run/step_000000001"
    assert s3_bucket.get("run/step_000000001/manifest.json") == b'{"m": 1}'


def test_demo_refuses_an_object_store_and_leaves_no_local_tree(tmp_path, monkeypatch):
    from resumekit.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["demo", "--dir", "s3://bucket/demo"])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "is an object store" in r.stderr and "nothing was run" in r.stderr
    assert os.listdir(tmp_path) == []
