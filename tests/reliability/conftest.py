"""The real components the reliability cases run against: a moto S3 server over HTTP, an `mlflow server`
subprocess and Prefect's test harness: the session fixtures of tests/conftest.py, started once per process
(or xdist worker) and shared with tests/flows. (Two sets, each setting the environment, had let a worker's later
reliability cases talk to the other set's MLflow.)

Each case records what it checked (`record_property`): `bench/reliability.py` turns the JUnit XML of this folder
into the table of docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

try:  # hypothesis keeps caches in ./.hypothesis unless told otherwise: not in the repository, nor left behind
    import atexit
    import shutil
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="hypothesis-")
    set_hypothesis_home_dir(_HYPOTHESIS_HOME)
    atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
except ImportError:  # pragma: no cover - hypothesis is in the dev extra
    pass

@pytest.fixture(scope="session")
def servers(s3, mlflow_server, prefect_harness) -> Iterator[dict]:
    """S3 (moto, with the toy checkpoint and its sha256 metadata), MLflow and Prefect: tests/conftest.py's session
    servers, the same ones tests/flows uses, so that the environment of this process names only them."""
    yield {"endpoint": s3["endpoint"], "mlflow": mlflow_server, "client": s3["client"], "bucket": s3["bucket"],
           "sha256": s3["sha256"], "checkpoint": s3["checkpoint"]}


@pytest.fixture
def checked(record_property):
    """`checked(what, **counters)`: one row of the reliability table (what the case checked, and counters such
    as bad_registrations, ledger_delta or secrets_found that the table sums)."""

    def record(what: str, **counters: int) -> None:
        record_property("checked", what)
        for k, v in counters.items():
            record_property(k, json.dumps(v))

    return record
