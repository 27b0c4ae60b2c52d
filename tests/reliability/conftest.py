"""The real components the reliability cases run against: a moto S3 server over HTTP, an `mlflow server`
subprocess and Prefect's test harness, as tests/flows/conftest.py starts them.

In a whole-suite session tests/flows has started them already (its session fixtures stay up until the session
ends, and tests/flows runs first): they are reused, not started twice. Run alone, this folder starts its own,
lighter set (no evaluation render on S3: the cases here bring their own data).

Each case records what it checked (`record_property`): `bench/reliability.py` turns the JUnit XML of this folder
into the table of docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import testservers

from clipforget.io.checkpoints import TOY_WEIGHTS, sha256_file

try:  # hypothesis keeps caches in ./.hypothesis unless told otherwise: not in the repository
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))
except ImportError:  # pragma: no cover - hypothesis is in the dev extra
    pass

BUCKET = "clipforget-test"
CHECKPOINT_KEY = "models/toy.safetensors"



def _started_by_this_session(basetemp: Path) -> bool:
    """tests/flows' session fixtures are up: its isolated cache lies under this session's basetemp (so the
    endpoints in the environment are the ones it started, not a developer's own), and both endpoints are set."""
    cache = os.environ.get("CLIPFORGET_CACHE", "")
    return cache.startswith(str(basetemp)) and bool(os.environ.get("AWS_ENDPOINT_URL")) and \
        bool(os.environ.get("MLFLOW_TRACKING_URI"))


@contextmanager
def _env(root: Path) -> Iterator[None]:
    updates = {"CLIPFORGET_CACHE": str(root / "cache"), "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-results"),
               "MLFLOW_ENABLE_ASYNC_LOGGING": "false", "AWS_SESSION_TOKEN": "", "AWS_PROFILE": "",
               "AWS_ENDPOINT_URL": "", "MLFLOW_TRACKING_URI": ""}
    saved = {k: os.environ.get(k) for k in updates}
    for k, v in updates.items():
        if v:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _moto() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[dict]:
    """S3 (moto, with the toy checkpoint and its sha256 metadata), MLflow and Prefect: reused or started."""
    import boto3

    with ExitStack() as stack:
        if not _started_by_this_session(tmp_path_factory.getbasetemp()):
            from prefect.testing.utilities import prefect_test_harness

            root = tmp_path_factory.mktemp("reliability-servers")
            stack.enter_context(_env(root))
            stack.enter_context(_moto())
            stack.enter_context(testservers.mlflow_server(root / "mlflow"))
            stack.enter_context(prefect_test_harness(server_startup_timeout=120))
        client = boto3.client("s3")
        if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket=BUCKET)
        sha = sha256_file(TOY_WEIGHTS)
        client.upload_file(str(TOY_WEIGHTS), BUCKET, CHECKPOINT_KEY, ExtraArgs={"Metadata": {"sha256": sha}})
        yield {"endpoint": os.environ["AWS_ENDPOINT_URL"], "mlflow": os.environ["MLFLOW_TRACKING_URI"],
               "client": client, "bucket": BUCKET, "sha256": sha, "checkpoint": f"s3://{BUCKET}/{CHECKPOINT_KEY}"}


@pytest.fixture
def checked(record_property):
    """`checked(what, **counters)`: one row of the reliability table (what the case checked, and counters such
    as bad_registrations, ledger_delta or secrets_found that the table sums)."""

    def record(what: str, **counters: int) -> None:
        record_property("checked", what)
        for k, v in counters.items():
            record_property(k, json.dumps(v))

    return record
