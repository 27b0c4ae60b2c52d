"""Shared, expensive fixtures: the shipped toy model, a fresh test render and one prototype bank."""

from __future__ import annotations

import os

import pytest
import testservers
import torch

from clipforget.io.checkpoints import TOY_WEIGHTS, load_model, sha256_file
from clipforget.method.evaluate import LabelledImages, ZeroShotClassifier, image_features
from clipforget.method.grid import resolve_grid
from clipforget.method.projection import cell_text_embeddings, text_targets
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import SynthesisConfig, synthesize
from clipforget.toyworld.render import render_cells

if os.environ.get("PYTEST_XDIST_WORKER"):
    # workers share the cores: one torch thread each, here and in the processes the tests start (two processes
    # with two threads each on two cores run many times slower than one thread each)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# the longest test files (minutes on a 2-core machine, `make test --durations`), run first: pytest-xdist hands files
# to its two workers in collection order (--dist loadfile), and a long file started last leaves one core idle for
# minutes at the end of the run
LONGEST_FIRST = ["flows/test_pipeline_flow.py", "reliability/test_kill_and_race.py", "flows/test_governance.py",
                 "reliability/test_secrets_and_data_free.py", "method/test_synthesis.py", "flows/deploy/test_deployment.py",
                 "method/test_fit_on_images.py", "flows/test_registry_consumers.py", "reliability/test_bad_input.py",
                 "flows/test_ray_synthesis.py", "cli/test_cli.py", "method/test_toy_targets.py"]


def pytest_collection_modifyitems(config, items):
    """The files of LONGEST_FIRST first, in that order; the rest after them, in collection order."""
    here = os.path.dirname(__file__)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item) -> int:
        rel = os.path.relpath(str(item.path), here).replace(os.sep, "/")
        return rank.get(rel, len(rank))

    items[:] = sorted(items, key=key)  # stable: a file's tests keep their order


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """`module_tmp(name)`: a new folder that lives as long as the test module, for a module's workspace (caches,
    checkpoints, registrations: tens to hundreds of MB each). Removed when the module's tests are done, so that
    a worker's disk holds one module's workspace at a time, not every module's until the run ends."""
    import shutil

    made = []

    def make(name: str):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


TEST_SEED = 3  # training used seed 0, setting choices seed 1, docs/RESULTS.md seed 2
PER_CELL = 50


@pytest.fixture(scope="session")
def toy():
    torch.manual_seed(0)
    return load_model("toy", device="cpu")


@pytest.fixture(scope="session")
def toy_grid():
    return resolve_grid("toy")


@pytest.fixture(scope="session")
def test_render(toy_grid):
    """The fresh test render (seed 3, 50 images per cell) as arrays: the core's target tests measure on it and the S3
    fixture serves it as the pipeline's evaluation set."""
    return render_cells(toy_grid.cells, PER_CELL, TEST_SEED)


@pytest.fixture(scope="session")
def test_images(toy, test_render):
    return LabelledImages.from_arrays(*test_render, toy.preprocess)


@pytest.fixture(scope="session")
def classifier(toy, toy_grid):
    return ZeroShotClassifier(toy.model, toy.tokenizer, toy_grid)


@pytest.fixture(scope="session")
def base_features(toy, test_images):
    return image_features(toy.model, test_images.pixels)


@pytest.fixture(scope="session")
def base_report(base_features, test_images, classifier):
    return classifier.evaluate(base_features, test_images.cells)


@pytest.fixture(scope="session")
def folded_features(toy, base_features):
    """`folded_features(P)`: the test render's embeddings by the toy model with P folded into a copy of it.

    The copy's own last linear map is read back and verified to be a fold of the base (`folded_map`, the gate's
    check: every other tensor bitwise the base's), so its embeddings are that map applied to the base's features
    (exact for a fold; tests/method/test_fold.py and tests/tasks/test_validate_measure.py compare it with running
    the folded tower) -- what the gate does, at a fraction of running the whole tower per fold."""
    import copy

    from clipforget.method.fold import fold_projection, folded_map

    def features(P: torch.Tensor) -> torch.Tensor:
        model = copy.deepcopy(toy.model)
        fold_projection(model, P)
        fm = folded_map(toy.model, model.state_dict())
        assert fm is not None, "the folded copy is not a fold of the toy model"
        return fm.apply(base_features)

    return features


@pytest.fixture(scope="session")
def text_bank(toy, toy_grid):
    return cell_text_embeddings(toy.model, toy.tokenizer, TemplateSet(), toy_grid.cells)


@pytest.fixture(scope="session")
def prototype_bank(toy, toy_grid, text_bank, tmp_path_factory):
    """The default synthesis settings of `clipforget forget`, for every cell of the toy grid.

    Under pytest-xdist the workers share one prototype bank in this run's temporary folder, filled in two halves of
    the grid, each under its own lock: a worker fills its own half first, then the other (which it finds banked,
    or waits for, or fills itself when the other worker is not there yet), so two workers that need the bank at
    the start synthesize in parallel instead of one waiting for the other. One thread each and prototypes seeded
    per (seed, cell, index): the bits do not depend on which worker made them.
    """
    targets = text_targets(text_bank, toy_grid.cells)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return synthesize(toy.model, targets, toy_grid.cells, SynthesisConfig())
    import fcntl

    from clipforget.io.bank import PrototypeBank, load_prototypes, synthesize_with_bank

    shared = tmp_path_factory.getbasetemp().parent / "shared-prototype-bank"  # this run's, common to its workers
    shared.mkdir(exist_ok=True)
    config = SynthesisConfig().resolved(toy.device)
    by_cell = dict(zip(toy_grid.cells, targets, strict=True))
    halves = [toy_grid.cells[0::2], toy_grid.cells[1::2]]
    first = int(worker.removeprefix("gw") or 0) % 2
    bank = PrototypeBank(shared)
    for half in (first, 1 - first):
        with open(shared / f".lock-{half}", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            synthesize_with_bank(toy.model, by_cell, halves[half], config, toy.sha256 or "", bank)
    return load_prototypes([bank.path(toy.sha256 or "", c, config) for c in toy_grid.cells], config)


# --- real servers, once per process (tests/flows and tests/reliability both use these) ---

BUCKET = "clipforget-test"
# the pipeline's evaluation set is the core target tests' render (`test_render`: seed 3, 50 per cell), so the
# pipeline's gate sees what those tests see; training used render seed 0


@pytest.fixture(scope="session")
def pipeline_env(tmp_path_factory):
    """Isolated cache, fake AWS credentials, no telemetry; restored afterwards."""
    root = tmp_path_factory.mktemp("pipeline")
    updates = {"CLIPFORGET_CACHE": str(root / "cache"), "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-results"),
               "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
               # the pictures' prototype strip: one synthesized image per forgotten cell instead of 4 (one row per
               # cell either way, what the tests look at); a strip costs a first request ~30 CPU-seconds on the toy
               "CLIPFORGET_STRIP_PER_CELL": "1"}
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
def s3(pipeline_env, test_render):
    """A moto S3 server over HTTP: s3://BUCKET/models/toy.safetensors (sha256 metadata) and
    s3://BUCKET/eval/toy/<domain>/<class>/<i>.png (the test render).

    The 2,000 evaluation images are put straight into the server's in-process store (what 2,000 PUTs over HTTP
    would leave there, in a tenth of the time); everything the tests and the product do goes over HTTP."""
    import boto3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    from clipforget.io.registry import encode_png
    from clipforget.method.data import cell_dir
    from clipforget.method.grid import Cell

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    sha = sha256_file(TOY_WEIGHTS)
    client.upload_file(str(TOY_WEIGHTS), BUCKET, "models/toy.safetensors", ExtraArgs={"Metadata": {"sha256": sha}})
    store = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    counts: dict = {}
    for image, (cls, domain) in zip(*test_render, strict=True):
        cell = Cell(cls, domain)
        i = counts[cell] = counts.get(cell, -1) + 1
        store.put_object(BUCKET, (cell_dir("eval/toy", cell) / f"{i}.png").as_posix(), encode_png(image))
    listed = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="eval/toy/")
    assert sum(p.get("KeyCount", 0) for p in listed) == len(test_render[1])  # the server serves what was stored
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
