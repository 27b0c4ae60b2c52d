"""Step 6: the gate. Per-cell accuracy before and after, the checks, and the run's artifacts."""

from __future__ import annotations

import re
from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from clipforget.bank import load_prototypes
from clipforget.evaluate import LabelledImages
from clipforget.forget import Outcome, cell_table
from clipforget.grid import Grid
from clipforget.request import ForgetGroup, Thresholds, gate_checks
from clipforget.steps import checks_table, evaluate_pair, parse_cells
from clipforget.synthesis import SynthesisConfig
from tasks.common import loaded_model


def artifact_key(request_id: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{request_id}-{what}".lower()).strip("-")


def summary_markdown(request_id: str, mode: str, forget: list[str], passed: bool, metrics: dict, checks: list[dict],
                     evaluation: str) -> str:
    verdict = "APPROVED" if passed else "REJECTED — not registered"
    lines = [
        f"# Unlearning request `{request_id}`: {verdict}",
        "",
        f"- mode: `{mode}`; forget cells ({len(forget)}): {', '.join(f'`{c}`' for c in forget)}",
        f"- evaluated on: {evaluation}",
        f"- forget accuracy {metrics['forget_before']:.3f} → {metrics['forget_after']:.3f} "
        f"(worst forget cell {metrics['forget_max_after']:.3f})",
        f"- retain accuracy {metrics['retain_before']:.3f} → {metrics['retain_after']:.3f} "
        f"(mean drop {metrics['retain_drop']:.3f}; max cell drop {metrics['retain_max_cell_drop']:.3f} "
        f"at `{metrics['worst_retain_cell']}`)",
        "",
        "| check | measured | limit | passed |",
        "| --- | ---: | ---: | :---: |",
    ]
    lines += [f"| {c['name']} | {c['value']:.4f} | {c['limit']:.4f} | {'yes' if c['passed'] else '**no**'} |"
              for c in checks]
    return "\n".join(lines) + "\n"


def evaluation_images(base_model, grid: Grid, data_path: str | None, heldout_files: list[str] | None,
                      synthesis: dict | None, data_uri: str | None = None) -> tuple[LabelledImages, str]:
    """The labelled images a model is judged on (the data, else held-out prototypes) and their description
    (naming the data by its URI when given, not by its place in the cache)."""
    if data_path is not None:
        images = LabelledImages.from_folder(data_path, base_model.preprocess, grid)
        return images, f"{data_uri or data_path} ({len(images.cells)} images)"
    protos = load_prototypes(heldout_files or [], SynthesisConfig(**(synthesis or {})))
    assert protos.images is not None, "held-out prototype files must hold images"
    images = LabelledImages.from_arrays(protos.images, protos.cells, base_model.preprocess)
    return images, f"held-out prototypes ({len(images.cells)} images; data-free)"


@task(name="validate")
def validate(request_id: str, arch: str, base: dict, unlearned: dict, grid: dict, groups: list[dict],
             thresholds: dict, data_path: str | None = None, heldout_files: list[str] | None = None,
             synthesis: dict | None = None, data_uri: str | None = None) -> dict:
    """Measure base and unlearned model on the same images, apply the gate, publish the artifacts.

    `groups` are the forget cells per mode ([{mode, cells}]: one for a request, several for a cumulative
    ledger build). Returns {passed, checks, metrics, cells, before, after, evaluation}; registration follows
    only if passed.
    """
    logger = get_run_logger()
    g = Grid(grid["name"], tuple(grid["classes"]), tuple(grid["domains"]))
    base_model = loaded_model(arch, base["path"], base["sha256"])
    images, evaluation = evaluation_images(base_model, g, data_path, heldout_files, synthesis, data_uri)
    from clipforget.models import load_model

    after_model = load_model(arch, unlearned["path"])
    before, after = evaluate_pair(base_model, after_model, images, g)
    forget_groups = [ForgetGroup(g["mode"], tuple(parse_cells(g["cells"]))) for g in groups]
    mode = "+".join(dict.fromkeys(g.mode for g in forget_groups))
    forget = list(dict.fromkeys(c for g in groups for c in g["cells"]))
    cells = parse_cells(forget)
    checks = checks_table(gate_checks(forget_groups, before, after, Thresholds(**thresholds)))
    passed = all(c["passed"] for c in checks)
    metrics = asdict(Outcome.measure(before, after, cells))
    table = cell_table(before, after, cells)
    create_markdown_artifact(summary_markdown(request_id, mode, forget, passed, metrics, checks, evaluation),
                             key=artifact_key(request_id, "summary"), description="unlearning verdict and checks")
    create_table_artifact([{**r, "before": round(r["before"], 4), "after": round(r["after"], 4)} for r in table],
                          key=artifact_key(request_id, "cells"), description="per-cell accuracy before/after")
    for c in checks:
        (logger.info if c["passed"] else logger.warning)("check %s: %.4f (limit %.4f) %s", c["name"], c["value"],
                                                         c["limit"], "passed" if c["passed"] else "FAILED")
    return {"passed": passed, "checks": checks, "metrics": metrics, "cells": table, "before": before.to_dict(),
            "after": after.to_dict(), "evaluation": {"data": evaluation, "images": len(images.cells)}}
