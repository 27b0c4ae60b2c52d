"""Alerts: a governance run that finds the champion non-compliant emits a Prefect event with its findings.

Event `clipforget.governance.noncompliant` on the resource `clipforget.registered-model.<name>`; the payload holds
the findings (kind, message, cells), the champion version, the ledger head, the MLflow run of the compliance report
and a one-paragraph `summary` for notifications. `infra/automations/governance-noncompliant.yaml` is the automation
that reacts to it (installed with `clipforget alerts install --block ...`, docs/CONSUMERS.md).
"""

from __future__ import annotations

from typing import Any

NONCOMPLIANT_EVENT = "clipforget.governance.noncompliant"
RESOURCE_PREFIX = "clipforget.registered-model."


def summary(report: dict) -> str:
    champ = report.get("champion") or {}
    head = (report.get("ledger") or {}).get("head") or ""
    lines = [f"{report['registered_name']}: champion version {champ.get('version', '-')} is NOT compliant with the "
             f"deletion-request ledger (head {head[:16]}); {len(report['findings'])} finding(s):"]
    lines += [f"- {f['kind']}: {f['message']}" for f in report["findings"]]
    run = (report.get("published") or {}).get("mlflow_run_id")
    if run:
        lines.append(f"compliance report: MLflow run {run} (experiment clipforget-governance)")
    return "\n".join(lines)


def emit_noncompliant(report: dict) -> Any:
    """Send the event (inside a flow run Prefect relates it to the run); returns the Event, or None when events
    are disabled."""
    from prefect.events import emit_event

    name = report["registered_name"]
    champ = report.get("champion") or {}
    payload = {"registered_name": name, "champion_version": champ.get("version"),
               "ledger_head": (report.get("ledger") or {}).get("head"),
               "findings": report["findings"], "cells": sorted({c for f in report["findings"] for c in f.get("cells", [])}),
               "mlflow_run_id": (report.get("published") or {}).get("mlflow_run_id"), "summary": summary(report)}
    return emit_event(NONCOMPLIANT_EVENT, resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{name}",
                                                    "prefect.resource.name": name, "prefect.resource.role": "model"},
                      payload=payload)
