"""No load path unpickles: every loader of the project is handed a file whose pickle would run code, and the
code never runs (a marker file would appear); the source holds no pickle-based loading at all."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates the marker file: proof that a loader unpickled an object."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil(path: Path, marker: Path) -> Path:
    """A torch-format file (a zip holding a pickle) whose unpickling runs code."""
    torch.save({"state_dict": {"visual.proj": Payload(marker)}, "embeddings": Payload(marker)}, path)
    return path


def _load_model(path: Path) -> None:
    from clipforget.io.checkpoints import load_model

    load_model("toy", checkpoint=path)


def _bank(path: Path) -> None:
    from clipforget.io.bank import load_prototypes
    from clipforget.method.synthesis import SynthesisConfig

    load_prototypes([path], SynthesisConfig())


def _text(path: Path) -> None:
    from clipforget.steps import load_text

    load_text(path)


def _projection(path: Path) -> None:
    from clipforget.steps import load_projection

    load_projection(path)


def _pyfunc(path: Path) -> None:
    import json

    from clipforget.io.checkpoints import TOY_CONFIG
    from clipforget.io.pyfunc_model import ZeroShotCLIP

    labels = path.parent / "labels.json"
    labels.write_text(json.dumps({"classes": ["star"]}))
    ZeroShotCLIP().load_context(SimpleNamespace(artifacts={"open_clip_config": str(TOY_CONFIG), "weights": str(path),
                                                           "classifier": str(path), "labels": str(labels)}))


def _fetch_and_load(path: Path) -> None:
    from clipforget.io.checkpoints import load_model
    from clipforget.io.storage import fetch

    got = fetch(path, cache=path.parent / "cache")
    load_model("toy", checkpoint=got.path)


LOADERS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "models.load_model": (_load_model, (".pt", ".pth", ".bin", ".ckpt", "", ".safetensors")),
    "storage.fetch + load_model": (_fetch_and_load, (".pt", ".safetensors")),
    "bank.load_prototypes": (_bank, (".safetensors",)),
    "steps.load_text": (_text, (".safetensors",)),
    "steps.load_projection": (_projection, (".safetensors",)),
    "pyfunc ZeroShotCLIP.load_context": (_pyfunc, (".safetensors", ".pt")),
}
CASES = [(name, suffix) for name, (_, suffixes) in LOADERS.items() for suffix in suffixes]


@pytest.mark.parametrize("loader,suffix", CASES, ids=[f"{n} {s or '(no suffix)'}" for n, s in CASES])
def test_a_malicious_pickle_never_runs(loader, suffix, tmp_path, checked):
    marker = tmp_path / "pwned"
    path = evil(tmp_path / f"weights{suffix}", marker)
    with pytest.raises(Exception) as err:
        LOADERS[loader][0](path)
    assert not marker.exists(), f"{loader} unpickled {path.name}: the payload ran"
    assert "pwned" not in str(err.value)
    checked(f"{loader} refuses a pickle named {path.name} ({type(err.value).__name__}); the payload did not run")


PICKLING = [
    (re.compile(r"^\s*(import|from)\s+(pickle|cPickle|cloudpickle|dill|joblib)\b", re.M), "imports a pickle module"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load with allow_pickle=True"),
    (re.compile(r"(mlflow\.pyfunc\.log_model|log_model)\([^)]*python_model\s*=\s*[A-Z]\w*\("), "a pickled python_model"),
]


def test_the_source_loads_nothing_by_pickle(checked):
    files = [p for d in ("clipforget", "tasks", "flows", "bench") for p in (REPO / d).rglob("*.py")]
    found = [f"{p.relative_to(REPO)}: {why}" for p in files for rx, why in PICKLING if rx.search(p.read_text())]
    assert len(files) > 30 and found == []
    checked(f"{len(files)} source files: no pickle import, torch.load only with weights_only=True, no allow_pickle")
