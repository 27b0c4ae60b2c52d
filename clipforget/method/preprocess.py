"""The image tower's own preprocessing, read from an open_clip model: input size and normalization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def image_normalizer(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalize float images [B,3,H,W] in [0,1] with the model's own preprocessing mean/std."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    return lambda x: (x - mean.to(x.device)) / std.to(x.device)


def image_size(model: Any) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
