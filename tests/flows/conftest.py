"""Real components the pipeline tests start themselves, once per session: an S3 endpoint (moto's
server mode, over HTTP) holding the toy checkpoint with its sha256 metadata and a rendered evaluation
set, an `mlflow server` subprocess on SQLite, and Prefect through `prefect_test_harness`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import testservers

from clipforget.io.checkpoints import TOY_WEIGHTS, sha256_file

BUCKET = "clipforget-test"
# the evaluation set of the core's target tests (tests/test_toy_targets.py: render seed 3, 50 per cell), so
# the pipeline's gate sees what those tests see; training used render seed 0
EVAL_SEED, EVAL_PER_CELL = 3, 50



@pytest.fixture(scope="session")
def pipeline_env(tmp_path_factory):
    """Isolated cache, fake AWS credentials, no telemetry; restored afterwards."""
    root = tmp_path_factory.mktemp("pipeline")
    updates = {"CLIPFORGET_CACHE": str(root / "cache"), "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-results"),
               "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        updates.setdefault(key, "")
    saved = {k: os.environ.get(k) for k in updates}
    for k, v in updates.items():
        if v:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3(pipeline_env):
    """A moto S3 server over HTTP: s3://BUCKET/models/toy.safetensors (sha256 metadata) and
    s3://BUCKET/eval/toy/<domain>/<class>/<i>.png."""
    import boto3
    from moto.server import ThreadedMotoServer

    from clipforget.io.registry import encode_png
    from clipforget.method.data import cell_dir
    from clipforget.method.grid import Cell, resolve_grid
    from clipforget.toyworld.render import render_cells

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    sha = sha256_file(TOY_WEIGHTS)
    client.upload_file(str(TOY_WEIGHTS), BUCKET, "models/toy.safetensors", ExtraArgs={"Metadata": {"sha256": sha}})
    images, cells = render_cells(resolve_grid("toy").cells, EVAL_PER_CELL, EVAL_SEED)
    counts: dict = {}
    for image, (cls, domain) in zip(images, cells, strict=True):
        cell = Cell(cls, domain)
        i = counts[cell] = counts.get(cell, -1) + 1
        key = (cell_dir("eval/toy", cell) / f"{i}.png").as_posix()
        client.put_object(Bucket=BUCKET, Key=key, Body=encode_png(image))
    yield {"endpoint": os.environ["AWS_ENDPOINT_URL"], "bucket": BUCKET, "client": client, "sha256": sha,
           "checkpoint": f"s3://{BUCKET}/models/toy.safetensors", "eval": f"s3://{BUCKET}/eval/toy/"}
    server.stop()
    os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(scope="session")
def mlflow_server(pipeline_env):
    """A real `mlflow server` subprocess (SQLite backend, proxied artifacts) on a free local port."""
    with testservers.mlflow_server(pipeline_env / "mlflow") as url:
        yield url


@pytest.fixture(scope="session")
def prefect_harness(pipeline_env):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def banked_retain_cells(pipeline_env, toy, prototype_bank):
    """The prototype bank as an earlier request would have left it: every cell but `star`'s.

    The core's session fixture synthesized all 40 cells with the default settings (those of the requests
    below), seeded per (seed, cell, index); storing 36 of them is what a request that forgot another class
    would have stored. A `star` request then synthesizes its 4 cells only, and the next one none.
    """
    from clipforget.io.bank import PrototypeBank
    from clipforget.method.synthesis import Prototypes

    keep = [i for i, c in enumerate(prototype_bank.cells) if c.cls != "star"]
    retained = Prototypes(prototype_bank.embeddings[keep], [prototype_bank.cells[i] for i in keep],
                          prototype_bank.cosines[keep], prototype_bank.steps_used[keep],
                          prototype_bank.seconds * len(keep) / len(prototype_bank.cells), prototype_bank.config)
    return PrototypeBank(pipeline_env / "cache" / "prototypes").put(toy.sha256, retained)


@pytest.fixture(scope="session")
def own_cache(pipeline_env, banked_retain_cells, tmp_path_factory):
    """A factory of fresh CLIPFORGET_CACHE folders, each holding the 36 non-`star` cells of the bank.

    Test modules that synthesize `star` (the whole grid is every build's retain set) work in a cache of their
    own: the flow tests' first request expects `star`'s cells unsynthesized, whichever order the tests run in.
    """
    import shutil

    def make(name: str) -> Path:
        src, dst = pipeline_env / "cache", tmp_path_factory.mktemp(name)
        for path in banked_retain_cells:
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        return dst

    return make


@pytest.fixture(scope="session")
def pipeline(s3, mlflow_server, prefect_harness, banked_retain_cells):
    """Everything the flow talks to, started."""
    return {"s3": s3, "mlflow": mlflow_server}
