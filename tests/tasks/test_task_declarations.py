"""What the tasks declare on their decorators (retries, caching, the gpu tag) and the pieces they rely on."""

from __future__ import annotations

import pytest

from clipforget.gate.verdict import Thresholds
from clipforget.governance.request import SynthesisSettings, UnlearnRequest
from clipforget.io import storage
from clipforget.io.registry import parse_model_ref
from tasks.build import build_nullspace, generate_prompts, synthesize_chunk
from tasks.common import file_cache_key, retry_if_transient
from tasks.fetch import fetch_checkpoint, fetch_eval_data
from tasks.register import find_registered, register_model


def test_retries_caching_and_tags_are_declared():
    assert fetch_checkpoint.retries == 2 and fetch_eval_data.retries == 2
    assert fetch_checkpoint.retry_condition_fn is retry_if_transient
    assert register_model.retries == 2 and find_registered.retries == 2
    assert "gpu" in synthesize_chunk.tags
    assert generate_prompts.cache_key_fn is not None and build_nullspace.cache_key_fn is not None


def test_only_transient_failures_are_retried():
    from botocore.exceptions import EndpointConnectionError
    from prefect.states import Failed

    assert retry_if_transient(None, None, Failed(data=EndpointConnectionError(endpoint_url="http://x")))
    assert retry_if_transient(None, None, Failed(data=storage.TransientError("gave up")))
    assert not retry_if_transient(None, None, Failed(data=storage.ChecksumMismatch("bad bytes")))
    assert not retry_if_transient(None, None, Failed(data=storage.NotFoundError("gone")))


def test_file_cache_key_names_the_output_and_only_while_it_exists(tmp_path):
    out = tmp_path / "text" / "abc.safetensors"
    key = file_cache_key(lambda params: out)
    assert key(None, {}) is None
    out.parent.mkdir()
    out.write_bytes(b"x")
    import hashlib

    assert key(None, {}) == hashlib.sha256(str(out.resolve()).encode()).hexdigest()  # the key names the output
    other = tmp_path / "elsewhere" / "abc.safetensors"
    other.parent.mkdir()
    other.write_bytes(b"x")
    assert file_cache_key(lambda params: other)(None, {}) != key(None, {})  # another cache root, another key


def test_request_defaults_and_identity():
    a = UnlearnRequest(mode="global", classes=["star"])
    b = UnlearnRequest(mode="global", classes=["star"], requested_by="someone else", promote=True)
    c = UnlearnRequest(mode="global", classes=["heart"])
    assert a.request_id == b.request_id != c.request_id and a.request_id.startswith("req-")
    # a request keeps its id across releases: a field added later and left unset digests as before it existed
    # (this id was issued before `fit_uri` and `thresholds.max_probe_excess`); setting it makes another request
    assert a.request_id == "req-5e9281ee8d822c3e"
    probed = UnlearnRequest(mode="global", classes=["star"], thresholds=Thresholds(max_probe_excess=0.1))
    assert probed.request_id != a.request_id and probed.policy().policy_digest() != a.policy().policy_digest()
    # held-out prototypes sized per request (the unset default) build the same model as the former fixed 20 per cell:
    # the same id; another fixed count is another request
    assert a.synthesis.heldout_per_cell is None
    fixed = {n: UnlearnRequest(mode="global", classes=["star"], synthesis=SynthesisSettings(heldout_per_cell=n))
             for n in (20, 30)}
    assert fixed[20].request_id == a.request_id != fixed[30].request_id
    assert a.registered_name == "clipforget-toy" and a.synthesis.config("toy").target_cosine == 0.77
    with pytest.raises(ValueError, match="request_id"):
        UnlearnRequest(mode="global", classes=["star"], request_id="no spaces")
    with pytest.raises(ValueError, match="a gate needs a check"):
        Thresholds(mode_criteria=False)
    with pytest.raises(ValueError, match="sha256"):
        UnlearnRequest(mode="global", classes=["star"], checkpoint_sha256="abc")


def test_model_references():
    assert parse_model_ref("models:/toy@champion") == ("toy", "champion", None)
    assert parse_model_ref("toy/3") == ("toy", None, "3")
    assert parse_model_ref("toy") == ("toy", None, None)
