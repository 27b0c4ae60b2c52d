"""Fetching checkpoints and evaluation folders into a local content-addressed cache.

Sources: `s3://bucket/key` (boto3; the standard `AWS_ENDPOINT_URL` points it at MinIO, moto, ...),
`file:///path` or a plain local path. A checkpoint lands at `<cache>/blobs/sha256/<digest><suffix>`
only after its sha256 was verified against the expected digest (the caller's, else the S3 object's
`sha256` metadata), so a file in the cache is always whole and correct; a mismatch leaves nothing.
Transient S3 errors (connection drops, timeouts, 5xx, throttling) are retried with backoff.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from clipforget.io.cache import touch

T = TypeVar("T")
CHUNK = 1 << 20
TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                   "ThrottlingException", "RequestTimeout", "RequestTimeoutException"}


class StorageError(RuntimeError):
    """A source could not be read; the message names it and says why."""


class NotFoundError(StorageError):
    """The object, file or prefix does not exist."""


class ChecksumMismatch(StorageError):
    """The bytes read do not hash to the expected sha256."""


class TransientError(StorageError):
    """A failure worth retrying (network, throttling, server error) that outlived its retries."""


def cache_root() -> Path:
    """`CLIPFORGET_CACHE`, else `~/.cache/clipforget`."""
    return Path(os.environ.get("CLIPFORGET_CACHE") or Path.home() / ".cache" / "clipforget")


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    uri: str
    cached: bool  # True when the cache already held the verified bytes and nothing was read

    def to_dict(self) -> dict[str, str | bool]:
        return {"path": str(self.path), "sha256": self.sha256, "uri": self.uri, "cached": self.cached}


@dataclass(frozen=True)
class Location:
    scheme: str  # "s3" or "file"
    bucket: str
    key: str  # S3 key, or the local path

    @classmethod
    def parse(cls, uri: str | Path) -> Location:
        text = str(uri)
        parsed = urlparse(text)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"{text}: an S3 URI needs a bucket, s3://bucket/key")
            return cls("s3", parsed.netloc, parsed.path.lstrip("/"))
        if parsed.scheme == "file":
            return cls("file", "", unquote(parsed.path))
        if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
            raise ValueError(f"{text}: unsupported scheme {parsed.scheme!r}; use s3://, file:// or a local path")
        return cls("file", "", text)


def is_transient(error: BaseException) -> bool:
    """Network trouble, throttling and server-side errors are worth retrying; a 403 or 404 is not."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(error, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, ClientError):
        err = error.response.get("Error", {})
        status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return str(err.get("Code", "")) in TRANSIENT_CODES or status.startswith("5")
    return False


def with_retries(fn: Callable[[], T], what: str, attempts: int = 4, backoff: float = 0.5,
                 log: Callable[[str], None] | None = None) -> T:
    """Call fn, retrying transient errors with exponential backoff (backoff, 2·backoff, ...)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == attempts:
                raise TransientError(f"{what}: gave up after {attempts} attempts: {type(e).__name__}: {e}") from e
            delay = backoff * 2 ** (attempt - 1)
            if log:
                log(f"{what}: {type(e).__name__} (attempt {attempt}/{attempts}); retrying in {delay:.1f}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def s3_client() -> Any:
    """A boto3 S3 client; boto3 reads `AWS_ENDPOINT_URL`, credentials and region from the environment."""
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # a stalled endpoint fails a call after CLIPFORGET_S3_TIMEOUT seconds (default 60) instead of hanging, and is retried
    timeout = float(os.environ.get("CLIPFORGET_S3_TIMEOUT") or 60)
    # botocore's own retries stay on; ours wrap whole operations (a download that breaks half-way)
    return boto3.client("s3", region_name=region, config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                                connect_timeout=min(timeout, 10.0), read_timeout=timeout))


def _client_error_code(error: BaseException) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _blob_path(root: Path, digest: str, suffix: str) -> Path:
    return root / "blobs" / "sha256" / f"{digest}{suffix}"


def _commit(read: Callable[[int], bytes], root: Path, suffix: str, expected: str | None, uri: str) -> tuple[Path, str]:
    """Stream into a temp file while hashing; rename it to its digest's name only if it verifies."""
    incoming = root / "blobs" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=incoming, suffix=suffix)
    tmp = Path(name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            while block := read(CHUNK):
                h.update(block)
                f.write(block)
        got = h.hexdigest()
        _check_digest(got, expected, uri)
        final = _blob_path(root, got, suffix)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)  # the name is the digest, so the rename is the whole commit
        return final, got
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_digest(got: str, expected: str | None, uri: str) -> None:
    if expected is not None and got != expected:
        raise ChecksumMismatch(f"{uri}: sha256 mismatch: expected {expected}, got {got}; nothing was kept")


def normalize_sha256(digest: str | None, what: str) -> str | None:
    """A sha256 hex digest, lower case, without a `sha256:` prefix; None for none; ValueError naming `what`."""
    if digest is None or digest == "":
        return None
    d = digest.strip().lower().removeprefix("sha256:")
    if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
        raise ValueError(f"{what} is not a sha256 hex digest: {digest!r}")
    return d


def fetch(uri: str | Path, sha256: str | None = None, cache: Path | None = None, attempts: int = 4,
          backoff: float = 0.5, log: Callable[[str], None] | None = None) -> Fetched:
    """Fetch one file into the content-addressed cache and verify it; returns the cached path."""
    root = cache or cache_root()
    expected = normalize_sha256(sha256, "the expected sha256")
    loc = Location.parse(uri)
    suffix = "".join(Path(loc.key).suffixes[-1:])
    if expected is not None and (hit := _blob_path(root, expected, suffix)).is_file():
        touch(hit)
        return Fetched(hit, expected, str(uri), cached=True)
    if loc.scheme == "file":
        src = Path(loc.key)
        if not src.is_file():
            raise NotFoundError(f"{uri}: no such file")
        with open(src, "rb") as f:
            final, got = _commit(f.read, root, suffix, expected, str(uri))
        return Fetched(final, got, str(uri), cached=False)
    return _fetch_s3(loc, str(uri), expected, root, suffix, attempts, backoff, log)


def _fetch_s3(loc: Location, uri: str, expected: str | None, root: Path, suffix: str, attempts: int, backoff: float,
              log: Callable[[str], None] | None) -> Fetched:
    from botocore.exceptions import ClientError

    client = s3_client()
    try:
        head = with_retries(lambda: client.head_object(Bucket=loc.bucket, Key=loc.key), f"{uri}: head", attempts,
                            backoff, log)
    except ClientError as e:
        if _client_error_code(e) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise NotFoundError(f"{uri}: {_missing(client, loc.bucket)}") from None
        raise StorageError(f"{uri}: {_client_error_code(e) or type(e).__name__}: cannot read the object") from e
    declared = normalize_sha256((head.get("Metadata") or {}).get("sha256"), f"{uri}'s sha256 metadata")
    if expected is not None and declared is not None and declared != expected:
        raise ChecksumMismatch(f"{uri}: its sha256 metadata {declared} differs from the expected {expected}")
    want = expected or declared
    if want is not None and (hit := _blob_path(root, want, suffix)).is_file():
        touch(hit)
        return Fetched(hit, want, uri, cached=True)

    def download() -> tuple[Path, str]:
        return _commit(client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read, root, suffix, want, uri)

    final, got = with_retries(download, f"{uri}: download", attempts, backoff, log)
    return Fetched(final, got, uri, cached=False)


def _missing(client: Any, bucket: str) -> str:
    """What a 404 on an object means: no such bucket, or no such key in it (a HEAD response has no error body)."""
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as e:
        if _client_error_code(e) in ("404", "NoSuchBucket", "NotFound"):
            return f"bucket {bucket!r} does not exist"
    return "no such object"


def _list_s3(client: Any, bucket: str, prefix: str) -> Iterator[dict]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def _download(client: Any, bucket: str, key: str, target: Path, attempts: int, backoff: float,
              log: Callable[[str], None] | None) -> None:
    def get() -> None:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        with open(target, "wb") as f:
            while block := body.read(CHUNK):
                f.write(block)

    with_retries(get, f"s3://{bucket}/{key}: download", attempts, backoff, log)


def fetch_tree(uri: str | Path, cache: Path | None = None, attempts: int = 4, backoff: float = 0.5,
               log: Callable[[str], None] | None = None) -> Path:
    """A folder: local paths are used in place; an S3 prefix is mirrored into the cache.

    The mirror is named by a digest of the listing (keys, sizes, ETags), so an unchanged prefix is
    downloaded once and a changed one gets a fresh folder.
    """
    loc = Location.parse(uri)
    if loc.scheme == "file":
        if not Path(loc.key).is_dir():
            raise NotFoundError(f"{uri}: no such folder")
        return Path(loc.key)
    client = s3_client()
    prefix = loc.key if loc.key.endswith("/") or not loc.key else loc.key + "/"
    from botocore.exceptions import ClientError

    try:
        objects = with_retries(lambda: sorted(_list_s3(client, loc.bucket, prefix), key=lambda o: o["Key"]),
                               f"{uri}: list", attempts, backoff, log)
    except ClientError as e:
        if _client_error_code(e) in ("404", "NoSuchBucket", "NotFound"):
            raise NotFoundError(f"{uri}: bucket {loc.bucket!r} does not exist") from None
        raise StorageError(f"{uri}: {_client_error_code(e) or type(e).__name__}: cannot list the prefix") from None
    objects = [o for o in objects if not o["Key"].endswith("/")]
    if not objects:
        raise NotFoundError(f"{uri}: no objects under this prefix")
    listing = "\n".join(f"{o['Key']}\t{o['Size']}\t{o.get('ETag', '')}" for o in objects)
    digest = hashlib.sha256(f"s3://{loc.bucket}\n{listing}".encode()).hexdigest()
    dest = (cache or cache_root()) / "trees" / digest
    if (dest / ".complete").is_file():
        touch(dest / ".complete")
        return dest
    staging = dest.with_name(f".{digest}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        targets = [staging / o["Key"][len(prefix):] for o in objects]
        for parent in {t.parent for t in targets}:
            parent.mkdir(parents=True, exist_ok=True)
        # many small objects (an image folder): requests in flight at once, not one after another
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda ot: _download(client, loc.bucket, ot[0]["Key"], ot[1], attempts, backoff, log),
                          zip(objects, targets, strict=True)))
        (staging / ".complete").write_text(listing + "\n")
        if dest.exists():  # another process finished first; theirs is as good as ours
            shutil.rmtree(staging)
        else:
            os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
