"""The request benchmark: is the data-free gate's verdict right, and does a lineage keep passing?

    python bench/requests.py --json runs/requests.json --markdown docs/REQUESTS.md          # report (fresh render)
    python bench/requests.py --render-seed 1 --kinds margin,soft --json runs/requests-val.json   # validation
    python bench/requests.py --request-seed 1 --no-lineage                  # another draw of requests, nobody tuned on
    python bench/requests.py --render-seed 1 --heldout-synthesis steps=60   # held-out prototypes of another generator
    python bench/requests.py --render-seed 3 --eval-images 50 --eval-seed 2 --request domain:house:sketch,cartoon
    python bench/requests.py --render-seed 1 --no-lineage --recentre-images 8   # oracle: prototypes at the image means

A fixed random set of requests (global 1-3 classes, domain 1-3 cells, domain_complete 1 domain) is run
through the method data-free, as the pipeline does: projection prototypes and held-out prototypes from
the prototype bank, the projection of the mode's default setting, and the gate's checks on the held-out
prototypes (clipforget.gate.criteria: 95% upper bounds for forget cells, paired flips for retain cells). Then
each candidate is measured on rendered images it never saw (50 per cell) against the same targets on
point estimates: the truth. A false approval is a candidate the gate approved that misses a target on
the images. Projections are applied to the base model's image features, which equals running the folded
model (tests/test_fold.py proves it).

The lineage: requests appended one by one to one ledger (3 classes everywhere, then 3 single cells in
other classes); for each length the cumulative build (union of all forget cells, as the deletion-request
flow builds it), whether the gate approves, whether the images meet every target, retain accuracy, and
persistence (every cell forgotten earlier still under its limit on the images).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from clipforget.gate.criteria import FORGET_CELL_LIMIT, RETAIN_CELL_LIMIT
from clipforget.gate.probe import residual_probe
from clipforget.gate.shift import SHIFT_SCALE, shift_cells, shifted_evidence
from clipforget.gate.verdict import ForgetGroup, Thresholds, cumulative_mode, evidence_per_cell, gate_checks
from clipforget.io.atomic import write_json, write_section, write_text
from clipforget.io.bank import PrototypeBank, load_prototypes, synthesize_with_bank
from clipforget.io.checkpoints import load_model
from clipforget.io.storage import cache_root
from clipforget.method.evaluate import LabelledImages, ZeroShotClassifier, image_features
from clipforget.method.grid import check_projection_kind, forget_cells, resolve_grid, retain_cells
from clipforget.method.projection import cell_text_embeddings, default_config, fit_projection, text_targets
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import SynthesisConfig, hardware_summary
from clipforget.runner import HELDOUT_BLOCK, heldout_blocks
from clipforget.toyworld.render import render_cells

REPORT_SEED = 7  # the render the published tables come from; settings were chosen on seeds 1 and 5
LINEAGE = [("global", ["star"], []), ("global", ["heart"], []), ("global", ["tree"], []),
           ("domain", ["house"], ["sketch"]), ("domain", ["circle"], ["painting"]), ("domain", ["arrow"], ["cartoon"])]


def typed(current: object, text: str) -> object:
    """`text` as a value of `current`'s type ("field=value" on the command line); a bool is true/false (or 1/0)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    return type(current)(text)


def request_set(grid, n_global: int = 12, n_domain: int = 15, seed: int = 0) -> list[tuple[str, list, list]]:
    """A fixed random set: global 1-3 classes, domain 1-3 cells, and each domain forgotten whole."""
    rng = random.Random(seed)
    out: list[tuple[str, list, list]] = []
    for i in range(n_global):
        out.append(("global", sorted(rng.sample(grid.classes, 1 + i % 3)), []))
    for i in range(n_domain):
        shape = [(1, 1), (2, 1), (1, 2)][i % 3] if i % 5 else (1, 1)
        out.append(("domain", sorted(rng.sample(grid.classes, shape[0])), sorted(rng.sample(grid.domains, shape[1]))))
    out += [("domain_complete", [], [d]) for d in grid.domains]
    return out


def parse_request(text: str, grid) -> tuple[str, list, list]:
    """'MODE:CLASSES[:DOMAINS]' (comma-separated lists; domain_complete: 'domain_complete::DOMAINS')."""
    mode, classes, domains = (text.split(":") + ["", ""])[:3]
    out = (mode, [c for c in classes.split(",") if c], [d for d in domains.split(",") if d])
    try:
        forget_cells(grid, *out)
    except ValueError as e:
        raise SystemExit(f"--request {text!r}: {e}") from None
    return out


def cell_means(loaded, grid, per_cell: int, seed: int) -> dict:
    """The mean normalized image embedding of each cell over `per_cell` rendered images."""
    imgs, cells = render_cells(grid.cells, per_cell, seed)
    feats = F.normalize(image_features(loaded.model, LabelledImages.from_arrays(imgs, cells, loaded.preprocess).pixels),
                        dim=-1)
    return {c: feats[[i for i, x in enumerate(cells) if x == c]].mean(0) for c in grid.cells}


def recentred(emb: torch.Tensor, cells: list, means: dict) -> torch.Tensor:
    """Each cell's rows moved by one vector so that their mean is the cell's image mean (then normalized): the oracle
    of docs/GATE.md, 'Where the gap sits'. Not a method: it needs labelled images of every cell."""
    out = F.normalize(emb.float(), dim=-1).clone()
    for c, target in means.items():
        rows = [i for i, x in enumerate(cells) if x == c]
        if rows:
            out[rows] = F.normalize(out[rows] + (target - out[rows].mean(0)), dim=-1)
    return out


def truth_pass(checks) -> bool:
    """The targets on point estimates (the images are the truth, not a sample to bound)."""
    return all((c.estimate if c.estimate is not None else c.value) <= c.limit + 1e-12 for c in checks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render-seed", type=int, default=REPORT_SEED)
    ap.add_argument("--per-cell", type=int, default=50, help="rendered images per cell (the truth)")
    ap.add_argument("--heldout-per-cell", type=int, default=None, help="default: the policy's")
    ap.add_argument("--synthesis", default="", metavar="FIELD=VALUE,...",
                    help="the projection's prototypes from other synthesis settings, e.g. augment_decay=1.0")
    ap.add_argument("--heldout-synthesis", default="", metavar="FIELD=VALUE,...",
                    help="the held-out prototypes from other synthesis settings, e.g. steps=60")
    ap.add_argument("--kinds", default=None, help="comma-separated projection kinds to compare (default: the mode's)")
    ap.add_argument("--request-seed", type=int, default=0,
                    help="draw of the request set (settings were chosen on draw 0; another draw: requests nobody tuned on)")
    ap.add_argument("--requests", type=int, default=0, help="only the first N requests (0: all)")
    ap.add_argument("--request", action="append", default=[], metavar="MODE:CLASSES[:DOMAINS]",
                    help="measure this request instead of a drawn set (repeatable), e.g. domain:house:sketch,cartoon")
    ap.add_argument("--no-lineage", action="store_true")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="synthesis precision of projection and held-out prototypes (auto: as the hardware does best)")
    ap.add_argument("--fit-images", type=int, default=0,
                    help="fit each projection on N rendered images per cell (of --fit-seed) instead of prototypes, "
                         "with the mode's image settings (0: data-free, prototypes)")
    ap.add_argument("--fit-seed", type=int, default=11, help="render seed of the fit images")
    ap.add_argument("--eval-images", type=int, default=0,
                    help="the gate judges on N rendered images per cell (of --eval-seed), as a policy's data_uri, "
                         "instead of held-out prototypes (0: held-out prototypes)")
    ap.add_argument("--eval-seed", type=int, default=13, help="render seed of the gate's images")
    ap.add_argument("--recentre-images", type=int, default=0,
                    help="oracle, not a method: move each cell's prototypes (projection and held-out) so their mean "
                         "is the mean of N rendered images of the cell (docs/GATE.md, 'Where the gap sits')")
    ap.add_argument("--recentre-seed", type=int, default=11, help="render seed of the re-centring images")
    ap.add_argument("--shift-scale", type=float, default=SHIFT_SCALE,
                    help="the gate's shifted held-out evidence for domain requests, in standard deviations "
                         "(clipforget.gate.shift; 0: the gate without that check)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--results", default=None, metavar="FILE",
                    help="also write the tables into FILE's request-benchmark section (docs/RESULTS.md), the rest kept")
    args = ap.parse_args()

    from clipforget.governance.request import SynthesisSettings

    t0 = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_model("toy", device="cpu")
    grid = resolve_grid("toy")
    templates = TemplateSet()
    classifier = ZeroShotClassifier(loaded.model, loaded.tokenizer, grid, templates)
    settings = SynthesisSettings(precision=args.precision)
    held_n = args.heldout_per_cell or settings.heldout_per_cell  # None: sized per request from the gate's limits

    def overridden(base: SynthesisConfig, fields: str) -> SynthesisConfig:  # "FIELD=VALUE,..." on top of `base`
        return replace(base, **{k: typed(getattr(base, k), v) for k, v in (f.split("=", 1) for f in fields.split(",") if f)})
    policy_synth = settings.config("toy")
    synth = overridden(policy_synth, args.synthesis)
    held_block: list[int] = []  # the block of each held-out row
    bank = PrototypeBank(cache_root() / "prototypes")
    text = cell_text_embeddings(loaded.model, loaded.tokenizer, templates, grid.cells)
    targets = dict(zip(grid.cells, text_targets(text, grid.cells), strict=True))

    def banked(cfg: SynthesisConfig, images: bool):
        paths, rep = synthesize_with_bank(loaded.model, targets, grid.cells, cfg, loaded.sha256 or "", bank, images)
        return load_prototypes(paths, cfg), rep

    seeds = {args.render_seed, args.fit_seed if args.fit_images else None, args.eval_seed if args.eval_images else None,
             args.recentre_seed if args.recentre_images else None}
    if len(seeds - {None}) != 1 + bool(args.fit_images) + bool(args.eval_images) + bool(args.recentre_images):
        raise SystemExit("--render-seed, --fit-seed, --eval-seed and --recentre-seed must differ: the truth is images "
                         "nothing saw")
    if args.recentre_images and (args.fit_images or args.eval_images):
        raise SystemExit("--recentre-images moves prototypes: it goes with a fit on prototypes and held-out evidence")
    fit_on = "images" if args.fit_images else "prototypes"
    t = time.perf_counter()
    resolved = synth.resolved(loaded.device, loaded.model)
    if args.fit_images:  # the fit set: rendered images instead of prototypes
        from clipforget.runner import image_prototypes

        fit_set = LabelledImages.from_arrays(*render_cells(grid.cells, args.fit_images, args.fit_seed),
                                             loaded.preprocess)
        protos = image_prototypes(loaded, grid, fit_set, text, resolved)
    else:
        protos, _ = banked(synth, False)
        protos.config = resolved
    if args.eval_images:  # the gate's evidence: rendered images, as a policy's data_uri would give
        held_n = args.eval_images
        held_set = LabelledImages.from_arrays(*render_cells(grid.cells, held_n, args.eval_seed), loaded.preprocess)
    else:  # as the pipeline draws them; sized per request (from the 20 per cell a mode's checks need at most)
        pixels, held_cells = [], []
        per_cell = held_n if held_n is not None else dict.fromkeys(grid.cells, 2 * HELDOUT_BLOCK)
        for b, (held_cfg, _) in enumerate(heldout_blocks(policy_synth, per_cell, grid.cells)):
            cfg = overridden(held_cfg, args.heldout_synthesis)  # the pipeline's held-out settings, then the overrides
            held, _ = banked(cfg, True)
            assert held.images is not None
            got = LabelledImages.from_arrays(held.images, held.cells, loaded.preprocess)
            pixels.append(got.pixels)
            held_cells += got.cells
            held_block += [b] * len(got.cells)
        held_set = LabelledImages(torch.cat(pixels), held_cells)
    synth_s = time.perf_counter() - t
    held_feats = image_features(loaded.model, held_set.pixels)
    if args.recentre_images:
        means = cell_means(loaded, grid, args.recentre_images, args.recentre_seed)
        protos = replace(protos, embeddings=recentred(protos.embeddings, protos.cells, means))
        held_feats = recentred(held_feats, held_set.cells, means)

    def evidence(groups: list[ForgetGroup]) -> tuple[torch.Tensor, list]:
        """The held-out rows a request is judged on: every row, or with sized evidence the blocks each cell needs."""
        if held_n is not None:
            return torch.arange(len(held_set.cells)), held_set.cells
        need = evidence_per_cell(groups, grid.cells)
        rows = [i for i, (c, b) in enumerate(zip(held_set.cells, held_block, strict=True)) if need[c] > b * HELDOUT_BLOCK]
        return torch.tensor(rows), [held_set.cells[i] for i in rows]
    imgs, cells = render_cells(grid.cells, args.per_cell, args.render_seed)
    render_set = LabelledImages.from_arrays(imgs, cells, loaded.preprocess)
    render_feats = image_features(loaded.model, render_set.pixels)
    render_base = classifier.evaluate(render_feats, render_set.cells)
    rows_cls = (list(grid.classes), classifier.weights)
    print(f"cpu {hardware_summary()['cpu_capability']}; prototypes {protos.summary()}; held-out {held_n}/cell; "
          f"synthesis/bank {synth_s:.1f} s", flush=True)

    def judge(groups: list[ForgetGroup], kind: str | None):
        forget = list(dict.fromkeys(c for g in groups for c in g.cells))
        # kind: "KIND[:field=value...]", e.g. margin:margin_weight=10 (the kind's own settings, then the fields)
        name, *fields = (kind or "").split(":")
        cfg = default_config(cumulative_mode([g.mode for g in groups]), fit_on, kind=name or None)
        cfg = replace(cfg, **{k: typed(getattr(cfg, k), v) for k, v in (f.split("=", 1) for f in fields)})
        try:  # a forget set the kind cannot express: the pipeline refuses it before any work, so nothing is approved
            check_projection_kind(cfg.kind, forget, grid.classes)  # and nothing meets a target
        except ValueError as e:
            nan = float("nan")
            return {"gate": "refused", "truth": False, "refused": str(e), "gate_checks": [], "truth_checks": [],
                    "forget_after": {}, "heldout_forget_after": {}, "retain_drops": {}, "heldout_retain_drops": {},
                    "retain_after": nan, "retain_before": nan, "probe": [], "probe_excess_before": nan,
                    "probe_excess_after": nan}
        proj = fit_projection(forget, retain_cells(grid, forget), text, protos, cfg, rows_cls)
        rows, held_cells = evidence(groups)
        held_base = classifier.evaluate(held_feats[rows], held_cells)
        held_after_feats = proj(held_feats[rows])
        held_after = classifier.evaluate(held_after_feats, held_cells)
        # on held-out prototypes the pipeline's gate also holds the shifted evidence (clipforget.gate.shift); on images
        # (--eval-images) the images decide
        shifted = None if args.eval_images or not args.shift_scale else shifted_evidence(
            held_feats[rows], held_after_feats, held_cells, classifier.cell_accuracy, scale=args.shift_scale,
            of=set(shift_cells(groups, held_cells)))
        gate = gate_checks(groups, held_base, held_after, Thresholds(), shifted=shifted)
        after_feats = proj(render_feats)
        after = classifier.evaluate(after_feats, render_set.cells)
        truth = gate_checks(groups, render_base, after, Thresholds())
        probes = residual_probe(render_feats, after_feats, render_set.cells, forget)
        status = "approved" if all(c.passed for c in gate) else (
            "not enough evidence" if any(c.status == "not enough evidence" for c in gate) else "rejected")
        return {"gate": status, "truth": truth_pass(truth), "gate_checks": [c.to_dict() for c in gate],
                "truth_checks": [c.to_dict() for c in truth],
                "forget_after": {str(c): after.by_cell()[c].accuracy for c in forget},
                "heldout_forget_after": {str(c): held_after.by_cell()[c].accuracy for c in forget},
                "retain_drops": {str(c): render_base.by_cell()[c].accuracy - after.by_cell()[c].accuracy
                                 for c in retain_cells(grid, forget)},
                "heldout_retain_drops": {str(c): held_base.by_cell()[c].accuracy - held_after.by_cell()[c].accuracy
                                         for c in retain_cells(grid, forget)},
                "retain_after": after.mean_over(retain_cells(grid, forget)),
                "retain_before": render_base.mean_over(retain_cells(grid, forget)),
                "probe": [p.to_dict() for p in probes],
                "probe_excess_before": max((p.before - p.chance for p in probes), default=float("nan")),
                "probe_excess_after": max((p.after - p.chance for p in probes), default=float("nan"))}

    kinds = args.kinds.split(",") if args.kinds else [None]
    requests = [parse_request(r, grid) for r in args.request] if args.request else request_set(grid, seed=args.request_seed)
    if args.requests:
        requests = requests[: args.requests]
    results: dict[str, list[dict]] = {}
    for kind in kinds:
        label = kind or "default"
        results[label] = []
        for mode, classes, domains in requests:
            group = ForgetGroup(mode, tuple(forget_cells(grid, mode, classes, domains)))
            r = judge([group], kind)
            r.update({"mode": mode, "classes": classes, "domains": domains})
            results[label].append(r)
            print(f"[{label}] {mode:15s} {','.join(classes) or '-':22s} {','.join(domains) or '-':22s} "
                  f"gate {r['gate']:20s} images {'meet' if r['truth'] else 'MISS'}  "
                  f"worst forget {max(r['forget_after'].values(), default=float('nan')):.2f}", flush=True)

    lineage: dict[str, list[dict]] = {}
    if not args.no_lineage:
        for kind in kinds:
            label = kind or "default"
            lineage[label] = []
            groups: list[ForgetGroup] = []
            for i, (mode, classes, domains) in enumerate(LINEAGE):
                groups.append(ForgetGroup(mode, tuple(forget_cells(grid, mode, classes, domains))))
                r = judge(groups, kind)
                earlier = [c for g in groups[:-1] for c in g.cells]
                limit = {c: FORGET_CELL_LIMIT[g.mode] for g in groups for c in g.cells}
                r["persistence"] = all(r["forget_after"].get(str(c), 1.0) <= limit[c] for c in earlier) if earlier else True
                r["length"] = i + 1
                lineage[label].append(r)
                print(f"[{label}] lineage {i + 1}: gate {r['gate']}, images {'meet' if r['truth'] else 'MISS'}, "
                      f"persistence {r['persistence']}, retain {r['retain_before']:.3f} -> {r['retain_after']:.3f}",
                      flush=True)

    summary = {label: summarize(rows) for label, rows in results.items()}
    agreement = {label: agreement_table(rows) for label, rows in results.items()}
    for label, s in summary.items():
        print(f"[{label}] {s}", flush=True)
    out = {"render_seed": args.render_seed, "per_cell": args.per_cell,
           "heldout_per_cell": held_n if held_n is not None else "sized",
           "synthesis": args.synthesis or "the policy's", "heldout_synthesis": args.heldout_synthesis or "the policy's",
           "request_seed": args.request_seed, "shift_scale": args.shift_scale,
           "command": "python bench/requests.py " + " ".join(sys.argv[1:]),
           "recentred": ({"images_per_cell": args.recentre_images, "seed": args.recentre_seed}
                         if args.recentre_images else None),
           "fit": {"on": fit_on, **({"images_per_cell": args.fit_images, "seed": args.fit_seed} if args.fit_images else {})},
           "gate_evidence": ({"on": "rendered images", "per_cell": args.eval_images, "seed": args.eval_seed}
                             if args.eval_images else {"on": "held-out prototypes", "per_cell": held_n}),
           "hardware": hardware_summary(), "prototypes": protos.summary(), "summary": summary, "agreement": agreement,
           "requests": results, "lineage": lineage, "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        write_json(args.json, out)
    if args.markdown:
        write_text(args.markdown, markdown(out))
    if args.results:
        write_section(args.results, RESULTS_SECTION, markdown(out).replace("# Request benchmark", "## Request benchmark", 1))


def summarize(rows: list[dict]) -> dict:
    by_mode: dict[str, dict] = {}
    for mode in ("global", "domain", "domain_complete", "all"):
        rs = [r for r in rows if mode in ("all", r["mode"])]
        if not rs:
            continue
        by_mode[mode] = {
            "requests": len(rs),
            "approved": sum(r["gate"] == "approved" for r in rs),
            "meet_on_images": sum(r["truth"] for r in rs),
            "false_approvals": sum(r["gate"] == "approved" and not r["truth"] for r in rs),
            "false_rejections": sum(r["gate"] != "approved" and r["truth"] for r in rs),
            "not_enough_evidence": sum(r["gate"] == "not enough evidence" for r in rs),
            "probe_within_10_points": sum(r["probe_excess_after"] <= 0.10 for r in rs),
            # collateral the mode's targets allow: domain and domain_complete limit only means over the other cells
            "approved_kept_cell_down": sum(r["gate"] == "approved" and max(r["retain_drops"].values(), default=0.0)
                                           > RETAIN_CELL_LIMIT + 1e-9 for r in rs),
        }
    return by_mode


def agreement_table(rows: list[dict]) -> dict:
    """Per mode: how held-out prototype accuracy relates to rendered-image accuracy, cell by cell."""
    import numpy as np

    out = {}
    for mode in ("global", "domain", "domain_complete"):
        rs = [r for r in rows if r["mode"] == mode and r["gate"] != "refused"]
        if not rs:
            continue
        f_h = np.array([r["heldout_forget_after"][c] for r in rs for c in r["forget_after"]])
        f_i = np.array([r["forget_after"][c] for r in rs for c in r["forget_after"]])
        r_h = np.array([r["heldout_retain_drops"][c] for r in rs for c in r["retain_drops"]])
        r_i = np.array([r["retain_drops"][c] for r in rs for c in r["retain_drops"]])
        out[mode] = {
            "forget_cells": len(f_h), "forget_heldout_mean": float(f_h.mean()), "forget_images_mean": float(f_i.mean()),
            "forget_corr": float(np.corrcoef(f_h, f_i)[0, 1]) if f_h.std() > 0 and f_i.std() > 0 else float("nan"),
            "forget_under_limit_agree": float(((f_h <= 0.15) == (f_i <= 0.15)).mean()),
            "forget_heldout_pass_image_miss": int(((f_h == 0) & (f_i > 0.15)).sum()),
            "retain_cells": len(r_h), "retain_drop_heldout_mean": float(r_h.mean()),
            "retain_drop_images_mean": float(r_i.mean()),
            "retain_drop_corr": float(np.corrcoef(r_h, r_i)[0, 1]) if r_h.std() > 0 and r_i.std() > 0 else float("nan"),
        }
    return out


def _evidence(out: dict) -> str:
    fit, ev = out.get("fit", {"on": "prototypes"}), out.get("gate_evidence", {"on": "held-out prototypes"})
    what = ("projections fitted on prototypes" if fit["on"] == "prototypes" else
            f"projections fitted on {fit['images_per_cell']} rendered images per cell (seed {fit['seed']})")
    if out.get("recentred"):
        r = out["recentred"]
        what += (f" (oracle: projection and held-out prototypes re-centred on the means of {r['images_per_cell']} "
                 f"rendered images per cell, seed {r['seed']})")
    if ev["on"] == "rendered images":
        return f"{what}, the gate judging on {ev['per_cell']} rendered images per cell (seed {ev['seed']})"
    if out["heldout_per_cell"] == "sized":
        return f"{what}, held-out prototypes sized per request from the gate's limits (10 or 20 per cell)"
    return f"{what}, held-out prototypes {out['heldout_per_cell']} per cell"


RESULTS_SECTION = "bench/requests.py --results"  # the section of docs/RESULTS.md that --results writes


def markdown(out: dict) -> str:
    lines = ["# Request benchmark: is the gate's verdict right?", "",
             f"Regenerate with `{out.get('command', 'python bench/requests.py')}` (with "
             "the prototype bank filled, 1-4 minutes on 2 CPU cores). Settings were chosen on validation renders "
             "(seeds 1 and 5: `--render-seed 1`); this table is a render no choice was made on. What was tried against "
             "false approvals, with its numbers on the validation renders: docs/GATE.md.", "",
             f"Render seed {out['render_seed']} ({out['per_cell']} images per cell), "
             f"request draw {out.get('request_seed', 0)}, {_evidence(out)}, "
             f"CPU capability {out['hardware']['cpu_capability']}, {out['seconds']} s.", ""]
    for label, s in out["summary"].items():
        lines += [f"### Projection: {label}", "", "| mode | requests | approved | meet targets on images | "
                  "false approvals | false rejections | not enough evidence | probe ≤ chance + 10 pts | "
                  "approved, a kept cell down > 0.10 on images |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {m} | {v['requests']} | {v['approved']} | {v['meet_on_images']} | {v['false_approvals']} | "
                  f"{v['false_rejections']} | {v['not_enough_evidence']} | {v['probe_within_10_points']} | "
                  f"{v.get('approved_kept_cell_down', '-')} |"
                  for m, v in s.items()]
        lines.append("")
    for label, agree in out.get("agreement", {}).items():
        evidence = ("other rendered images" if out.get("gate_evidence", {}).get("on") == "rendered images"
                    else "held-out prototypes")
        lines += [f"### Does the gate's evidence ({evidence}) predict images? ({label}; per cell, after unlearning)", "",
                  "| mode | forget cells | forget acc. held-out / images (mean) | correlation | same side of 0.15 | "
                  "0 on held-out but > 0.15 on images | retain cells | retain drop held-out / images (mean) | "
                  "correlation |", "|---|---:|---|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {m} | {a['forget_cells']} | {a['forget_heldout_mean']:.3f} / {a['forget_images_mean']:.3f} | "
                  f"{a['forget_corr']:.2f} | {a['forget_under_limit_agree']:.0%} | {a['forget_heldout_pass_image_miss']} | "
                  f"{a['retain_cells']} | {a['retain_drop_heldout_mean']:.4f} / {a['retain_drop_images_mean']:.4f} | "
                  f"{a['retain_drop_corr']:.2f} |" for m, a in agree.items()]
        lines.append("")
    for label, rows in out["lineage"].items():
        lines += [f"### Lineage ({label})", "", "| length | request added | gate | targets on images | persistence | "
                  "retain accuracy before → after |", "|---:|---|---|---|---|---|"]
        for r, (mode, classes, domains) in zip(rows, LINEAGE, strict=False):
            lines.append(f"| {r['length']} | {mode}: {', '.join(classes)}{' in ' + ', '.join(domains) if domains else ''} "
                         f"| {r['gate']} | {'met' if r['truth'] else 'missed'} | {'yes' if r['persistence'] else 'NO'} "
                         f"| {r['retain_before']:.3f} → {r['retain_after']:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

