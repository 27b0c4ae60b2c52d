"""The governance audit's findings and its compliance report (markdown, JSON and a per-cell PNG plot).

A finding is a violation that makes governance fail: the ledger is broken, the champion does not cover
every ledger request, a forgotten cell is recognized again, the retain accuracy misses the policy, or the
registered weights are not the ones the registry says. Each finding names the cells it concerns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipforget.gate.criteria import FORGET_CELL_LIMIT
from clipforget.gate.verdict import ForgetGroup, Thresholds


@dataclass(frozen=True)
class Finding:
    kind: str  # ledger | lineage | coverage | forgotten | retain | weights | build | champion
    message: str
    cells: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def forget_limits(groups: Iterable[ForgetGroup], thresholds: Thresholds) -> dict[str, float]:
    """The highest accuracy each forgotten cell may keep: its mode's per-cell limit (the strictest when
    several requests forget it), and the policy's `max_forget_acc` when that is stricter."""
    limits: dict[str, float] = {}
    for g in groups:
        limit = FORGET_CELL_LIMIT[g.mode] if thresholds.mode_criteria else math.inf
        if thresholds.max_forget_acc is not None:
            limit = min(limit, thresholds.max_forget_acc)
        for c in g.cells:
            limits[str(c)] = min(limits.get(str(c), math.inf), limit)
    return limits


def recognized_again(table: Sequence[dict], limits: dict[str, float]) -> Finding | None:
    """Forgotten cells the audited model recognizes above their limit, worst first."""
    cells = ((f"{r['class']}/{r['domain']}", r["after"]) for r in table)
    over = sorted(((acc, c, limits[c]) for c, acc in cells if c in limits and acc > limits[c] + 1e-12), reverse=True)
    if not over:
        return None
    detail = ", ".join(f"{c} {acc:.2f} > {lim:.2f}" for acc, c, lim in over)
    return Finding("forgotten", f"{len(over)} forgotten cell(s) are recognized again: {detail}", [c for _, c, _ in over])


def plot_cells(table: Sequence[dict], path: Path, title: str) -> Path:
    """Per-cell accuracy before/after as a PNG: forgotten cells in red, retained in blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(table, key=lambda r: (r["role"] != "forget", r["domain"], r["class"]))
    labels = [f"{r['class']}/{r['domain']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(rows)), 4.2), dpi=110)
    ax.bar([i - 0.2 for i in x], [r["before"] for r in rows], width=0.4, color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], [r["after"] for r in rows], width=0.4,
           color=["#d62728" if r["role"] == "forget" else "#1f77b4" for r in rows])
    ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("zero-shot accuracy")
    from matplotlib.patches import Patch

    ax.set_title(title, fontsize=10, pad=24)
    ax.legend(handles=[Patch(color="#bbbbbb", label="base"), Patch(color="#d62728", label="audited: forgotten cell"),
                       Patch(color="#1f77b4", label="audited: retained cell")],
              fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(report: dict) -> str:
    """The compliance report a person reads (Prefect artifact and MLflow artifact)."""
    ok = report["passed"]
    champ = report.get("champion") or {}
    led = report["ledger"]
    lines = [
        f"# Governance of `{report['registered_name']}`: {'COMPLIANT' if ok else 'VIOLATION'}",
        "",
        f"- audited at {report['time']}",
        f"- ledger `{led['location']}`: {led.get('entries', '?')} request(s), head `{(led.get('head') or '')[:16]}`, "
        f"chain {'verified' if led.get('verified') else '**broken**'}",
    ]
    if report.get("processed"):
        p = report["processed"]
        lines.append(f"- pending requests processed in one batch: {', '.join(p.get('request_ids', []))} → "
                     f"{'version ' + str(p['version']) if p.get('version') else 'rejected'}")
    if champ:
        head, sha = (champ.get("ledger_head") or "-")[:16], (champ.get("sha256") or "")[:16]
        lines.append(f"- champion: version {champ.get('version')} (ledger head `{head}`, covers "
                     f"{len(champ.get('request_ids') or [])} request(s), sha256 `{sha}`)")
        if champ.get("pictures"):  # logged with the champion's build: heatmap and prototype strip
            lines.append("- pictures of the champion's build: " + ", ".join(f"[{k}]({v})" for k, v in
                                                                           champ["pictures"].items()))
    else:
        lines.append("- champion: none")
    audit = report.get("audit")
    if audit:
        m = audit["metrics"]
        lines += [f"- evaluated on {audit['evaluation']}",
                  f"- forgotten cells: accuracy {m['forget_before']:.3f} → {m['forget_after']:.3f} "
                  f"(worst {m['forget_max_after']:.3f}); retained: {m['retain_before']:.3f} → {m['retain_after']:.3f}"]
    lines += ["", "## Findings", ""]
    lines += [f"- **{f['kind']}**: {f['message']}" for f in report["findings"]] or ["- none: the champion forgets every "
                                                                                   "ledger request and meets the policy"]
    if audit:
        lines += ["", "## Checks", "", "| check | measured | limit | passed |", "| --- | ---: | ---: | :---: |"]
        lines += [f"| {c['name']} | {c['value']:.4f} | {c['limit']:.4f} | {'yes' if c['passed'] else '**no**'} |"
                  for c in audit["checks"]]
        lines += ["", "## Forgotten cells", "", "| cell | base | champion | limit |", "| --- | ---: | ---: | ---: |"]
        limits = audit["limits"]
        lines += [f"| {r['class']}/{r['domain']} | {r['before']:.3f} | {r['after']:.3f} | "
                  f"{limits.get(r['class'] + '/' + r['domain'], float('nan')):.2f} |"
                  for r in audit["cells"] if r["role"] == "forget"]
    return "\n".join(lines) + "\n"
