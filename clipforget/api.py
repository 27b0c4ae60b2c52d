"""The Python API for notebooks and scripts: load a model, forget, evaluate, save; submit a deletion request.

Each function is a thin front over the same code the `clipforget` commands and the Prefect flows run
(`clipforget.runner.run_forget`, the gate in `clipforget.gate.verdict`, the prototype bank under
`CLIPFORGET_CACHE`), with the defaults of `clipforget forget` / `eval` / `request submit --no-build`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clipforget.gate.verdict import Thresholds
from clipforget.governance.ledger import Entry, Ledger
from clipforget.governance.request import DeletionRequest, SynthesisSettings
from clipforget.io.bank import PrototypeBank
from clipforget.io.checkpoints import LoadedModel
from clipforget.io.storage import cache_root
from clipforget.method.data import grid_of_folder
from clipforget.method.evaluate import EvalReport, LabelledImages, ZeroShotClassifier, image_features
from clipforget.method.grid import Grid, resolve_grid
from clipforget.method.projection import NullspaceConfig, default_config
from clipforget.method.synthesis import SynthesisConfig
from clipforget.runner import ForgetResult, heldout_images, run_forget


def default_bank() -> PrototypeBank:
    """The prototype bank every command and flow of this machine shares (`CLIPFORGET_CACHE/prototypes`)."""
    return PrototypeBank(cache_root() / "prototypes")


def grid_for(model: LoadedModel, grid: str | Grid | None = None, data: str | Path | None = None) -> Grid:
    """The concept grid: as given (a preset name, a JSON file or a Grid), the toy grid for the toy model, else
    the folders of `data`."""
    if isinstance(grid, Grid):
        return grid
    if grid is not None:
        return resolve_grid(grid)
    if model.arch == "toy":
        return resolve_grid("toy")
    if data is not None:
        return grid_of_folder(data)
    raise ValueError("give a grid (pacs, domainnet or a JSON file) or data for a model other than toy")


def synthesis_for(model: LoadedModel, **settings: Any) -> SynthesisConfig:
    """Synthesis settings with the defaults of a request (`prototypes_per_cell`, `steps`, `target_cosine`,
    `seed`, `precision`; the target cosine's default depends on the architecture)."""
    return SynthesisSettings(**settings).config(model.arch)


def forget(model: LoadedModel, *, mode: str, out: str | Path, classes: Sequence[str] = (),
           domains: Sequence[str] = (), grid: str | Grid | None = None, data: str | Path | None = None,
           synthesis: SynthesisConfig | None = None, nullspace: NullspaceConfig | None = None,
           thresholds: Thresholds | None = None, heldout_per_cell: int | None = None, bank: PrototypeBank | None = None,
           progress: Callable[[dict], None] | None = None, fit_data: str | Path | None = None) -> ForgetResult:
    """Forget `classes` / `domains` (by `mode`: global, domain or domain_complete) and write the unlearned
    checkpoint to `out` (safetensors). Judged on `data` (labelled folder) or, without it, on held-out
    prototypes (`heldout_per_cell` of each cell; default: as many per cell as the gate's checks need, docs/GATE.md);
    `result.report["passed"]` is the gate's verdict, `result.model` the unlearned model.
    Prototypes come from (and go to) the machine's prototype bank unless another `bank` is given. With `fit_data`
    (a labelled folder with images of every cell, other than `data`) the projection is fitted on those images with
    the mode's image settings instead of on prototypes (docs/GATE.md, "fitting on images")."""
    g = grid_for(model, grid, data)
    fit_on = "images" if fit_data is not None else "prototypes"
    return run_forget(model, g, mode=mode, classes=list(classes), domains=list(domains),
                      synthesis=synthesis or synthesis_for(model), nullspace=nullspace or default_config(mode, fit_on),
                      out=out, data=data, heldout_per_cell=heldout_per_cell, progress=progress,
                      bank=bank or default_bank(), thresholds=thresholds, fit_data=fit_data)


def evaluate(model: LoadedModel, *, data: str | Path | None = None, grid: str | Grid | None = None,
             heldout_per_cell: int = 20, synthesis: SynthesisConfig | None = None,
             bank: PrototypeBank | None = None) -> EvalReport:
    """Zero-shot accuracy per (class, domain) cell on a labelled folder `data` (`<domain>/<class>/*.png`),
    or data-free on held-out prototypes."""
    g = grid_for(model, grid, data)
    if data is not None:
        images = LabelledImages.from_folder(data, model.preprocess, g)
    else:
        images = heldout_images(model, g, synthesis or synthesis_for(model), heldout_per_cell, bank=bank or default_bank())
    classifier = ZeroShotClassifier(model.model, model.tokenizer, g)
    return classifier.evaluate(image_features(model.model, images.pixels), images.cells)


def submit(request: DeletionRequest | dict, *, ledger: str | Path, grid: str | Grid = "toy") -> tuple[Entry, bool]:
    """Validate a deletion request against the grid and append it to the ledger (a folder or `s3://bucket/prefix/`).

    Returns (entry, appended); the same request again appends nothing. The model is built later, by the
    governance flow (`clipforget govern`) or the deletion-request flow (`clipforget request submit`)."""
    req = request if isinstance(request, DeletionRequest) else DeletionRequest.model_validate(request)
    req.cells(grid if isinstance(grid, Grid) else resolve_grid(grid))  # ValueError before anything is written
    return Ledger(str(ledger)).append(req.request_id, req.ledger_record())
