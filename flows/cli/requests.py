"""`clipforget request submit|list|show`: data-deletion requests and their ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from flows.cli.common import (
    LEDGER,
    POLICY,
    echo_data_free,
    fail,
    fitted_on_images,
    grid_of,
    load_model_json,
    local_flow_run,
    offline_prefect,
    report_of,
    request_app,
    user_errors,
)


@request_app.command("submit")
def request_submit(
    file: Path = typer.Argument(..., help='Request JSON: {"request_id": "dsr-1", "requested_by": "...", "reason": "...", '
                                '"mode": "global", "classes": ["star"], "domains": []}.'),
    policy_file: Path = POLICY,
    ledger: str = LEDGER,
    promote: bool = typer.Option(False, "--promote", help="Move the `champion` alias to the approved version."),
    no_build: bool = typer.Option(False, "--no-build", help="Only append to the ledger; the next governance run "
                                  "builds every pending request in one batch."),
    deployment: str = typer.Option(None, "--deployment", help="Run through a Prefect deployment (e.g. "
                                   "deletion-request/on-demand) instead of in this process; prints the flow run id."),
    json_out: Path = typer.Option(None, "--json", help="Where to write the report (default runs/request-ID.json)."),
) -> None:
    """Validate a deletion request, append it to the ledger and build + register the cumulative model."""
    offline_prefect(start_server=not no_build)  # first: a temporary server starts while the request is checked
    from clipforget.governance.request import DeletionRequest, ModelPolicy
    from clipforget.method.grid import check_projection_kind
    from tasks.record import ledger_location

    request = load_model_json(DeletionRequest, file, "request")
    policy = load_model_json(ModelPolicy, policy_file, "policy")
    location = ledger_location(ledger)
    try:
        local_policy = deployment is None or policy_file is not None  # else the deployment's policy decides
        if local_policy and (policy.grid is not None or policy.arch == "toy"):  # bad input fails before any write
            grid = grid_of(policy.grid, policy.arch, None)
            cells = request.cells(grid)
            check_projection_kind(policy.projection, cells, grid.classes)  # one the policy's projection can express
    except user_errors() as e:
        fail(e)
    if deployment:
        from prefect.deployments import run_deployment

        # the deployment's own policy and its workers' CLIPFORGET_LEDGER apply unless given here
        parameters: dict[str, Any] = {"request": request.model_dump(), "promote": promote}
        if policy_file is not None:
            parameters["policy"] = policy.model_dump()
        if ledger is not None:
            parameters["ledger"] = ledger
        with local_flow_run():
            run = run_deployment(deployment, timeout=0, parameters=parameters)
        typer.echo(f"submitted {request.request_id} to deployment {deployment}: flow run {run.id} ({run.name})")
        return
    if no_build:
        from clipforget.governance.ledger import Ledger, LedgerError

        try:
            entry, appended = Ledger(location).append(request.request_id, request.ledger_record())
        except LedgerError as e:
            fail(e)
        typer.echo(f"{'appended' if appended else 'already in the ledger:'} {request.request_id} as entry {entry.seq} "
                   f"of {location} (hash {entry.hash[:16]}); `clipforget govern` builds it")
        return
    from flows.deletion_request import deletion_request

    json_out = json_out or Path("runs") / f"request-{request.request_id}.json"
    json_out.unlink(missing_ok=True)
    with local_flow_run():
        state = deletion_request(request, policy, location, promote, str(json_out), return_state=True)
    report = report_of(json_out, state)
    reg = report.get("registered")
    if report.get("passed") and reg:
        led = report.get("ledger") or {}
        typer.echo(f"{request.request_id}: ledger entry {report['deletion_request']['entry']}; "
                   f"{'already registered' if report.get('reused') else 'approved: registered'} {reg['name']} version "
                   f"{reg['version']} (aliases: {', '.join(reg.get('aliases') or []) or 'none'}) covering "
                   f"{len(led.get('request_ids') or reg.get('request_ids') or [])} request(s)")
        echo_data_free(bool(report.get("heldout")))
        typer.echo(f"wrote {json_out}")
        return
    typer.echo(f"rejected, nothing registered (the request stays in the ledger): {report.get('rejected') or state.message}",
               err=True)
    echo_data_free(bool(report.get("heldout")), passed=False, fitted_on_images=fitted_on_images(report))
    typer.echo(f"wrote {json_out}")
    raise typer.Exit(1)


def _ledger_entries(ledger: str | None) -> tuple[str, list]:
    from clipforget.governance.ledger import Ledger, LedgerError
    from tasks.record import ledger_location

    location = ledger_location(ledger)
    try:
        return location, Ledger(location).entries()
    except LedgerError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@request_app.command("list")
def request_list(ledger: str = LEDGER, json_out: Path = typer.Option(None, "--json")) -> None:
    """Every request in the ledger, oldest first (the hash chain is verified first)."""
    from clipforget.io.atomic import write_json

    location, entries = _ledger_entries(ledger)
    if json_out:
        write_json(json_out, [e.to_dict() for e in entries])
    if not entries:
        typer.echo(f"ledger {location} is empty")
    for e in entries:
        r = e.request
        what = ", ".join(r.get("classes") or []) or "all classes"
        where = ", ".join(r.get("domains") or []) or "all domains"
        typer.echo(f"{e.seq:4d}  {e.request_id}  {r['mode']}: {what} in {where}  by {r.get('requested_by', '?')}  "
                   f"{e.hash[:12]}")
    if entries:
        typer.echo(f"head {entries[-1].hash} ({len(entries)} requests, chain verified)")


@request_app.command("show")
def request_show(request_id: str = typer.Argument(...), ledger: str = LEDGER, policy_file: Path = POLICY) -> None:
    """One ledger entry as JSON, and the registered versions that cover it."""
    from clipforget.governance.request import ModelPolicy
    from clipforget.io import registry

    _, entries = _ledger_entries(ledger)
    entry = next((e for e in entries if e.request_id == request_id), None)
    if entry is None:
        fail(ValueError(f"request {request_id!r} is not in the ledger"))
    assert entry is not None
    policy = load_model_json(ModelPolicy, policy_file, "policy")
    out = entry.to_dict()
    try:
        out["covered_by"] = [{"name": policy.registered_name, "version": v["version"], "aliases": v["aliases"]}
                             for v in registry.versions(policy.registered_name) if request_id in v["request_ids"]]
    except Exception as e:  # the registry is unreachable: the ledger entry is still worth showing
        out["covered_by"] = f"unknown ({type(e).__name__})"
    typer.echo(json.dumps(out, indent=1))
