"""One forget request run by the core alone (what `clipforget forget` does): load, build the
projection from text embeddings and prototypes, fold it into a copy of the model, save, and measure
per-cell accuracy before and after.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from clipforget.gate.shift import shift_cells
from clipforget.gate.verdict import ForgetGroup, Thresholds, evidence_per_cell, judge
from clipforget.io.bank import PrototypeBank, load_prototypes, synthesize_blocks_with_bank, synthesize_with_bank
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
# held-out prototypes sized from the gate's limits come in blocks of 10 per cell, block b the images 10b..10b+9 of
# the cell's held-out sequence: a cell that one request needs 20 of and another 10 shares the first block in the bank
HELDOUT_BLOCK = 10
# held-out prototypes come from another generator than the projection's: their augmentation fades out with the step
# size. Measured with `bench/requests.py` (docs/GATE.md, "Held-out prototypes from another generator"): on the report
# render over four request draws, 10 false approvals instead of 20 at the same 3 false rejections, because the faded
# prototypes show the collateral on other classes that the projection's generator hides; they also reach the target
# cosine more often (91% against 77%) in fewer steps
HELDOUT_AUGMENT_DECAY = 1.0


def heldout_config(synthesis: SynthesisConfig, per_cell: int, block: int = 0) -> SynthesisConfig:
    """Synthesis settings of the held-out prototypes used for data-free validation: `per_cell` of each cell, or block
    `block` of the sized held-out set (`heldout_blocks`): the projection's settings with another seed and the
    held-out generator's augmentation (`HELDOUT_AUGMENT_DECAY`)."""
    return replace(synthesis, seed=synthesis.seed + HELDOUT_SEED_OFFSET, prototypes_per_cell=per_cell,
                   first_index=block * per_cell, augment_decay=HELDOUT_AUGMENT_DECAY)


def _blocks(n: int) -> int:
    """Blocks of `HELDOUT_BLOCK` that hold at least n prototypes."""
    return -(-n // HELDOUT_BLOCK)


def heldout_blocks(synthesis: SynthesisConfig, per_cell: int | Mapping[Cell, int],
                   cells: Sequence[Cell] = ()) -> list[tuple[SynthesisConfig, list[Cell]]]:
    """The held-out prototypes to synthesize, as (settings, the cells that need them): at least `per_cell[cell]` of
    each cell (`evidence_per_cell`), or `per_cell` of each of `cells`. Block 0 holds every cell; a cell needing 20
    also gets block 1. A single count that is not a multiple of the block is one set of its own."""
    if isinstance(per_cell, int):
        if per_cell % HELDOUT_BLOCK:
            return [(heldout_config(synthesis, per_cell), list(cells))]
        per_cell = dict.fromkeys(cells, per_cell)  # whole blocks: the sized sets' own images
    blocks = max((_blocks(n) for n in per_cell.values()), default=0)
    return [(heldout_config(synthesis, HELDOUT_BLOCK, b), [c for c, n in per_cell.items() if n > b * HELDOUT_BLOCK])
            for b in range(blocks)]


def heldout_drawn(per_cell: int | Mapping[Cell, int], cells: int = 0) -> int:
    """How many held-out prototypes `per_cell` draws: whole blocks per cell when sized, else per_cell × cells."""
    if isinstance(per_cell, int):
        return per_cell * cells
    return sum(_blocks(n) * HELDOUT_BLOCK for n in per_cell.values())


def heldout_label(per_cell: int | Mapping[Cell, int]) -> str:
    """What the held-out evidence was, for reports: "held-out prototypes (20/cell)" or "(10-20/cell, sized ...)"."""
    if isinstance(per_cell, int):
        return f"held-out prototypes ({per_cell}/cell)"
    got = [_blocks(n) * HELDOUT_BLOCK for n in per_cell.values()]
    return f"held-out prototypes ({min(got)}-{max(got)}/cell, sized from the gate's limits)"


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
    text: dict[Cell, torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, Projection, list[Cell], list[Cell], Prototypes, dict[str, float]]:
    """Build the projection for a request and fold it into a copy of the model.

    With a `bank` (and a checkpoint digest), prototypes come from the bank and only missing cells are synthesized.
    With `fit_images` (labelled images of every cell of the grid) the projection is fitted on their embeddings
    instead, and nothing is synthesized. `text`: the grid's prompt embeddings when the caller has them already.
    """
    templates = templates or TemplateSet()
    forget = forget_cells(grid, mode, classes, domains)
    retain = retain_cells(grid, forget)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if text is None:
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
                   progress: Callable[[dict], None] | None = None, cells: Sequence[Cell] | None = None) -> Prototypes:
    """Prototypes of every cell of the grid (or of `cells`): from the bank when given (synthesizing only what it
    lacks), else synthesized now."""
    cells = list(grid.cells if cells is None else cells)
    targets = text_targets(text, cells)
    if bank is None or not loaded.sha256:
        return synthesize(loaded.model, targets, cells, synthesis, progress, return_images=with_images)
    paths, _ = synthesize_with_bank(loaded.model, dict(zip(cells, targets, strict=True)), cells, synthesis,
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


def heldout_images(loaded: LoadedModel, grid: Grid, synthesis: SynthesisConfig, per_cell: int | Mapping[Cell, int],
                   templates: TemplateSet | None = None, progress: Callable[[dict], None] | None = None,
                   bank: PrototypeBank | None = None, text: dict[Cell, torch.Tensor] | None = None) -> LabelledImages:
    """Fresh prototypes of the held-out generator (`heldout_config`) as images, for data-free validation: `per_cell`
    of every cell, or at least `per_cell[cell]` of each cell (`evidence_per_cell`), in blocks the bank shares across
    requests (a count that is a multiple of the block comes from the same blocks).

    The blocks are synthesized together, as one batch: a cell needing 20 adds its second block's 10 images to the
    batch of everyone's first block rather than running them as a small batch of their own. `text`: the grid's prompt
    embeddings when the caller has them already."""
    if text is None:
        text = cell_text_embeddings(loaded.model, loaded.tokenizer, templates or TemplateSet(), grid.cells)
    blocks = heldout_blocks(synthesis, per_cell, grid.cells)
    if bank is None or not loaded.sha256:
        rows = [(c, config) for config, block_cells in blocks for c in block_cells]
        protos = synthesize(loaded.model, text_targets(text, [c for c, _ in rows]), [c for c, _ in rows], blocks[0][0],
                            progress, return_images=True, configs=[config for _, config in rows])
    else:
        targets = dict(zip(grid.cells, text_targets(text, grid.cells), strict=True))
        paths, _ = synthesize_blocks_with_bank(loaded.model, targets, blocks, loaded.sha256, bank, True, progress)
        protos = load_prototypes([p for block_paths in paths for p in block_paths],
                                 blocks[0][0].resolved(loaded.device, loaded.model))
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
    heldout_per_cell: int | None = None,
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
    registers on (the mode's criteria, plus `thresholds`); the checkpoint is written either way. Data-free, the gate
    judges on `heldout_per_cell` held-out prototypes of every cell, or by default on as many per cell as its checks
    need (`evidence_per_cell`)."""
    t0 = time.perf_counter()
    # fail on a bad request or a bad data folder before any costly work
    requested = forget_cells(grid, mode, classes, domains)
    if fit_data is not None and data is not None and Path(fit_data).resolve() == Path(data).resolve():
        raise ValueError(f"--fit-data and --data are the same folder ({fit_data}): the gate would judge the "
                         "projection on the images it was fitted on; give held-out images to --data")
    if data is not None:
        evalset = LabelledImages.from_folder(data, loaded.preprocess, grid)
    fitset = LabelledImages.from_folder(fit_data, loaded.preprocess, grid) if fit_data is not None else None
    groups = [ForgetGroup(mode, tuple(requested))]
    held: int | dict[Cell, int] = (heldout_per_cell if heldout_per_cell is not None
                                   else evidence_per_cell(groups, grid.cells, thresholds))
    t = time.perf_counter()
    text = cell_text_embeddings(loaded.model, loaded.tokenizer, templates or TemplateSet(), grid.cells)
    text_s, t = time.perf_counter() - t, time.perf_counter()
    if data is None and fitset is None and bank is not None and loaded.sha256:
        # a cold request: the projection's prototypes and the gate's held-out ones as one batch, the held-out images
        # filling the slots the projection's leave as they finish; the steps below then find both in the bank
        blocks = [(synthesis, list(grid.cells)), *heldout_blocks(synthesis, held, grid.cells)]
        synthesize_blocks_with_bank(loaded.model, dict(zip(grid.cells, text_targets(text, grid.cells), strict=True)),
                                    blocks, loaded.sha256, bank, [False] + [True] * (len(blocks) - 1), progress)
    prefetch_s = time.perf_counter() - t
    unlearned, projection, forget, retain, protos, timings = unlearn_model(
        loaded, grid, mode=mode, classes=classes, domains=domains, synthesis=synthesis, nullspace=nullspace,
        templates=templates, progress=progress, bank=bank, fit_images=fitset, text=text)
    timings["text_s"] += text_s  # the prompt embeddings were computed here, once for every step
    timings["prototypes_s"] += prefetch_s  # and a cold request's prototypes synthesized, held-out ones included
    if data is None:
        evalset = heldout_images(loaded, grid, synthesis, held, templates, progress, bank, text)
    t = time.perf_counter()
    classifier = ZeroShotClassifier(loaded.model, loaded.tokenizer, grid, templates)
    shift = shift_cells(groups, evalset.cells) if data is None else []  # on images, they decide
    compared = compare_models(classifier, loaded.model, unlearned, evalset, forget, shift)
    verdict = judge(groups, compared.before, compared.after, thresholds, probe=compared.probe, shifted=compared.shifted)
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
        "evaluation": {"data": str(data) if data is not None else heldout_label(held),
                       "images": len(evalset.cells)},
        **{k: v for k, v in verdict.to_dict().items() if k != "evaluation"},
        "rejected": verdict.rejected(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    return ForgetResult(unlearned, projection, forget, retain, protos, report)
