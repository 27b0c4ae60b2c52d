"""The prototype bank: per-cell files keyed by checkpoint + cell + settings, reused across requests."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from clipforget.io.bank import PrototypeBank, cell_key, load_prototypes, synthesize_with_bank
from clipforget.io.checkpoints import load_model
from clipforget.method.grid import Cell
from clipforget.method.projection import cell_text_embeddings, text_targets
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import SynthesisConfig

TINY = SynthesisConfig(prototypes_per_cell=2, steps=6, check_every=3)


def test_bank_synthesizes_only_missing_cells_and_matches_a_fresh_batch(tmp_path):
    # fp32: a cell's prototypes are the same whatever shared its batch on every CPU measured (MKL's reproducible path,
    # clipforget/__init__.py); bf16 on an AMX CPU is not (oneDNN's kernels: 0.015 apart after 6 steps; docs/PIPELINE.md)
    cfg = replace(TINY, precision="fp32")
    toy = load_model("toy", device="cpu")
    cells = [Cell("star", "sketch"), Cell("heart", "photo"), Cell("tree", "cartoon")]
    text = cell_text_embeddings(toy.model, toy.tokenizer, TemplateSet(), cells)
    targets = dict(zip(cells, text_targets(text, cells), strict=True))
    bank = PrototypeBank(tmp_path)
    _, first = synthesize_with_bank(toy.model, targets, cells[:2], cfg, toy.sha256, bank)
    assert first.hits == [] and first.synthesized == ["star/sketch", "heart/photo"]
    paths, second = synthesize_with_bank(toy.model, targets, cells, cfg, toy.sha256, bank)
    assert second.hits == ["star/sketch", "heart/photo"] and second.synthesized == ["tree/cartoon"]
    protos = load_prototypes(paths, cfg)
    assert protos.cells == [c for c in cells for _ in range(2)] and protos.embeddings.shape == (6, 128)
    # a cell's prototypes do not depend on its batch: the banked ones equal a batch of that cell alone
    alone, _ = synthesize_with_bank(toy.model, targets, cells[:1], cfg, toy.sha256, PrototypeBank(tmp_path / "b"))
    torch.testing.assert_close(load_prototypes(alone, cfg).embeddings, protos.embeddings[:2], atol=2e-3, rtol=0)


def test_keys_change_with_checkpoint_cell_settings_and_seed():
    c = Cell("star", "sketch")
    base = cell_key("a" * 64, c, TINY)
    assert base == cell_key("a" * 64, c, SynthesisConfig(prototypes_per_cell=2, steps=6, check_every=3, batch_size=7))
    others = {cell_key("b" * 64, c, TINY), cell_key("a" * 64, Cell("star", "photo"), TINY),
              cell_key("a" * 64, c, SynthesisConfig(prototypes_per_cell=2, steps=7, check_every=3)),
              cell_key("a" * 64, c, SynthesisConfig(prototypes_per_cell=2, steps=6, check_every=3, seed=1)),
              cell_key("a" * 64, c, TINY, with_images=True)}
    assert base not in others and len(others) == 5


def test_sized_heldout_evidence_comes_in_blocks_the_bank_shares_across_requests(tmp_path):
    """Data-free evidence sized per request (clipforget.gate.verdict.evidence_per_cell): a cell gets whole blocks of
    10 held-out prototypes; another request that needs more of a cell synthesizes only the blocks the bank lacks,
    and a plain count that is a multiple of the block is the same images."""
    from collections import Counter

    from clipforget.method.grid import resolve_grid
    from clipforget.runner import heldout_images

    toy = load_model("toy", device="cpu")
    grid = resolve_grid("toy")
    star, heart, tree = Cell("star", "sketch"), Cell("heart", "photo"), Cell("tree", "cartoon")
    bank = PrototypeBank(tmp_path)

    def files() -> set:
        return set(tmp_path.rglob("*.safetensors"))

    first = heldout_images(toy, grid, TINY, {star: 19, heart: 10, tree: 20}, bank=bank)
    assert Counter(first.cells) == {star: 20, heart: 10, tree: 20}
    assert len(files()) == 5  # block 0 of three cells, block 1 of two
    before = files()
    second = heldout_images(toy, grid, TINY, {heart: 20}, bank=bank)
    assert Counter(second.cells) == {heart: 20} and len(files() - before) == 1  # only heart's block 1 is new
    # heart's first block is the same images in both requests
    torch.testing.assert_close(second.pixels[:10], first.pixels[[i for i, c in enumerate(first.cells) if c == heart]])
    # and the two blocks are the first 20 images of the cell's held-out sequence (to the rounding of batched kernels)
    from clipforget.method.evaluate import LabelledImages
    from clipforget.method.projection import cell_text_embeddings, text_targets
    from clipforget.method.prompts import TemplateSet
    from clipforget.method.synthesis import synthesize
    from clipforget.runner import heldout_config

    text = cell_text_embeddings(toy.model, toy.tokenizer, TemplateSet(), [heart])
    whole = synthesize(toy.model, text_targets(text, [heart]), [heart], heldout_config(TINY, 20), return_images=True)
    assert whole.images is not None
    diff = (second.pixels - LabelledImages.from_arrays(whole.images, whole.cells, toy.preprocess).pixels).abs()
    # the same images: at most a level or two of 8-bit rounding on a few pixels (other seeds differ everywhere)
    assert diff.mean() < 1e-3 and (diff < 0.02).float().mean() > 0.995, (float(diff.mean()), float(diff.max()))


def test_heldout_prototypes_come_from_another_generator_than_the_projections():
    """The gate's evidence is never the projection's own images: another seed family and augmentation that fades
    with the step size (docs/GATE.md), while steps, precision and target follow the request's settings."""
    from clipforget.runner import HELDOUT_AUGMENT_DECAY, heldout_blocks

    policy = SynthesisConfig(steps=90, precision="fp32", target_cosine=0.7)
    cells = [Cell("star", "sketch")]
    (block0, _), (block1, _) = heldout_blocks(policy, {cells[0]: 20}, cells)
    for b, cfg in enumerate((block0, block1)):
        assert (cfg.steps, cfg.precision, cfg.target_cosine) == (90, "fp32", 0.7)
        assert cfg.augment_decay == HELDOUT_AUGMENT_DECAY != policy.augment_decay
        assert cfg.seed != policy.seed and cfg.first_index == 10 * b
        assert cell_key("a" * 64, cells[0], cfg) != cell_key("a" * 64, cells[0], policy)


def test_the_precision_measurement_is_kept_per_checkpoint_and_machine(tmp_path, monkeypatch):
    """On a CPU with native bf16, `auto` measures the model once on a machine: a later request (a new process)
    decides the same way from the cache without loading the model (ViT-B-32: 8.5 s a command); an unreadable
    record is measured again and replaced."""
    import clipforget.method.synthesis as S
    import flows.fanout as fanout
    import tasks.common

    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path))
    monkeypatch.setattr(S, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(S, "_MEASURED", {})
    toy = load_model("toy")
    loads = []
    monkeypatch.setattr(tasks.common, "loaded_model", lambda *a: loads.append(a) or toy)
    first = fanout._decided({"precision": "auto"}, "toy", "ckpt", "a" * 64)
    assert first["precision"] in ("fp32", "bf16") and len(loads) == 1
    kept = list((tmp_path / "precision").glob("*.json"))
    assert len(kept) == 1

    monkeypatch.setattr(S, "_MEASURED", {})  # as in a new process
    monkeypatch.setattr(S, "measured_cpu_precision", lambda model: pytest.fail("measured again"))
    assert fanout._decided({"precision": "auto"}, "toy", "ckpt", "a" * 64) == first
    assert len(loads) == 1  # the model was not loaded either
    assert "fp32" in S.hardware_summary("cpu")["measured_image_steps_per_s"]  # reported as measured
    assert fanout._decided({"precision": "fp32"}, "toy", "ckpt", "a" * 64)["precision"] == "fp32"

    monkeypatch.undo()
    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path))
    monkeypatch.setattr(S, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(S, "_MEASURED", {})
    monkeypatch.setattr(tasks.common, "loaded_model", lambda *a: loads.append(a) or toy)
    kept[0].write_text("{not json")
    assert fanout._decided({"precision": "auto"}, "toy", "ckpt", "a" * 64)["precision"] in ("fp32", "bf16")
    assert len(loads) == 2 and json.loads(kept[0].read_text())["choice"] in ("fp32", "bf16")
    other = fanout._decided({"precision": "auto"}, "toy", "ckpt", "b" * 64)  # another checkpoint: its own record
    assert len(loads) == 3 and len(list((tmp_path / "precision").glob("*.json"))) == 2 and other["precision"]
