"""One forget request run by the core alone (what `clipforget forget` does): load, build the
projection from text embeddings and prototypes, fold it into a copy of the model, save, and measure
per-cell accuracy before and after.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from clipforget.gate.verdict import ForgetGroup, Thresholds, judge
from clipforget.io.bank import PrototypeBank, load_prototypes, synthesize_with_bank
from clipforget.io.checkpoints import LoadedModel, save_checkpoint
from clipforget.method.data import require_every_cell
from clipforget.method.evaluate import LabelledImages, ZeroShotClassifier, image_features
from clipforget.method.fold import fold_projection
from clipforget.method.grid import Cell, Grid, forget_cells, retain_cells
from clipforget.method.nullspace import Projection
from clipforget.method.projection import NullspaceConfig, cell_text_embeddings, fit_projection, text_targets
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import Prototypes, SynthesisConfig, synthesize
from clipforget.steps import checkpoint_metadata, compare_models

HELDOUT_SEED_OFFSET = 1_000_003  # held-out prototypes never share a seed with the forget set's


def heldout_config(synthesis: SynthesisConfig, per_cell: int) -> SynthesisConfig:
    """Synthesis settings of the held-out prototypes used for data-free validation."""
    return replace(synthesis, seed=synthesis.seed + HELDOUT_SEED_OFFSET, prototypes_per_cell=per_cell)


@dataclass
class ForgetResult:
    model: torch.nn.Module  # the unlearned model (a copy; the input model is unchanged)
    projection: Projection
    forget: list[Cell]
    retain: list[Cell]
    prototypes: Prototypes
    report: dict


def unlearn_model(
    loaded: LoadedModel,
    grid: Grid,
    *,
    mode: str,
    classes: Sequence[str],
    domains: Sequence[str],
    synthesis: SynthesisConfig,
    nullspace: NullspaceConfig,
    templates: TemplateSet | None = None,
    progress: Callable[[dict], None] | None = None,
    bank: PrototypeBank | None = None,
    fit_images: LabelledImages | None = None,
) -> tuple[torch.nn.Module, Projection, list[Cell], list[Cell], Prototypes, dict[str, float]]:
    """Build the projection for a request and fold it into a copy of the model.

    With a `bank` (and a checkpoint digest), prototypes come from the bank and only missing cells are synthesized.
    With `fit_images` (labelled images of every cell of the grid) the projection is fitted on their embeddings
    instead, and nothing is synthesized.
    """
    templates = templates or TemplateSet()
    forget = forget_cells(grid, mode, classes, domains)
    retain = retain_cells(grid, forget)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    text = cell_text_embeddings(loaded.model, loaded.tokenizer, templates, grid.cells)
    classifier = ZeroShotClassifier(loaded.model, loaded.tokenizer, grid, templates)
    timings["text_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if fit_images is not None:
        protos = image_prototypes(loaded, grid, fit_images, text, synthesis)
    else:
        protos = prototypes_for(loaded, grid, text, synthesis, bank, progress=progress)
    timings["prototypes_s"] = time.perf_counter() - t
    t = time.perf_counter()
    projection = fit_projection(forget, retain, text, protos, nullspace, (classifier.classes, classifier.weights))
    timings["nullspace_s"] = time.perf_counter() - t
    t = time.perf_counter()
    unlearned = copy.deepcopy(loaded.model)
    fold_projection(unlearned, projection.P)
    timings["fold_s"] = time.perf_counter() - t
    return unlearned, projection, forget, retain, protos, timings


def prototypes_for(loaded: LoadedModel, grid: Grid, text: dict[Cell, torch.Tensor], synthesis: SynthesisConfig,
                   bank: PrototypeBank | None, with_images: bool = False,
                   progress: Callable[[dict], None] | None = None) -> Prototypes:
    """Prototypes of every cell of the grid: from the bank when given (synthesizing only what it lacks), else
    synthesized now."""
    targets = text_targets(text, grid.cells)
    if bank is None or not loaded.sha256:
        return synthesize(loaded.model, targets, grid.cells, synthesis, progress, return_images=with_images)
    paths, _ = synthesize_with_bank(loaded.model, dict(zip(grid.cells, targets, strict=True)), grid.cells, synthesis,
                                    loaded.sha256, bank, with_images, progress)
    return load_prototypes(paths, synthesis.resolved(loaded.device, loaded.model))


def image_prototypes(loaded: LoadedModel, grid: Grid, images: LabelledImages, text: dict[Cell, torch.Tensor],
                     synthesis: SynthesisConfig) -> Prototypes:
    """Labelled images as the fit set of a projection: their normalized embeddings in place of prototypes (`cosines`:
    each image's cosine to its cell's text target; no synthesis steps). Every cell of the grid needs images: the
    projection is fitted on the forget and the retain cells alike."""
    require_every_cell(images.cells, grid)
    t = time.perf_counter()
    emb = torch.nn.functional.normalize(image_features(loaded.model, images.pixels), dim=-1)
    targets = torch.stack([text[c][-1] for c in images.cells])
    return Prototypes(emb, list(images.cells), (emb * targets).sum(-1), torch.zeros(len(emb), dtype=torch.long),
                      time.perf_counter() - t, synthesis)


def heldout_images(loaded: LoadedModel, grid: Grid, synthesis: SynthesisConfig, per_cell: int,
                   templates: TemplateSet | None = None, progress: Callable[[dict], None] | None = None,
                   bank: PrototypeBank | None = None) -> LabelledImages:
    """Fresh prototypes (another seed) as images, for data-free validation."""
    text = cell_text_embeddings(loaded.model, loaded.tokenizer, templates or TemplateSet(), grid.cells)
    protos = prototypes_for(loaded, grid, text, heldout_config(synthesis, per_cell), bank, True, progress)
    assert protos.images is not None
    return LabelledImages.from_arrays(protos.images, protos.cells, loaded.preprocess)


def run_forget(
    loaded: LoadedModel,
    grid: Grid,
    *,
    mode: str,
    classes: Sequence[str],
    domains: Sequence[str],
    synthesis: SynthesisConfig,
    nullspace: NullspaceConfig,
    out: str | Path,
    data: str | Path | None = None,
    heldout_per_cell: int = 10,
    templates: TemplateSet | None = None,
    progress: Callable[[dict], None] | None = None,
    bank: PrototypeBank | None = None,
    thresholds: Thresholds | None = None,
    fit_data: str | Path | None = None,
) -> ForgetResult:
    """The whole core method for one request; writes the unlearned checkpoint to `out`.

    With `fit_data` (a labelled folder with images of every cell) the projection is fitted on those images instead
    of prototypes; `nullspace` should then be the mode's image settings (`default_config(mode, fit_on="images")`).
    Judge on other images (`data`): images the projection was fitted on say little about the rest.

    The report holds the gate's verdict (`passed`, `checks`, `rejected`) by the same rules the pipeline
    registers on (the mode's criteria, plus `thresholds`); the checkpoint is written either way."""
    t0 = time.perf_counter()
    # fail on a bad request or a bad data folder before any costly work
    forget_cells(grid, mode, classes, domains)
    if fit_data is not None and data is not None and Path(fit_data).resolve() == Path(data).resolve():
        raise ValueError(f"--fit-data and --data are the same folder ({fit_data}): the gate would judge the "
                         "projection on the images it was fitted on; give held-out images to --data")
    if data is not None:
        evalset = LabelledImages.from_folder(data, loaded.preprocess, grid)
    fitset = LabelledImages.from_folder(fit_data, loaded.preprocess, grid) if fit_data is not None else None
    unlearned, projection, forget, retain, protos, timings = unlearn_model(
        loaded, grid, mode=mode, classes=classes, domains=domains, synthesis=synthesis, nullspace=nullspace,
        templates=templates, progress=progress, bank=bank, fit_images=fitset)
    if data is None:
        evalset = heldout_images(loaded, grid, synthesis, heldout_per_cell, templates, progress, bank)
    t = time.perf_counter()
    classifier = ZeroShotClassifier(loaded.model, loaded.tokenizer, grid, templates)
    before, after, probe = compare_models(classifier, loaded.model, unlearned, evalset, forget)
    verdict = judge([ForgetGroup(mode, tuple(forget))], before, after, thresholds, probe=probe)
    timings["evaluate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    digest = save_checkpoint(unlearned.state_dict(), out, metadata=checkpoint_metadata(
        base_sha256=loaded.sha256 or "", arch=loaded.arch, mode=mode, forget_cells=[str(c) for c in forget]))
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "model": {"arch": loaded.arch, "checkpoint": loaded.checkpoint, "sha256": loaded.sha256},
        "output": {"path": str(out), "sha256": digest},
        "request": {"grid": grid.name, "mode": mode, "classes": list(classes), "domains": list(domains)},
        "forget_cells": [str(c) for c in forget],
        "settings": {"synthesis": asdict(synthesis), "nullspace": nullspace.to_dict()},
        "projection": projection.summary(),
        "prototypes": protos.summary() if fitset is None else None,
        "fit": ({"on": "prototypes"} if fitset is None else
                {"on": "images", "data": str(fit_data), "images": len(fitset.cells)}),
        "evaluation": {"data": str(data) if data is not None else f"held-out prototypes ({heldout_per_cell}/cell)",
                       "images": len(evalset.cells)},
        **{k: v for k, v in verdict.to_dict().items() if k != "evaluation"},
        "rejected": verdict.rejected(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    return ForgetResult(unlearned, projection, forget, retain, protos, report)
