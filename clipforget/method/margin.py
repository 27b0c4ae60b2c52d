"""A margin-aware linear map: forget by zero-shot margins, not only by removing directions.

In a near-additive embedding (h ≈ a_class + b_domain) a projection can only remove directions, so it
cannot forget a class in one domain and keep it in another: that needs the domain's direction mapped
toward *minus* the class's text direction, which a general linear map can express. This module solves
for such a map, training-free (the network is untouched; only a d×d matrix is fitted):

    minimize  ‖P − P₀‖²_F + C · ( mean_forget hinge(m + s_y(Ph) − max_{c≠y} s_c(Ph))
                                 + mean_retain hinge(min(m, m₀) − s_y(Ph) + max_{c≠y} s_c(Ph)) )

where s_c(h) = cos(h, t_c) are the zero-shot logits of the class rows t_c, y is a sample's true class and
m₀ its margin before (a retain sample that was not classified correctly is not forced to be). P₀ is the
start: the identity, or a nullspace projection to refine. A few hundred Adam steps on a d×d matrix:
seconds on a CPU. The result is folded like any projection (W' = W Pᵀ).

Rendered images of a cell lie farther from its prototypes than the prototypes from each other (cell means
at cosine ~0.96 against a spread of ~0.99 on the toy model), so a retain sample can be held to its margin
within a radius ε (`retain_radius`, first order: s_y − s_c − ε‖∇ₕ(s_y − s_c)‖, ∇ taken through P and the
normalization): the same class in kept domains then keeps its images, not only its prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipforget.method.nullspace import Projection


def _margins(h: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the best other logit, per row of h."""
    s = F.normalize(h, dim=-1) @ classifier.T
    true = s.gather(1, labels[:, None]).squeeze(1)
    other = s.scatter(1, labels[:, None], float("-inf")).max(1).values
    return true - other


def _robust_margins_all(h: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, P: torch.Tensor,
                        radius: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of h, the smallest over every other class c of (s_y − s_c)(P h) − ε ‖∇ₕ (s_y − s_c)‖: the margin,
    to first order, after the worst move of norm ε, against whichever class that move favours (the best other class
    before the move is not always the one a rendered image of the cell falls to). With `metric` S the move is S u,
    ‖u‖ ≤ ε (an ellipsoid), and the gradient's norm is taken after S."""
    z = h @ P.T
    n = z.norm(dim=-1, keepdim=True)
    zh = z / n
    s = zh @ classifier.T  # [N, C]
    diff = s.gather(1, labels[:, None]) - s  # s_y − s_c, [N, C]
    # ∇ₕ (s_y − s_c) = ((t_y − t_c) − (s_y − s_c) ẑ)ᵀ P / ‖z‖; its squared norm from Gram matrices ([N, C], not [N, C, d])
    PS = P if metric is None else P @ metric
    tp, zp = classifier @ PS, zh @ PS
    gram, cross = tp @ tp.T, zp @ tp.T
    y = labels[:, None]
    gram_y = gram[labels]  # [N, C]: t_yP · t_cP
    sq = (gram_y.gather(1, y) + gram.diagonal()[None, :] - 2 * gram_y
          - 2 * diff * (cross.gather(1, y) - cross) + diff ** 2 * (zp * zp).sum(-1, keepdim=True))
    robust = diff - radius[:, None] * sq.clamp_min(1e-18).sqrt() / n
    return robust.scatter(1, y, float("inf")).min(1).values


def _robust_margins(h: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                    P: torch.Tensor, metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins of P h (rows) and the norm of their gradient with respect to h (against the best other class)."""
    z = h @ P.T
    n = z.norm(dim=-1, keepdim=True)
    zh = z / n
    s = zh @ classifier.T
    true = s.gather(1, labels[:, None]).squeeze(1)
    others = s.scatter(1, labels[:, None], float("-inf"))
    best = others.argmax(1)
    other = others.gather(1, best[:, None]).squeeze(1)
    g = ((classifier[labels] - true[:, None] * zh) - (classifier[best] - other[:, None] * zh)) / n
    return true - other, (g @ (P if metric is None else P @ metric)).norm(dim=-1)


def margin_projection(
    forget: torch.Tensor,
    forget_labels: torch.Tensor,
    retain: torch.Tensor,
    retain_labels: torch.Tensor,
    classifier: torch.Tensor,
    *,
    margin: float = 0.05,
    weight: float = 30.0,
    steps: int = 300,
    lr: float = 0.01,
    start: torch.Tensor | None = None,
    retain_weights: torch.Tensor | None = None,
    retain_margin: float | None = None,
    retain_radius: float | torch.Tensor = 0.0,
    robust_all_classes: bool = False,
    radius_metric: torch.Tensor | None = None,
    conformal: float = 0.0,
) -> Projection:
    """Fit P [d, d] on forget/retain image embeddings (rows) with class labels and the zero-shot classifier.

    Deterministic for given inputs (full-batch Adam from `start`, default the identity). With `retain_radius`
    ε > 0 (one value, or one per retain row) a retain row keeps its margin to first order for any perturbation
    of norm ε of its embedding (with `radius_metric` S: any move S u, ‖u‖ ≤ ε, an ellipsoid).
    """
    if forget.ndim != 2 or retain.ndim != 2 or forget.shape[1] != retain.shape[1] != classifier.shape[1]:
        raise ValueError("forget, retain and classifier must be [n, d] with the same d")
    if len(forget) == 0:
        raise ValueError("the forget set is empty")
    d = forget.shape[1]
    f, r = forget.double(), retain.double()
    t = F.normalize(classifier.double(), dim=-1)
    fl, rl = forget_labels.long(), retain_labels.long()
    with torch.no_grad():
        m0 = _margins(r, t, rl)
    keep = m0 > 0  # only samples the model got right are held to a margin
    # a retain sample keeps its own margin up to `retain_margin` (default: the forget margin)
    r_target = torch.clamp(m0, max=margin if retain_margin is None else retain_margin)
    rw = torch.ones(len(r), dtype=torch.float64) if retain_weights is None else retain_weights.double()
    rw = rw * keep
    radius = torch.as_tensor(retain_radius, dtype=torch.float64).expand(len(r))
    robust = bool((radius > 0).any())
    metric = None if radius_metric is None else radius_metric.double()
    P0 = (torch.eye(d, dtype=torch.float64) if start is None else start.double()).clone()
    P = P0.clone().requires_grad_()
    opt = torch.optim.Adam([P], lr=lr)
    # the step size decays to zero (cosine): the fit settles instead of oscillating between hinge faces, so
    # prototypes that differ in rounding give nearly the same P
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in range(steps):
        forget_loss = F.relu(margin + _margins(f @ P.T, t, fl)).mean()
        if robust and robust_all_classes:
            mr = _robust_margins_all(r, t, rl, P, radius, metric)
        elif robust:
            mr, grad = _robust_margins(r, t, rl, P, metric)
            mr = mr - radius * grad
        else:
            mr = _margins(r @ P.T, t, rl)
        retain_loss = (F.relu(r_target - mr) * rw).sum() / rw.sum().clamp(min=1)
        loss = ((P - P0) ** 2).sum() + weight * (forget_loss + retain_loss)
        if conformal:  # how far P is from a scaled rotation, which changes no angle between embeddings
            gram = P.T @ P
            loss = loss + conformal * ((gram - gram.diagonal().mean() * torch.eye(d, dtype=gram.dtype)) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        P_final = P.detach()
        fm, rm = _margins(f @ P_final.T, t, fl), _margins(r @ P_final.T, t, rl)
        stats = {"margin": margin, "weight": weight, "steps": steps, "lr": lr,
                 "retain_radius": float(radius.max()) if len(r) else 0.0,
                 "forget_violations": float((fm > -margin).double().mean()),
                 "retain_flips": float(((rm <= 0) & keep).double().sum() / keep.sum().clamp(min=1)),
                 "distance": float((P_final - P0).norm())}
    return Projection(P_final, "margin", stats)
