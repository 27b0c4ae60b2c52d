"""A domain-gated class suppression (kind "gated"; measured, not a mode's default: docs/GATE.md, "A domain-gated map").

In a near-additive embedding (h ≈ a_class + b_domain) forgetting class c only in domain d needs the domain's part of
h to lower c's zero-shot logit and nothing else. This map does that with a handful of numbers:

    P = I − Uᵀ A V

- V [domains, d]: one detector per domain, v_d · h ≈ 1 on embeddings of domain d and ≈ 0 on the others, whatever
  the class (ridge least squares of the domain's indicator over the prototypes of every cell, each cell weighted
  alike, so the class parts average out);
- U [forgotten classes, d]: the part of each forgotten class's zero-shot row orthogonal to every other class's row.
  Subtracting it lowers that class's logit and leaves every other logit where it was (before normalization), so an
  image of another class never flips because of it;
- A [forgotten classes, domains], non-zero only where a class is forgotten in a domain: fitted on the prototypes,
  full-batch Adam on hinge terms: every forget prototype loses its class by `margin`, every retain prototype keeps
  its own margin up to `retain_margin`.

The margin map (clipforget.method.margin) fits a full d×d matrix on the same prototypes; this one fits at most
classes × domains numbers, each estimated from every cell's prototypes at once. Since subtracting a multiple of U
can take a class's cosine margin only down to −‖u‖ (about −0.3 to −0.7 on the toy model), forget margins are small.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clipforget.method.grid import Cell, check_projection_kind
from clipforget.method.margin import _margins
from clipforget.method.nullspace import Projection


def domain_detector(embeddings: torch.Tensor, cells: Sequence[Cell], domain: str, ridge: float) -> torch.Tensor:
    """v [d]: ridge least squares of the indicator of `domain` on the normalized rows, each cell weighted alike."""
    h = F.normalize(embeddings.double(), dim=-1)
    y = torch.tensor([1.0 if c.domain == domain else 0.0 for c in cells], dtype=torch.float64)
    counts = Counter(cells)
    w = torch.tensor([1.0 / counts[c] for c in cells], dtype=torch.float64)
    hw = h * w[:, None]
    return torch.linalg.solve(h.T @ hw + ridge * torch.eye(h.shape[1], dtype=torch.float64), hw.T @ y)


def unique_row(classifier: torch.Tensor, index: int) -> torch.Tensor:
    """The part of (normalized) row `index` orthogonal to every other row."""
    t = F.normalize(classifier.double(), dim=-1)
    q, _ = torch.linalg.qr(torch.cat([t[:index], t[index + 1:]]).T)
    return t[index] - q @ (q.T @ t[index])


def gated_projection(forget: Sequence[Cell], embeddings: torch.Tensor, cells: Sequence[Cell], classes: Sequence[str],
                     classifier: torch.Tensor, *, margin: float = 0.1, retain_margin: float = 0.05,
                     weight: float = 1.0, ridge: float = 0.1, steps: int = 400, lr: float = 0.5,
                     radius: float = 0.0) -> Projection:
    """P [d, d] forgetting the cells `forget`, fitted on prototypes (`embeddings`, rows, of `cells`: every cell of the
    grid, so that the domain detectors see every class) against the zero-shot rows `classifier` of `classes`."""
    if not forget:
        raise ValueError("the forget set is empty")
    check_projection_kind("gated", forget, classes)
    missing = sorted({str(c) for c in forget} - {str(c) for c in cells})
    if missing:
        raise ValueError(f"no prototypes for the forget cells {', '.join(missing)}")
    t = F.normalize(classifier.double(), dim=-1)
    d = t.shape[1]
    index = {c: i for i, c in enumerate(classes)}
    h = F.normalize(embeddings.double(), dim=-1)
    domains = sorted({c.domain for c in cells})
    forgotten = sorted({c.cls for c in forget})
    V = torch.stack([domain_detector(h, cells, dom, ridge) for dom in domains])
    U = torch.stack([unique_row(t, index[c]) for c in forgotten])
    labels = torch.tensor([index[c.cls] for c in cells])
    fset = set(forget)
    is_f = torch.tensor([c in fset for c in cells])
    hv = h @ V.T
    # within a ball of `radius` around a row its detector scores move by up to radius·‖v‖: forget rows are held to their
    # margin at the lowest score, retain rows at the highest (the one that lowers a forgotten class the most)
    spread = radius * V.norm(dim=-1)
    m0 = _margins(h, t, labels)
    keep = (~is_f) & (m0 > 0)  # retain prototypes the model got right keep their margin, up to `retain_margin`
    target = m0.clamp(max=retain_margin)
    # only the forgotten (class, domain) pairs get a term: free terms for the other domains of a forgotten class met
    # fewer requests on rendered images (docs/GATE.md)
    mask = torch.tensor([[float(Cell(c, dom) in fset) for dom in domains] for c in forgotten], dtype=torch.float64)
    A = torch.zeros(len(forgotten), len(domains), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([A], lr=lr)
    for _ in range(steps):
        mf = _margins(h[is_f] - ((hv[is_f] - spread) @ (A * mask).T) @ U, t, labels[is_f])
        mr = _margins(h[keep] - ((hv[keep] + spread) @ (A * mask).T) @ U, t, labels[keep])
        loss = (F.relu(margin + mf).mean() + weight * F.relu(target[keep] - mr).mean()
                + 1e-4 * (A ** 2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    A = (A * mask).detach()
    P = torch.eye(d, dtype=torch.float64) - U.T @ A @ V
    m = _margins(h @ P.T, t, labels)
    stats = {"margin": margin, "retain_margin": retain_margin, "weight": weight, "ridge": ridge, "steps": steps,
             "radius": radius,
             "forget_violations": float((m[is_f] > -margin).double().mean()),
             "retain_flips": float(((m <= 0) & keep).double().sum() / keep.sum().clamp(min=1))}
    return Projection(P, "gated", stats)
