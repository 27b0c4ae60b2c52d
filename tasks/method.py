"""Steps 2-5 of the method as Prefect tasks: text embeddings, prototypes, projection, fold.

Thin wrappers over `clipforget.steps` and `clipforget.io.bank`: they take and return paths, digests and
small dicts, never models. One exception: `synthesize_chunk` returns its prototypes' tensors, because
on Ray it runs on workers that need not share the caller's disk (`synthesize` banks them on the caller's
side; `synthesize_routed` sends the work to the gpu pool's deployment instead when one is configured).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from clipforget.io.bank import PrototypeBank, load_prototypes, synthesize_with_bank
from clipforget.method.projection import NullspaceConfig, text_targets
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import Prototypes, SynthesisConfig, format_progress
from clipforget.method.synthesis import synthesize as synthesize_images
from clipforget.steps import (
    build_projection_file,
    cell_names,
    digest,
    fold_checkpoint,
    load_projection,
    load_text,
    parse_cells,
    text_path,
    write_text_embeddings,
)
from tasks import runners
from tasks.common import file_cache_key, loaded_model, work_root


def _text_file(p: dict) -> Path:
    return text_path(work_root(), p["sha256"], parse_cells(p["cells"]), TemplateSet())


@task(name="generate_prompts", cache_key_fn=file_cache_key(_text_file), persist_result=True, result_serializer="json")
def generate_prompts(arch: str, checkpoint: str, sha256: str, cells: list[str]) -> str:
    """Domain-aware prompts per cell → their normalized text embeddings (a safetensors file)."""
    path = _text_file({"sha256": sha256, "cells": cells})
    if not path.is_file():
        write_text_embeddings(loaded_model(arch, checkpoint, sha256), parse_cells(cells), TemplateSet(), path)
    get_run_logger().info("text embeddings of %d cells at %s", len(cells), path)
    return str(path)


def _precision(config: SynthesisConfig) -> dict:
    """The precision synthesis runs at here (auto resolved) and what decided it, for the report."""
    from clipforget.io.checkpoints import pick_device
    from clipforget.method.synthesis import hardware_summary

    device = pick_device()
    return {"precision": config.resolved(device).precision, "hardware": hardware_summary(device)}


def _progress_logger(every_s: float = 5.0):
    """Synthesis progress as log lines: the first at once, then at least every `every_s` seconds, and the last."""
    logger = get_run_logger()
    last = [float("-inf")]

    def log(p: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or p["done"] == p["total"]:
            last[0] = now
            logger.info("synthesis (%s): %s", p.get("precision", "?"), format_progress(p))
    return log


@task(name="synthesize_prototypes", tags=["gpu"])
def synthesize_prototypes(arch: str, checkpoint: str, sha256: str, text_file: str, cells: list[str],
                          synthesis: dict, with_images: bool = False) -> dict:
    """Visual prototypes per cell from the prototype bank, synthesizing only the cells it lacks.

    Returns {paths (one bank file per cell, in `cells` order), reused, synthesized, seconds}.
    """
    logger = get_run_logger()
    config = SynthesisConfig(**synthesis)
    bank = PrototypeBank(work_root() / "prototypes")
    wanted = parse_cells(cells)
    missing = [c for c in wanted if not bank.has(sha256, c, config, with_images)]
    logger.info("prototype bank: %d of %d cells reused, %d to synthesize (%d prototypes/cell, %d steps, seed %d)",
                len(wanted) - len(missing), len(wanted), len(missing), config.prototypes_per_cell, config.steps,
                config.seed)
    model = loaded_model(arch, checkpoint, sha256).model if missing else None
    text = load_text(text_file)
    targets = dict(zip(wanted, text_targets(text, wanted), strict=True))
    paths, report = synthesize_with_bank(model, targets, wanted, config, sha256, bank, with_images,
                                         _progress_logger())
    logger.info("prototype bank: reused %d cells, synthesized %d in %.1f s", len(report.hits),
                len(report.synthesized), report.seconds)
    return {"paths": [str(p) for p in paths], "reused": len(report.hits), "synthesized": len(report.synthesized),
            "seconds": round(report.seconds, 3), **_precision(config)}


def _local_checkpoint(checkpoint: str, sha256: str, checkpoint_uri: str | None = None) -> str:
    """The checkpoint as a file on this machine: the path itself, else its URI (`checkpoint_uri`, or
    `checkpoint` when it is one) fetched into this machine's cache and verified against `sha256`."""
    if Path(checkpoint).is_file():
        return checkpoint
    uri = next((u for u in (checkpoint_uri, checkpoint) if u and "://" in u), None)
    if uri is not None:
        from clipforget.io.storage import fetch

        return str(fetch(uri, sha256).path)
    raise FileNotFoundError(f"checkpoint {checkpoint} is not readable on {socket.gethostname()}: a synthesis worker "
                            "needs the checkpoint at the same path (a shared volume) or an s3:// / file:// URI")


@task(name="synthesize_chunk", tags=["gpu"], cache_policy=NONE, persist_result=False)
def synthesize_chunk(arch: str, checkpoint: str, sha256: str, cells: list[str], targets: torch.Tensor,
                     synthesis: dict, with_images: bool = False, checkpoint_uri: str | None = None) -> dict:
    """Prototypes of a chunk of cells, returned as data (not bank paths: a Ray worker on another machine
    does not share the caller's disk; the caller puts them into its bank).

    `targets` [len(cells), d] are the cells' text targets. Returns {cells, embeddings, cosines, steps_used,
    images (uint8, or None), seconds, host, pid, device}.
    """
    logger = get_run_logger()
    config = SynthesisConfig(**synthesis)
    model = loaded_model(arch, _local_checkpoint(checkpoint, sha256, checkpoint_uri), sha256).model
    device = str(next(model.parameters()).device)
    logger.info("synthesizing %d cells x %d prototypes on %s (%s, pid %d)", len(cells), config.prototypes_per_cell,
                device, socket.gethostname(), os.getpid())
    protos = synthesize_images(model, targets, parse_cells(cells), config, _progress_logger(),
                               return_images=with_images)
    return {"cells": list(cells), "embeddings": protos.embeddings, "cosines": protos.cosines,
            "steps_used": protos.steps_used, "images": protos.images, "seconds": protos.seconds,
            "host": socket.gethostname(), "pid": os.getpid(), "device": device}


def _logger() -> Any:
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_logger

    return get_run_logger() if FlowRunContext.get() or TaskRunContext.get() else get_logger("clipforget.synthesis")


def _missing(bank: PrototypeBank, sha256: str, cells: list[str], config: SynthesisConfig, with_images: bool) -> list:
    return [c for c in dict.fromkeys(parse_cells(cells)) if not bank.has(sha256, c, config, with_images)]


def _within(cells: list, subset: list) -> list:
    keep = set(subset)
    return [c for c in cells if c in keep]


def synthesize(arch: str, checkpoint: str, sha256: str, text_file: str, cells: list[str], synthesis: dict,
               with_images: bool = False, cells_per_task: int | None = None,
               gpus_per_task: float | None = None, checkpoint_uri: str | None = None) -> dict:
    """Visual prototypes per cell from the prototype bank, the missing cells synthesized by the flow's task runner.

    A plain function, not a task: called inside a flow, it submits one `synthesize_chunk` task per
    `cells_per_task` missing cells (default `CLIPFORGET_CELLS_PER_TASK`, 8) to the flow's task runner. On a
    `RayTaskRunner` all chunks run at once, each asking Ray for `gpus_per_task` GPUs (default
    `CLIPFORGET_GPUS_PER_TASK`, else 1 when the cluster has GPUs); in-process they run one after another.
    The chunks return their prototypes as data and this process puts them into its own bank, so workers
    need no shared disk (only the checkpoint: same path, or a URI they can fetch). Synthesis is seeded per
    (seed, cell, index) and the chunks depend on `cells_per_task` only, so any runner gives the same bits.
    Nothing is submitted when the bank holds every cell. Outside a flow the chunks run in this process.

    Returns {paths (one bank file per cell, in `cells` order), reused, synthesized, seconds}, like
    `synthesize_prototypes`.
    """
    from prefect.context import FlowRunContext

    t0 = time.perf_counter()
    logger = _logger()
    config = SynthesisConfig(**synthesis)
    bank = PrototypeBank(work_root() / "prototypes")
    wanted = parse_cells(cells)
    missing = _missing(bank, sha256, cells, config, with_images)
    if missing:
        per_task = cells_per_task or runners.cells_per_task()
        chunks = [missing[i : i + per_task] for i in range(0, len(missing), per_task)]
        text = load_text(text_file)
        ctx = FlowRunContext.get()
        runner = ctx.task_runner if ctx is not None else None
        on_ray = runners.is_ray(runner)
        gpus = 0.0
        if on_ray:
            gpus = gpus_per_task if gpus_per_task is not None else runners.gpus_per_task(runners.ray_cluster_gpus())
        logger.info("prototype bank: %d of %d cells reused, %d to synthesize in %d tasks of up to %d cells%s "
                    "(%d prototypes/cell, %d steps, seed %d; precision %s: %s)", len(set(wanted)) - len(missing),
                    len(set(wanted)), len(missing), len(chunks), per_task,
                    f" on Ray, {gpus:g} GPU/task" if on_ray else " in-process", config.prototypes_per_cell,
                    config.steps, config.seed, *_precision(config).values())

        def args(chunk: list) -> dict:
            return {"arch": arch, "checkpoint": checkpoint, "sha256": sha256, "cells": cell_names(chunk),
                    "targets": text_targets(text, chunk), "synthesis": synthesis, "with_images": with_images,
                    "checkpoint_uri": checkpoint_uri}

        def store(i: int, out: dict) -> None:
            protos = Prototypes(out["embeddings"], [c for c in parse_cells(out["cells"])
                                                    for _ in range(config.prototypes_per_cell)],
                                out["cosines"], out["steps_used"], out["seconds"], config, out["images"])
            bank.put(sha256, protos, with_images)
            logger.info("chunk %d/%d (%d cells) synthesized in %.1f s on %s, %s pid %d", i + 1, len(chunks),
                        len(out["cells"]), out["seconds"], out["device"], out["host"], out["pid"])

        errors: list[BaseException] = []
        if ctx is None:
            for i, chunk in enumerate(chunks):
                store(i, synthesize_chunk(**args(chunk)))
        elif on_ray:
            from prefect_ray.context import remote_options

            options = {"num_gpus": gpus} if gpus > 0 else {}
            with remote_options(**options):
                futures = [synthesize_chunk.submit(**args(chunk)) for chunk in chunks]
            for i, future in enumerate(futures):  # keep every chunk that succeeded, then report the failures
                try:
                    store(i, future.result())
                except Exception as e:
                    errors.append(e)
        else:
            for i, chunk in enumerate(chunks):
                store(i, synthesize_chunk.submit(**args(chunk)).result())
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(chunks)} synthesis tasks failed; the others' cells are "
                               f"banked. First failure: {errors[0]!r}") from errors[0]
    else:
        logger.info("prototype bank: %d of %d cells reused, 0 to synthesize", len(set(wanted)), len(set(wanted)))
    paths = [bank.path(sha256, c, config, with_images) for c in wanted]
    seconds = time.perf_counter() - t0
    if missing:
        logger.info("prototype bank: synthesized %d cells in %.1f s", len(missing), seconds)
    return {"paths": [str(p) for p in paths], "reused": len(wanted) - len(_within(wanted, missing)),
            "synthesized": len(missing), "seconds": round(seconds, 3), **_precision(config)}


SYNTHESIS_DEPLOYMENT_ENV = "CLIPFORGET_SYNTHESIS_DEPLOYMENT"


def synthesize_routed(arch: str, checkpoint: str, sha256: str, text_file: str, cells: list[str], synthesis: dict,
                      with_images: bool = False, cells_per_task: int | None = None,
                      gpus_per_task: float | None = None, checkpoint_uri: str | None = None) -> dict:
    """`synthesize`, with the missing cells sent to the gpu pool when `CLIPFORGET_SYNTHESIS_DEPLOYMENT` is set.

    With the variable set (a deployment name such as `synthesize-prototypes/gpu`, of the flow in
    flows/synthesize.py) and cells missing from the bank, this runs that deployment (as a subflow when
    called from a flow) and waits for it; a run that does not complete raises. The gpu worker and this
    process must share the cache volume `CLIPFORGET_CACHE`: the deployment reads the checkpoint and
    `text_file` at the paths given here and writes the prototypes into the same bank, which this process
    then reads. The chunking and GPUs per task are then the gpu worker's settings (its environment).
    `synthesized` and `seconds` count the cells the deployment synthesized and the time it took.
    Without the variable, or with every cell banked: `synthesize(...)` in this flow.
    """
    name = os.environ.get(SYNTHESIS_DEPLOYMENT_ENV)
    config = SynthesisConfig(**synthesis)
    bank = PrototypeBank(work_root() / "prototypes")
    missing = _missing(bank, sha256, cells, config, with_images) if name else []
    if not missing:
        return synthesize(arch, checkpoint, sha256, text_file, cells, synthesis, with_images, cells_per_task,
                          gpus_per_task, checkpoint_uri)
    from prefect.deployments import run_deployment

    assert name is not None
    t0 = time.perf_counter()
    logger = _logger()
    logger.info("%d cells missing from the prototype bank: running deployment %s", len(missing), name)
    parameters = {"arch": arch, "checkpoint": checkpoint, "sha256": sha256, "text_file": text_file,
                  "cells": list(cells), "synthesis": synthesis, "with_images": with_images,
                  "checkpoint_uri": checkpoint_uri}
    run: Any = run_deployment(name, parameters=parameters, timeout=None)  # a FlowRun (sync context)
    state = run.state
    if state is None or not state.is_completed():
        raise RuntimeError(f"prototype synthesis deployment {name}: flow run {run.name} ({run.id}) ended "
                           f"{state.type.value if state else 'without a state'}"
                           f"{': ' + state.message if state and state.message else ''}")
    still = _missing(bank, sha256, cells, config, with_images)
    if still:
        raise RuntimeError(f"deployment {name} completed (flow run {run.name}) but the prototype bank at {bank.root} "
                           f"still lacks {len(still)} cells: the gpu worker and this process must share "
                           "CLIPFORGET_CACHE (the same volume at the same path)")
    out = synthesize(arch, checkpoint, sha256, text_file, cells, synthesis, with_images, checkpoint_uri=checkpoint_uri)
    return {**out, "reused": len(cells) - len(_within(parse_cells(cells), missing)), "synthesized": len(missing),
            "seconds": round(time.perf_counter() - t0, 3)}  # precision: from `out`


def _projection_file(p: dict) -> Path:
    key = digest(p["text_file"], p["prototype_files"], p["forget"], p["retain"], p["nullspace"])
    return work_root() / "projections" / f"{key[:32]}.safetensors"


@task(name="build_nullspace", cache_key_fn=file_cache_key(_projection_file), persist_result=True,
      result_serializer="json")
def build_nullspace(text_file: str, prototype_files: list[str], forget: list[str], retain: list[str],
                    nullspace: dict, synthesis: dict) -> dict:
    """Forget set F and retain set R from text embeddings and prototypes → the projection P (safetensors)."""
    params = {"text_file": text_file, "prototype_files": prototype_files, "forget": forget, "retain": retain,
              "nullspace": nullspace}
    path = _projection_file(params)
    if path.is_file():
        summary = load_projection(path)[1]["summary"]
    else:
        protos = load_prototypes(prototype_files, SynthesisConfig(**synthesis)) if prototype_files else None
        path, summary = build_projection_file(text_file, protos, parse_cells(forget), parse_cells(retain),
                                              NullspaceConfig(**nullspace), path)
    get_run_logger().info("projection %s: %s", path.name, summary)
    return {"path": str(path), "summary": summary}


@task(name="fold_projection")
def fold_projection(arch: str, checkpoint: str, sha256: str, projection_file: str, out: str,
                    metadata: dict[str, str]) -> dict:
    """Fold P into the image tower's last linear map → an ordinary checkpoint of the same architecture."""
    P, _ = load_projection(projection_file)
    digest_out = fold_checkpoint(loaded_model(arch, checkpoint, sha256), P, Path(out), metadata)
    get_run_logger().info("unlearned checkpoint %s: sha256 %s", out, digest_out)
    return {"path": out, "sha256": digest_out}
