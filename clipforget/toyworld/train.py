"""Train the toy CLIP model on rendered toy-world images.

Recipe: open_clip's ModifiedResNet image tower, a multi-positive
contrastive loss over every distinct prompt each step (plain CLIP loss treats the many identical
captions of a 40-cell world as negatives), pre-rendered images, shift/flip/channel-permutation
augmentation, AdamW with warm-up then cosine; bf16 autocast only on a CPU that computes bf16 natively
(elsewhere it is many times slower than fp32), as prototype synthesis chooses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipforget.io.checkpoints import TOY_ARCH, register_toy_config, save_checkpoint
from clipforget.method.preprocess import image_normalizer
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import resolve_precision
from clipforget.toyworld.render import CLASSES, DOMAINS, render_cells


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1100
    batch_size: int = 256
    per_cell: int = 1500
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    max_shift: int = 4
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 only where the CPU does it natively)


def _render_cell(args: tuple[str, str, int, int]) -> np.ndarray:
    name, domain, per_cell, seed = args
    return render_cells([(name, domain)], per_cell, seed)[0]


def render_training_set(per_cell: int, seed: int, workers: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images [N,64,64,3], class index [N], domain index [N]."""
    cells = [(c, d) for d in DOMAINS for c in CLASSES]
    with ProcessPoolExecutor(workers) as pool:
        blocks = list(pool.map(_render_cell, [(c, d, per_cell, seed) for c, d in cells]))
    images = torch.from_numpy(np.concatenate(blocks))
    cls = torch.tensor([CLASSES.index(c) for c, _ in cells]).repeat_interleave(per_cell)
    dom = torch.tensor([DOMAINS.index(d) for _, d in cells]).repeat_interleave(per_cell)
    return images, cls, dom


def training_prompts(templates: TemplateSet) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every distinct caption with its class and domain (-1 for class-only captions)."""
    prompts, pc, pd = [], [], []
    for ci, c in enumerate(CLASSES):
        for di, d in enumerate(DOMAINS):
            cell = templates.cell_prompts(c, d)
            prompts += cell
            pc += [ci] * len(cell)
            pd += [di] * len(cell)
        prompts += [t.format(c) for t in templates.class_templates]
        pc += [ci] * len(templates.class_templates)
        pd += [-1] * len(templates.class_templates)
    return prompts, torch.tensor(pc), torch.tensor(pd)


def augment(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [0,1], shifted, flipped and channel-permuted."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, 3, h, w + 2 * max_shift)
    x = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, 3, h, w)
    x = x.gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    perm = torch.argsort(torch.rand(b, 3, generator=gen), dim=1)
    return x.gather(1, perm[:, :, None, None].expand_as(x))


def multi_positive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Contrastive loss where an image may match several prompts and a prompt several images."""
    pos = positive.float()
    i2t = -(F.log_softmax(logits, dim=1) * pos).sum(1) / pos.sum(1)
    has = pos.sum(0) > 0
    t2i = -(F.log_softmax(logits, dim=0) * pos).sum(0)[has] / pos.sum(0)[has]
    return (i2t.mean() + t2i.mean()) / 2


def train_toy_model(
    out: Path, config: TrainConfig = TrainConfig(), progress: Callable[[str], None] = print
) -> dict:
    """Train from scratch and save fp16 safetensors at `out`; returns a summary of the run."""
    import open_clip

    torch.manual_seed(config.seed)
    register_toy_config()
    model = open_clip.create_model(TOY_ARCH)
    tokenizer = open_clip.get_tokenizer(TOY_ARCH)
    normalize = image_normalizer(model)

    t0 = time.perf_counter()
    images, cls, dom = render_training_set(config.per_cell, config.seed)
    progress(f"rendered {len(images)} images in {time.perf_counter() - t0:.0f}s")
    prompts, pc, pd = training_prompts(TemplateSet())
    tokens = tokenizer(prompts)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        t = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * 0.5 * (1 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(config.seed)
    bf16 = resolve_precision(config.precision, "cpu") == "bf16"
    model.train()
    t1 = time.perf_counter()
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, len(images), (config.batch_size,), generator=gen)
        x = normalize(augment(images[idx], config.max_shift, gen))
        positive = (cls[idx][:, None] == pc[None]) & ((dom[idx][:, None] == pd[None]) | (pd[None] == -1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        loss = multi_positive_loss(logits.float(), positive)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == config.steps - 1:
            el = time.perf_counter() - t1
            progress(f"step {step + 1}/{config.steps} loss {loss.item():.4f} lr {lr_at(step):.2e} {el:.0f}s")
    train_s = time.perf_counter() - t1
    model.eval()
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    digest = save_checkpoint(state, out)
    return {"steps": config.steps, "train_seconds": round(train_s, 1), "images": len(images), "sha256": digest}
