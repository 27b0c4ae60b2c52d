"""The domain-gated map (clipforget.method.gated): a class forgotten in one domain only, other classes untouched."""

import pytest
import torch
import torch.nn.functional as F

from clipforget.method.gated import domain_detector, gated_projection, unique_row
from clipforget.method.grid import Cell
from clipforget.method.margin import _margins
from clipforget.method.projection import NullspaceConfig, fit_projection
from clipforget.method.synthesis import Prototypes, SynthesisConfig

CLASSES = ["a", "b", "c"]
DOMAINS = ["x", "y", "z"]


def _world(seed: int = 0, n: int = 8):
    """Additive embeddings: class along e0..e2 (its text row), domain along e3..e5, noise; every cell n rows."""
    g = torch.Generator().manual_seed(seed)
    d = 12
    eye = torch.eye(d, dtype=torch.float64)
    rows = F.normalize(eye[:3] + 0.1 * torch.randn(3, d, generator=g, dtype=torch.float64), dim=-1)
    emb, cells = [], []
    for i, cls in enumerate(CLASSES):
        for j, dom in enumerate(DOMAINS):
            emb.append(F.normalize(eye[i] + 0.7 * eye[3 + j] + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64),
                                   dim=-1))
            cells += [Cell(cls, dom)] * n
    return torch.cat(emb), cells, rows


def test_detector_separates_its_domain_whatever_the_class():
    emb, cells, _ = _world()
    v = domain_detector(emb, cells, "y", ridge=0.01)
    score = emb @ v
    inside = torch.tensor([c.domain == "y" for c in cells])
    assert score[inside].min() > 0.7 and score[~inside].abs().max() < 0.3


def test_unique_row_moves_only_its_own_logit():
    _, _, rows = _world()
    u = unique_row(rows, 1)
    logits = F.normalize(rows, dim=-1) @ u
    assert logits[1] > 0.1 and logits[[0, 2]].abs().max() < 1e-12


def test_gated_map_forgets_a_class_in_one_domain_and_keeps_every_other_cell():
    emb, cells, rows = _world()
    fresh, fresh_cells, _ = _world(seed=1)  # other samples of the same cells: what the map was not fitted on
    forget = [Cell("a", "y")]
    proj = gated_projection(forget, emb, cells, CLASSES, rows, margin=0.1)
    assert proj.params["forget_violations"] == 0.0 and proj.params["retain_flips"] == 0.0
    labels = torch.tensor([CLASSES.index(c.cls) for c in fresh_cells])
    m = _margins(fresh @ proj.P.T, F.normalize(rows, dim=-1), labels)
    forgotten = torch.tensor([c in forget for c in fresh_cells])
    assert (m[forgotten] < 0).all()  # class a in domain y is no longer recognized
    assert (m[~forgotten] > 0).all()  # class a in x and z, and b, c everywhere, still are


def test_fit_projection_builds_the_gated_kind_and_refuses_it_without_prototypes():
    emb, cells, rows = _world()
    forget = [Cell("b", "z")]
    retain = [c for c in dict.fromkeys(cells) if c not in forget]

    protos = Prototypes(emb, cells, torch.ones(len(cells)), torch.zeros(len(cells)), 0.0, SynthesisConfig())
    cfg = NullspaceConfig(kind="gated", margin=0.1, retain_margin=0.05, margin_weight=1.0, margin_steps=400)
    proj = fit_projection(forget, retain, {}, protos, cfg, (CLASSES, rows))
    assert proj.kind == "gated" and proj.params["forget_violations"] == 0.0
    with pytest.raises(ValueError, match="needs prototypes"):
        fit_projection(forget, retain, {}, None, cfg, (CLASSES, rows))
    with pytest.raises(ValueError, match="no prototypes for the forget cells"):
        gated_projection([Cell("b", "w")], emb, cells, CLASSES, rows)


def test_detector_radius_holds_the_kept_cells_of_the_forgotten_class_when_their_detector_score_rises():
    emb, cells, rows = _world()
    forget = [Cell("c", "x")]
    labels = torch.tensor([CLASSES.index(c.cls) for c in cells])
    kept = torch.tensor([c.cls == "c" and c.domain != "x" for c in cells])
    v = domain_detector(emb, cells, "x", ridge=0.1)
    moved = emb[kept] + 0.2 * v / v.norm()  # each row 0.2 toward domain x: its score up by 0.2·‖v‖

    def worst_kept_margin(radius: float) -> float:
        proj = gated_projection(forget, emb, cells, CLASSES, rows, margin=0.1, radius=radius)
        assert proj.params["radius"] == radius and proj.params["forget_violations"] == 0.0
        return float(_margins(moved @ proj.P.T, F.normalize(rows, dim=-1), labels[kept]).min())

    assert worst_kept_margin(0.2) > 0 > worst_kept_margin(0.0)


def test_asking_for_the_gated_kind_brings_its_measured_settings():
    from clipforget.governance.request import ModelPolicy
    from clipforget.method.projection import GATED, default_config

    assert ModelPolicy(projection="gated").projection == "gated"
    cfg = default_config("domain", kind="gated")
    assert cfg.kind == "gated" and all(getattr(cfg, k) == v for k, v in GATED.items())
    assert default_config("domain").kind == "margin"


def test_a_whole_domain_is_refused_before_anything_is_fitted():
    """Every class of a domain forgotten (what `domain_complete` asks): the gated map would lower each class's logit by
    the same amount on every image of the domain, and the class lowered least would keep its images; refused, with
    why, in the core, the CLI (tests/cli) and a request."""
    from pydantic import ValidationError

    from clipforget.governance.request import UnlearnRequest

    emb, cells, rows = _world()
    whole = [Cell(c, "y") for c in CLASSES]
    with pytest.raises(ValueError, match=r"cannot forget every class of a domain \(y\)"):
        gated_projection(whole, emb, cells, CLASSES, rows)
    proj = gated_projection(whole[:2], emb, cells, CLASSES, rows)  # all but one class of the domain: built
    labels = torch.tensor([CLASSES.index(c.cls) for c in cells])
    lost = torch.tensor([c in whole[:2] for c in cells])
    assert (_margins(emb @ proj.P.T, F.normalize(rows, dim=-1), labels)[lost] < 0).all()
    with pytest.raises(ValidationError, match="domain_complete"):
        UnlearnRequest(mode="domain_complete", domains=["sketch"], projection="gated")
    assert UnlearnRequest(mode="domain", classes=["house"], domains=["sketch"], projection="gated").projection == "gated"
