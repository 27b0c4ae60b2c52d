"""The pipeline body every flow shares: a policy and forget groups in, an approved version in the registry out.

Reads as the numbered steps of docs/DESIGN.md. Called from inside a flow (`unlearn`, `deletion-request`,
`governance`): each step is a task of that flow run. A model that misses a threshold is never registered:
the report says why and the caller ends its run Failed ("rejected").
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

from prefect import get_run_logger

from clipforget.gate.verdict import ForgetGroup, cumulative_mode, evidence_per_cell, rejection
from clipforget.governance.request import ModelPolicy
from clipforget.io.atomic import write_json
from clipforget.io.registry import Registration
from clipforget.method.grid import Grid, check_projection_kind, forget_cells, resolve_grid, retain_cells
from clipforget.method.projection import NullspaceConfig, default_config
from clipforget.method.synthesis import SynthesisConfig
from clipforget.runner import heldout_blocks, heldout_label
from clipforget.steps import cell_names, checkpoint_metadata
from flows.fanout import fill_bank_blocks, fill_bank_routed
from tasks.build import build_nullspace, embed_fit_images, fold_into_checkpoint, generate_prompts
from tasks.common import work_root
from tasks.fetch import fetch_checkpoint, fetch_eval_data
from tasks.pictures import draw_pictures, publish_rejected
from tasks.register import register_model
from tasks.validate import validate


def policy_grid(policy: ModelPolicy, data_path: str | None) -> Grid:
    from clipforget.method.data import grid_of_folder

    if policy.grid is not None:
        return resolve_grid(policy.grid)
    if policy.arch == "toy":
        return resolve_grid("toy")
    if data_path is not None:
        return grid_of_folder(data_path)
    raise ValueError("give a grid (pacs, domainnet or a JSON file) or evaluation data for a model other than toy")


@dataclass
class Build:
    """What to build and how to label it. `version_id` names the version (idempotency key of the registry)."""

    policy: ModelPolicy
    specs: list[dict]  # what each request forgets: {mode, classes, domains}
    version_id: str
    version_digest: str  # of everything that decides the model; one version id, one content
    requested_by: str
    params: dict = field(default_factory=dict)  # extra MLflow params (a request's mode, classes, domains)
    tags: dict[str, str] = field(default_factory=dict)  # extra version tags (ledger head, request ids)
    report: dict = field(default_factory=dict)  # extra report fields
    # settings recorded with a registered version ({"synthesis": {...}, "nullspace": {...}}, MLflow's strings) that
    # replace today's defaults: a rebuild builds what was built even after an upgrade changed a default
    settings: dict | None = None

    @property
    def mode(self) -> str:
        """The mode label: one mode, or the modes of a cumulative build joined by '+'."""
        return "+".join(dict.fromkeys(s["mode"] for s in self.specs))


def typed_settings(cls: type, recorded: Mapping[str, str]) -> dict[str, Any]:
    """Recorded settings (strings) back to the field types of the dataclass `cls`; names it no longer has are dropped."""
    defaults = cls()
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in recorded:
            default, value = getattr(defaults, f.name), recorded[f.name]
            out[f.name] = value == "True" if isinstance(default, bool) else type(default)(value)
    return out


class Inputs(NamedTuple):
    """What a build reads, fetched and checked once per flow run."""

    base: dict  # the base checkpoint {path, sha256, uri}
    data_path: str | None  # the evaluation images (`data_uri`)
    grid: Grid
    fit_path: str | None = None  # the fit images (`fit_uri`)


def fetch_inputs(policy: ModelPolicy) -> Inputs:
    """Step 0: the base checkpoint, evaluation and fit images in the cache, and the grid."""
    base = fetch_checkpoint(policy.checkpoint_uri, policy.checkpoint_sha256)
    # a grid known before the data (named, or the toy model's) checks the data's folders now, not after synthesis
    known = policy_grid(policy, None) if policy.grid is not None or policy.arch == "toy" else None
    data_path = fetch_eval_data(policy.data_uri, None if known is None else known.to_dict()) if policy.data_uri else None
    grid = known or policy_grid(policy, data_path)
    fit_path = fetch_eval_data(policy.fit_uri, grid.to_dict()) if policy.fit_uri else None
    return Inputs(base, data_path, grid, fit_path)


def run_pipeline(build: Build, promote: bool = False, report_path: str | None = None, register: bool = True,
                 inputs: Inputs | None = None) -> dict:
    """Steps 1-6 and registration. Returns the report; `report["passed"]` says whether it was registered.

    With `register=False` the model is built and validated but not registered (a rebuild or a dry run).
    `inputs`: the policy's inputs when the caller fetched them already.
    """
    logger = get_run_logger()
    policy = build.policy
    assert policy.registered_name is not None
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run_dir = work_root() / "runs" / build.version_id

    def step(name: str, t: float) -> None:
        timings[f"{name}_s"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    base, data_path, grid, fit_path = inputs or fetch_inputs(policy)
    step("fetch", t)

    # 1. cells: the forget cells of every request; every other cell of the grid is retained
    forget_groups = groups_of(build.specs, grid)
    forget = list(dict.fromkeys(c for g in forget_groups for c in g.cells))
    retain = retain_cells(grid, forget)
    if not retain:
        raise ValueError("the forget set covers every cell of the grid; nothing would be retained")
    cells = cell_names(grid.cells)
    grid_dict = grid.to_dict()
    synthesis = policy.synthesis.config(policy.arch)
    fit_on = "images" if policy.fit_uri else "prototypes"
    nullspace = default_config(cumulative_mode([g.mode for g in forget_groups]), fit_on, kind=policy.projection,
                               source=policy.source)
    if build.settings:
        synthesis = replace(synthesis, **typed_settings(SynthesisConfig, build.settings.get("synthesis", {})))
        nullspace = replace(nullspace, **typed_settings(NullspaceConfig, build.settings.get("nullspace", {})))
    check_projection_kind(nullspace.kind, forget, grid.classes)  # before any synthesis

    # 2. text side: domain-aware prompts per cell
    t = time.perf_counter()
    text = generate_prompts(policy.arch, base["path"], base["sha256"], cells)
    step("text", t)

    # 3. visual prototypes, data-free (the prototype bank keeps them per cell across requests)
    t = time.perf_counter()
    fit, prefetched = None, None
    if fit_path:  # or the policy's labelled images of every cell, with the mode's image settings
        fit = embed_fit_images(policy.arch, base["path"], base["sha256"], text, fit_path, grid_dict, asdict(synthesis))
        protos = {"paths": fit["paths"], "precision": synthesis.precision}
    elif data_path is None:  # data-free: the gate's held-out prototypes share the batch of the projection's
        # (a cold request then synthesizes everything as one batch, the held-out images filling the slots the
        # projection's leave as they finish; validation finds them in the bank)
        held_blocks, per_cell = heldout_plan(policy, grid, forget_groups, synthesis)
        got = fill_bank_blocks(policy.arch, base["path"], base["sha256"], text,
                               [(asdict(synthesis), cells, False), *held_blocks], checkpoint_uri=base["uri"])
        protos, prefetched = got[0], merged_heldout(held_blocks, got[1:], per_cell)
    else:
        protos = fill_bank_routed(policy.arch, base["path"], base["sha256"], text, cells, asdict(synthesis),
                                  checkpoint_uri=base["uri"])
    step("prototypes", t)

    # 4. multimodal nullspace
    t = time.perf_counter()
    projection = build_nullspace(text, protos["paths"], cell_names(forget), cell_names(retain), nullspace.to_dict(),
                                 asdict(synthesis))
    step("nullspace", t)

    # 5. fold into the image tower's last linear map (the checkpoint's metadata depends on the build only,
    # so a rebuild of the same version id gives the same bytes)
    t = time.perf_counter()
    unlearned = fold_into_checkpoint(policy.arch, base["path"], base["sha256"], projection["path"],
                                str(run_dir / "unlearned.safetensors"),
                                checkpoint_metadata(base_sha256=base["sha256"], arch=policy.arch, mode=build.mode,
                                                    forget_cells=cell_names(forget), request_id=build.version_id))
    step("fold", t)

    # 6. validate: before/after per cell on the data, else on fresh held-out prototypes
    t = time.perf_counter()
    heldout, heldout_cfg = (prefetched or heldout_prototypes(policy, base, grid, forget_groups, text, synthesis)
                            if data_path is None else (None, None))
    groups = [{"mode": g.mode, "cells": cell_names(g.cells)} for g in forget_groups]
    verdict = validate(build.version_id, policy.arch, base, unlearned, grid_dict, groups,
                       thresholds=policy.thresholds.model_dump(), data_path=data_path,
                       heldout_files=heldout["paths"] if heldout else None, synthesis=heldout_cfg,
                       data_uri=policy.data_uri)
    step("validate", t)
    # pictures: before/after heatmap and a prototype strip of the forgotten cells (tasks/pictures.py)
    t = time.perf_counter()
    pictures = draw_pictures(build.version_id, policy.arch, base, text, grid_dict, table=verdict["cells"],
                             forget=cell_names(forget), synthesis=asdict(synthesis), out_dir=str(run_dir / "pictures"),
                             heldout=heldout, cells=cells) if register else None
    if pictures:
        step("pictures", t)

    report = {
        "request_id": build.version_id,
        "requested_by": build.requested_by,
        **build.report,
        "policy": policy.model_dump(),
        "model": {"arch": policy.arch, "checkpoint": policy.checkpoint_uri or base["uri"], "sha256": base["sha256"]},
        "output": {"path": unlearned["path"], "sha256": unlearned["sha256"]},
        "mode": build.mode,
        "forget_cells": cell_names(forget),
        "settings": {"synthesis": asdict(synthesis), "nullspace": nullspace.to_dict()},
        "projection": projection["summary"],
        "prototypes": {k: protos.get(k) for k in ("reused", "synthesized", "seconds", "precision", "hardware")},
        # the gate's held-out prototypes (data-free): how many per cell, and how many bank files were reused
        "heldout": ({k: heldout.get(k) for k in ("per_cell", "reused", "synthesized", "seconds")} if heldout
                    else None),
        "fit": ({"on": "prototypes"} if fit is None else
                {"on": "images", "uri": policy.fit_uri, "images": fit["images"], "digest": fit["digest"]}),
        **{k: verdict[k] for k in ("evaluation", "metrics", "checks", "cells", "probe", "before", "after")},
        "passed": verdict["passed"],
        "registered": None,
    }

    def done() -> dict:
        report["timings"] = {**timings, "total_s": round(time.perf_counter() - t0, 3)}
        for path in {run_dir / "report.json", *([Path(report_path)] if report_path else [])}:
            write_json(path, report)
        return report

    failed = [c for c in verdict["checks"] if not c["passed"]]
    if failed:
        report["rejected"] = "; ".join(rejection(c) for c in failed)
        logger.warning("rejected, not registered: %s", report["rejected"])
        if pictures:
            report["pictures"] = publish_rejected(build.version_id, build.tags, {k: v for k, v in report.items()
                                                                                  if k not in ("before", "after")}, pictures)
        return done()
    if not register:
        return done()

    # register the approved model: candidate, and champion when asked
    t = time.perf_counter()
    params = {"mode": build.mode, "arch": policy.arch, **build.params,
              # the precision as resolved (what ran), so that a rebuild elsewhere synthesizes the same prototypes
              **{f"synthesis.{k}": v for k, v in {**asdict(synthesis), "precision": protos["precision"]}.items()},
              **{f"nullspace.{k}": v for k, v in nullspace.to_dict().items()}}
    record = Registration(request_id=build.version_id, request_digest=build.version_digest,
                          requested_by=build.requested_by, arch=policy.arch, grid=grid.name, mode=build.mode,
                          forget_cells=tuple(cell_names(forget)), base_sha256=base["sha256"],
                          sha256=unlearned["sha256"], metrics=verdict["metrics"])
    report["registered"] = register_model(
        name=policy.registered_name, record=record, grid=grid_dict, unlearned=unlearned["path"],
        projection_file=projection["path"], example=_example(data_path, heldout), params=params,
        report={k: v for k, v in report.items() if k not in ("before", "after")}, promote=promote,
        extra_tags=build.tags, pictures=pictures, base=base)
    step("register", t)
    logger.info("approved: %s version %s", policy.registered_name, report["registered"]["version"])
    return done()


def heldout_plan(policy: ModelPolicy, grid: Grid, groups: Sequence[ForgetGroup],
                 synthesis: SynthesisConfig | None = None) -> tuple[list[tuple[dict, list[str], bool]], int | dict]:
    """The held-out blocks data-free validation of `groups` needs, as `fill_bank_blocks` takes them (settings, cells,
    with images), and the count per cell they were sized from: the policy's `heldout_per_cell` of every cell, or by
    default as many per cell as the gate's checks of `groups` need, in blocks of 10 the bank shares across requests
    (clipforget.runner.heldout_blocks). `synthesis`: the build's settings (a rebuild's recorded ones), default the
    policy's."""
    synthesis = synthesis or policy.synthesis.config(policy.arch)
    per_cell: int | dict = policy.synthesis.heldout_per_cell or evidence_per_cell(groups, grid.cells, policy.thresholds)
    blocks = [(asdict(config), cell_names(cells), True) for config, cells in heldout_blocks(synthesis, per_cell,
                                                                                            grid.cells)]
    return blocks, per_cell


def merged_heldout(blocks: Sequence[tuple[dict, list[str], bool]], results: Sequence[dict],
                   per_cell: int | dict) -> tuple[dict, dict]:
    """The results of `fill_bank_blocks` for `heldout_plan`'s blocks as one (synthesis result, config): `paths` lists
    block 0 (one file per cell, in grid order) first, then the cells of later blocks."""
    merged: dict = {"paths": [], "reused": 0, "synthesized": 0, "seconds": 0.0}
    for got in results:
        merged["paths"] += got["paths"]
        for k in ("reused", "synthesized", "seconds"):
            merged[k] += got.get(k) or 0
        merged.update({k: v for k, v in got.items() if k not in merged})
    merged["per_cell"] = heldout_label(per_cell)  # the report's `heldout`
    cfg: dict = blocks[-1][0] if blocks else {}  # the settings the files are read back with (first_index aside)
    return merged, cfg


def heldout_prototypes(policy: ModelPolicy, base: dict, grid: Grid, groups: Sequence[ForgetGroup],
                       text: str | None = None, synthesis: SynthesisConfig | None = None) -> tuple[dict, dict]:
    """Fresh held-out prototypes, with images, for data-free validation of `groups` (`heldout_plan`), from the bank,
    what it lacks synthesized now: (synthesis result, config) as `merged_heldout` gives them."""
    if text is None:
        text = generate_prompts(policy.arch, base["path"], base["sha256"], cell_names(grid.cells))
    blocks, per_cell = heldout_plan(policy, grid, groups, synthesis)
    got = fill_bank_blocks(policy.arch, base["path"], base["sha256"], text, blocks, checkpoint_uri=base["uri"])
    return merged_heldout(blocks, got, per_cell)


def _example(data_path: str | None, heldout: dict | None) -> str:
    """One evaluation image (a file, or a held-out prototype bank file) for the model's input example."""
    if data_path is not None:
        from clipforget.method.data import list_labelled_images

        return str(list_labelled_images(data_path)[0][0])
    assert heldout is not None
    return heldout["paths"][0]


def groups_of(requests: Sequence[dict], grid: Grid) -> list[ForgetGroup]:
    """Forget groups of requests (each {mode, classes, domains}) on a grid; ValueError names what does not fit."""
    return [ForgetGroup(r["mode"], tuple(forget_cells(grid, r["mode"], r.get("classes", []), r.get("domains", []))))
            for r in requests]
