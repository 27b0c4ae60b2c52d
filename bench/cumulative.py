"""Several deletion requests in one model: does the cumulative (union) build pass every request's criteria?

    python bench/cumulative.py --json runs/cumulative.json

For ledgers of two or three requests, fits one projection on the union of their forget cells with the
settings the pipeline uses (`cumulative_mode`: the most protective mode's defaults), applies it to the
base model's image features of fresh renders, and runs the pipeline's gate (`gate_checks`: each mode judged
on its own cells). Also measures the alternative the issue rules out (one projection per request,
multiplied), to show what the union buys. Seeds 1 and 5 are the validation renders, 2 the docs render,
3 the tests' render (the ledger tests use the first scenario).

    python bench/cumulative.py --fit-images 20 --json runs/cumulative-fit-images.json

fits the union on N rendered images per cell (of `--fit-seed`, a render none of the four is) with the mode's
image settings, as a policy with `fit_uri` does, instead of prototypes (the union build only).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from results import render_features  # bench/results.py, beside this script

from clipforget.gate.verdict import ForgetGroup, Thresholds, cumulative_mode, gate_checks
from clipforget.io.atomic import write_json
from clipforget.io.bank import PrototypeBank, load_prototypes, synthesize_with_bank
from clipforget.io.checkpoints import load_model
from clipforget.method.evaluate import ZeroShotClassifier
from clipforget.method.grid import forget_cells, resolve_grid, retain_cells
from clipforget.method.nullspace import Projection
from clipforget.method.projection import cell_text_embeddings, default_config, fit_projection, text_targets
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import SynthesisConfig

LEDGERS = {  # name: requests in ledger order (mode, classes, domains)
    "house/sketch, house/cartoon": [("domain", ["house"], ["sketch"]), ("domain", ["house"], ["cartoon"])],
    "… then house everywhere": [("domain", ["house"], ["sketch"]), ("domain", ["house"], ["cartoon"]),
                                ("global", ["house"], [])],
    "star, heart": [("global", ["star"], []), ("global", ["heart"], [])],
    "star, heart, tree": [("global", ["star"], []), ("global", ["heart"], []), ("global", ["tree"], [])],
    "star, house/sketch": [("global", ["star"], []), ("domain", ["house"], ["sketch"])],
    "house/sketch, tree/sketch": [("domain", ["house"], ["sketch"]), ("domain", ["tree"], ["sketch"])],
    "house/sketch, tree/cartoon": [("domain", ["house"], ["sketch"]), ("domain", ["tree"], ["cartoon"])],
}
SEEDS = (1, 5, 2, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", default="runs/bank", help="prototype bank folder (shared with bench/results.py)")
    ap.add_argument("--per-cell", type=int, default=50)
    ap.add_argument("--fit-images", type=int, default=0,
                    help="fit the union on N rendered images per cell instead of prototypes (0: prototypes)")
    ap.add_argument("--fit-seed", type=int, default=11, help="render seed of the fit images")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.fit_seed in SEEDS:
        raise SystemExit(f"--fit-seed must not be one of the judged renders {SEEDS}")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model("toy", device="cpu")
    grid = resolve_grid("toy")
    classifier = ZeroShotClassifier(loaded.model, loaded.tokenizer, grid, TemplateSet())
    zero_shot = (classifier.classes, classifier.weights)  # what the margin-aware projection works against
    renders = render_features(loaded, grid, classifier, SEEDS, args.per_cell)
    text = cell_text_embeddings(loaded.model, loaded.tokenizer, TemplateSet(), grid.cells)
    synth = SynthesisConfig()
    fit_on = "images" if args.fit_images else "prototypes"
    if args.fit_images:  # a policy's fit_uri: labelled images of every cell instead of prototypes
        from clipforget.method.evaluate import LabelledImages
        from clipforget.runner import image_prototypes
        from clipforget.toyworld.render import render_cells

        fit_set = LabelledImages.from_arrays(*render_cells(grid.cells, args.fit_images, args.fit_seed),
                                             loaded.preprocess)
        protos = image_prototypes(loaded, grid, fit_set, text, synth)
    else:
        targets = dict(zip(grid.cells, text_targets(text, grid.cells), strict=True))
        paths, _ = synthesize_with_bank(loaded.model, targets, grid.cells, synth, loaded.sha256,
                                        PrototypeBank(args.bank))
        protos = load_prototypes(paths, synth)

    def union(groups: list[ForgetGroup]) -> Projection:
        forget = list(dict.fromkeys(c for g in groups for c in g.cells))
        return fit_projection(forget, retain_cells(grid, forget), text, protos,
                              default_config(cumulative_mode([g.mode for g in groups]), fit_on), zero_shot)

    def product(groups: list[ForgetGroup]) -> Projection:
        forget = list(dict.fromkeys(c for g in groups for c in g.cells))
        P = torch.eye(protos.embeddings.shape[1], dtype=torch.float64)
        for g in groups:
            P = fit_projection(list(g.cells), retain_cells(grid, forget), text, protos, default_config(g.mode),
                               zero_shot).P @ P
        return Projection(P, "soft")

    rows = []
    for name, specs in LEDGERS.items():
        groups = [ForgetGroup(m, tuple(forget_cells(grid, m, c, d))) for m, c, d in specs]
        builds = (("union", union),) if args.fit_images else (("union", union), ("product", product))
        for build, fit in builds:
            P = fit(groups)
            row: dict = {"ledger": name, "build": build, "seeds": {}}
            for seed, (feats, cells, base) in renders.items():
                after = classifier.evaluate(P(feats), cells)
                checks = gate_checks(groups, base, after, Thresholds())
                row["seeds"][seed] = {"passed": all(c.passed for c in checks),
                                      "failed": [c.to_dict() for c in checks if not c.passed]}
            rows.append(row)
            marks = " ".join(f"s{s}:{'pass' if r['passed'] else 'FAIL'}" for s, r in row["seeds"].items())
            print(f"{name:30s} {build:8s} {marks}", flush=True)
            for s, r in row["seeds"].items():
                for c in r["failed"]:
                    print(f"    seed {s}: {c['name']} {c['value']:.2f} > {c['limit']:.2f}")
    out = {"seeds": list(SEEDS), "per_cell": args.per_cell, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
           "fit": {"on": fit_on, **({"images_per_cell": args.fit_images, "seed": args.fit_seed} if args.fit_images else {})},
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(f"{out['seconds']} s")
    if args.json:
        write_json(args.json, out)
        print(json.dumps({"wrote": args.json}))


if __name__ == "__main__":
    main()
