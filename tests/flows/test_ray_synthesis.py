"""Prototype synthesis fanned out on a local Ray instance (prefect-ray) gives the in-process bits; a full
bank submits nothing; routing to the gpu pool's deployment fills the shared bank or fails clearly."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from logcapture import run_log_lines
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from clipforget.io.bank import load_prototypes
from clipforget.io.checkpoints import TOY_WEIGHTS
from clipforget.method.grid import Cell
from clipforget.method.synthesis import SynthesisConfig, resolve_precision
from clipforget.steps import save_text
from flows.fanout import fill_bank, fill_bank_routed
from flows.runners import task_runner

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CELLS = ["star/sketch", "heart/photo", "tree/cartoon", "circle/painting"]
SMALL = SynthesisConfig(prototypes_per_cell=2, steps=30, check_every=10)


@flow(name="test-fill-bank")
def fill_twice(arch: str, checkpoint: str, sha256: str, text_file: str, cells: list[str], synthesis: dict,
               cells_per_task: int) -> dict:
    import ray

    first = fill_bank(arch, checkpoint, sha256, text_file, cells, synthesis, with_images=True,
                       cells_per_task=cells_per_task)
    second = fill_bank(arch, checkpoint, sha256, text_file, cells, synthesis, with_images=True,
                        cells_per_task=cells_per_task)
    return {"first": first, "second": second, "ray": ray.is_initialized()}


@pytest.fixture
def inputs(prefect_harness, toy, text_bank, tmp_path):
    text_file = save_text({Cell(*c.split("/")): text_bank[Cell(*c.split("/"))] for c in CELLS},
                          tmp_path / "text.safetensors")
    return {"arch": "toy", "checkpoint": str(TOY_WEIGHTS), "sha256": toy.sha256, "text_file": str(text_file),
            "cells": CELLS, "synthesis": asdict(SMALL)}


def _run(runner, inputs: dict, cache: Path, monkeypatch) -> dict:
    monkeypatch.setenv("CLIPFORGET_CACHE", str(cache))
    t0 = time.perf_counter()
    with run_log_lines() as lines:
        state = fill_twice.with_options(task_runner=runner)(**inputs, cells_per_task=2, return_state=True)
    out = state.result()
    with get_client(sync_client=True) as client:
        assert state.state_details.flow_run_id is not None
        ids = FlowRunFilterId(any_=[state.state_details.flow_run_id])
        # the API records task runs from events, a moment after they ran: wait for them (a busy machine lags)
        deadline = time.monotonic() + 60
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=ids))
            if len(runs) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    chunk_lines = [line for line in lines if line.startswith("chunk ")]
    return {**out, "plan": [line for line in lines if " tasks of up to " in line],
            "seconds": time.perf_counter() - t0, "task_runs": [r.name.rsplit("-", 1)[0] for r in runs],
            "pids": {int(line.rsplit("pid ", 1)[1]) for line in chunk_lines}, "chunk_lines": chunk_lines}


def test_ray_fan_out_gives_the_in_process_bits_and_a_full_bank_submits_nothing(inputs, tmp_path, monkeypatch):
    import ray

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same as the Ray workers (OMP_NUM_THREADS=1), so the same kernels' reductions
    try:
        local = _run(ThreadPoolTaskRunner(), inputs, tmp_path / "local", monkeypatch)
        # one declared (not real) GPU: each chunk asks Ray for half of it, so both chunks still run at once
        monkeypatch.setenv("CLIPFORGET_GPUS_PER_TASK", "0.5")
        init = {"num_cpus": 2, "num_gpus": 1, "include_dashboard": False, "log_to_driver": False,
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}}}
        remote = _run(task_runner("local", init_kwargs=init), inputs, tmp_path / "ray", monkeypatch)
    finally:
        torch.set_num_threads(threads)
        if ray.is_initialized():
            ray.shutdown()
    print(f"\nin-process {local['seconds']:.1f} s, Ray {remote['seconds']:.1f} s")
    assert not ray.is_initialized()  # the runner started Ray for the flow run and shut it down after

    for run, cache in ((local, tmp_path / "local"), (remote, tmp_path / "ray")):
        assert run["first"]["synthesized"] == 4 and run["first"]["reused"] == 0
        assert run["second"] == {**run["second"], "synthesized": 0, "reused": 4, "paths": run["first"]["paths"]}
        assert all(Path(p).is_file() and Path(p).is_relative_to(cache) for p in run["first"]["paths"])
        # two chunks of two cells in the first call, nothing submitted in the second
        # (counted from the chunks' own log lines: the API records task runs from events, which a busy worker
        # process may not have flushed when the flow returns)
        assert len(run["chunk_lines"]) == 2
        assert set(run["task_runs"]) <= {"synthesize_chunk"} and len(run["task_runs"]) <= 2
    assert remote["ray"] and not local["ray"]
    assert "on Ray, 0.5 GPU/task" in remote["plan"][0] and "in-process" in local["plan"][0]
    assert local["pids"] == {os.getpid()}
    assert os.getpid() not in remote["pids"] and len(remote["pids"]) >= 1  # Ray worker processes

    a = load_prototypes(local["first"]["paths"], SMALL)
    b = load_prototypes(remote["first"]["paths"], SMALL)
    assert a.cells == b.cells == [Cell(*c.split("/")) for c in CELLS for _ in range(2)]
    assert a.images is not None and b.images is not None and a.images.shape == (8, 64, 64, 3)
    for name in ("embeddings", "cosines", "steps_used", "images"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_routed_synthesis_runs_the_gpu_deployment_only_for_missing_cells(inputs, tmp_path, monkeypatch):
    import prefect.deployments

    from flows.synthesize import synthesize_prototypes_flow

    tiny = {**inputs, "cells": CELLS[:2], "synthesis": {**inputs["synthesis"], "steps": 4, "check_every": 2},
            "checkpoint_uri": TOY_WEIGHTS.as_uri()}  # forwarded, for a gpu worker without the caller's path
    calls: list[dict] = []

    def deployment(behaviour: str):
        def run_deployment(name, parameters=None, timeout=None, **kw):
            calls.append({"name": name, "timeout": timeout, **parameters})
            if behaviour == "fill":
                synthesize_prototypes_flow(**parameters)  # what the gpu worker does, on the shared cache
            return SimpleNamespace(name="gpu-run", id="0", state=Failed(message="no GPU") if behaviour == "fail"
                                   else Completed())
        return run_deployment

    @flow(name="test-routed")
    def routed(**kw) -> dict:
        return fill_bank_routed(**kw)

    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path / "shared"))
    monkeypatch.setenv("CLIPFORGET_SYNTHESIS_DEPLOYMENT", "synthesize-prototypes/gpu")

    monkeypatch.setattr(prefect.deployments, "run_deployment", deployment("fail"))
    with pytest.raises(RuntimeError, match="synthesize-prototypes/gpu.*FAILED.*no GPU"):
        routed(**tiny)
    monkeypatch.setattr(prefect.deployments, "run_deployment", deployment("nothing"))
    with pytest.raises(RuntimeError, match="share CLIPFORGET_CACHE"):
        routed(**tiny)

    monkeypatch.setattr(prefect.deployments, "run_deployment", deployment("fill"))
    out = routed(**tiny)
    assert out["synthesized"] == 2 and out["reused"] == 0 and all(Path(p).is_file() for p in out["paths"])
    # `precision: auto` is decided here, where the bank is keyed, and sent to the gpu pool decided
    decided = {**tiny["synthesis"], "precision": resolve_precision(tiny["synthesis"]["precision"], "cpu")}
    assert decided["precision"] in ("fp32", "bf16")
    assert calls[-1] == {"name": "synthesize-prototypes/gpu", "timeout": None, **tiny, "synthesis": decided,
                         "with_images": False}
    again = routed(**tiny)  # every cell banked: no deployment run
    assert len(calls) == 3 and again["synthesized"] == 0 and again["paths"] == out["paths"]


@flow(name="test-fill-bank-blocks")
def fill_blocks_twice(arch: str, checkpoint: str, sha256: str, text_file: str, blocks: list) -> dict:
    from flows.fanout import fill_bank_blocks

    first = fill_bank_blocks(arch, checkpoint, sha256, text_file, blocks, with_images=True)
    return {"first": first, "second": fill_bank_blocks(arch, checkpoint, sha256, text_file, blocks, with_images=True)}


def test_heldout_blocks_are_one_in_process_batch_banked_per_block(inputs, tmp_path, monkeypatch):
    """The sized held-out evidence comes in blocks (a forgotten cell needs a second block of 10): in a flow on the
    in-process runner every block the bank lacks is one synthesis task, one batch, and each block's files are its
    own, reused by the next request."""
    from clipforget.runner import heldout_blocks

    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIPFORGET_CELLS_PER_TASK", raising=False)
    cells = [Cell(*c.split("/")) for c in CELLS]
    sized = heldout_blocks(replace(SMALL, steps=5), {cells[0]: 20, cells[1]: 10, cells[2]: 20, cells[3]: 10}, cells)
    blocks = [(asdict(cfg), [str(c) for c in block]) for cfg, block in sized]
    assert [len(b) for _, b in blocks] == [4, 2]
    inputs = {k: v for k, v in inputs.items() if k not in ("cells", "synthesis")}
    with run_log_lines() as lines:
        out = fill_blocks_twice.with_options(task_runner=ThreadPoolTaskRunner())(**inputs, blocks=blocks)
    first, second = out["first"], out["second"]
    assert [b["synthesized"] for b in first] == [4, 2] and [b["reused"] for b in first] == [0, 0]
    assert [b["synthesized"] for b in second] == [0, 0] and [b["paths"] for b in second] == [b["paths"] for b in first]
    assert len({p for b in first for p in b["paths"]}) == 6 and all(Path(p).is_file() for b in first for p in b["paths"])
    done = [line for line in lines if "cell blocks synthesized in" in line]
    assert len(done) == 1 and done[0].startswith("6 cell blocks")  # one task for both blocks
    block1 = load_prototypes(first[1]["paths"], sized[1][0])
    assert block1.images is not None and len(block1.cells) == 2 * 10


def test_a_cold_requests_projection_and_heldout_prototypes_are_one_in_process_batch(inputs, tmp_path, monkeypatch):
    """A cold data-free request needs the projection's prototypes (no images kept) and the gate's held-out blocks
    (another seed and augmentation, images kept): in a flow on the in-process runner they are one synthesis task and
    one batch, each set banked under its own key, and the validation step's lookup finds every held-out block."""
    from clipforget.runner import heldout_blocks

    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIPFORGET_CELLS_PER_TASK", raising=False)
    cells = [Cell(*c.split("/")) for c in CELLS]
    small = replace(SMALL, steps=5)
    sized = heldout_blocks(small, {cells[0]: 20, cells[1]: 10, cells[2]: 10, cells[3]: 10}, cells)
    blocks = [(asdict(small), CELLS, False), *[(asdict(cfg), [str(c) for c in block], True) for cfg, block in sized]]
    inputs = {k: v for k, v in inputs.items() if k not in ("cells", "synthesis")}
    with run_log_lines() as lines:
        out = fill_blocks_twice.with_options(task_runner=ThreadPoolTaskRunner())(**inputs, blocks=blocks)
    first, second = out["first"], out["second"]
    assert [b["synthesized"] for b in first] == [4, 4, 1] and [b["synthesized"] for b in second] == [0, 0, 0]
    done = [line for line in lines if "cell blocks synthesized in" in line]
    assert len(done) == 1 and done[0].startswith("9 cell blocks")  # one task for the projection and the evidence
    projection = load_prototypes(first[0]["paths"], small)
    assert projection.images is None and len(projection.cells) == 4 * 2
    heldout = load_prototypes(first[1]["paths"] + first[2]["paths"], sized[0][0])
    assert heldout.images is not None and len(heldout.cells) == 5 * 10
    assert not set(first[0]["paths"]) & set(first[1]["paths"])
    # the synthesis time is split between the blocks by the images each one had synthesized
    assert first[1]["seconds"] > first[0]["seconds"] > 0
