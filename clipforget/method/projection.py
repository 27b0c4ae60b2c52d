"""The unlearning method end to end, without orchestration: cells → text embeddings and prototypes →
forget/retain sets → projection. Folding and evaluation live in `fold` and `evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from torch.nn.functional import normalize

from clipforget.method.grid import Cell
from clipforget.method.nullspace import Projection, hard_projection, soft_projection
from clipforget.method.prompts import TemplateSet, encode_prompts
from clipforget.method.synthesis import Prototypes

Source = Literal["text", "prototypes", "multimodal"]
SOURCES: tuple[str, ...] = ("text", "prototypes", "multimodal")


@dataclass(frozen=True)
class NullspaceConfig:
    """How the projection is built. `same_class_weight` up-weights retain cells that share a class
    with a forget cell (the same class in kept domains, in `domain` mode)."""

    kind: Literal["soft", "hard", "margin", "gated"] = "hard"
    source: Source = "multimodal"
    lam: float = 100.0
    mu: float = 10.0
    energy: float = 0.95
    retain_energy: float = 0.9
    same_class_weight: float = 1.0
    text_weight: float = 1.0  # weight of text columns relative to prototype columns
    # kind "margin" (clipforget.method.margin): the zero-shot margin each forget prototype must lose by, the weight of
    # the margin terms against ‖P − I‖², and the Adam steps of the solve
    margin: float = 0.05
    margin_weight: float = 30.0
    margin_steps: int = 300
    margin_start: Literal["identity", "soft"] = "identity"  # refine from I, or from the soft projection of lam/mu
    retain_margin: float = 0.0  # 0: the forget margin; else how much of its own margin a retain prototype keeps
    # the radius within which a prototype of a forgotten class in a kept domain keeps its margin (first order;
    # clipforget.method.margin): images lie farther from their cell's prototypes than the prototypes from each other
    same_class_radius: float = 0.0
    # kind "margin": the weight of the retain prototypes of other classes in a domain where a class is forgotten
    # (in `domain` mode the collateral on images falls mostly there: another class of the forgotten domain)
    same_domain_weight: float = 1.0
    # kind "margin": the radius within which a prototype of another class (not forgotten anywhere) keeps its margin
    other_class_radius: float = 0.0
    # kind "margin": a retain prototype held within a radius keeps its margin against every other class, not only
    # against the best other class where it stands
    robust_all_classes: bool = False
    # kind "margin": the shape of the region a retain prototype is held within. 0: a ball of the radius; 1: an
    # ellipsoid shaped like the prototypes' spread within their cells (their pooled within-cell covariance, scaled to
    # the ball's mean size), where rendered images deviate from their cell's prototypes; in between: a mix of the two
    radius_spread: float = 0.0
    # kind "margin": > 1 adds to each cell's prototypes a copy of them k times as far from the cell's mean (rendered
    # images deviate from their cell's prototypes mostly along the directions the prototypes spread in); 0: none
    spread_copies: float = 0.0
    # kind "margin": > 0 adds, for each cell of another class in a forgotten cell's domain, its prototypes moved this
    # share of the way toward the forgotten cell's (kept samples near the boundary the map moves)
    boundary_mix: float = 0.0
    # kind "margin": weight of ‖PᵀP − s I‖² (s the mean of PᵀP's diagonal): how far the map is from a scaled rotation,
    # which moves every angle between embeddings alike (a steep map turns the small gap between images and prototypes
    # into flips); 0: off
    conformal_weight: float = 0.0
    # kind "margin": the radius of the other classes' prototypes in a forgotten cell's domain, where most collateral on
    # images falls; 0: the other-class radius
    same_domain_radius: float = 0.0
    # kind "gated" (clipforget.method.gated; measured, no mode's default): the ridge of its domain detectors. It also
    # reads margin, retain_margin, margin_weight and margin_steps (measured with 0.1, 0.05, 1 and 400)
    ridge: float = 0.1
    detector_radius: float = 0.0  # kind "gated": the radius within which prototypes are held (clipforget.method.gated)

    def to_dict(self) -> dict:
        return asdict(self)


# Defaults per mode. `global` refines the soft projection (settings chosen on the validation renders, seeds 1 and 5,
# by `python bench/results.py --tune`; `domain` now starts from the identity, below) with the margin-aware map:
# every forget prototype must lose its class by 0.3 in cosine, every retain prototype keep its own margin, margin
# terms weighted 100 (chosen with `python bench/requests.py --render-seed 1 --kinds margin:margin=0.3,...` over 31 requests;
# docs/REQUESTS.md): on validation images global requests met their targets 12 of 12 times (soft alone: 5;
# margin 0.1 weight 30: 9; margin 0.2: 10), domain requests 9 of 15 (soft alone: 5).
# Text columns weigh little (0.1-0.3): in the retain set they over-protect directions images do not use.
# Prototypes of the classes nobody asked to forget keep their margin within a radius of 0.1 (first order): the
# collateral on images falls on such cells, mostly in painting, whose images have the smallest margins. Chosen on
# validation renders 1 and 5, request draws 0-3 (`bench/requests.py --kinds margin:other_class_radius=R`; docs/GATE.md,
# "Other classes held within a radius"): domain requests' false approvals 27 -> 20 and false rejections 10 -> 3 of
# 120 at as many approvals, global false approvals 3 -> 1 of 96 (0.08: 16 false approvals, but the suite's governance
# scenario lost one image too many)
# Held within a radius, a retain prototype keeps its margin against every other class (`robust_all_classes`), not
# only against the best other class where it stands: forgetting cross in sketch lowers `cross`, the best other class
# of the star-in-sketch prototypes, while star-in-sketch images fall to `triangle` and `tree`. Validation renders 1
# and 5, draws 0-3: domain 74, 57, 20, 3 -> 72, 63, 16, 7 (approved, met on images, false approvals, false
# rejections), global unchanged (96, 95, 1, 0); docs/GATE.md, "Kept margins against every class"
_MARGIN: dict = dict(kind="margin", margin_start="soft", margin=0.3, margin_weight=100.0, margin_steps=200,
                     retain_margin=1.0, other_class_radius=0.1, robust_all_classes=True)
MODE_DEFAULTS: dict[str, NullspaceConfig] = {
    # global: prototypes lose their class by 0.5. Chosen on validation renders 1 and 5 with prototypes synthesized in
    # fp32 and in bf16 (their numerics differ, and auto picks by CPU): of 48 request runs, 48 approved, 47 met on
    # images, 1 false approval (a kept cell); margin 0.3 left a forgotten cell at 0.16-0.18 with fp32 prototypes
    "global": NullspaceConfig(source="prototypes", lam=10.0, mu=0.3, text_weight=0.1, **{**_MARGIN, "margin": 0.5}),
    # domain: prototypes lose their class by 0.5 (weight 300), and prototypes of the same class in kept domains keep
    # their margin within a radius of 0.05 (images lie farther from their prototypes than prototypes from each
    # other). Chosen on validation renders 1 and 5 (`bench/requests.py`; docs/GATE.md, "what was tried"): domain
    # requests approved 14 of 15 on both, met on images 13, 1 false approval each (a kept-domain cell of the same class
    # at 0.06 against 0.05) and no approved request with a forget cell above its limit on images; margin 0.3
    # weight 100 approved 13, met 9 and 8, with 5 and 6 false approvals (4 and 3 of them forget cells kept).
    # `same_domain_weight=3` meets more requests on images but moves damage to domains where nothing is forgotten
    # (docs/GATE.md, "Other classes of the forgotten domain"): not the default.
    # The map starts from (and is held near) the identity, not the soft projection: the soft projection squashes
    # directions (a singular value of 0.014) the map then has to work around. Validation renders 1 and 5, draws 0-3:
    # domain 72, 63, 16, 7 -> 78, 72, 16, 10 (approved, met on images, false approvals, false rejections); global
    # keeps the soft start (identity: 92, 96, 0, 4 against 96, 95, 1, 0). docs/GATE.md, "The map held near the identity"
    "domain": NullspaceConfig(source="prototypes", lam=30.0, mu=0.3, same_class_weight=10.0, text_weight=0.1,
                              **{**_MARGIN, "margin": 0.5, "margin_weight": 300.0, "margin_start": "identity"},
                              same_class_radius=0.05),
    # no setting meets this mode's targets (docs/RESULTS.md): this one keeps the other domains within 0.05
    "domain_complete": NullspaceConfig(kind="soft", source="multimodal", lam=1000.0, mu=100.0, text_weight=0.3),
}


# Fitted on labelled images (`fit_images`, a few per cell) instead of prototypes: images carry the small margins
# and the spread that prototypes lack, so a retain image need only keep a margin of 0.05, and the map may move
# as far as the hinge terms need (weight 10000, 1000 steps). Chosen on validation renders 1 and 5 with the fit
# images drawn from render 11 (20 per cell; `bench/requests.py --fit-images 20`): every length of the lineage met
# its targets on the images of both renders, as did 12 of 12 global and 29 of 30 domain requests; the
# prototype settings on those images, and these settings on prototypes, did not (docs/GATE.md). For
# `domain_complete` the same map, started from the mode's soft projection, met the mode's targets for each of the
# four domains on both renders (forgotten domain mean <= 0.032, no cell above 0.16, kept domains within 0.04)
IMAGE_FIT: dict = dict(kind="margin", margin=0.2, retain_margin=0.05, margin_weight=10000.0, margin_steps=1000,
                       other_class_radius=0.0, robust_all_classes=False)
FIT_ON: tuple[str, ...] = ("prototypes", "images")
# kind "gated" when asked for (no mode's default): its own settings, measured on the request benchmark (docs/GATE.md,
# "A domain-gated map"): forget prototypes lose their class by 0.1 (the construction cannot go much below −0.3),
# retain prototypes keep up to 0.05, weight 1, 400 steps
GATED: dict = dict(kind="gated", margin=0.1, retain_margin=0.05, margin_weight=1.0, margin_steps=400)


def default_config(mode: str, fit_on: str = "prototypes", **overrides) -> NullspaceConfig:
    """The mode's default settings for a projection fitted on prototypes (data-free) or on labelled images."""
    if fit_on not in FIT_ON:
        raise ValueError(f"unknown fit_on {fit_on!r}; expected one of {', '.join(FIT_ON)}")
    base = MODE_DEFAULTS[mode]
    if fit_on == "images":  # every mode: the margin map refining the mode's soft projection
        base = replace(base, margin_start="soft", **IMAGE_FIT)
    if overrides.get("kind") == "gated":
        base = replace(base, **GATED)
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@torch.no_grad()
def cell_text_embeddings(model, tokenizer, templates: TemplateSet, cells: Sequence[Cell]) -> dict[Cell, torch.Tensor]:
    """Per cell: its normalized single-prompt embeddings and their normalized mean, [n_prompts + 1, d]."""
    device = next(model.parameters()).device
    out = {}
    for cell in cells:
        e = encode_prompts(model, tokenizer, templates.cell_prompts(cell.cls, cell.domain), device).cpu()
        out[cell] = torch.cat([e, torch.nn.functional.normalize(e.mean(0, keepdim=True), dim=-1)])
    return out


def text_targets(text: dict[Cell, torch.Tensor], cells: Sequence[Cell]) -> torch.Tensor:
    """The synthesis target of each cell: its mean prompt embedding."""
    return torch.stack([text[c][-1] for c in cells])


def _columns(cells: Sequence[Cell], text: dict[Cell, torch.Tensor], protos: Prototypes | None, source: str,
             text_weight: float) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Cell]]:
    cols, weights, owners = [], [], []
    for cell in cells:
        if source in ("text", "multimodal"):
            t = text[cell]
            cols.append(t)
            weights.append(torch.full((len(t),), text_weight))
            owners += [cell] * len(t)
        if source in ("prototypes", "multimodal"):
            if protos is None:
                raise ValueError(f"source {source!r} needs prototypes")
            p = protos.for_cell(cell)
            if len(p) == 0:
                raise ValueError(f"no prototypes for cell {cell}")
            cols.append(p)
            weights.append(torch.ones(len(p)))
            owners += [cell] * len(p)
    return cols, weights, owners


def forget_retain_sets(
    forget: Sequence[Cell],
    retain: Sequence[Cell],
    text: dict[Cell, torch.Tensor],
    protos: Prototypes | None,
    config: NullspaceConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """F [d, n_f], forget weights, R [d, n_r], retain weights.

    The retain set always uses both modalities that are available: what must survive is the image
    side (prototypes) and its alignment with text.
    """
    if config.source not in SOURCES:
        raise ValueError(f"unknown source {config.source!r}; expected one of {', '.join(SOURCES)}")
    f_cols, f_w, _ = _columns(forget, text, protos, config.source, config.text_weight)
    retain_source = "multimodal" if protos is not None else "text"
    r_cols, r_w, owners = _columns(retain, text, protos, retain_source, config.text_weight)
    forget_classes = {c.cls for c in forget}
    boost = torch.tensor([config.same_class_weight if o.cls in forget_classes else 1.0 for o in owners])
    d = next(iter(text.values())).shape[1]
    R = torch.cat(r_cols).T if r_cols else torch.zeros(d, 0)
    rw = torch.cat(r_w) * boost if r_w else torch.zeros(0)
    return torch.cat(f_cols).T, torch.cat(f_w), R, rw


def build_projection(F: torch.Tensor, fw: torch.Tensor, R: torch.Tensor, rw: torch.Tensor,
                     config: NullspaceConfig) -> Projection:
    if config.kind == "margin":
        raise ValueError("a margin projection is fitted from labelled prototypes: use fit_projection")
    if config.kind == "soft":
        return soft_projection(F, R, lam=config.lam, mu=config.mu, forget_weights=fw, retain_weights=rw)
    if config.kind == "hard":
        return hard_projection(F, R, energy=config.energy, retain_energy=config.retain_energy,
                               forget_weights=fw, retain_weights=rw)
    raise ValueError(f"unknown projection kind {config.kind!r}; expected soft or hard")


def fit_projection(forget: Sequence[Cell], retain: Sequence[Cell], text: dict[Cell, torch.Tensor],
                   protos: Prototypes | None, config: NullspaceConfig,
                   classifier: tuple[Sequence[str], torch.Tensor] | None = None) -> Projection:
    """The projection of a request. `classifier` (class names, rows [n_classes, d]) is the zero-shot
    classifier the margin kind works against."""
    if config.kind == "margin":
        return fit_margin_projection(forget, retain, text, protos, classifier, config)
    if config.kind == "gated":
        from clipforget.method.gated import gated_projection

        if protos is None or classifier is None:
            raise ValueError("a gated projection needs prototypes and the zero-shot classifier")
        return gated_projection(forget, protos.embeddings, protos.cells, classifier[0], classifier[1],
                                margin=config.margin, retain_margin=config.retain_margin, weight=config.margin_weight,
                                ridge=config.ridge, steps=config.margin_steps, radius=config.detector_radius)
    F, fw, R, rw = forget_retain_sets(forget, retain, text, protos, config)
    return build_projection(F, fw, R, rw, config)


def fit_margin_projection(forget: Sequence[Cell], retain: Sequence[Cell], text: dict[Cell, torch.Tensor],
                          protos: Prototypes | None,
                          classifier: tuple[Sequence[str], torch.Tensor] | None, config: NullspaceConfig) -> Projection:
    """The margin-aware map (clipforget.method.margin) on the prototypes of the forget and retain cells."""
    from clipforget.method.margin import margin_projection

    if protos is None or classifier is None:
        raise ValueError("a margin projection needs prototypes and the zero-shot classifier")
    classes, rows = classifier
    index = {c: i for i, c in enumerate(classes)}

    def stack(cells: Sequence[Cell]) -> tuple[torch.Tensor, torch.Tensor, list[Cell]]:
        embs, owners = [], []
        for cell in cells:
            p = protos.for_cell(cell)
            if len(p) == 0:
                raise ValueError(f"no prototypes for cell {cell}")
            embs.append(p)
            owners += [cell] * len(p)
            if config.spread_copies > 1 and len(p) > 1:  # the cell's prototypes again, k times as far from their mean
                m = p.mean(0)
                embs.append(normalize(m + config.spread_copies * (p - m), dim=-1))
                owners += [cell] * len(p)
        return torch.cat(embs), torch.tensor([index[c.cls] for c in owners]), owners

    f, fl, _ = stack(forget)
    if retain:
        r, rl, owners = stack(retain)
        if config.boundary_mix > 0:
            r, rl, owners = _with_boundary_copies(forget, retain, protos, config.boundary_mix, index, r, rl, owners)
    else:
        r, rl, owners = f[:0], fl[:0], []
    forget_classes, forget_domains = {c.cls for c in forget}, {c.domain for c in forget}
    rw = torch.tensor([config.same_class_weight if o.cls in forget_classes else
                       config.same_domain_weight if o.domain in forget_domains else 1.0 for o in owners])
    radii = retain_radii(forget, owners, config)
    start = None
    if config.margin_start == "soft":
        start = fit_projection(forget, retain, text, protos, replace(config, kind="soft")).P
    metric = spread_metric([*forget, *retain], protos, config.radius_spread) if config.radius_spread else None
    return margin_projection(f, fl, r, rl, rows, margin=config.margin, weight=config.margin_weight,
                             steps=config.margin_steps, retain_weights=rw, start=start,
                             retain_margin=config.retain_margin or None, retain_radius=radii,
                             robust_all_classes=config.robust_all_classes, radius_metric=metric,
                             conformal=config.conformal_weight)


def retain_radii(forget: Sequence[Cell], owners: Sequence[Cell], config: NullspaceConfig) -> torch.Tensor:
    """The radius each retain row (of cell `owners[i]`) keeps its margin within: the forgotten classes' kept cells
    `same_class_radius`; the other classes `other_class_radius`, or `same_domain_radius` (when set) in a forgotten
    cell's domain."""
    classes, domains = {c.cls for c in forget}, {c.domain for c in forget}
    return torch.tensor([config.same_class_radius if o.cls in classes else
                         config.same_domain_radius if o.domain in domains and config.same_domain_radius else
                         config.other_class_radius for o in owners], dtype=torch.float64)


def _with_boundary_copies(forget: Sequence[Cell], retain: Sequence[Cell], protos: Prototypes, mix: float,
                          index: dict[str, int], r: torch.Tensor, rl: torch.Tensor,
                          owners: list[Cell]) -> tuple[torch.Tensor, torch.Tensor, list[Cell]]:
    """The retain set and, for each retain cell of another class in a forgotten cell's domain, its prototypes moved
    `mix` of the way toward that forgotten cell's (labelled with the retain cell's class): kept samples near the
    boundary a forgetting map moves, where images of the kept cell with small margins lie."""
    extra, extra_owners = [r], list(owners)
    forgotten = {c.cls for c in forget}
    for cell in retain:
        p = protos.for_cell(cell)
        for fc in forget:
            if fc.domain != cell.domain or cell.cls in forgotten:  # other classes of a forgotten cell's domain
                continue
            q = protos.for_cell(fc)
            k = min(len(p), len(q))
            extra.append(normalize((1 - mix) * p[:k] + mix * q[:k], dim=-1))
            extra_owners += [cell] * k
    labels = torch.tensor([index[c.cls] for c in extra_owners])
    return torch.cat(extra), labels, extra_owners


def spread_metric(cells: Sequence[Cell], protos: Prototypes, mix: float) -> torch.Tensor:
    """S [d, d], symmetric: the square root of (1 − mix)·I + mix·Σ, Σ the prototypes' pooled within-cell covariance
    scaled to trace d. A move S u with ‖u‖ ≤ ε is the ellipsoid a retain prototype is held within (mix 0: the ball)."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"radius_spread must be within [0, 1], got {mix}")
    dev = []
    for cell in cells:
        p = normalize(protos.for_cell(cell).double(), dim=-1)
        if len(p) > 1:
            dev.append(p - p.mean(0))
    d = protos.embeddings.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    if not dev:
        return eye
    w = torch.cat(dev)
    cov = w.T @ w
    cov = (1 - mix) * eye + mix * cov * (d / cov.trace().clamp_min(1e-18))
    vals, vecs = torch.linalg.eigh(cov)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T

