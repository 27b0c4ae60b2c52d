"""Folding is exact: the folded model's unnormalized image features are P times the original's, for
ViT, ModifiedResNet and timm towers, and survive a save/load as an ordinary checkpoint."""

import copy

import open_clip
import pytest
import torch

from clipforget.io.checkpoints import load_model, save_checkpoint
from clipforget.method.fold import final_map, fold_projection, folded_map
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
    base = copy.deepcopy(model)
    fold_projection(model, P)
    with torch.no_grad():
        h2, t2 = model.encode_image(x), model.encode_text(tokens)
    expected = (P @ h.double().T).T.float()
    assert (h2 - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(t2, t)  # the text tower is untouched

    # the gate's shortcut: the folded checkpoint, read back as a fold of its base, gives the forward pass's features
    fold = folded_map(base, model.state_dict())
    assert fold is not None
    assert (fold.apply(h) - h2).abs().max() <= 1e-4 * h2.abs().max()

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


def test_folded_map_accepts_only_a_fold_of_the_base(toy):
    """Any change outside the last linear map, or a map outside the base map's row space, is not a fold: the gate
    then runs the candidate through its image tower instead of trusting the shortcut."""
    P = _random_projection(128, 3)
    folded = copy.deepcopy(toy.model)
    fold_projection(folded, P)
    state = {k: v.clone() for k, v in folded.state_dict().items()}
    fold = folded_map(toy.model, state)
    assert fold is not None and (fold.P - P).abs().max() < 1e-5

    conv = next(k for k in state if k.startswith("visual.conv1"))
    tampered = {**state, conv: state[conv] + 1e-6}
    assert folded_map(toy.model, tampered) is None  # one weight elsewhere in the tower
    weight = state["visual.attnpool.c_proj.weight"].clone()
    weight[0, 0] += 1e-3
    assert folded_map(toy.model, {**state, "visual.attnpool.c_proj.weight": weight}) is None  # not P·M
    assert folded_map(toy.model, {k: v for k, v in state.items() if k != conv}) is None  # a tensor missing
    half = {**state, "visual.attnpool.c_proj.weight": state["visual.attnpool.c_proj.weight"].half()}
    assert folded_map(toy.model, half) is None  # another dtype
