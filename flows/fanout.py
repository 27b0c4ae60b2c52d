"""Fan-out of prototype synthesis: the bank's missing cells, chunked onto the flow's task runner (in-process or
Ray), or sent to the gpu pool's deployment. Orchestration only: the work itself is `tasks.build.synthesize_chunk`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Any

from clipforget.io.bank import PrototypeBank
from clipforget.method.projection import text_targets
from clipforget.method.synthesis import Prototypes, SynthesisConfig
from clipforget.steps import cell_names, load_text, parse_cells
from flows import runners
from tasks.build import precision_report, synthesize_chunk, synthesize_into_bank
from tasks.common import run_logger, work_root


def _decided(synthesis: dict, arch: str, checkpoint: str, sha256: str) -> dict:
    """The settings with `precision: auto` decided here, by the process that keys the bank: the chunks, Ray
    workers and the gpu pool's deployment then synthesize at exactly the precision the bank files are named
    for (a worker deciding `auto` for its own device would bank cells under keys this process never reads).
    On a CPU with native bf16 the decision measures the model (clipforget.method.synthesis.measured_cpu_precision),
    loaded here for it the first time on a machine; the measurement is kept in the cache (`precision/`, per
    checkpoint and machine: CPU, torch threads and version), so later requests decide the same way without loading
    the model or measuring again (ViT-B-32: 8.5 s on a 2-core AVX512-BF16 CPU)."""
    from clipforget.io.atomic import write_json
    from clipforget.io.checkpoints import pick_device
    from clipforget.method.synthesis import machine_fingerprint, measurement_record, measures_model, restore_measurement
    from clipforget.steps import digest

    config, device = SynthesisConfig(**synthesis), pick_device()
    if not measures_model(config.precision, device):
        return asdict(config.resolved(device))
    machine = machine_fingerprint()
    kept = work_root() / "precision" / f"{digest(arch, sha256, machine)[:32]}.json"
    try:
        choice = restore_measurement(json.loads(kept.read_text()))
    except (OSError, ValueError):  # none yet (or unreadable): measure, and keep it
        from tasks.common import loaded_model

        record = measurement_record(loaded_model(arch, checkpoint, sha256).model)
        write_json(kept, {**record, "arch": arch, "checkpoint_sha256": sha256, "machine": machine})
        choice = record["choice"]
    return {**asdict(config), "precision": choice}


def _logger() -> Any:
    return run_logger("clipforget.synthesis")


def _missing(bank: PrototypeBank, sha256: str, cells: list[str], config: SynthesisConfig, with_images: bool) -> list:
    return [c for c in dict.fromkeys(parse_cells(cells)) if not bank.has(sha256, c, config, with_images)]


def _one_batch(runner: Any, cells_per_task: int | None = None) -> bool:
    """Whether missing cells are synthesized as one in-process batch: not on Ray, and no chunking asked for."""
    return not runners.is_ray(runner) and cells_per_task is None and not runners.cells_per_task_set()


def _targets_of(text: dict, cells: list) -> dict:
    """The text target of each cell, by its name (what `synthesize_into_bank` takes)."""
    return dict(zip(cell_names(cells), text_targets(text, cells), strict=True))


def _within(cells: list, subset: list) -> list:
    keep = set(subset)
    return [c for c in cells if c in keep]


def fill_bank(arch: str, checkpoint: str, sha256: str, text_file: str, cells: list[str], synthesis: dict,
              *, with_images: bool = False, cells_per_task: int | None = None,
              gpus_per_task: float | None = None, checkpoint_uri: str | None = None) -> dict:
    """Visual prototypes per cell from the prototype bank, the missing cells synthesized by the flow's task runner.

    A plain function, not a task: called inside a flow, it submits one `synthesize_chunk` task per
    `cells_per_task` missing cells (default `CLIPFORGET_CELLS_PER_TASK`, 8) to the flow's task runner. On a
    `RayTaskRunner` all chunks run at once, each asking Ray for `gpus_per_task` GPUs (default
    `CLIPFORGET_GPUS_PER_TASK`, else 1 when the cluster has GPUs). In-process, chunks would run one after another
    and each ends on a thinning batch, so unless `cells_per_task` or the variable is given the missing cells are
    one `synthesize_into_bank` task: one batch whose slots refill as images finish, each cell banked when done.
    The chunks return their prototypes as data and this process puts them into its own bank, so workers
    need no shared disk (only the checkpoint: same path, or a URI they can fetch). Synthesis is seeded per
    (seed, cell, index) and the chunks depend on `cells_per_task` only, so any runner gives the same bits.
    Nothing is submitted when the bank holds every cell. Outside a flow the chunks run in this process.

    Returns {paths (one bank file per cell, in `cells` order), reused, synthesized, seconds}, like the
    gpu pool's flow.
    """
    from prefect.context import FlowRunContext

    t0 = time.perf_counter()
    logger = _logger()
    synthesis = _decided(synthesis, arch, checkpoint, sha256)
    config = SynthesisConfig(**synthesis)
    bank = PrototypeBank(work_root() / "prototypes")
    wanted = parse_cells(cells)
    missing = _missing(bank, sha256, cells, config, with_images)
    if missing:
        text = load_text(text_file)
        ctx = FlowRunContext.get()
        runner = ctx.task_runner if ctx is not None else None
        on_ray = runners.is_ray(runner)
        one_batch = _one_batch(runner, cells_per_task)
        per_task = len(missing) if one_batch else (cells_per_task or runners.cells_per_task())
        chunks = [missing[i : i + per_task] for i in range(0, len(missing), per_task)]
        gpus = 0.0
        if on_ray:
            gpus = gpus_per_task if gpus_per_task is not None else runners.gpus_per_task(runners.ray_cluster_gpus())
        logger.info("prototype bank: %d of %d cells reused, %d to synthesize in %d tasks of up to %d cells%s "
                    "(%d prototypes/cell, %d steps, seed %d; precision %s: %s)", len(set(wanted)) - len(missing),
                    len(set(wanted)), len(missing), len(chunks), per_task,
                    f" on Ray, {gpus:g} GPU/task" if on_ray else
                    (" in-process, one batch" if one_batch else " in-process"), config.prototypes_per_cell,
                    config.steps, config.seed, *precision_report(config).values())

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
        if one_batch:  # banks each cell itself, as it finishes
            call = synthesize_into_bank if ctx is None else (lambda **a: synthesize_into_bank.submit(**a).result())
            done = call(arch=arch, checkpoint=checkpoint, sha256=sha256, checkpoint_uri=checkpoint_uri,
                        blocks=[{"synthesis": synthesis, "cells": cell_names(missing), "with_images": with_images}],
                        targets=_targets_of(text, missing))
            logger.info("%d cells synthesized in %.1f s on %s, %s pid %d", len(done["cells"]), done["seconds"],
                        done["device"], done["host"], done["pid"])
        elif ctx is None:
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
            "synthesized": len(missing), "seconds": round(seconds, 3), **precision_report(config)}


SYNTHESIS_DEPLOYMENT_ENV = "CLIPFORGET_SYNTHESIS_DEPLOYMENT"


def fill_bank_blocks(arch: str, checkpoint: str, sha256: str, text_file: str, blocks: list[tuple],
                     *, with_images: bool = False, checkpoint_uri: str | None = None) -> list[dict]:
    """`fill_bank_routed` of several blocks, one result per block: each block is (settings, cells) or (settings,
    cells, with_images) (default `with_images`), and the blocks differ in the settings of each image only
    (`clipforget.method.synthesis.PER_IMAGE_SETTINGS`): the held-out sets (clipforget.runner.heldout_blocks), and a
    request's projection prototypes beside them.

    In a flow on the in-process runner (no Ray, no gpu pool deployment, no chunking asked for) what the bank lacks
    of every block is one `synthesize_into_bank` task, one batch: the few cells of a second block then fill the
    batch of the first instead of running as a small batch (and a task) of their own, and a cold request's
    held-out prototypes fill the slots its projection prototypes leave as they finish. Elsewhere the blocks go one
    after another through `fill_bank_routed`."""
    from prefect.context import FlowRunContext

    blocks = [(b[0], b[1], b[2] if len(b) > 2 else with_images) for b in blocks]
    ctx = FlowRunContext.get()
    one_batch = ctx is not None and _one_batch(ctx.task_runner) and not os.environ.get(SYNTHESIS_DEPLOYMENT_ENV)
    if not one_batch or len(blocks) < 2:
        return [fill_bank_routed(arch, checkpoint, sha256, text_file, cells, synthesis, with_images=images,
                                 checkpoint_uri=checkpoint_uri) for synthesis, cells, images in blocks]
    t0 = time.perf_counter()
    logger = _logger()
    decided = [_decided(synthesis, arch, checkpoint, sha256) for synthesis, _, _ in blocks]
    configs = [SynthesisConfig(**d) for d in decided]
    bank = PrototypeBank(work_root() / "prototypes")
    missing = [_missing(bank, sha256, cells, config, images)
               for config, (_, cells, images) in zip(configs, blocks, strict=True)]
    todo = sum(len(m) for m in missing)
    images_todo = sum(len(m) * c.prototypes_per_cell for m, c in zip(missing, configs, strict=True))
    if todo:
        logger.info("prototype bank: %d blocks of %s cells, %d cell blocks to synthesize in-process, one batch (%s "
                    "prototypes/cell and block, %d steps, seeds %s; precision %s: %s)", len(blocks),
                    "/".join(str(len(cells)) for _, cells, _ in blocks), todo,
                    "/".join(str(c.prototypes_per_cell) for c in configs), configs[0].steps,
                    "/".join(str(s) for s in dict.fromkeys(c.seed for c in configs)),
                    *precision_report(configs[0]).values())
        text = load_text(text_file)
        union = list(dict.fromkeys(c for m in missing for c in m))
        done = synthesize_into_bank.submit(
            arch=arch, checkpoint=checkpoint, sha256=sha256, checkpoint_uri=checkpoint_uri,
            blocks=[{"synthesis": d, "cells": cell_names(m), "with_images": images}
                    for d, m, (_, _, images) in zip(decided, missing, blocks, strict=True) if m],
            targets=_targets_of(text, union)).result()
        logger.info("%d cell blocks synthesized in %.1f s on %s, %s pid %d", todo, done["seconds"], done["device"],
                    done["host"], done["pid"])
    seconds = time.perf_counter() - t0
    out = []
    for config, (_, cells, images), lacked in zip(configs, blocks, missing, strict=True):
        wanted = parse_cells(cells)
        share = len(lacked) * config.prototypes_per_cell / images_todo if todo else 0.0  # by images synthesized
        out.append({"paths": [str(bank.path(sha256, c, config, images)) for c in wanted],
                    "reused": len(wanted) - len(_within(wanted, lacked)), "synthesized": len(lacked),
                    "seconds": round(seconds * share, 3), **precision_report(config)})
    return out


def fill_bank_routed(arch: str, checkpoint: str, sha256: str, text_file: str, cells: list[str], synthesis: dict,
                     *, with_images: bool = False, cells_per_task: int | None = None,
                     gpus_per_task: float | None = None, checkpoint_uri: str | None = None) -> dict:
    """`fill_bank`, with the missing cells sent to the gpu pool when `CLIPFORGET_SYNTHESIS_DEPLOYMENT` is set.

    With the variable set (a deployment name such as `synthesize-prototypes/gpu`, of the flow in
    flows/synthesize.py) and cells missing from the bank, this runs that deployment (as a subflow when
    called from a flow) and waits for it; a run that does not complete raises. The gpu worker and this
    process must share the cache volume `CLIPFORGET_CACHE`: the deployment reads the checkpoint and
    `text_file` at the paths given here and writes the prototypes into the same bank, which this process
    then reads. The chunking and GPUs per task are then the gpu worker's settings (its environment).
    `synthesized` and `seconds` count the cells the deployment synthesized and the time it took.
    Without the variable, or with every cell banked: `fill_bank(...)` in this flow.
    """
    name = os.environ.get(SYNTHESIS_DEPLOYMENT_ENV)
    synthesis = _decided(synthesis, arch, checkpoint, sha256)
    config = SynthesisConfig(**synthesis)
    bank = PrototypeBank(work_root() / "prototypes")
    missing = _missing(bank, sha256, cells, config, with_images) if name else []
    if not missing:
        return fill_bank(arch, checkpoint, sha256, text_file, cells, synthesis, with_images=with_images,
                         cells_per_task=cells_per_task, gpus_per_task=gpus_per_task, checkpoint_uri=checkpoint_uri)
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
    out = fill_bank(arch, checkpoint, sha256, text_file, cells, synthesis, with_images=with_images,
                    checkpoint_uri=checkpoint_uri)
    return {**out, "reused": len(cells) - len(_within(parse_cells(cells), missing)), "synthesized": len(missing),
            "seconds": round(time.perf_counter() - t0, 3)}  # precision: from `out`
