"""The prototype bank: synthesized prototypes cached per cell, across requests, on disk.

Synthesis seeds every image by (seed, cell, index), so a cell's prototypes are decided by the
checkpoint, the cell and the synthesis settings; which other cells share the batch reaches them only
through the kernels a batch of that size runs (`clipforget.method.synthesis.synthesize`: the same
draw, not always the same bits). The bank keys one safetensors file per cell by exactly that:
checkpoint sha256 + cell + settings + seed, and keeps the first draw it is given.
The retain cells that every request needs are therefore synthesized once per checkpoint, and a later
request only pays for cells nobody asked for before.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clipforget.io.atomic import atomic_path
from clipforget.io.cache import touch
from clipforget.method.grid import Cell
from clipforget.method.synthesis import PER_IMAGE_SETTINGS, Prototypes, SynthesisConfig, shared_settings, synthesize

# settings that change no prototype: how many images share a batch
_NOT_IN_KEY = ("batch_size",)


def settings_key(config: SynthesisConfig) -> dict:
    """The settings that decide a prototype; `precision` as it runs here (auto resolves to fp32 or bf16), so
    prototypes of either precision stay valid and are never mixed up."""
    from clipforget.io.checkpoints import pick_device

    key = {k: v for k, v in asdict(config.resolved(pick_device())).items() if k not in _NOT_IN_KEY}
    if not key["first_index"]:  # added later: a cell's first images key as before it existed
        del key["first_index"]
    if not key["bn_prior"]:  # likewise: without the prior a prototype keys as before the setting existed
        del key["bn_prior"]
    return key


def cell_key(checkpoint_sha256: str, cell: Cell, config: SynthesisConfig, with_images: bool = False) -> str:
    """The bank key of one cell's prototypes (a sha256 hex digest)."""
    payload = {"checkpoint": checkpoint_sha256, "cell": [cell.cls, cell.domain], "synthesis": settings_key(config),
               "images": with_images}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclass(frozen=True)
class BankReport:
    """Which cells came from the bank and which were synthesized now."""

    hits: list[str]
    synthesized: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class PrototypeBank:
    """Per-cell prototype files under `root/<checkpoint sha256>/`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, checkpoint_sha256: str, cell: Cell, config: SynthesisConfig, with_images: bool = False) -> Path:
        key = cell_key(checkpoint_sha256, cell, config, with_images)
        return self.root / checkpoint_sha256 / f"{_safe(cell.cls)}--{_safe(cell.domain)}--{key[:24]}.safetensors"

    def has(self, checkpoint_sha256: str, cell: Cell, config: SynthesisConfig, with_images: bool = False) -> bool:
        return self.path(checkpoint_sha256, cell, config, with_images).is_file()

    def put(self, checkpoint_sha256: str, protos: Prototypes, with_images: bool = False) -> list[Path]:
        """Store each cell of `protos` in its own file (atomically); returns the paths."""
        from safetensors.torch import save_file

        paths = []
        for cell in dict.fromkeys(protos.cells):
            idx = [i for i, c in enumerate(protos.cells) if c == cell]
            tensors = {"embeddings": protos.embeddings[idx].contiguous(), "cosines": protos.cosines[idx].contiguous(),
                       "steps_used": protos.steps_used[idx].contiguous()}
            if with_images:
                if protos.images is None:
                    raise ValueError("with_images needs prototypes synthesized with return_images=True")
                tensors["images"] = protos.images[idx].contiguous()
            meta = {"cell": str(cell), "checkpoint_sha256": checkpoint_sha256,
                    "synthesis": json.dumps(settings_key(protos.config), sort_keys=True),
                    "seconds": f"{protos.seconds * len(idx) / len(protos.cells):.3f}"}
            path = self.path(checkpoint_sha256, cell, protos.config, with_images)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
            paths.append(path)
        return paths


def load_prototypes(paths: Sequence[str | Path], config: SynthesisConfig) -> Prototypes:
    """Assemble bank files into one `Prototypes` (rows in the order of the files)."""
    from safetensors import safe_open

    embs, coss, steps, imgs, cells = [], [], [], [], []
    seconds = 0.0
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            e = f.get_tensor("embeddings")
            embs.append(e)
            coss.append(f.get_tensor("cosines"))
            steps.append(f.get_tensor("steps_used"))
            if "images" in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                imgs.append(f.get_tensor("images"))
            cls, domain = meta["cell"].split("/", 1)
            cells += [Cell(cls, domain)] * len(e)
            seconds += float(meta.get("seconds", 0.0))
    return Prototypes(torch.cat(embs), cells, torch.cat(coss), torch.cat(steps), seconds, config,
                      torch.cat(imgs) if imgs and len(imgs) == len(paths) else None)


def synthesize_with_bank(
    model: torch.nn.Module,
    targets: dict[Cell, torch.Tensor],
    cells: Sequence[Cell],
    config: SynthesisConfig,
    checkpoint_sha256: str,
    bank: PrototypeBank,
    with_images: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> tuple[list[Path], BankReport]:
    """Bank files for `cells`, synthesizing (in one batch) only the cells the bank lacks.

    Each cell is banked as soon as its prototypes are finished: an interrupted run keeps the finished cells,
    and a rerun synthesizes only the rest."""
    paths, report = synthesize_blocks_with_bank(model, targets, [(config, cells)], checkpoint_sha256, bank,
                                                with_images, progress)
    return paths[0], report


def synthesize_blocks_with_bank(
    model: torch.nn.Module,
    targets: dict[Cell, torch.Tensor],
    blocks: Sequence[tuple[SynthesisConfig, Sequence[Cell]]],
    checkpoint_sha256: str,
    bank: PrototypeBank,
    with_images: bool | Sequence[bool] = False,
    progress: Callable[[dict], None] | None = None,
) -> tuple[list[list[Path]], BankReport]:
    """Bank files for each block (settings, cells), in block order. Blocks may differ in the settings of each image
    only (`clipforget.method.synthesis.PER_IMAGE_SETTINGS`): the held-out sets (`clipforget.runner.heldout_blocks`,
    which differ in `first_index`), and a request's projection prototypes beside them. `with_images`: one flag, or one
    per block (held-out files keep their images, the projection's do not). What the bank lacks, of every block, is
    synthesized in one batch, each cell of each block banked as soon as it is finished (under its block's key)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    resolved = [(cfg.resolved(device, model), list(cells)) for cfg, cells in blocks]  # `auto` decided, then keyed
    images = [with_images] * len(resolved) if isinstance(with_images, bool) else list(with_images)
    if len(images) != len(resolved):
        raise ValueError(f"with_images gives {len(images)} flags for {len(resolved)} blocks")
    if len({shared_settings(cfg) for cfg, _ in resolved}) > 1:
        raise ValueError(f"blocks synthesized together may differ only in {', '.join(PER_IMAGE_SETTINGS)}")
    keyed: dict[SynthesisConfig, bool] = {}  # one bank key per block: a block of the same settings given twice is one block
    for (cfg, _), img in zip(resolved, images, strict=True):
        if keyed.setdefault(cfg, img) != img:
            raise ValueError("two blocks with the same settings must agree on with_images")
    missing = list(dict.fromkeys((c, cfg) for cfg, cells in resolved for c in cells
                                 if not bank.has(checkpoint_sha256, c, cfg, keyed[cfg])))
    if missing:
        first = resolved[0][0]
        synthesize(model, torch.stack([targets[c] for c, _ in missing]), [c for c, _ in missing], first,
                   progress, return_images=any(keyed[cfg] for _, cfg in missing), configs=[cfg for _, cfg in missing],
                   on_cells_done=lambda p: bank.put(checkpoint_sha256, p, keyed[p.config]))
    paths = [[bank.path(checkpoint_sha256, c, cfg, img) for c in cells]
             for (cfg, cells), img in zip(resolved, images, strict=True)]
    made, hits = set(missing), []
    for (cfg, cells), block_paths in zip(resolved, paths, strict=True):
        for c, p in zip(cells, block_paths, strict=True):
            if (c, cfg) not in made:
                touch(p)  # used now: `clipforget cache prune` keeps it
                hits.append(str(c))
    return paths, BankReport(hits, [str(c) for c, _ in missing], time.perf_counter() - t0)
