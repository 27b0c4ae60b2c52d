"""Fold a projection P into the image tower's last linear map (docs/DESIGN.md, step 5).

An image embedding is h = g(x) W; folding W' = W Pᵀ gives h' = P h, so the unlearned model is an
ordinary checkpoint of the same architecture. The text tower is never touched.

- open_clip ViT: `visual.proj`, a parameter [width, embed_dim] applied as x @ proj → proj' = proj Pᵀ;
- ModifiedResNet: `visual.attnpool.c_proj`, a Linear (weight [out, in], bias) → weight' = P weight,
  bias' = P bias;
- timm towers: the Linear `visual.head.proj` (or the last Linear of an MLP head, or the trunk's
  classifier when it is the projection) → as above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FinalMap:
    """Where an image tower's last linear map lives."""

    name: str  # state-dict prefix, e.g. "visual.attnpool.c_proj"
    module: nn.Module | None  # the Linear, or None for a bare parameter
    param: nn.Parameter | None  # ViT's `proj`


def final_map(model: nn.Module) -> FinalMap:
    visual = model.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, nn.Parameter):
        return FinalMap("visual.proj", None, proj)
    attnpool = getattr(visual, "attnpool", None)
    if attnpool is not None and isinstance(getattr(attnpool, "c_proj", None), nn.Linear):
        return FinalMap("visual.attnpool.c_proj", attnpool.c_proj, None)
    head = getattr(visual, "head", None)
    if head is not None:
        if isinstance(getattr(head, "proj", None), nn.Linear):
            return FinalMap("visual.head.proj", head.proj, None)
        linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            n, m = linears[-1]
            return FinalMap(f"visual.head.{n}", m, None)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "get_classifier"):  # timm tower whose classifier is the projection
        clf = trunk.get_classifier()
        names = {m: n for n, m in trunk.named_modules()}
        if isinstance(clf, nn.Linear) and clf in names:
            return FinalMap(f"visual.trunk.{names[clf]}", clf, None)
    raise ValueError(
        f"cannot find the last linear map of image tower {type(visual).__name__}: expected visual.proj (ViT), "
        "visual.attnpool.c_proj (ModifiedResNet) or a Linear in visual.head (timm)"
    )


@torch.no_grad()
def fold_projection(model: nn.Module, P: torch.Tensor) -> FinalMap:
    """Fold P into the model in place (computed in float64, stored in the map's dtype)."""
    fm = final_map(model)
    P64 = P.to(torch.float64)
    if fm.param is not None:
        w = fm.param
        if w.shape[1] != P.shape[0]:
            raise ValueError(f"P is {tuple(P.shape)} but {fm.name} outputs {w.shape[1]} dims")
        w.copy_((w.to(torch.float64) @ P64.T.to(w.device)).to(w.dtype))
    else:
        assert isinstance(fm.module, nn.Linear)
        lin = fm.module
        if lin.weight.shape[0] != P.shape[0]:
            raise ValueError(f"P is {tuple(P.shape)} but {fm.name} outputs {lin.weight.shape[0]} dims")
        P_dev = P64.to(lin.weight.device)
        lin.weight.copy_((P_dev @ lin.weight.to(torch.float64)).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((P_dev @ lin.bias.to(torch.float64)).to(lin.bias.dtype))
    return fm
