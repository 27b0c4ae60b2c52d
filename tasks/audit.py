"""Governance tasks: fetch a registered version's weights, measure it against the ledger, publish the report."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from clipforget.gate.verdict import Thresholds
from clipforget.governance import compliance
from clipforget.io import registry
from clipforget.io.checkpoints import sha256_file
from tasks.common import work_root
from tasks.validate import artifact_key, measure


@task(name="fetch_registered_weights", retries=2, retry_delay_seconds=5)
def fetch_registered_weights(name: str, version: str) -> dict:
    """The version's checkpoint from the artifact store → {path, sha256} (the digest of the bytes fetched)."""
    path = registry.download_weights(name, version, work_root() / "governance" / name / str(version))
    return {"path": str(path), "sha256": sha256_file(path)}


@task(name="audit_model")
def audit_model(arch: str, base: dict, model: dict, grid: dict, groups: list[dict], *, thresholds: dict,
                data_path: str | None = None, heldout_files: list[str] | None = None,
                synthesis: dict | None = None, data_uri: str | None = None) -> dict:
    """Per-cell accuracy of the base and the audited model, the policy's checks over every ledger group,
    and the forgotten cells the model recognizes again."""
    verdict = measure(arch, base, model, grid, groups, thresholds=thresholds, data_path=data_path,
                      heldout_files=heldout_files, synthesis=synthesis, data_uri=data_uri)
    out = verdict.to_dict()
    limits = compliance.forget_limits(list(verdict.groups), Thresholds(**thresholds))
    recognized = compliance.recognized_again(out["cells"], limits)
    return {"evaluation": verdict.evaluation, "checks": out["checks"], "metrics": out["metrics"], "cells": out["cells"],
            "limits": limits, "recognized": recognized.to_dict() if recognized else None}


@task(name="publish_governance_report", retries=2, retry_delay_seconds=5)
def publish_governance_report(report: dict, out_dir: str) -> dict:
    """The compliance report as a Prefect markdown artifact and an MLflow run (markdown, JSON, PNG plot)."""
    md = compliance.markdown(report)
    plot = None
    if report.get("audit"):
        champ = report.get("champion") or {}
        plot = compliance.plot_cells(report["audit"]["cells"], Path(out_dir) / "cells.png",
                                     f"{report['registered_name']} champion v{champ.get('version')}: per-cell "
                                     "accuracy, base vs champion")
    create_markdown_artifact(md, key=artifact_key(report["registered_name"], "governance"),
                             description="governance: compliance of the champion with the deletion-request ledger")
    run_id = registry.log_governance(report, md, plot)
    get_run_logger().info("compliance report: MLflow run %s (experiment %s)", run_id, registry.GOVERNANCE_EXPERIMENT)
    return {"markdown": md, "plot": str(plot) if plot else None, "mlflow_run_id": run_id}
