"""Folding is exact: the folded model's unnormalized image features are P times the original's, for
ViT, ModifiedResNet and timm towers, and survive a save/load as an ordinary checkpoint."""

import open_clip
import pytest
import torch

from clipforget.io.checkpoints import load_model, save_checkpoint
from clipforget.method.fold import final_map, fold_projection
from clipforget.method.nullspace import hard_projection


def _random_projection(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(d, 6, generator=g, dtype=torch.float64)
    R = torch.randn(d, 40, generator=g, dtype=torch.float64)
    return hard_projection(F, R, energy=1.0, retain_energy=0.8).P


@pytest.mark.parametrize("arch,where", [
    ("ViT-B-32", "visual.proj"),
    ("RN50", "visual.attnpool.c_proj"),
    ("convnext_tiny", "visual.head.proj"),
])
def test_fold_is_exact_and_survives_save_load(tmp_path, arch, where):
    torch.manual_seed(0)
    model = open_clip.create_model(arch).eval()
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(["a photo of a dog", "a sketch of a house"])
    with torch.no_grad():
        h, t = model.encode_image(x), model.encode_text(tokens)
    P = _random_projection(h.shape[1], 2)

    assert final_map(model).name == where
    fold_projection(model, P)
    with torch.no_grad():
        h2, t2 = model.encode_image(x), model.encode_text(tokens)
    expected = (P @ h.double().T).T.float()
    assert (h2 - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(t2, t)  # the text tower is untouched

    path = tmp_path / "folded.safetensors"
    save_checkpoint(model.state_dict(), path)
    reloaded = load_model(arch, checkpoint=path, device="cpu")
    with torch.no_grad():
        h3 = reloaded.model.encode_image(x)
    assert (h3 - h2).abs().max() <= 1e-5 * h2.abs().max()
    assert len(reloaded.sha256) == 64


def test_fold_rejects_wrong_dimension():
    model = open_clip.create_model("RN50")
    with pytest.raises(ValueError, match="outputs 1024 dims"):
        fold_projection(model, torch.eye(512, dtype=torch.float64))
