"""Fetching into the content-addressed cache: sha256 verification, retries, nothing partial left."""

from __future__ import annotations

import hashlib

import pytest

from clipforget.io import storage


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "cache"


def _blobs(cache):
    return sorted(p.name for p in (cache / "blobs").rglob("*") if p.is_file()) if cache.exists() else []


def test_s3_object_is_verified_against_its_sha256_metadata_and_cached(s3, cache):
    got = storage.fetch(s3["checkpoint"], cache=cache)
    assert got.sha256 == s3["sha256"] and not got.cached
    assert got.path == cache / "blobs" / "sha256" / f"{s3['sha256']}.safetensors"
    assert storage.fetch(s3["checkpoint"], cache=cache).cached  # metadata names a blob the cache holds
    assert storage.fetch(s3["checkpoint"], sha256=s3["sha256"], cache=cache).cached


def test_expected_digest_mismatch_fails_and_keeps_nothing(s3, cache):
    wrong = "0" * 64
    with pytest.raises(storage.ChecksumMismatch, match="differs from the expected"):
        storage.fetch(s3["checkpoint"], sha256=wrong, cache=cache)
    s3["client"].put_object(Bucket=s3["bucket"], Key="models/plain.bin", Body=b"abc")
    with pytest.raises(storage.ChecksumMismatch, match="sha256 mismatch"):
        storage.fetch(f"s3://{s3['bucket']}/models/plain.bin", sha256=wrong, cache=cache)
    assert _blobs(cache) == []


def test_lying_metadata_is_caught(s3, cache):
    s3["client"].put_object(Bucket=s3["bucket"], Key="models/liar.bin", Body=b"not what it says",
                            Metadata={"sha256": hashlib.sha256(b"something else").hexdigest()})
    with pytest.raises(storage.ChecksumMismatch):
        storage.fetch(f"s3://{s3['bucket']}/models/liar.bin", cache=cache)
    assert _blobs(cache) == []


def test_missing_object_is_not_retried(s3, cache):
    with pytest.raises(storage.NotFoundError, match="no such object"):
        storage.fetch(f"s3://{s3['bucket']}/models/nothing.safetensors", cache=cache, backoff=10)


def test_local_path_and_file_uri(tmp_path, cache):
    src = tmp_path / "w.safetensors"
    src.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert storage.fetch(src, cache=cache).sha256 == digest
    assert storage.fetch(f"file://{src}", sha256=digest, cache=cache).cached
    with pytest.raises(storage.ChecksumMismatch):
        storage.fetch(src, sha256="1" * 64, cache=cache)
    with pytest.raises(storage.NotFoundError):
        storage.fetch(tmp_path / "absent.safetensors", cache=cache)


def test_transient_errors_are_retried_with_backoff_and_others_are_not():
    from botocore.exceptions import ClientError, EndpointConnectionError

    calls, logged = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        return "ok"

    assert storage.with_retries(flaky, "get", attempts=4, backoff=0.01, log=logged.append) == "ok"
    assert len(calls) == 3 and len(logged) == 2 and "retrying" in logged[0]
    throttled = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    with pytest.raises(storage.TransientError, match="gave up after 2 attempts"):
        storage.with_retries(lambda: (_ for _ in ()).throw(throttled), "get", attempts=2, backoff=0.01)
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    calls.clear()

    def forbidden():
        calls.append(1)
        raise denied

    with pytest.raises(ClientError):
        storage.with_retries(forbidden, "get", attempts=4, backoff=0.01)
    assert len(calls) == 1


def test_s3_prefix_is_mirrored_once(s3, cache):
    for key in ("sketch/house/0.png", "sketch/house/1.png", "photo/star/0.png"):
        s3["client"].put_object(Bucket=s3["bucket"], Key=f"small/{key}", Body=key.encode())
    uri = f"s3://{s3['bucket']}/small"
    first = storage.fetch_tree(uri, cache=cache)
    assert sorted(p.relative_to(first).as_posix() for p in first.glob("*/*/*.png")) == [
        "photo/star/0.png", "sketch/house/0.png", "sketch/house/1.png"]
    assert (first / "sketch" / "house" / "1.png").read_bytes() == b"sketch/house/1.png"
    assert storage.fetch_tree(uri + "/", cache=cache) == first
    s3["client"].put_object(Bucket=s3["bucket"], Key="small/photo/star/1.png", Body=b"new")
    assert storage.fetch_tree(uri, cache=cache) != first  # a changed prefix is a new mirror
    with pytest.raises(storage.NotFoundError):
        storage.fetch_tree(f"s3://{s3['bucket']}/nothing/", cache=cache)
