"""A short training smoke test: the recipe runs end to end and writes a loadable toy checkpoint.
(The shipped weights come from the full run recorded in clipforget/toyworld/weights/PROVENANCE.md.)"""

import math

import torch

from clipforget.io.checkpoints import load_model
from clipforget.toyworld.train import TrainConfig, multi_positive_loss, train_toy_model


def test_training_smoke(tmp_path):
    out = tmp_path / "toy.safetensors"
    lines = []
    summary = train_toy_model(out, TrainConfig(steps=3, batch_size=16, per_cell=2, warmup=1), progress=lines.append)
    assert out.is_file() and len(summary["sha256"]) == 64 and summary["images"] == 80
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines if line.startswith("step")]
    assert losses and all(math.isfinite(v) for v in losses)
    model = load_model("toy", checkpoint=out).model
    # the checkpoint holds what training produced, and loads into the toy architecture tensor for tensor (the loader
    # casts to float32 whatever the file holds, so a dtype check here could not fail)
    from safetensors.torch import load_file

    saved = load_file(str(out))
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(state[k], saved[k].float()) for k in saved)


def test_multi_positive_loss_prefers_matching_pairs():
    positive = torch.eye(4, 6, dtype=torch.bool)
    good = torch.where(positive, 10.0, 0.0)
    bad = torch.where(positive, 0.0, 10.0)
    assert multi_positive_loss(good, positive) < multi_positive_loss(bad, positive)
