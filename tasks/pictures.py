"""Pictures of a build: the before/after per-cell heatmap and a strip of prototypes per forgotten cell.

`draw_pictures` (called by the pipeline after the gate) writes the PNGs; registration logs them to the version's
MLflow run, `publish_rejected` to a run of their own when the gate rejected the build; either way
`picture_artifacts` links them from the Prefect run (a markdown artifact, and an image artifact of the heatmap
when the tracking server serves them over http).

The strip shows the first prototypes of each forgotten cell, synthesized again with their images kept (synthesis
is seeded per cell and index, so these are the images behind the first embeddings the projection was fitted on).
They are cached under `CLIPFORGET_CACHE/pictures/`, apart from the prototype bank, and cost one small synthesis per
new set of forgotten cells (`CLIPFORGET_STRIP_PER_CELL`, default 4 images per cell, at most 6 cells; 0 turns the
strip off). With data-free validation the forgotten cells' held-out prototypes are drawn instead (already there).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact

from clipforget.io import plots, registry
from clipforget.steps import parse_cells
from tasks.common import loaded_model, work_root
from tasks.validate import artifact_key

STRIP_CELLS = 6


def strip_per_cell() -> int:
    return int(os.environ.get("CLIPFORGET_STRIP_PER_CELL", "4"))


def _strip_images(arch: str, base: dict, text_file: str, forget: list[str], synthesis: Any,
                  heldout_files: dict[str, str] | None) -> tuple[dict[str, Any], str]:
    """{cell: uint8 images} for the first forgotten cells, and what they are."""
    from safetensors import safe_open

    n = strip_per_cell()
    cells = forget[:STRIP_CELLS]
    if n <= 0 or not cells:
        return {}, ""
    if heldout_files:
        out = {}
        for c in cells:
            with safe_open(heldout_files[c], framework="np") as f:
                out[c] = f.get_tensor("images")[:n]
        return out, "held-out prototypes (the data-free validation set)"
    from clipforget.io.bank import PrototypeBank, synthesize_with_bank
    from clipforget.steps import load_text

    config = replace(synthesis, prototypes_per_cell=min(n, synthesis.prototypes_per_cell))
    text = load_text(text_file)
    wanted = parse_cells(cells)
    model = loaded_model(arch, base["path"], base["sha256"])
    paths, report = synthesize_with_bank(model.model, {c: text[c][-1] for c in wanted}, wanted, config, base["sha256"],
                                         PrototypeBank(work_root() / "pictures" / "strips"), with_images=True)
    if report.synthesized:
        get_run_logger().info("prototype strip: %d image(s) of %d forgotten cell(s) synthesized in %.1f s",
                              config.prototypes_per_cell * len(report.synthesized), len(report.synthesized),
                              report.seconds)
    out = {}
    for c, p in zip(cells, paths, strict=True):
        with safe_open(str(p), framework="np") as f:
            out[c] = f.get_tensor("images")
    return out, f"the first {config.prototypes_per_cell} synthesized prototypes of each cell"


@task(name="draw_pictures")
def draw_pictures(request_id: str, arch: str, base: dict, text_file: str, grid: dict, *, table: list[dict],
                  forget: list[str], synthesis: dict, out_dir: str, heldout: dict | None = None,
                  cells: list[str] | None = None) -> dict[str, str]:
    """The heatmap (always) and the prototype strip (when there are forgotten cells) as PNG files: {name: path}."""
    from clipforget.method.synthesis import SynthesisConfig

    out = Path(out_dir)
    pictures = {"cells": str(plots.cell_heatmap(table, grid["classes"], grid["domains"], out / "cells.png",
                                                f"{request_id}: zero-shot accuracy per cell, base vs unlearned"))}
    # held-out paths: block 0 holds one file per cell, in grid order (flows.pipeline.heldout_prototypes)
    held = dict(zip(cells or [], heldout["paths"][:len(cells or [])], strict=True)) if heldout and cells else None
    images, what = _strip_images(arch, base, text_file, forget, SynthesisConfig(**synthesis), held)
    if images:
        more = f" (first {STRIP_CELLS} of {len(forget)} forgotten cells)" if len(forget) > STRIP_CELLS else ""
        pictures["prototypes"] = str(plots.prototype_strip(images, out / "prototypes.png",
                                                           f"{request_id}: {what}{more}"))
    return pictures


def picture_artifacts(request_id: str, links: dict[str, str], registered: str | None) -> None:
    """Link the pictures from the Prefect run: a markdown artifact, and the heatmap as an image artifact when it
    is served over http(s)."""
    if not links:
        return
    where = f"MLflow run of {registered}" if registered else "MLflow run of the rejected build (nothing registered)"
    captions = {"cells": "per-cell accuracy, base vs unlearned (forgotten cells outlined)",
                "prototypes": "prototypes of the forgotten cells"}
    md = [f"# Pictures of `{request_id}`", "", f"Logged to the {where}.", ""]
    for name, url in links.items():
        md += [f"**{captions.get(name, name)}**: [{url}]({url})", "", f"![{name}]({url})", ""]
    create_markdown_artifact("\n".join(md), key=artifact_key(request_id, "pictures"),
                             description="before/after heatmap and prototype strip")
    if links.get("cells", "").startswith(("http://", "https://")):
        create_image_artifact(links["cells"], key=artifact_key(request_id, "heatmap"),
                              description="per-cell zero-shot accuracy, base vs unlearned; forgotten cells outlined")


@task(name="publish_rejected", retries=2, retry_delay_seconds=5)
def publish_rejected(request_id: str, tags: dict, report: dict, pictures: dict[str, str]) -> dict:
    """A rejected build's report and pictures in an MLflow run (nothing is registered), linked from Prefect."""
    run_id, links = registry.log_rejected(request_id, {registry.TAG_REQUEST_ID: request_id, **tags}, report, pictures)
    picture_artifacts(request_id, links, None)
    get_run_logger().info("rejected build %s: report and pictures in MLflow run %s", request_id, run_id)
    return {"run_id": run_id, "pictures": links}
