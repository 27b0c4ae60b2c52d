"""The model card of a registered unlearned model: what it forgets, how it was judged, how to rebuild it.

Plain markdown built from the pipeline's report (no MLflow here). The registry writes it as the MLflow model
version's description, so consumers read it on the model page without opening artifacts, and `export` writes it
as the README of an open_clip folder. MLflow keeps descriptions up to 5,000 characters: long cell lists are cut
with a count of what was left out, and the whole card is kept under `MAX_CHARS`.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from clipforget.gate.verdict import DATA_FREE_CAVEAT

MAX_CHARS = 5000  # MLflow's limit on a model version description (a String(5000) column)


def _cut(items: Sequence[str], keep: int) -> str:
    shown = ", ".join(f"`{i}`" for i in items[:keep])
    return shown + (f" … and {len(items) - keep} more" if len(items) > keep else "")


def _rebuild(report: Mapping[str, Any], name: str) -> list[str]:
    ledger = report.get("ledger") or {}
    policy = report.get("policy") or {}
    if ledger.get("head"):
        loc = ledger.get("location") or "LEDGER"
        return ["```bash",
                f"clipforget rebuild --head {ledger['head'][:16]} --ledger {shlex.quote(str(loc))} --policy policy.json",
                "```",
                "with `policy.json` holding the policy below. The version's weights are rebuilt from the base checkpoint "
                "and the ledger up to that head; `rebuild` compares their sha256 with this version's."]
    req = report.get("request") or {}
    parts = ["clipforget unlearn", "--model", str(policy.get("arch", "toy"))]
    if policy.get("checkpoint_uri"):
        parts += ["--checkpoint", str(policy["checkpoint_uri"])]
    parts += ["--mode", str(req.get("mode") or report.get("mode"))]
    if req.get("classes"):
        parts += ["--classes", ",".join(req["classes"])]
    if req.get("domains"):
        parts += ["--domains", ",".join(req["domains"])]
    if policy.get("data_uri"):
        parts += ["--data", str(policy["data_uri"])]
    syn = policy.get("synthesis") or {}
    for key, opt in (("prototypes_per_cell", "--prototypes-per-cell"), ("steps", "--steps"),
                     ("target_cosine", "--target-cosine"), ("seed", "--seed")):
        if syn.get(key) is not None:
            parts += [opt, str(syn[key])]
    parts += ["--request-id", str(report.get("request_id")), "--registered-name", f"{name}-rebuild"]
    return ["```bash", " ".join(shlex.quote(p) if p != "clipforget unlearn" else p for p in parts), "```",
            "registers the same build under another name (the checkpoint's metadata names the request id, so keep it); "
            "the build is seeded and closed-form, so compare the new version's `clipforget.sha256` with this one's."]


def model_card(report: Mapping[str, Any], name: str, version: str | None = None,
               pictures: Mapping[str, str] | None = None) -> str:
    """The card of one registered version, from the pipeline's report (markdown, at most MAX_CHARS)."""
    forget = list(report.get("forget_cells") or [])
    ledger = report.get("ledger") or {}
    model = report.get("model") or {}
    output = report.get("output") or {}
    evaluation = report.get("evaluation") or {}
    m = report.get("metrics") or {}
    cells = list(report.get("cells") or [])
    title = f"# {name}" + (f" version {version}" if version else "")
    lines = [title, "",
             f"Unlearned CLIP (`{model.get('arch', '?')}`, open_clip) that **forgets {len(forget)} cell(s)** "
             f"({report.get('mode', '?')}): {_cut(forget, 24)}.", ""]
    lines += ["## What it forgets", ""]
    if ledger.get("request_ids"):
        ids = list(ledger["request_ids"])
        lines += [f"- deletion requests ({len(ids)}): {_cut(ids, 20)}",
                  f"- ledger `{ledger.get('location', '?')}`, head `{ledger.get('head', '')}` (entry {ledger.get('seq')})"]
    else:
        lines.append(f"- request `{report.get('request_id')}` by {report.get('requested_by', '?')}")
    lines += [f"- base checkpoint `{model.get('checkpoint') or '?'}`, sha256 `{model.get('sha256', '?')}`",
              f"- these weights: sha256 `{output.get('sha256', '?')}`", ""]

    lines += ["## How it was judged", ""]
    per_cell = sorted({int(r.get("n", 0)) for r in cells})
    counts = f"{per_cell[0]}" if len(per_cell) == 1 else f"{per_cell[0]}–{per_cell[-1]}" if per_cell else "?"
    lines += [f"Base and this version measured on the same images: {evaluation.get('data', '?')}, "
              f"{counts} per cell over {len(cells)} cells (zero-shot accuracy per class × domain cell).", ""]
    if report.get("heldout"):  # judged data-free, on held-out prototypes
        lines += [f"**{DATA_FREE_CAVEAT}**", ""]
    if m:
        def f(key: str) -> str:
            v = m.get(key)
            return f"{v:.3f}" if isinstance(v, (int, float)) else "?"

        lines += [f"- forgotten cells: {f('forget_before')} → {f('forget_after')} (worst {f('forget_max_after')})",
                  f"- retained cells: {f('retain_before')} → {f('retain_after')} (largest drop "
                  f"{f('retain_max_cell_drop')} at `{m.get('worst_retain_cell', '?')}`)", ""]
    checks = list(report.get("checks") or [])
    if checks:
        lines += ["| check | measured | limit | passed |", "| --- | ---: | ---: | :---: |"]
        lines += [f"| {c['name']} | {c['value']:.4f} | {c['limit']:.4f} | {'yes' if c['passed'] else 'no'} |"
                  for c in checks]
        lines.append("")
        # how a value was computed, where it is not the plain point estimate (e.g. a 95% upper bound on n images)
        ruled = [c for c in checks if c.get("rule") and c.get("rule") != "point estimate"]
        for c in ruled:
            est = c.get("estimate")
            lines.append(f"- {c['name']}: {c['rule']}" + (f"; point estimate {est:.4f}" if isinstance(est, float) else "")
                         + (f" on n={c['n']}" if c.get("n") else ""))
        if ruled:
            lines.append("")
    forgot = [r for r in cells if r.get("role") == "forget"]
    if forgot:
        lines += ["| forgotten cell | base | this version | images |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['class']}/{r['domain']} | {r['before']:.3f} | {r['after']:.3f} | {r.get('n', '?')} |"
                  for r in forgot[:12]]
        if len(forgot) > 12:
            lines.append(f"| … {len(forgot) - 12} more | | | |")
        lines.append("")
    if pictures:
        lines += ["Pictures: " + ", ".join(f"[{k}]({v})" for k, v in pictures.items()), ""]

    lines += ["## How to rebuild it", "", *_rebuild(report, name), ""]
    policy = report.get("policy") or {}
    keep = {k: policy[k] for k in ("arch", "checkpoint_uri", "checkpoint_sha256", "grid", "data_uri", "thresholds",
                                   "synthesis", "projection", "source") if policy.get(k) is not None}
    if keep:
        import json

        lines += ["Policy:", "", "```json", json.dumps(keep, sort_keys=True), "```", ""]
    ref = f"models:/{name}/{version}" if version else f"models:/{name}@champion"
    lines += ["## Use", "", "```bash", f"mlflow models serve -m {ref} --env-manager local --port 5001",
              f"clipforget export {ref} --out DIR   # an open_clip folder: create_model_and_transforms('local-dir:DIR')",
              "```"]
    text = "\n".join(lines) + "\n"
    if len(text) > MAX_CHARS:  # cut whole lines from the tables' end, never mid-line
        text = text[: MAX_CHARS - 40].rsplit("\n", 1)[0] + "\n\n… (card cut at 5,000 characters)\n"
    return text
