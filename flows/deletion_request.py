"""On-demand data-deletion requests: validate, append to the ledger, build the cumulative model, register.

Unlearning is cumulative and reproducible: every version is built from the policy's base checkpoint with
the union of the forget cells of all ledger entries up to a head (never by projecting an already edited
model again). A version's id is derived from that head and the policy, its tags carry the ledger head and
the request ids it covers, and `rebuild` makes the same checkpoint again from base + ledger.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed

from clipforget.governance.ledger import Entry, Ledger
from clipforget.governance.request import DeletionRequest, ModelPolicy
from clipforget.io import registry
from clipforget.io.atomic import write_json
from clipforget.io.checkpoints import check_arch
from clipforget.method.data import list_labelled_images, require_every_cell
from clipforget.method.grid import check_projection_kind
from flows.pipeline import Build, Inputs, fetch_inputs, groups_of, run_pipeline
from flows.runners import task_runner
from tasks.record import append_request, entry_of, ledger_location, read_ledger
from tasks.register import find_registered, promote_model


def version_id(entries: Sequence[Entry], policy: ModelPolicy) -> str:
    """The registry id of the version built from the ledger up to `entries[-1]` under `policy`."""
    head = entries[-1]
    return f"ledger-{head.seq:06d}-{head.hash[:12]}-{policy.policy_digest()[:8]}"


def ledger_build(policy: ModelPolicy, entries: Sequence[Entry], location: str, requested_by: str) -> Build:
    """The cumulative build for the ledger up to `entries[-1]`: every entry's forget cells at once."""
    head = entries[-1]
    ids = [e.request_id for e in entries]
    tags = {registry.TAG_LEDGER: location, registry.TAG_LEDGER_HEAD: head.hash, registry.TAG_LEDGER_SEQ: str(head.seq),
            registry.TAG_REQUEST_IDS: ",".join(ids)[: registry.MAX_TAG_VALUE]}
    return Build(policy=policy, specs=[e.request for e in entries], version_id=version_id(entries, policy),
                 version_digest=hashlib.sha256(f"{head.hash}:{policy.policy_digest()}".encode()).hexdigest(),
                 requested_by=requested_by, params={"ledger_seq": head.seq, "requests": len(ids)}, tags=tags,
                 report={"ledger": {"location": location, "head": head.hash, "seq": head.seq, "request_ids": ids}})


def build_at_head(policy: ModelPolicy, entries: Sequence[Entry], location: str, requested_by: str, promote: bool,
                  report_path: str | None = None, inputs: Inputs | None = None) -> dict:
    """Register the cumulative version for this head, unless it already is (then only promote if asked)."""
    logger = get_run_logger()
    build = ledger_build(policy, entries, location, requested_by)
    assert policy.registered_name is not None
    existing = find_registered(policy.registered_name, build.version_id)
    if existing is not None:
        logger.info("ledger head %s is already registered as %s version %s", entries[-1].hash[:16],
                    policy.registered_name, existing["version"])
        if promote and registry.CHAMPION not in existing["aliases"]:
            existing = promote_model(policy.registered_name, existing["version"])
        return {"request_id": build.version_id, "passed": True, "reused": True,
                "registered": {"name": policy.registered_name, **existing}}
    return run_pipeline(build, promote=promote, report_path=report_path, inputs=inputs)


@flow(name="deletion-request", flow_run_name="deletion-{request.request_id}", validate_parameters=True,
      task_runner=task_runner())
def deletion_request(request: DeletionRequest, policy: ModelPolicy | None = None, ledger: str | None = None,
                     promote: bool = False, report_path: str | None = None):
    """Validate the request, append it to the ledger, and register the model that forgets the whole ledger."""
    logger = get_run_logger()
    policy = policy or ModelPolicy()
    location = ledger_location(ledger)

    # validate before anything is written: the architecture, the evaluation data on the policy's grid, the names
    # on that grid, and something left to retain
    check_arch(policy.arch)
    inputs = fetch_inputs(policy)
    grid = inputs.grid
    if inputs.data_path is not None:
        list_labelled_images(inputs.data_path, grid)  # cells outside the grid fail now, not after synthesis
    if inputs.fit_path is not None:  # and fit images that cannot fit a projection fail before the request enters the ledger
        require_every_cell((c for _, c in list_labelled_images(inputs.fit_path, grid)), grid,
                           f"the fit images {policy.fit_uri}")
    entries = [entry_of(d) for d in read_ledger(location)]
    cells = request.cells(grid)
    known = {c for g in groups_of([e.request for e in entries], grid) for c in g.cells}
    if len(known | set(cells)) == len(grid.cells):
        raise ValueError(f"with request {request.request_id!r} the ledger would forget every cell of grid "
                         f"{grid.name}; nothing would be retained")
    check_projection_kind(policy.projection, known | set(cells), grid.classes)  # nor one its projection can't express

    appended = append_request(location, request.request_id, request.ledger_record())
    entries = [entry_of(d) for d in read_ledger(location)]
    if not appended["appended"]:
        logger.info("request %s is already in the ledger as entry %d", request.request_id, appended["seq"])
    report = build_at_head(policy, entries, location, request.requested_by, promote, report_path, inputs)
    report["deletion_request"] = {"request_id": request.request_id, "entry": appended["seq"],
                                  "appended": appended["appended"], "covered_by_head": appended["hash"]}
    if report_path:
        write_json(Path(report_path), report)
    if not report["passed"]:
        return Failed(message=f"rejected: {report['rejected']}; the request stays in the ledger and the next "
                      "build retries it")
    return report


@flow(name="rebuild", flow_run_name="rebuild-{head}", validate_parameters=True, task_runner=task_runner())
def rebuild(policy: ModelPolicy | None = None, ledger: str | None = None, head: str | None = None) -> dict:
    """Build (not register) the model of the ledger up to `head` (default: the current head) from the base
    checkpoint; the report's output sha256 equals the registered version's weights when nothing was altered."""
    policy = policy or ModelPolicy()
    location = ledger_location(ledger)
    led = Ledger(location)
    entries = led.up_to(led.resolve(head)) if head else led.entries()
    if not entries:
        raise ValueError(f"ledger {location} has no entries: nothing to rebuild")
    build = ledger_build(policy, entries, location, "rebuild")
    # the settings the registered version was built with, not today's defaults (an upgrade may have changed them)
    recorded = registry.recorded_settings(policy.registered_name, build.version_id) if policy.registered_name else None
    build.settings = recorded
    build.report["settings_from"] = "the registered version's run" if recorded else "this release's defaults"
    get_run_logger().info("rebuilding with the settings of %s", build.report["settings_from"])
    return run_pipeline(build, register=False)
