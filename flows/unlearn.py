"""The unlearning pipeline: a base checkpoint in, an approved unlearned model in the MLflow registry out.

Reads as the numbered steps of docs/DESIGN.md. A model that misses a threshold is never registered: the
run ends Failed ("rejected") with the measured numbers in its artifacts and its JSON report.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed

from clipforget.governance.request import UnlearnRequest
from clipforget.io import registry
from clipforget.io.atomic import write_json
from flows.pipeline import Build, policy_grid, run_pipeline
from flows.runners import task_runner
from tasks.register import find_registered, promote_model

__all__ = ["unlearn", "policy_grid"]


@flow(name="unlearn", flow_run_name="unlearn-{request.request_id}", validate_parameters=True, task_runner=task_runner())
def unlearn(request: UnlearnRequest, report_path: str | None = None):
    """Forget the request's cells from its checkpoint; register the result only if it passes the gate."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    assert request.registered_name is not None

    # 0. a request id is registered at most once
    existing = find_registered(request.registered_name, request.request_id)
    if existing is not None and existing.get("request_digest") not in (None, request.content_digest()):
        raise ValueError(f"request id {request.request_id!r} was registered for a different request "
                         f"({request.registered_name} version {existing['version']}); use a new request id")
    if existing is not None:
        logger.info("request %s is already registered as %s version %s; nothing to register", request.request_id,
                    request.registered_name, existing["version"])
        if request.promote and registry.CHAMPION not in existing["aliases"]:
            existing = promote_model(request.registered_name, existing["version"])
        report = {"request_id": request.request_id, "passed": True, "reused": True,
                  "registered": {"name": request.registered_name, **existing},
                  "timings": {"total_s": round(time.perf_counter() - t0, 3)}}
        if report_path:  # the approved run's own report stays where it is
            write_json(Path(report_path), report)
        return report

    build = Build(policy=request.policy(),
                  specs=[{"mode": request.mode, "classes": request.classes, "domains": request.domains}],
                  version_id=request.request_id, version_digest=request.content_digest(),
                  requested_by=request.requested_by,
                  params={"classes": ",".join(request.classes), "domains": ",".join(request.domains)},
                  report={"request": request.model_dump()})
    report = run_pipeline(build, promote=request.promote, report_path=report_path)
    if not report["passed"]:
        return Failed(message=f"rejected: {report['rejected']}")
    return report
