"""Measure the method on the shipped toy model and write docs/RESULTS.md.

    python bench/results.py --json runs/results.json --markdown docs/RESULTS.md
    python bench/results.py --tune          # choose per-mode defaults on the validation render

Settings are chosen on two validation renders (seeds 1 and 5); the table is measured on a test render
(seed 2, never used for a choice). Projections are applied to the base model's unnormalized image
features, which equals running the folded model (tests/test_fold.py proves it to 1e-4).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from clipforget.gate.criteria import mode_checks
from clipforget.gate.verdict import Outcome
from clipforget.io.atomic import read_section, write_json, write_text
from clipforget.io.bank import PrototypeBank, load_prototypes, synthesize_with_bank
from clipforget.io.checkpoints import load_model
from clipforget.method.evaluate import LabelledImages, ZeroShotClassifier, image_features
from clipforget.method.grid import forget_cells, resolve_grid, retain_cells
from clipforget.method.projection import (
    MODE_DEFAULTS,
    SOURCES,
    NullspaceConfig,
    cell_text_embeddings,
    fit_projection,
    text_targets,
)
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import SynthesisConfig
from clipforget.toyworld.render import render_cells

SCENARIOS = [  # (label, mode, classes, domains)
    ("global: star", "global", ["star"], []),
    ("global: heart, cross, tree", "global", ["heart", "cross", "tree"], []),
    ("domain: house in sketch", "domain", ["house"], ["sketch"]),
    ("domain_complete: sketch", "domain_complete", [], ["sketch"]),
]
TUNED_PATH = Path(__file__).with_name("tuned.json")  # written by --tune: best setting per mode/kind/source
TUNED = json.loads(TUNED_PATH.read_text()) if TUNED_PATH.is_file() else {}
VALIDATION_SEEDS, TEST_SEED = (1, 5), 2  # tests use seed 3, training seed 0


def embedding_geometry(features: torch.Tensor, cells, grid) -> dict[str, float]:
    """Share of cell-mean energy that is class, domain and class×domain interaction (two-way ANOVA)."""
    z = torch.nn.functional.normalize(features.double(), dim=-1)
    M = torch.stack([torch.stack([z[[i for i, c in enumerate(cells) if c == (k, d)]].mean(0)
                                  for d in grid.domains]) for k in grid.classes])  # [C, D, dim]
    mu = M.mean((0, 1), keepdim=True)
    a = M.mean(1, keepdim=True) - mu
    b = M.mean(0, keepdim=True) - mu
    inter = M - mu - a - b
    C, D = M.shape[:2]
    e = {"class": float(D * (a**2).sum()), "domain": float(C * (b**2).sum()), "interaction": float((inter**2).sum())}
    total = sum(e.values())
    out = {k: v / total for k, v in e.items()}
    # cosine between cell means: same class in another domain vs same domain with another class
    Mn = torch.nn.functional.normalize(M, dim=-1)
    same_class = np.mean([float(Mn[k, i] @ Mn[k, j]) for k in range(C) for i in range(D) for j in range(D) if i != j])
    same_dom = np.mean([float(Mn[i, d] @ Mn[j, d]) for d in range(D) for i in range(C) for j in range(C) if i != j])
    out.update({"cos_same_class_other_domain": same_class, "cos_same_domain_other_class": same_dom})
    return out


def render_features(loaded, grid, classifier, seeds, per_cell: int) -> dict:
    """Per render seed: the base model's image features of a fresh render, its cells and its per-cell report."""
    renders = {}
    for seed in seeds:
        imgs, cells = render_cells(grid.cells, per_cell, seed)
        evalset = LabelledImages.from_arrays(imgs, cells, loaded.preprocess)
        feats = image_features(loaded.model, evalset.pixels)
        renders[seed] = (feats, evalset.cells, classifier.evaluate(feats, evalset.cells))
    return renders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-cell", type=int, default=50)
    ap.add_argument("--prototypes-per-cell", type=int, default=8)
    ap.add_argument("--steps", type=int, default=SynthesisConfig().steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bank", default="runs/bank", help="prototype bank folder (reused across runs)")
    ap.add_argument("--tune", action="store_true", help="grid-search settings on the validation render")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model("toy", device="cpu")
    grid = resolve_grid("toy")
    templates = TemplateSet()
    classifier = ZeroShotClassifier(loaded.model, loaded.tokenizer, grid, templates)
    seeds = VALIDATION_SEEDS if args.tune else (TEST_SEED,)
    renders = render_features(loaded, grid, classifier, seeds, args.per_cell)
    for seed, (_, cells, base) in renders.items():
        print(f"base accuracy {base.accuracy:.4f} on {len(cells)} images (seed {seed})", flush=True)

    text = cell_text_embeddings(loaded.model, loaded.tokenizer, templates, grid.cells)
    synth = SynthesisConfig(prototypes_per_cell=args.prototypes_per_cell, steps=args.steps, seed=args.seed)
    # the prototype bank keeps prototypes per cell across runs (keyed by checkpoint sha256 + settings)
    targets = dict(zip(grid.cells, text_targets(text, grid.cells), strict=True))
    paths, bank_report = synthesize_with_bank(
        loaded.model, targets, grid.cells, synth, loaded.sha256, PrototypeBank(args.bank),
        progress=lambda p: p["step"] % 50 == 0 and print(f"  synthesis step {p['step']} active {p['active']} "
                                                         f"cos {p['mean_cosine']:.3f}", flush=True))
    protos = load_prototypes(paths, synth)
    print(f"prototypes: {protos.summary()}", flush=True)

    def run(mode, classes, domains, cfg: NullspaceConfig, seed: int):
        feats, cells, base = renders[seed]
        forget = forget_cells(grid, mode, classes, domains)
        t = time.perf_counter()
        proj = fit_projection(forget, retain_cells(grid, forget), text, protos, cfg,
                              (classifier.classes, classifier.weights))
        build_ms = (time.perf_counter() - t) * 1e3
        after = classifier.evaluate(proj(feats), cells)
        checks = mode_checks(mode, base, after, forget)
        return {"outcome": asdict(Outcome.measure(base, after, forget)), "checks": [c.to_dict() for c in checks],
                "passed": all(c.passed for c in checks), "build_ms": build_ms, "projection": proj.summary(),
                "forget_cells": {str(c): after.by_cell()[c].accuracy for c in forget}}

    rows: list[dict] = []
    tuned: dict[str, dict] = {}
    if args.tune:
        # one default per mode: least total violation (retain drops weighted x10) over the mode's scenarios and
        # both validation renders, then the largest worst-case margin (robustness to a render never seen)
        configs = [dict(kind="soft", lam=lam, mu=mu) for lam, mu in itertools.product(
            [3, 10, 30, 100, 300, 1000, 1e4], [0.1, 0.3, 1, 3, 10, 30, 100])]
        configs += [dict(kind="hard", energy=e, retain_energy=r) for e, r in itertools.product(
            [0.3, 0.5, 0.7, 0.8, 0.9, 0.95], [0.3, 0.5, 0.7, 0.8, 0.9, 0.95])]
        for mode in dict.fromkeys(m for _, m, _, _ in SCENARIOS):
            scenarios = [s for s in SCENARIOS if s[1] == mode]
            best = None
            weights = [1.0, 3.0, 10.0] if mode == "domain" else [1.0]
            best_of = {}  # (kind, source) -> best (key, config): the table's non-default rows
            for source, params, w, tw in itertools.product(SOURCES, configs, weights, [0.1, 0.3, 1.0]):
                cfg = replace(NullspaceConfig(), source=source, same_class_weight=w, text_weight=tw, **params)
                results = [run(m, c, d, cfg, seed) for _, m, c, d in scenarios for seed in seeds]
                checks = [c for r in results for c in r["checks"]]
                # retain first: a setting that damages kept cells is worse than one that forgets less
                violation = sum(max(0.0, c["value"] - c["limit"]) * (10.0 if "drop" in c["name"] else 1.0)
                                for c in checks)
                margin = min(c["limit"] - c["value"] for c in checks)
                key = (round(violation, 6), -margin)
                if best is None or key < best[0]:
                    best = (key, cfg, results)
                if (cfg.kind, source) not in best_of or key < best_of[cfg.kind, source][0]:
                    best_of[cfg.kind, source] = (key, cfg)
            tuned[mode] = {f"{k}/{s}": v[1].to_dict() for (k, s), v in best_of.items()}
            rows.append({"mode": mode, "config": best[1].to_dict(), "violation": best[0][0], "margin": -best[0][1]})
            print(f"{mode}: {best[1]}\n  violation {best[0][0]:.3f}, worst margin {-best[0][1]:.3f}; checks "
                  f"{[(c['name'], round(c['value'], 3)) for r in best[2] for c in r['checks']]}", flush=True)
    else:
        for label, mode, classes, domains in SCENARIOS:
            for source, kind in itertools.product(SOURCES, ["soft", "hard"]):
                defaults = MODE_DEFAULTS[mode]
                # every (projection, source) pair at its best setting on the validation renders
                cfg = NullspaceConfig(**TUNED[mode][f"{kind}/{source}"])
                r = run(mode, classes, domains, cfg, TEST_SEED)
                r["is_default"] = cfg == defaults
                rows.append({"scenario": label, "mode": mode, "source": source, "kind": kind,
                             "config": cfg.to_dict(), **r})
                o = r["outcome"]
                print(f"{label:28s} {source:10s} {kind:4s} forget {o['forget_before']:.3f}->{o['forget_after']:.3f} "
                      f"retain {o['retain_before']:.3f}->{o['retain_after']:.3f} "
                      f"{'PASS' if r['passed'] else 'miss'}{' (default)' if r['is_default'] else ''}", flush=True)

    tradeoff = []
    if not args.tune:  # how far a whole domain can be forgotten for a given cost to the kept domains
        for lam, mu in itertools.product([100.0, 1000.0, 1e4, 1e5], [1.0, 10.0, 100.0]):
            cfg = replace(MODE_DEFAULTS["domain_complete"], lam=lam, mu=mu)
            r = run("domain_complete", [], ["sketch"], cfg, TEST_SEED)
            tradeoff.append({"lam": lam, "mu": mu, "checks": r["checks"], "outcome": r["outcome"]})

    feats, cells, base = renders[seeds[0]]
    result = {
        "seed": seeds[0], "per_cell": args.per_cell, "synthesis": asdict(synth), "prototypes": protos.summary(),
        "base": {"accuracy": base.accuracy, "per_domain": {d: base.mean_over([c for c in grid.cells if c.domain == d])
                                                           for d in grid.domains}},
        "geometry": embedding_geometry(feats, cells, grid),
        "rows": rows, "tradeoff": tradeoff, "seconds": time.perf_counter() - t0,
    }
    if args.tune:
        write_json(TUNED_PATH, tuned)
    if args.json:
        write_json(args.json, result)
    if args.markdown and not args.tune:
        # the request benchmark's section (bench/requests.py --results) is another command's: kept as it is
        kept = read_section(args.markdown, "bench/requests.py --results")
        write_text(args.markdown, render_markdown(result) + ("\n" + kept + "\n" if kept else ""))
    print(json.dumps(result["geometry"], indent=1))


def render_markdown(r: dict) -> str:
    g = r["geometry"]
    lines = [
        "# Results on the toy world",
        "",
        "> **Not the measure of the method:** the tables of this part compare the soft/hard projections only. The "
        "shipped defaults",
        "> (margin-aware map for `global` and `domain`, the evidence gate) are measured by the request benchmark on a "
        "render no",
        "> setting was chosen on: its section at the end of this file (`bench/requests.py --results`), with the "
        "agreement of the",
        "> gate's held-out evidence with rendered images and the lineage; the geometry section describes the toy model.",
        "",
        "Regenerate with `python bench/results.py --json runs/results.json --markdown docs/RESULTS.md` "
        f"(about {(r['seconds'] + r['prototypes']['seconds']) / 60:.0f} minutes on 2 CPU cores with an empty prototype "
        "bank `runs/bank`, most of it prototype synthesis; under a minute once the bank holds them). "
        f"Test render: seed {r['seed']}, "
        f"{r['per_cell']} images per cell (2,000 images), never used to choose a setting; settings per mode were "
        "chosen on two validation renders (seeds 1 and 5) with `python bench/results.py --tune`.",
        f"Prototypes: {r['synthesis']['prototypes_per_cell']} per cell, at most {r['synthesis']['steps']} steps, "
        f"target cosine {r['synthesis']['target_cosine']}, seed {r['synthesis']['seed']}: "
        f"mean cosine {r['prototypes']['mean_cosine']:.3f}, {100 * r['prototypes']['reached_target']:.0f}% reached "
        f"the target, {r['prototypes']['seconds']:.0f} s for {r['prototypes']['prototypes']} prototypes.",
        "",
        f"Base model: zero-shot class accuracy {r['base']['accuracy']:.3f} ("
        + ", ".join(f"{d} {v:.3f}" for d, v in r["base"]["per_domain"].items()) + ").",
        "",
        "## Embedding geometry of the toy model",
        "",
        "Energy of the cell means (normalized image embeddings), split as a two-way layout:",
        "",
        "| class | domain | class × domain interaction | cos(same class, other domain) | cos(same domain, other class) |",
        "|---|---|---|---|---|",
        f"| {g['class']:.1%} | {g['domain']:.1%} | {g['interaction']:.1%} | {g['cos_same_class_other_domain']:.3f} "
        f"| {g['cos_same_domain_other_class']:.3f} |",
        "",
        "## Forget and retain accuracy, before → after",
        "",
        "Forget = mean accuracy over the forget cells (max cell in brackets); retain = mean over all other cells; "
        "worst = largest single retain-cell drop. Each row uses the best setting of its projection and source on the "
        "validation renders (`bench/tuned.json`); **bold** rows are the mode's default; ✅ when every target of the "
        "mode is met, otherwise the missed targets with their measured values.",
        "",
        "| scenario | source | projection | forget | retain | worst retain drop | targets | build |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        o = row["outcome"]
        misses = [f"{c['name']} {c['value']:.3f} > {c['limit']}" for c in row["checks"] if not c["passed"]]
        mark = "✅" if row["passed"] else "❌ " + "; ".join(misses)
        b = "**" if row.get("is_default") else ""
        lines.append(
            f"| {b}{row['scenario']}{b} | {row['source']} | {row['kind']} | {o['forget_before']:.3f} → "
            f"{o['forget_after']:.3f} ({o['forget_max_after']:.2f}) | {o['retain_before']:.3f} → {o['retain_after']:.3f}"
            f" | {o['retain_max_cell_drop']:.3f} ({o['worst_retain_cell']}) | {mark} | {row['build_ms']:.1f} ms |")
    if r.get("tradeoff"):
        lines += [
            "",
            "## domain_complete (sketch): the trade-off",
            "",
            "Soft multimodal projection, text weight 0.3, over λ (forget weight) and μ (retain weight). The "
            "targets are sketch mean ≤ 0.25, no sketch cell above 0.50, every kept domain within 0.05.",
            "",
            "| λ | μ | sketch mean | worst sketch cell | worst kept-domain drop |",
            "|---|---|---|---|---|",
        ]
        for t in r["tradeoff"]:
            v = [c["value"] for c in t["checks"]]
            lines.append(f"| {t['lam']:g} | {t['mu']:g} | {v[0]:.3f} | {v[1]:.2f} | {v[2]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
