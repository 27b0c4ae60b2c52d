"""The unlearning pipeline: a base checkpoint in, an approved unlearned model in the MLflow registry out.

Reads as the numbered steps of DESIGN.md. A model that misses a threshold is never registered: the
run ends Failed ("rejected") with the measured numbers in its artifacts and its JSON report.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed

from clipforget import registry
from clipforget.atomic import write_json
from clipforget.forget import heldout_config
from clipforget.grid import Grid, forget_cells, resolve_grid, retain_cells
from clipforget.method import default_config
from clipforget.request import UnlearnRequest
from clipforget.steps import cell_names
from tasks.common import work_root
from tasks.fetch import fetch_checkpoint, fetch_eval_data
from tasks.method import build_nullspace, fold_projection, generate_prompts, synthesize_prototypes
from tasks.register import find_registered, promote_model, register_model
from tasks.validate import validate


def request_grid(request: UnlearnRequest, data_path: str | None) -> Grid:
    from clipforget.data import grid_of_folder

    if request.grid is not None:
        return resolve_grid(request.grid)
    if request.arch == "toy":
        return resolve_grid("toy")
    if data_path is not None:
        return grid_of_folder(data_path)
    raise ValueError("give a grid (pacs, domainnet or a JSON file) or evaluation data for a model other than toy")


@flow(name="unlearn", flow_run_name="unlearn-{request.request_id}", validate_parameters=True)
def unlearn(request: UnlearnRequest, report_path: str | None = None):
    """Forget the request's cells from its checkpoint; register the result only if it passes the gate."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run_dir = work_root() / "runs" / request.request_id
    assert request.registered_name is not None

    def done(report: dict, keep: bool = True) -> dict:
        """Write the report where asked, and (unless it only says "already registered") in the run folder."""
        report["timings"] = {**timings, "total_s": round(time.perf_counter() - t0, 3)}
        for path in {*([run_dir / "report.json"] if keep else []), *([Path(report_path)] if report_path else [])}:
            write_json(path, report)
        return report

    def step(name: str, t: float) -> None:
        timings[f"{name}_s"] = round(time.perf_counter() - t, 3)

    # 0. a request id is registered at most once
    existing = find_registered(request.registered_name, request.request_id)
    if existing is not None and existing.get("request_digest") not in (None, request.content_digest()):
        raise ValueError(f"request id {request.request_id!r} was registered for a different request "
                         f"({request.registered_name} version {existing['version']}); use a new request id")
    if existing is not None:
        logger.info("request %s is already registered as %s version %s; nothing to register", request.request_id,
                    request.registered_name, existing["version"])
        if request.promote and registry.CHAMPION not in existing["aliases"]:
            existing = promote_model(request.registered_name, existing["version"])
        return done({"request_id": request.request_id, "passed": True, "reused": True,
                     "registered": {"name": request.registered_name, **existing}}, keep=False)

    t = time.perf_counter()
    base = fetch_checkpoint(request.checkpoint_uri, request.checkpoint_sha256)
    data_path = fetch_eval_data(request.data_uri) if request.data_uri else None
    step("fetch", t)

    # 1. cells: the forget cells the request names; every other cell of the grid is retained
    grid = request_grid(request, data_path)
    forget = forget_cells(grid, request.mode, request.classes, request.domains)
    retain = retain_cells(grid, forget)
    cells = cell_names(grid.cells)
    grid_dict = {"name": grid.name, "classes": list(grid.classes), "domains": list(grid.domains)}
    synthesis = request.synthesis.config(request.arch)
    nullspace = default_config(request.mode, kind=request.projection, source=request.source)

    # 2. text side: domain-aware prompts per cell
    t = time.perf_counter()
    text = generate_prompts(request.arch, base["path"], base["sha256"], cells)
    step("text", t)

    # 3. visual prototypes, data-free (the prototype bank keeps them per cell across requests)
    t = time.perf_counter()
    protos = synthesize_prototypes(request.arch, base["path"], base["sha256"], text, cells, asdict(synthesis))
    step("prototypes", t)

    # 4. multimodal nullspace
    t = time.perf_counter()
    projection = build_nullspace(text, protos["paths"], cell_names(forget), cell_names(retain), nullspace.to_dict(),
                                 asdict(synthesis))
    step("nullspace", t)

    # 5. fold into the image tower's last linear map
    t = time.perf_counter()
    unlearned = fold_projection(request.arch, base["path"], base["sha256"], projection["path"],
                                str(run_dir / "unlearned.safetensors"),
                                {"clipforget.base_sha256": base["sha256"], "clipforget.arch": request.arch,
                                 "clipforget.mode": request.mode, "clipforget.request_id": request.request_id,
                                 "clipforget.forget_cells": ",".join(cell_names(forget))})
    step("fold", t)

    # 6. validate: before/after per cell on the data, else on fresh held-out prototypes
    t = time.perf_counter()
    heldout = None
    if data_path is None:
        heldout_cfg = asdict(heldout_config(synthesis, request.synthesis.heldout_per_cell))
        heldout = synthesize_prototypes(request.arch, base["path"], base["sha256"], text, cells, heldout_cfg,
                                        with_images=True)
    verdict = validate(request.request_id, request.arch, base, unlearned, grid_dict, request.mode,
                       cell_names(forget), request.thresholds.model_dump(), data_path,
                       heldout["paths"] if heldout else None, heldout_cfg if heldout else None)
    step("validate", t)

    report = {
        "request_id": request.request_id,
        "requested_by": request.requested_by,
        "request": request.model_dump(),
        "model": {"arch": request.arch, "checkpoint": request.checkpoint_uri or base["uri"], "sha256": base["sha256"]},
        "output": {"path": unlearned["path"], "sha256": unlearned["sha256"]},
        "forget_cells": cell_names(forget),
        "settings": {"synthesis": asdict(synthesis), "nullspace": nullspace.to_dict()},
        "projection": projection["summary"],
        "prototypes": {k: protos[k] for k in ("reused", "synthesized", "seconds")},
        **{k: verdict[k] for k in ("evaluation", "metrics", "checks", "cells", "before", "after")},
        "passed": verdict["passed"],
        "registered": None,
    }
    failed = [c for c in verdict["checks"] if not c["passed"]]
    if failed:
        report["rejected"] = "; ".join(f"{c['name']} {c['value']:.4f} > {c['limit']:.4f}" for c in failed)
        done(report)
        logger.warning("rejected, not registered: %s", report["rejected"])
        return Failed(message=f"rejected: {report['rejected']}")

    # register the approved model: candidate, and champion when the request asks for promotion
    t = time.perf_counter()
    example = _example(data_path, heldout)
    params = {"mode": request.mode, "classes": ",".join(request.classes), "domains": ",".join(request.domains),
              "arch": request.arch, **{f"synthesis.{k}": v for k, v in asdict(synthesis).items()},
              **{f"nullspace.{k}": v for k, v in nullspace.to_dict().items()}}
    report["registered"] = register_model(
        request.registered_name, request.request_id, request.content_digest(), request.requested_by, request.arch,
        grid_dict, request.mode, cell_names(forget), base["sha256"], unlearned, projection["path"], example,
        verdict["metrics"], params, {k: v for k, v in report.items() if k not in ("before", "after")}, request.promote)
    step("register", t)
    logger.info("approved: %s version %s", request.registered_name, report["registered"]["version"])
    return done(report)


def _example(data_path: str | None, heldout: dict | None) -> str:
    """One evaluation image (a file, or a held-out prototype bank file) for the model's input example."""
    if data_path is not None:
        from clipforget.data import list_labelled_images

        return str(list_labelled_images(data_path)[0][0])
    assert heldout is not None
    return heldout["paths"][0]
