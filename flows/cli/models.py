"""`clipforget models ...`, `clipforget export` and `clipforget alerts ...`: what registry consumers and operators
run. Registered in flows/cli/__init__.py; heavy imports happen inside each command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flows.cli.common import app

models_app = typer.Typer(no_args_is_help=True, help="Registered unlearned models (MLflow registry).")
alerts_app = typer.Typer(no_args_is_help=True, help="Prefect automations that react to governance findings.")

REPO = Path(__file__).resolve().parents[2]
AUTOMATION_FILE = REPO / "infra" / "automations" / "governance-noncompliant.yaml"
LEDGER = typer.Option(None, "--ledger", help="Ledger folder or s3://bucket/prefix/ (default: CLIPFORGET_LEDGER, "
                      "else ./ledger).")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _mlflow_message(e: BaseException) -> str:
    return str(getattr(e, "message", None) or e)


@models_app.command("list")
def models_list(json_out: Path = typer.Option(None, "--json", help="Also write the listing as JSON.")) -> None:
    """Registered models with their latest version and aliases."""
    from clipforget.io import registry
    from clipforget.io.atomic import write_json

    rows = registry.list_models()
    if json_out:
        write_json(json_out, rows)
    if not rows:
        typer.echo(f"no registered models at {registry.tracking_uri()}")
    for r in rows:
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(r["aliases"].items())) or "no aliases"
        typer.echo(f"{r['name']}: latest version {r['latest_version']} ({aliases})")


@models_app.command("show")
def models_show(
    ref: str = typer.Argument(..., help="NAME, NAME@alias or NAME/version."),
    json_out: Path = typer.Option(None, "--json", help="Also write the details as JSON."),
    card: bool = typer.Option(False, "--card", help="Print the version's model card (its MLflow description)."),
) -> None:
    """Versions, aliases and tags (request id, mode, forgotten cells, base sha256, metrics)."""
    from clipforget.io import registry
    from clipforget.io.atomic import write_json

    try:
        info = registry.show(ref)
    except Exception as e:  # MlflowException: no such model, version or alias
        _fail(f"{ref}: {_mlflow_message(e)}")
    if json_out:
        write_json(json_out, info)
    if card and "version" in info:
        typer.echo(registry.client().get_model_version(info["name"], info["version"]).description or "(no model card)")
        return
    for v in info.get("versions", [info]):
        aliases = ", ".join(v["aliases"]) or "-"
        metrics = ", ".join(f"{k} {val:.3f}" for k, val in sorted(v["metrics"].items())
                            if k in ("forget_after", "retain_after", "retain_max_cell_drop"))
        typer.echo(f"{info['name']} v{v['version']} [{aliases}] request {v['request_id']} by {v['requested_by']}: "
                   f"{v['mode']} forgetting {', '.join(v['forget_cells'])}; base {str(v['base_sha256'])[:12]}; {metrics}")


def _ledger(ledger: str | None) -> tuple[list[str], str | None]:
    """The ledger's request ids (oldest first) and head hash; the chain is verified."""
    from clipforget.governance.ledger import Ledger, LedgerError
    from tasks.record import ledger_location

    location = ledger_location(ledger)
    try:
        entries = Ledger(location).entries()
    except LedgerError as e:
        _fail(f"ledger {location}: {e}", 1)
        raise  # unreachable
    return [e.request_id for e in entries], (entries[-1].hash if entries else None)


@models_app.command("promote")
def models_promote(
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="The version to make the champion."),
    reason: str = typer.Option("", "--reason", help="Why (recorded as the version's clipforget.promotion_reason tag)."),
    ledger: str = LEDGER,
) -> None:
    """Move `champion` to VERSION; refused unless it was built for every request of the ledger (its current head)."""
    from clipforget.io import registry

    ids, head = _ledger(ledger)
    try:
        v = registry.promote_checked(name, version, ids, head, reason)
    except registry.PromotionRefused as e:
        _fail(str(e))
    except Exception as e:  # MlflowException: no such model or version
        _fail(f"{name}/{version}: {_mlflow_message(e)}")
    typer.echo(f"{name} version {v['version']} is now the champion (covers {len(ids)} ledger request(s))")


@models_app.command("rollback")
def models_rollback(
    name: str = typer.Argument(..., help="Registered model name."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded as tags on both versions)."),
    ledger: str = LEDGER,
) -> None:
    """Move `champion` back to the newest older version that covers the whole ledger and was never rolled back."""
    from clipforget.io import registry

    ids, head = _ledger(ledger)
    try:
        old, new = registry.rollback(name, ids, head, reason)
    except registry.PromotionRefused as e:
        _fail(str(e))
    except Exception as e:  # MlflowException: no such model
        _fail(f"{name}: {_mlflow_message(e)}")
    typer.echo(f"{name}: champion moved back from version {old['version']} to version {new['version']} ({reason})")


def export_cmd(
    ref: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION, NAME@ALIAS or NAME/VERSION."),
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist or be empty)."),
) -> None:
    """Write a registered version as an open_clip folder (open_clip_config.json, safetensors weights, README card)
    that loads with `open_clip.create_model_and_transforms("local-dir:OUT")`, without clipforget or MLflow."""
    import tempfile

    from clipforget.io import registry
    from clipforget.io.export import write_open_clip_folder

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _fail(f"{out} exists and is not an empty folder")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            info, model_dir = registry.download_model(ref, Path(tmp))
        except ValueError as e:
            _fail(str(e))
        except Exception as e:  # MlflowException: no such model, version or alias
            _fail(f"{ref}: {_mlflow_message(e)}")
        write_open_clip_folder(model_dir, out, info.get("description") or f"# {info['name']} version {info['version']}",
                               info)
    typer.echo(f"exported {info['name']} version {info['version']} to {out}: "
               f"open_clip.create_model_and_transforms('local-dir:{out}')")


def _automation(file: Path, block_id: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(file.read_text())
    for action in data.get("actions", []):
        if action.get("block_document_id") == "BLOCK_DOCUMENT_ID":
            action["block_document_id"] = block_id
    return data


@alerts_app.command("install")
def alerts_install(
    block: str = typer.Option(..., "--block", help="The notification block as BLOCK_TYPE/NAME, e.g. "
                              "slack-webhook/clipforget-alerts (create it once: docs/CONSUMERS.md)."),
    file: Path = typer.Option(AUTOMATION_FILE, "--file", help="The automation (YAML)."),
) -> None:
    """Create the governance alert automation on the Prefect server (PREFECT_API_URL), sending through BLOCK;
    an automation of the same name is replaced."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    if "/" not in block:
        _fail("--block is BLOCK_TYPE/NAME, e.g. slack-webhook/clipforget-alerts")
    block_type, block_name = block.split("/", 1)
    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(block_name, block_type)
        except Exception as e:  # ObjectNotFound
            _fail(f"no notification block {block} on the Prefect server ({type(e).__name__})")
        automation = AutomationCore.model_validate(_automation(file, str(doc.id)))
        for old in client.read_automations_by_name(automation.name):
            client.delete_automation(old.id)
        automation_id = client.create_automation(automation)
    typer.echo(f"automation {automation.name!r} ({automation_id}): {', '.join(automation.trigger.expect)} -> "
               f"notify through {block}")


app.add_typer(models_app, name="models")
app.add_typer(alerts_app, name="alerts")
app.command("export")(export_cmd)
