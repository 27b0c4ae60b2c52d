"""S3 faults through a fault-injecting proxy in front of the moto server: 500/503 answers, a write that succeeded
but whose answer was lost, and stalls. Each operation is retried with backoff and completes, or fails with one
clear line; a rerun completes; nothing is lost, doubled or left half-written in the cache or the ledger."""

from __future__ import annotations

import time

import pytest
from faultproxy import Fault, FaultProxy, always, first

from clipforget.governance.ledger import Ledger
from clipforget.io.storage import TransientError, fetch, fetch_tree


@pytest.fixture(scope="module")
def proxy(servers):
    with FaultProxy(servers["endpoint"]) as p:
        yield p


@pytest.fixture
def via_proxy(proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("CLIPFORGET_S3_TIMEOUT", "1")
    return proxy


def _incoming(cache):
    d = cache / "blobs" / "incoming"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.mark.parametrize("status", [500, 503])
def test_checkpoint_fetch_survives_server_errors_on_the_first_calls(servers, via_proxy, tmp_path, status, checked):
    seen = via_proxy.plan(first(3, Fault("status", status)))
    got = fetch(servers["checkpoint"], cache=tmp_path, backoff=0.05)
    assert got.sha256 == servers["sha256"] and not got.cached
    assert seen.count("status") == 3 and seen.count("pass") >= 2  # retried, then head + get went through
    assert _incoming(tmp_path) == []
    checked(f"3 x HTTP {status} then normal: fetched after retries, sha256 verified, no temp file left")


def test_checkpoint_fetch_gives_up_with_one_clear_line_and_a_rerun_completes(servers, via_proxy, tmp_path, checked):
    seen = via_proxy.plan(always(Fault("status", 503)))
    t0 = time.monotonic()
    with pytest.raises(TransientError) as err:
        fetch(servers["checkpoint"], cache=tmp_path, attempts=3, backoff=0.05)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{servers['checkpoint']}: head: gave up after 3 attempts")
    assert seen.count("status") >= 3 and time.monotonic() - t0 < 30
    assert not (tmp_path / "blobs" / "sha256").exists() and _incoming(tmp_path) == []
    via_proxy.plan(always(Fault()))
    assert fetch(servers["checkpoint"], cache=tmp_path, backoff=0.05).sha256 == servers["sha256"]
    checked(f"503 on every call: one line after {seen.count()} calls ({message[:70]}...); nothing cached; "
            "the rerun fetched and verified it", faults_survived=1)


def test_stalled_calls_time_out_and_are_retried(servers, via_proxy, tmp_path, checked):
    seen = via_proxy.plan(first(2, Fault("stall", seconds=3.0)))
    got = fetch(servers["checkpoint"], cache=tmp_path, backoff=0.05)
    assert got.sha256 == servers["sha256"] and seen.count("stall") == 2
    checked("the first 2 calls stall 3 s (client timeout 1 s): retried, fetched and verified", faults_survived=1)


def test_a_stall_on_every_call_fails_clearly(servers, via_proxy, tmp_path, checked):
    via_proxy.plan(always(Fault("stall", seconds=2.0)))
    with pytest.raises(TransientError, match=r"gave up after 2 attempts: .*(Timeout|timed out)"):
        fetch(servers["checkpoint"], cache=tmp_path, attempts=2, backoff=0.05)
    via_proxy.plan(always(Fault()))
    assert _incoming(tmp_path) == [] and not (tmp_path / "blobs" / "sha256").exists()
    checked("every call stalls: a one-line timeout error naming the object, nothing cached", faults_survived=1)


def test_evaluation_prefix_mirror_survives_errors_and_is_complete(servers, via_proxy, tmp_path, checked):
    client, bucket = servers["client"], servers["bucket"]
    for i in range(6):
        client.put_object(Bucket=bucket, Key=f"faults-eval/photo/star/{i}.png", Body=f"image {i}".encode())
    seen = via_proxy.plan(lambda method, path, n: Fault("status", 500) if n % 3 == 1 else Fault())
    tree = fetch_tree(f"s3://{bucket}/faults-eval/", cache=tmp_path, backoff=0.05)
    assert sorted(p.name for p in (tree / "photo" / "star").iterdir()) == [f"{i}.png" for i in range(6)]
    assert all((tree / "photo" / "star" / f"{i}.png").read_bytes() == f"image {i}".encode() for i in range(6))
    assert (tree / ".complete").is_file() and not list(tree.parent.glob(".*.partial"))
    assert seen.count("status") >= 2
    checked(f"every third call answers 500 ({seen.count('status')} injected): the mirror is complete and "
            "byte-identical, no partial folder", faults_survived=1)


def test_ledger_append_whose_answer_is_lost_is_not_doubled(servers, via_proxy, checked):
    """The conditional PUT reached S3 but the client heard 500: the retry meets its own entry (412) and the append
    resolves to that entry, once."""
    location = f"s3://{servers['bucket']}/faults-ledger/"
    ledger = Ledger(location)
    ledger.append("dsr-a", {"mode": "global", "classes": ["star"], "domains": []})
    seen = via_proxy.plan(lambda method, path, n: Fault("after", 500) if method == "PUT" and seen.count(
        "after") == 0 else Fault())
    entry, _ = Ledger(location).append("dsr-b", {"mode": "global", "classes": ["heart"], "domains": []})
    via_proxy.plan(always(Fault()))
    entries = Ledger(location).entries()
    assert [e.request_id for e in entries] == ["dsr-a", "dsr-b"] and entries[1] == entry
    assert sum(1 for m, _, k in seen.requests if m == "PUT") >= 2
    checked("the PUT of entry 1 succeeded but its answer was a 500: the retry finds its own entry; the ledger holds "
            "2 entries, chain verified (0 lost, 0 doubled)", faults_survived=1, ledger_delta=0)


def test_ledger_append_when_s3_answers_503_first(servers, via_proxy, checked):
    location = f"s3://{servers['bucket']}/faults-ledger-503/"
    seen = via_proxy.plan(first(4, Fault("status", 503)))
    Ledger(location).append("dsr-a", {"mode": "global", "classes": ["star"], "domains": []})
    via_proxy.plan(always(Fault()))
    assert [e.request_id for e in Ledger(location).entries()] == ["dsr-a"] and seen.count("status") == 4
    checked("4 x 503 on list/put: appended once, chain verified", faults_survived=1, ledger_delta=0)
