"""The team install's path, for real: a `prefect server`, the deployments of infra/prefect.yaml, a process worker
on the `cpu` pool and one on the `gpu` pool; a deletion request run through its deployment, its prototype
synthesis routed to the gpu pool, and the model found in the `mlflow server`, tagged with the ledger head."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from clipforget.io import registry

pytestmark = pytest.mark.slow

NAME = "toy-deployed"
REQUEST_ID = "deploy-forget-star"
RUN_TIMEOUT_S = 480
REPO = Path(__file__).resolve().parents[3]
PREFECT_FILE = REPO / "infra" / "prefect.yaml"
STAR = ["star/photo", "star/painting", "star/cartoon", "star/sketch"]


@pytest.fixture(scope="module")
def worker_cache(own_cache):
    """The workers' CLIPFORGET_CACHE (one folder, as the cpu and gpu workers share one volume): a cache of
    its own, so `star`'s cells always go through the gpu pool here."""
    return own_cache("worker-cache")


@pytest.fixture(scope="module")
def deployed(prefect_stack, s3, mlflow_server, worker_cache, tmp_path_factory):
    """`prefect deploy --all` of the shipped prefect.yaml, then a worker per pool with the environment
    DEPLOY.md lists. The ledger is an S3 prefix, as a team install keeps it."""
    prefect_stack.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE))
    ledger = f"s3://{s3['bucket']}/deploy-ledger/"
    env = {"CLIPFORGET_HOME": str(REPO), "PYTHONPATH": str(REPO), "CLIPFORGET_CACHE": str(worker_cache),
           "CLIPFORGET_LEDGER": ledger, "MLFLOW_TRACKING_URI": mlflow_server, "AWS_ENDPOINT_URL": s3["endpoint"],
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path_factory.mktemp("worker-results")),
           **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
    gpu = prefect_stack.start_worker("gpu", **env)
    cpu = prefect_stack.start_worker("cpu", **env, CLIPFORGET_SYNTHESIS_DEPLOYMENT="synthesize-prototypes/gpu")
    return {"stack": prefect_stack, "ledger": ledger, "cpu": cpu, "gpu": gpu}


def test_the_recipe_deploys_three_deployments_on_their_pools(deployed):
    with deployed["stack"].client() as client:
        request = client.read_deployment_by_name("deletion-request/on-demand")
        governance = client.read_deployment_by_name("governance/daily")
        synthesis = client.read_deployment_by_name("synthesize-prototypes/gpu")
    assert (request.work_pool_name, governance.work_pool_name, synthesis.work_pool_name) == ("cpu", "cpu", "gpu")
    assert request.parameters["policy"]["arch"] == "toy" and request.parameters["promote"] is False
    assert not request.schedules
    [daily] = governance.schedules
    assert (daily.schedule.cron, daily.schedule.timezone, daily.active) == ("0 3 * * *", "UTC", True)
    assert governance.parameters["promote"] is True
    assert governance.parameters["policy"] == request.parameters["policy"]
    for dep, strategy in ((request, "ENQUEUE"), (governance, "CANCEL_NEW"), (synthesis, "ENQUEUE")):
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1, dep.name
        assert dep.concurrency_options is not None and dep.concurrency_options.collision_strategy.value == strategy
    assert request.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                   {"directory": "{{ $CLIPFORGET_HOME }}"}}]  # read on the worker, at run time


def test_deletion_request_runs_on_the_cpu_worker_and_registers_the_model(deployed, s3, mlflow_server, worker_cache):
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from clipforget.governance.ledger import Ledger

    stack = deployed["stack"]
    parameters = {
        "request": {"request_id": REQUEST_ID, "requested_by": "tests", "reason": "deployment test",
                    "mode": "global", "classes": ["star"]},
        "policy": {"arch": "toy", "checkpoint_uri": s3["checkpoint"], "data_uri": s3["eval"], "registered_name": NAME},
    }
    t0 = time.perf_counter()
    run = stack.run("deletion-request/on-demand", parameters, timeout=RUN_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    assert run.state is not None and run.state.is_completed(), (
        f"flow run {run.name} ended {run.state!r} after {seconds:.0f} s\n{stack.logs()}")
    print(f"deletion-request/on-demand: {seconds:.1f} s from submission to Completed")

    # the ledger (an S3 prefix) holds the request, and the registered version names it and the head
    entries = Ledger(deployed["ledger"]).entries()
    assert [e.request_id for e in entries] == [REQUEST_ID]
    assert entries[0].request["classes"] == ["star"] and entries[0].request["requested_by"] == "tests"
    versions = MlflowClient(mlflow_server).search_model_versions(f"name = '{NAME}'")
    assert len(versions) == 1, [v.tags for v in versions]
    tags = versions[0].tags
    assert tags[registry.TAG_LEDGER_HEAD] == entries[-1].hash
    assert tags[registry.TAG_REQUEST_IDS].split(",") == [REQUEST_ID]
    assert tags[registry.TAG_BASE_SHA256] == s3["sha256"]
    assert registry.show(f"{NAME}@candidate", uri=mlflow_server)["version"] == versions[0].version

    # star's 4 cells were missing from the bank: a run of the gpu pool's deployment, picked up by the gpu
    # worker, synthesized them into the shared cache
    with stack.client() as client:
        synth = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["synthesize-prototypes"])))
    assert len(synth) == 1, synth
    assert synth[0].work_pool_name == "gpu" and synth[0].state is not None and synth[0].state.is_completed()
    assert set(STAR) <= set(synth[0].parameters["cells"])
    assert str(synth[0].id) in deployed["gpu"].log_path.read_text()
    assert str(run.id) in deployed["cpu"].log_path.read_text()
    assert len(list((worker_cache / "prototypes").rglob("*.safetensors"))) == 40
