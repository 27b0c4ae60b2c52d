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


@dataclass(frozen=True)
class FoldedMap:
    """A candidate checkpoint that differs from its base only in the image tower's last linear map M' (the base's:
    M, both [out, in], biases b', b): its image embedding is h' = P (h - b) + b' for the base's embedding
    h = M x + b of the same image, with P = M' M⁺. Exact when M' = P M, which holds for a fold (M' = P M by
    construction) and for any M' when M has full column rank (M⁺ M = I)."""

    P: torch.Tensor  # [out, out], float64
    bias: torch.Tensor  # the base's b [out], float64 (zeros without one)
    folded_bias: torch.Tensor  # the candidate's b' [out], float64

    def apply(self, base_features: torch.Tensor) -> torch.Tensor:
        """The candidate's embeddings [N, out] (float32) from the base's."""
        return ((base_features.double() - self.bias) @ self.P.T + self.folded_bias).float()


def _map_tensors(fm: FinalMap, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M [out, in], b [out] or None) of the map `fm` in a state dict."""
    if fm.param is not None:
        return state[fm.name].T, None
    return state[f"{fm.name}.weight"], state.get(f"{fm.name}.bias")


@torch.no_grad()
def folded_map(model: nn.Module, candidate: dict[str, torch.Tensor], rtol: float = 1e-5) -> FoldedMap | None:
    """Verify that the state dict `candidate` is `model` with only the last linear map of its image tower changed,
    to M' = P M; return that P (and the biases), or None when it is anything else.

    Every other tensor must be bitwise equal (dtype and shape too) and P M must equal M' to float32 rounding
    (largest deviation at most `rtol` of the largest entry of M'); both maps must be stored in float32 or float64
    (a 16-bit map rounds too coarsely to be checked this way) and M must have full rank.
    """
    fm = final_map(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if set(candidate) != set(state):
        return None
    map_keys = {fm.name} if fm.param is not None else {f"{fm.name}.weight", f"{fm.name}.bias"}
    for k, v in state.items():
        c = candidate[k]
        if c.dtype != v.dtype or c.shape != v.shape:
            return None
        if k not in map_keys and not torch.equal(c.to(v.device), v):
            return None
    M, b = _map_tensors(fm, state)
    M2, b2 = _map_tensors(fm, candidate)
    if any(t.dtype not in (torch.float32, torch.float64) for t in (M, M2)):
        return None
    M, M2 = M.double().cpu(), M2.double().cpu()
    if not bool(torch.isfinite(M2).all()):
        return None
    s = torch.linalg.svdvals(M)
    if float(s[-1]) <= 1e-12 * float(s[0]):  # rank-deficient: P is not determined by M'
        return None
    P = M2 @ torch.linalg.pinv(M)
    if float((P @ M - M2).abs().max()) > rtol * float(M2.abs().max()):
        return None
    zeros = torch.zeros(M.shape[0], dtype=torch.float64)
    return FoldedMap(P, zeros if b is None else b.double().cpu(), zeros if b2 is None else b2.double().cpu())
