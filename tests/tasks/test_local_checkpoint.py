"""A synthesis worker on another machine finds the checkpoint by its URI when the caller's path is not there."""

from __future__ import annotations

import pytest

from clipforget.io.checkpoints import TOY_WEIGHTS, sha256_file
from tasks.build import _local_checkpoint


def test_worker_fetches_the_uri_when_the_path_is_not_on_its_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path / "worker-cache"))
    sha = sha256_file(TOY_WEIGHTS)
    assert _local_checkpoint(str(TOY_WEIGHTS), sha) == str(TOY_WEIGHTS)  # on a shared disk: the path itself
    elsewhere = str(tmp_path / "caller-cache" / "blobs" / "toy.safetensors")  # the caller's cache, not here
    got = _local_checkpoint(elsewhere, sha, TOY_WEIGHTS.as_uri())
    assert got.startswith(str(tmp_path / "worker-cache")) and sha256_file(got) == sha
    with pytest.raises(FileNotFoundError, match="not readable"):
        _local_checkpoint(elsewhere, sha)
