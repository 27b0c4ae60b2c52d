"""Prototype synthesis: seeded and reproducible, per-cell independent of the batch, early stopping,
progress reports, and prototypes that the model recognizes as their cell."""

from __future__ import annotations

import pytest
import torch

from clipforget.method.evaluate import LabelledImages, image_features
from clipforget.method.grid import Cell
from clipforget.method.projection import text_targets
from clipforget.method.synthesis import SynthesisConfig, synthesize

CELLS = [Cell("star", "sketch"), Cell("house", "photo"), Cell("circle", "cartoon")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reproducible_and_independent_of_the_batch(toy, text_bank, precision):
    """A cell's prototypes are the same bits in a small batch with other cells as alone. Pinned to one thread and to
    each precision: with more, fp32 kernels split their reductions by batch size (measured: up to 0.02 apart after
    15 steps with 2 threads). Even with one thread a much larger batch may run other kernels (36 images against 6:
    about 1e-4 apart after 5 steps), so "the same bits" holds for batches of like size, not for any batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # 5 steps: any difference in the bits shows from the first step on (bf16 without native support, as on an
        # AVX2-only CPU, runs about 15 times slower than fp32)
        cfg = SynthesisConfig(prototypes_per_cell=2, steps=5, seed=4, precision=precision)
        targets = text_targets(text_bank, CELLS)
        a = synthesize(toy.model, targets, CELLS, cfg)
        b = synthesize(toy.model, targets, CELLS, cfg)
        assert torch.equal(a.embeddings, b.embeddings)
        alone = synthesize(toy.model, targets[1:2], CELLS[1:2], cfg)
        assert torch.equal(alone.embeddings, a.for_cell(CELLS[1]))
        other = synthesize(toy.model, targets, CELLS, SynthesisConfig(prototypes_per_cell=2, steps=5, seed=5,
                                                                       precision=precision))
        assert not torch.allclose(other.embeddings, a.embeddings, atol=1e-3)
        assert torch.allclose(a.embeddings.norm(dim=-1), torch.ones(6), atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_early_stop_progress_and_images(toy, text_bank):
    seen = []
    cfg = SynthesisConfig(prototypes_per_cell=2, steps=200, target_cosine=0.3, check_every=5, seed=1)
    p = synthesize(toy.model, text_targets(text_bank, CELLS), CELLS, cfg, progress=seen.append, return_images=True)
    assert p.reached.all() and int(p.steps_used.max()) < 200  # every image stopped at the easy target
    assert seen and {"step", "steps", "active", "mean_cosine"} <= set(seen[0])
    assert seen[-1]["active"] == 0
    assert p.images is not None and p.images.shape == (6, 64, 64, 3) and p.images.dtype == torch.uint8


def test_prototypes_are_recognized_as_their_cell(toy, prototype_bank, classifier):
    """The default settings' prototypes (the bank the mode tests use) carry their cell's class."""
    report = classifier.evaluate(prototype_bank.embeddings, prototype_bank.cells)
    assert report.accuracy >= 0.9
    assert float(prototype_bank.cosines.mean()) > 0.6


def test_prototype_images_encode_like_their_embeddings(toy, text_bank):
    """The 8-bit images handed out for inspection are the prototypes: re-encoded, they land where they were."""
    cfg = SynthesisConfig(prototypes_per_cell=2, steps=60, seed=9)
    p = synthesize(toy.model, text_targets(text_bank, CELLS), CELLS, cfg, return_images=True)
    images = LabelledImages.from_arrays(p.images, p.cells, toy.preprocess)
    again = torch.nn.functional.normalize(image_features(toy.model, images.pixels), dim=-1)
    assert float((again * p.embeddings).sum(-1).min()) > 0.9


def test_precision_follows_the_hardware(monkeypatch):
    """auto runs bf16 only where it is native; an explicit choice is kept; the bank keys the resolved one."""
    import clipforget.method.synthesis as S
    from clipforget.io.bank import settings_key

    monkeypatch.setattr(S, "cpu_has_native_bf16", lambda: False)
    assert S.resolve_precision("auto", "cpu") == "fp32"
    assert settings_key(SynthesisConfig(precision="auto"))["precision"] == "fp32"
    monkeypatch.setattr(S, "cpu_has_native_bf16", lambda: True)
    assert S.resolve_precision("auto", "cpu") == "bf16"
    assert S.resolve_precision("fp32", "cpu") == "fp32"
    assert settings_key(SynthesisConfig(precision="auto")) != settings_key(SynthesisConfig(precision="fp32"))
    import pytest

    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        SynthesisConfig(precision="fp8")


class _Timed(torch.nn.Module):
    """A model whose synthesis step is slow in one precision: what a measurement must see through."""

    def __init__(self, slow: str, seconds: float = 0.03) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)
        self.visual = torch.nn.Module()
        self.visual.image_size = 8
        self.slow, self.seconds = slow, seconds

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        import time

        bf16 = torch.is_autocast_enabled("cpu")
        time.sleep(self.seconds if (self.slow == "bf16") == bf16 else 0.0)
        return self.proj(x.mean((2, 3)))


def test_auto_measures_the_model_on_a_bf16_cpu(monkeypatch):
    """On a CPU with native bf16, `auto` keeps bf16 unless the model's own synthesis step is clearly faster in fp32
    (ViT-B-32 is, on such a CPU); the measurement is reported with the hardware, and the bank keys the decision."""
    import clipforget.method.synthesis as S
    from clipforget.io.bank import settings_key

    monkeypatch.setattr(S, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(S, "_MEASURED", {})
    slow_bf16, slow_fp32 = _Timed("bf16"), _Timed("fp32", 0.031)  # two shapes: measured apart
    slow_fp32.proj = torch.nn.Linear(3, 5)
    assert S.resolve_precision("auto", "cpu", slow_bf16) == "fp32"
    assert S.resolve_precision("auto", "cpu", slow_fp32) == "bf16"
    assert S.resolve_precision("bf16", "cpu", slow_bf16) == "bf16"  # an explicit choice is not second-guessed
    assert SynthesisConfig().resolved("cpu", slow_bf16).precision == "fp32"
    assert settings_key(SynthesisConfig().resolved("cpu", slow_bf16))["precision"] == "fp32"
    assert "_Timed" in S.hardware_summary("cpu")["measured_image_steps_per_s"]
    assert all(p.requires_grad for p in slow_bf16.parameters())  # the model is left as it was


class _Burst(torch.nn.Module):
    """A model as fast in either precision, measured while another process takes the CPU for a few of its runs."""

    def __init__(self, burst: range) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)
        self.visual = torch.nn.Module()
        self.visual.image_size = 8
        self.burst, self.calls = burst, 0

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.25 if self.calls in self.burst else 0.02)
        self.calls += 1
        return self.proj(x.mean((2, 3)))


@pytest.mark.parametrize("start", range(0, 6))
def test_auto_is_not_flipped_by_a_moment_of_load(monkeypatch, start):
    """A busy moment (3 runs in a row, wherever it falls) during the measurement leaves the choice as it is on an
    idle machine: the bank key, and so the prototypes of a request, do not depend on what else the machine did."""
    import clipforget.method.synthesis as S

    monkeypatch.setattr(S, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(S, "_MEASURED", {})
    model = _Burst(range(start, start + 3))
    assert S.resolve_precision("auto", "cpu", model) == "bf16"
    assert model.calls == 2 * (S.MEASURED_RUNS + 1)


def test_progress_starts_at_once_and_ends_done(toy, text_bank):
    seen = []
    cfg = SynthesisConfig(prototypes_per_cell=2, steps=20, target_cosine=0.3, check_every=5, seed=1, precision="fp32")
    synthesize(toy.model, text_targets(text_bank, CELLS), CELLS, cfg, progress=seen.append)
    assert seen[0]["done"] == 0 and seen[0]["step"] == 0  # a first line before any step
    assert seen[-1]["done"] == seen[-1]["total"] == 6
    from clipforget.method.synthesis import format_progress

    line = format_progress(seen[-1])
    assert "6/6 done" in line and "mean cosine" in line and "ETA" in line


def test_cells_are_banked_as_they_finish_and_reused(toy, text_bank, tmp_path):
    """A second request synthesizes nothing the bank holds; each finished cell is its own whole file."""
    from clipforget.io.bank import PrototypeBank, synthesize_with_bank

    bank = PrototypeBank(tmp_path)
    cfg = SynthesisConfig(prototypes_per_cell=2, steps=10, seed=2, precision="fp32", batch_size=2)
    targets = dict(zip(CELLS, text_targets(text_bank, CELLS), strict=True))
    banked: list[int] = []
    original = bank.put
    bank.put = lambda sha, p, images=False: banked.append(len(set(p.cells))) or original(sha, p, images)
    paths, first = synthesize_with_bank(toy.model, targets, CELLS, cfg, "0" * 64, bank)
    assert sorted(first.synthesized) == sorted(map(str, CELLS)) and len(banked) >= 2  # banked in groups, not at the end
    _, again = synthesize_with_bank(toy.model, targets, CELLS[:2], cfg, "0" * 64, bank)
    assert again.synthesized == [] and len(again.hits) == 2
    assert all(p.is_file() for p in paths) and not list(tmp_path.rglob("*.tmp*"))


def test_blocks_of_one_cell_share_a_batch_and_are_banked_under_their_own_keys(toy, text_bank, tmp_path):
    """The held-out sets come in blocks of images (a forgotten cell needs a second block). Blocks synthesized in one
    batch give each block's own images, the same bits as the block alone (one thread), each banked under its block's
    key; a later request that needs only the first block finds it."""
    from dataclasses import replace

    from clipforget.io.bank import PrototypeBank, synthesize_blocks_with_bank

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        block0 = SynthesisConfig(prototypes_per_cell=2, steps=5, seed=3, precision="fp32")
        block1 = replace(block0, first_index=2)
        targets = dict(zip(CELLS, text_targets(text_bank, CELLS), strict=True))
        bank = PrototypeBank(tmp_path)
        handed: list[tuple[int, int]] = []
        original = bank.put
        bank.put = lambda sha, p, images=False: handed.append((p.config.first_index, len(p.cells))) or original(
            sha, p, images)
        paths, report = synthesize_blocks_with_bank(toy.model, targets, [(block0, CELLS), (block1, CELLS[:1])],
                                                    "0" * 64, bank)
        assert sorted(report.synthesized) == sorted([*map(str, CELLS), str(CELLS[0])]) and report.hits == []
        assert {start for start, _ in handed} == {0, 2} and sum(n for _, n in handed) == 4 * 2
        assert [len(p) for p in paths] == [3, 1] and paths[1][0] != paths[0][0]
        from clipforget.io.bank import load_prototypes

        together = load_prototypes(paths[1], block1).embeddings
        alone = synthesize(toy.model, text_targets(text_bank, CELLS[:1]), CELLS[:1], block1).embeddings
        assert torch.equal(together, alone)  # block 1 is images 2-3 of the cell, as if synthesized on its own
        first = synthesize(toy.model, text_targets(text_bank, CELLS[:1]), CELLS[:1], block0).embeddings
        assert torch.equal(load_prototypes(paths[0][:1], block0).embeddings, first)
        assert not torch.allclose(first, alone, atol=1e-3)  # other images, not the first block again
        _, again = synthesize_blocks_with_bank(toy.model, targets, [(block0, CELLS[:2])], "0" * 64, bank)
        assert again.synthesized == [] and len(again.hits) == 2
        for other in (replace(block1, steps=6), replace(block1, lr=0.1), replace(block1, target_cosine=0.5)):
            with pytest.raises(ValueError, match="may differ only in seed, augment"):  # not one batch: refused
                synthesize_blocks_with_bank(toy.model, targets, [(block0, CELLS), (other, CELLS[:1])], "0" * 64, bank)
    finally:
        torch.set_num_threads(threads)


def test_a_requests_projection_and_heldout_prototypes_share_a_batch_and_keep_their_own_bits(toy, text_bank, tmp_path):
    """A cold data-free request needs the projection's prototypes and the gate's held-out ones, which differ in seed,
    augmentation schedule, count and whether images are kept. Synthesized as one batch, each set has the images it has
    alone, banked under its own key with or without images. (One image per batch, one thread: the same bits. Kernels
    differ between batch sizes, so in larger batches the bits, and with them an image's stopping step, depend on how
    many images share the batch; the test checks each image's own seed, augmentation and key.)"""
    from clipforget.io.bank import PrototypeBank, load_prototypes, synthesize_blocks_with_bank
    from clipforget.runner import heldout_blocks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        projection = SynthesisConfig(prototypes_per_cell=2, steps=5, seed=3, precision="fp32", batch_size=1)
        (held0, cells0), (held1, cells1) = heldout_blocks(projection, {CELLS[0]: 20, **dict.fromkeys(CELLS[1:], 10)},
                                                          CELLS)
        assert held0.seed != projection.seed and held0.augment_decay != projection.augment_decay
        targets = dict(zip(CELLS, text_targets(text_bank, CELLS), strict=True))
        bank = PrototypeBank(tmp_path)
        paths, report = synthesize_blocks_with_bank(
            toy.model, targets, [(projection, CELLS), (held0, cells0), (held1, cells1)], "0" * 64, bank,
            [False, True, True])
        assert len(report.synthesized) == len(CELLS) * 2 + len(cells1) and report.hits == []
        proj = load_prototypes(paths[0], projection)
        assert proj.images is None and len(proj.cells) == 2 * len(CELLS)  # the projection's files keep no images
        held = load_prototypes(paths[1], held0)
        assert held.images is not None and len(held.cells) == 10 * len(CELLS)
        alone = synthesize(toy.model, text_targets(text_bank, CELLS), CELLS, projection)
        assert torch.equal(proj.embeddings, alone.embeddings)
        held_alone = synthesize(toy.model, text_targets(text_bank, CELLS), CELLS, held0, return_images=True)
        assert torch.equal(held.images, held_alone.images)  # what the gate judges: the images, re-encoded there
        # the stored embeddings are encoded with the images finished at the same time, a batch of another size
        assert torch.allclose(held.embeddings, held_alone.embeddings, atol=1e-4)
        second = synthesize(toy.model, text_targets(text_bank, cells1), cells1, held1).embeddings
        assert torch.equal(load_prototypes(paths[2], held1).embeddings, second)
        # the validation step of the same request then finds every held-out block in the bank
        _, again = synthesize_blocks_with_bank(toy.model, targets, [(held0, cells0), (held1, cells1)], "0" * 64, bank,
                                               True)
        assert again.synthesized == [] and len(again.hits) == len(cells0) + len(cells1)
        with pytest.raises(ValueError, match="agree on with_images"):
            synthesize_blocks_with_bank(toy.model, targets, [(held0, cells0), (held0, cells0)], "0" * 64, bank,
                                        [True, False])
    finally:
        torch.set_num_threads(threads)


def test_feature_statistics_prior_keeps_each_image_independent_and_keys_only_when_on(toy, text_bank):
    """`bn_prior` (docs/GATE.md: measured, not the default) pulls each image's batch-norm inputs toward the running
    statistics: it changes the prototypes, still per image (a cell alone gives the same bits), and a prototype
    synthesized without it keys in the bank as before the setting existed."""
    from clipforget.io.bank import settings_key

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = SynthesisConfig(prototypes_per_cell=2, steps=5, seed=4, precision="fp32")
        cfg = SynthesisConfig(prototypes_per_cell=2, steps=5, seed=4, precision="fp32", bn_prior=0.5)
        targets = text_targets(text_bank, CELLS)
        with_prior = synthesize(toy.model, targets, CELLS, cfg)
        alone = synthesize(toy.model, targets[1:2], CELLS[1:2], cfg)
        assert torch.equal(alone.embeddings, with_prior.for_cell(CELLS[1]))
        assert not torch.allclose(with_prior.embeddings, synthesize(toy.model, targets, CELLS, base).embeddings,
                                  atol=1e-4)
    finally:
        torch.set_num_threads(threads)
    assert "bn_prior" not in settings_key(base)
    assert settings_key(cfg)["bn_prior"] == 0.5
