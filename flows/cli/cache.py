"""`clipforget cache info|prune`: what the local cache holds, and removing what has not been used for a while."""

from __future__ import annotations

import json
import time

import typer

from flows.cli.common import app, fail

cache_app = typer.Typer(no_args_is_help=True, help="The local cache (CLIPFORGET_CACHE): what it holds, and pruning "
                        "entries not used for a while.")
app.add_typer(cache_app, name="cache")

SECTION = typer.Option(None, "--section", help="Only this section (repeatable): runs, prototypes, fit, projections, "
                       "text, pictures, governance, blobs, trees. Default: every section.")


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _age(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    days = (now - t) / 86400
    return f"{days:.1f} d" if days >= 1 else f"{(now - t) / 3600:.1f} h"


@cache_app.command("info")
def info(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Entries, size and last use per section of the cache."""
    from clipforget.io.cache import SECTIONS, usage
    from clipforget.io.storage import cache_root

    root = cache_root()
    got = usage(root)
    if as_json:
        typer.echo(json.dumps({"root": str(root), "sections": got}, indent=2))
        return
    now = time.time()
    typer.echo(f"cache {root}")
    typer.echo(f"{'section':12s} {'entries':>8s} {'size':>11s} {'oldest use':>11s} {'newest use':>11s}  holds")
    for name, s in got.items():
        typer.echo(f"{name:12s} {s['entries']:8d} {_size(s['bytes']):>11s} {_age(s['oldest'], now):>11s} "
                   f"{_age(s['newest'], now):>11s}  {SECTIONS[name][0]}")
    typer.echo(f"{'total':12s} {sum(s['entries'] for s in got.values()):8d} "
               f"{_size(sum(s['bytes'] for s in got.values())):>11s}")


@cache_app.command("prune")
def prune_cmd(
    older_than: float = typer.Option(..., "--older-than", min=0, help="Remove entries not used for this many days "
                                     "(a cache hit counts as a use)."),
    section: list[str] = SECTION,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
) -> None:
    """Remove cache entries not used for --older-than days. Nothing in the cache is the only copy: a registered model
    is in the MLflow registry, and prototypes, projections and fetched files are made or fetched again when needed.
    Run it when no request is running on this cache."""
    from clipforget.io.cache import prune
    from clipforget.io.storage import cache_root

    try:
        gone = prune(cache_root(), older_than * 86400, section or None, dry_run=dry_run)
    except ValueError as e:
        fail(e)
    for e in gone:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {e.section}: {e.path} ({_size(e.bytes)})")
    total = sum(e.bytes for e in gone)
    typer.echo(f"{'would free' if dry_run else 'freed'} {_size(total)} in {len(gone)} entries "
               f"not used for {older_than:g} days")
