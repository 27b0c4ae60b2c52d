"""Data-free visual prototypes (DESIGN.md step 3).

For each cell, K images are synthesized from noise by maximizing the cosine between their image
embedding and the cell's text embedding, all cells in one batch. Each image is a sigmoid of a
blurred low-resolution start plus a full-resolution residual (the low-resolution part finds the
shape, the residual the texture); every step sees a random scale/shift/flip and pixel noise, so the
result is an image the model recognizes robustly rather than an adversarial pattern. Images that
reach the target cosine stop early.

Reproducible: each image's start and augmentations come from its own generator seeded by
(seed, cell, index), so a cell's prototypes do not depend on which other cells share the batch.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clipforget.grid import Cell
from clipforget.models import image_normalizer, image_size


@dataclass(frozen=True)
class SynthesisConfig:
    prototypes_per_cell: int = 8
    steps: int = 300
    target_cosine: float = 0.77
    seed: int = 0
    lr: float = 0.08
    low_res: int = 16
    check_every: int = 10
    batch_size: int = 512  # images optimized at once; larger batches are split
    bf16: bool = True  # bf16 autocast for the optimization steps (2-3x faster on CPUs, native on GPUs)


@dataclass
class Prototypes:
    """Normalized image embeddings [N, d] of synthesized images, row i belonging to cells[i]."""

    embeddings: torch.Tensor
    cells: list[Cell]
    cosines: torch.Tensor  # final clean cosine to the cell's text target
    steps_used: torch.Tensor  # optimization steps each image took
    seconds: float
    config: SynthesisConfig
    images: torch.Tensor | None = None  # uint8 [N, H, W, 3] when asked for

    def for_cell(self, cell: Cell) -> torch.Tensor:
        idx = [i for i, c in enumerate(self.cells) if c == cell]
        return self.embeddings[idx]

    @property
    def reached(self) -> torch.Tensor:
        return self.cosines >= self.config.target_cosine

    def summary(self) -> dict[str, float]:
        return {
            "prototypes": len(self.cells),
            "mean_cosine": float(self.cosines.mean()),
            "reached_target": float(self.reached.float().mean()),
            "mean_steps": float(self.steps_used.float().mean()),
            "seconds": round(self.seconds, 2),
        }


def cell_seed(seed: int, cell: Cell, index: int) -> int:
    """A stable 63-bit seed for one prototype image (independent of Python's hash randomization)."""
    digest = hashlib.sha256(f"{seed}|{cell.cls}|{cell.domain}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _augment_params(gens: Sequence[torch.Generator], steps: int) -> torch.Tensor:
    """Per image and step: scale, shift x, shift y, flip, noise std -> [N, steps, 5]."""
    out = torch.empty(len(gens), steps, 5)
    for i, g in enumerate(gens):
        u = torch.rand(steps, 5, generator=g)
        out[i, :, 0] = 0.85 + 0.3 * u[:, 0]  # zoom
        out[i, :, 1:3] = (u[:, 1:3] - 0.5) * 0.25  # shift, in [-1, 1] image units
        out[i, :, 3] = (u[:, 3] < 0.5).float()
        out[i, :, 4] = 0.03 * u[:, 4]
    return out


def _augment(x: torch.Tensor, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Apply per-image zoom/shift/flip (one grid_sample) and pixel noise; x [B,3,H,W] in [0,1]."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device)
    sx = (1.0 / p[:, 0]) * (1 - 2 * p[:, 3])  # flip = negative x scale
    theta[:, 0, 0], theta[:, 1, 1] = sx, 1.0 / p[:, 0]
    theta[:, 0, 2], theta[:, 1, 2] = p[:, 1], p[:, 2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return y + noise * p[:, 4, None, None, None]


@torch.no_grad()
def _encode(model: Any, x: torch.Tensor, normalize: Callable) -> torch.Tensor:
    return F.normalize(model.encode_image(normalize(x)).float(), dim=-1)


def synthesize(
    model: torch.nn.Module,
    targets: torch.Tensor,
    cells: Sequence[Cell],
    config: SynthesisConfig = SynthesisConfig(),
    progress: Callable[[dict], None] | None = None,
    return_images: bool = False,
) -> Prototypes:
    """Synthesize `config.prototypes_per_cell` prototypes for each cell.

    `targets` [n_cells, d] are the normalized text embeddings to match, row j for cells[j]. The model
    is used as it is (its device, eval mode) and left unchanged.
    """
    if targets.shape[0] != len(cells):
        raise ValueError(f"{targets.shape[0]} targets for {len(cells)} cells")
    if config.prototypes_per_cell < 1 or config.steps < 1:
        raise ValueError("prototypes_per_cell and steps must be at least 1")
    t0 = time.perf_counter()
    k = config.prototypes_per_cell
    rows = [(cell, j, i) for j, cell in enumerate(cells) for i in range(k)]
    embs, coss, used, imgs = [], [], [], []
    for start in range(0, len(rows), config.batch_size):
        chunk = rows[start : start + config.batch_size]
        e, c, s, im = _synthesize_chunk(model, targets, chunk, config, progress, start, len(rows))
        embs.append(e)
        coss.append(c)
        used.append(s)
        imgs.append(im)
    return Prototypes(
        embeddings=torch.cat(embs),
        cells=[r[0] for r in rows],
        cosines=torch.cat(coss),
        steps_used=torch.cat(used),
        seconds=time.perf_counter() - t0,
        config=config,
        images=torch.cat(imgs) if return_images else None,
    )


def _synthesize_chunk(model, targets, rows, config: SynthesisConfig, progress, offset: int, total: int):
    device = next(model.parameters()).device
    size = image_size(model)
    normalize = image_normalizer(model)
    gens = [torch.Generator().manual_seed(cell_seed(config.seed, cell, i)) for cell, _, i in rows]
    n = len(rows)
    low = torch.stack([torch.randn(3, config.low_res, config.low_res, generator=g) for g in gens]) * 0.5
    high = torch.stack([torch.randn(3, size, size, generator=g) for g in gens]) * 0.05
    aug = _augment_params(gens, config.steps)
    noise_bank = torch.stack([torch.randn(3, size, size, generator=g) for g in gens]).to(device)
    low, high = low.to(device).requires_grad_(), high.to(device).requires_grad_()
    tgt = targets[[j for _, j, _ in rows]].to(device).float()
    opt = torch.optim.Adam([low, high], lr=config.lr)
    active = torch.ones(n, dtype=torch.bool)
    steps_used = torch.full((n,), config.steps, dtype=torch.long)
    frozen_low, frozen_high = low.detach().clone(), high.detach().clone()

    def images(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.interpolate(lo, size=size, mode="bicubic", align_corners=False) + hi)

    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for step in range(config.steps):
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x = images(low[idx], high[idx])
            # each image's own noise pattern, moved every step: independent of the batch's other images
            noise = noise_bank[idx].roll(shifts=(7 * step % size, 13 * step % size), dims=(2, 3))
            xa = _augment(x, aug[idx, step].to(device), noise)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                feats = model.encode_image(normalize(xa))
            emb = F.normalize(feats.float(), dim=-1)
            loss = -(emb * tgt[idx]).sum(-1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % config.check_every == 0 or step == config.steps - 1:
                with torch.no_grad():
                    cos = (_encode(model, images(low[idx], high[idx]), normalize) * tgt[idx]).sum(-1).cpu()
                done = idx[cos >= config.target_cosine]
                if done.numel():
                    active[done] = False
                    steps_used[done] = step + 1
                    frozen_low[done], frozen_high[done] = low.detach()[done], high.detach()[done]
                if progress is not None:
                    progress({"step": step + 1, "steps": config.steps, "active": int(active.sum()),
                              "images": n, "offset": offset, "total": total, "mean_cosine": float(cos.mean())})
        with torch.no_grad():
            still = active.nonzero().squeeze(1)
            frozen_low[still], frozen_high[still] = low.detach()[still], high.detach()[still]
            x = images(frozen_low, frozen_high)
            emb = _encode(model, x, normalize)
            cos = (emb * tgt).sum(-1)
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    img_u8 = (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return emb.cpu(), cos.cpu(), steps_used, img_u8

