"""`clipforget cache`: the cache grows by a built model per request until entries nobody used for a while are pruned."""

from __future__ import annotations

import json
import os
import time

from typer.testing import CliRunner

from clipforget.io.bank import PrototypeBank, synthesize_with_bank
from clipforget.io.cache import entries, prune
from clipforget.io.checkpoints import load_model
from clipforget.method.grid import Cell
from clipforget.method.projection import cell_text_embeddings, text_targets
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import SynthesisConfig
from flows.cli import app

DAY = 86400.0


def _age(path, days: float) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        t = time.time() - days * DAY
        os.utime(p, (t, t))


def _cache(root):
    """Two runs (one 40 days unused, one fresh), two bank files (40 days, 1 day) and a 40-day-old blob."""
    old_run, new_run = root / "runs" / "req-old", root / "runs" / "req-new"
    for run in (old_run, new_run):
        (run / "pictures").mkdir(parents=True)
        (run / "unlearned.safetensors").write_bytes(b"\0" * 4096)
        (run / "pictures" / "heatmap.png").write_bytes(b"\0" * 100)
    bank = root / "prototypes" / ("a" * 64)
    bank.mkdir(parents=True)
    (bank / "star--sketch--old.safetensors").write_bytes(b"\0" * 256)
    (bank / "star--photo--new.safetensors").write_bytes(b"\0" * 256)
    blob = root / "blobs" / "sha256" / ("b" * 64 + ".safetensors")
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"\0" * 1024)
    _age(old_run, 40)
    _age(new_run, 0)
    _age(bank / "star--sketch--old.safetensors", 40)
    _age(bank / "star--photo--new.safetensors", 1)
    _age(blob, 40)
    return old_run, new_run, bank, blob


def test_prune_removes_whole_entries_unused_for_longer_than_asked_and_nothing_else(tmp_path):
    old_run, new_run, bank, blob = _cache(tmp_path)
    assert {(e.section, e.path.name) for e in entries(tmp_path)} == {
        ("runs", "req-old"), ("runs", "req-new"), ("prototypes", "star--sketch--old.safetensors"),
        ("prototypes", "star--photo--new.safetensors"), ("blobs", blob.name)}
    # a dry run lists, removes nothing
    listed = prune(tmp_path, 30 * DAY, dry_run=True)
    assert {e.path for e in listed} == {old_run, bank / "star--sketch--old.safetensors", blob}
    assert old_run.is_dir() and blob.is_file()
    # one section only
    assert [e.path for e in prune(tmp_path, 30 * DAY, ["runs"])] == [old_run]
    assert not old_run.exists() and (new_run / "unlearned.safetensors").is_file() and blob.is_file()
    # then the rest: the run is gone whole (no half folder), the fresh entries stay
    prune(tmp_path, 30 * DAY)
    assert not blob.exists() and not (bank / "star--sketch--old.safetensors").exists()
    assert (bank / "star--photo--new.safetensors").is_file() and (new_run / "pictures" / "heatmap.png").is_file()


def test_a_bank_hit_counts_as_a_use(tmp_path):
    toy = load_model("toy", device="cpu")
    cell = Cell("star", "sketch")
    text = cell_text_embeddings(toy.model, toy.tokenizer, TemplateSet(), [cell])
    targets = dict(zip([cell], text_targets(text, [cell]), strict=True))
    tiny = SynthesisConfig(prototypes_per_cell=1, steps=2, check_every=1)
    bank = PrototypeBank(tmp_path / "prototypes")
    (path,), _ = synthesize_with_bank(toy.model, targets, [cell], tiny, toy.sha256, bank)
    _age(path, 40)
    assert [e.path for e in prune(tmp_path, 30 * DAY, dry_run=True)] == [path]
    (again,), report = synthesize_with_bank(toy.model, targets, [cell], tiny, toy.sha256, bank)
    assert again == path and report.hits == [str(cell)]
    assert prune(tmp_path, 30 * DAY) == [] and path.is_file()


def test_cli_info_and_prune(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path))
    old_run, new_run, _, _ = _cache(tmp_path)
    runner = CliRunner()
    got = runner.invoke(app, ["cache", "info", "--json"])
    assert got.exit_code == 0, got.output
    sections = json.loads(got.output)["sections"]
    assert sections["runs"]["entries"] == 2 and sections["runs"]["bytes"] == 2 * (4096 + 100)
    bad = runner.invoke(app, ["cache", "prune", "--older-than", "30", "--section", "model"])
    assert bad.exit_code == 2 and "unknown cache section(s) model" in bad.output and old_run.is_dir()
    got = runner.invoke(app, ["cache", "prune", "--older-than", "30", "--section", "runs"])
    assert got.exit_code == 0, got.output
    assert f"removed runs: {old_run}" in got.output and "in 1 entries not used for 30 days" in got.output
    assert not old_run.exists() and new_run.is_dir()
