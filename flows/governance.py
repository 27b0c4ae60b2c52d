"""Scheduled governance: process pending ledger entries in one batch, then audit the `champion`.

The audit fails loudly (the flow run ends Failed, naming the cells) when the ledger's hash chain is broken,
a registered version was built from a ledger head that is gone, the champion does not cover every ledger
request, a forgotten cell is recognized again, the retain accuracy misses the policy, or the champion's
weights in the artifact store are not the ones its tags name. Either way it writes a compliance report:
a Prefect markdown artifact and an MLflow run (markdown, JSON, per-cell PNG plot).
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.states import Failed

from clipforget.gate.verdict import rejection
from clipforget.governance.compliance import Finding
from clipforget.governance.ledger import GENESIS, Entry, LedgerError
from clipforget.governance.request import ModelPolicy
from clipforget.io import registry
from clipforget.io.atomic import write_json
from clipforget.steps import cell_names
from flows.deletion_request import build_at_head, version_id
from flows.pipeline import fetch_inputs, groups_of, heldout_prototypes
from flows.runners import task_runner
from tasks.alerts import emit_noncompliant
from tasks.audit import audit_model, fetch_registered_weights, publish_governance_report
from tasks.common import work_root
from tasks.record import entry_of, ledger_location, read_ledger


@flow(name="governance", validate_parameters=True, task_runner=task_runner())
def governance(policy: ModelPolicy | None = None, ledger: str | None = None, promote: bool = True,
               report_path: str | None = None):
    """Build the model for pending ledger entries (promoting it when `promote`), audit the champion, report."""
    logger = get_run_logger()
    policy = policy or ModelPolicy()
    name = policy.registered_name
    assert name is not None
    location = ledger_location(ledger)
    now = datetime.now(UTC)
    findings: list[Finding] = []
    report: dict = {"time": now.isoformat(timespec="seconds"), "registered_name": name,
                    "ledger": {"location": location, "verified": False}, "processed": None, "champion": None,
                    "audit": None}

    # 1. the ledger's hash chain, and every registered version's head still in it
    entries: list[Entry] | None = None
    try:
        entries = [entry_of(d) for d in read_ledger(location)]
        report["ledger"].update(verified=True, entries=len(entries), head=entries[-1].hash if entries else GENESIS)
    except LedgerError as e:
        findings.append(Finding("ledger", str(e)))
    versions = registry.versions(name)
    if entries is not None:
        hashes = {e.hash for e in entries}
        for v in versions:
            if v["ledger_head"] and v["ledger_head"] not in hashes:
                findings.append(Finding("lineage", f"version {v['version']} was built from ledger head "
                                        f"{v['ledger_head'][:16]}…, which is not in the ledger: entries were removed "
                                        "or changed after it was built"))

    inputs = fetch_inputs(policy) if entries else None  # for the batch build and the audit

    # 2. pending entries: one cumulative build for the current head, unless it is registered already
    if entries and not findings:
        vid = version_id(entries, policy)
        if not any(v["request_id"] == vid for v in versions):
            covered = {r for v in versions for r in v["request_ids"]}
            pending = [e.request_id for e in entries if e.request_id not in covered]
            logger.info("processing %d pending request(s) in one batch: %s", len(pending), ", ".join(pending))
            built = build_at_head(policy, entries, location, "governance", promote, inputs=inputs)
            report["processed"] = {"request_ids": pending, "version_id": vid,
                                   "version": (built.get("registered") or {}).get("version"),
                                   "rejected": built.get("rejected")}
            if not built["passed"]:
                findings.append(Finding("build", f"the model for ledger head {entries[-1].hash[:16]}… was rejected: "
                                        f"{built['rejected']}", built.get("forget_cells", [])))

    # 3. the champion: covers every request, weights as registered, forgets every ledger cell, keeps the rest
    champ = registry.champion(name)
    if champ is None:
        if entries:
            findings.append(Finding("champion", f"no version of {name} holds the `champion` alias, so no model "
                                    f"serves the {len(entries)} ledger request(s)"))
    else:
        report["champion"] = {k: champ.get(k) for k in ("version", "request_id", "ledger_head", "request_ids", "sha256",
                                                        "base_sha256", "forget_cells", "pictures")}
        weights = fetch_registered_weights(name, champ["version"])
        if champ.get("sha256") and weights["sha256"] != champ["sha256"]:
            findings.append(Finding("weights", f"champion version {champ['version']}'s weights hash to "
                                    f"{weights['sha256'][:16]}…, not the registered {champ['sha256'][:16]}…"))
        if inputs is not None:
            base, data_path, grid = inputs.base, inputs.data_path, inputs.grid
            groups = groups_of([e.request for e in entries], grid)
            missing = [(e, g) for e, g in zip(entries, groups, strict=True)
                       if e.request_id not in (champ.get("request_ids") or [])]
            if missing:
                cells = list(dict.fromkeys(c for _, g in missing for c in cell_names(g.cells)))
                findings.append(Finding("coverage", f"champion version {champ['version']} was not built for request(s) "
                                        f"{', '.join(e.request_id for e, _ in missing)} (cells {', '.join(cells)})",
                                        cells))
            heldout, heldout_cfg = heldout_prototypes(policy, base, grid, groups) if data_path is None \
                else (None, None)
            audit = audit_model(policy.arch, base, weights,
                                grid.to_dict(),
                                [{"mode": g.mode, "cells": cell_names(g.cells)} for g in groups],
                                thresholds=policy.thresholds.model_dump(), data_path=data_path,
                                heldout_files=heldout["paths"] if heldout else None, synthesis=heldout_cfg,
                                data_uri=policy.data_uri)
            report["audit"] = audit
            if audit["recognized"]:
                findings.append(Finding(**audit["recognized"]))
            for c in audit["checks"]:
                if not c["passed"] and "forget" not in c["name"]:
                    findings.append(Finding("retain", f"{rejection(c)} "
                                            f"(worst retained cell {audit['metrics']['worst_retain_cell']})",
                                            [audit["metrics"]["worst_retain_cell"]]))

    report["findings"] = [f.to_dict() for f in findings]
    report["passed"] = not findings
    out_dir = work_root() / "governance" / name / now.strftime("%Y%m%dT%H%M%SZ")
    report["published"] = publish_governance_report(report, str(out_dir))
    for path in {out_dir / "report.json", *([report_path] if report_path else [])}:
        write_json(path, report)
    if findings:
        for f in findings:
            logger.error("governance violation (%s): %s", f.kind, f.message)
        emit_noncompliant(report)  # the alert: infra/automations/ reacts to this event
        return Failed(message="governance: " + " | ".join(f.message for f in findings))
    logger.info("governance: champion version %s of %s complies with %d ledger request(s)",
                champ["version"] if champ else "-", name, len(entries or []))
    return report
