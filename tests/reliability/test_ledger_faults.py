"""The ledger under tampering and under concurrent appends.

- A tampered, missing or reordered entry: every flow (deletion-request, governance, rebuild) and `request list`
  refuse to build from it and name the entry; nothing is registered and the ledger is left as it was.
- Writers appending at the same moment (separate processes, released by one barrier) on a folder and on S3 (the
  conditional write of the moto server): every entry lands once, the chain verifies.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
from reliability_checks import registry_state, tree_state
from typer.testing import CliRunner

from clipforget.governance.ledger import Ledger
from clipforget.governance.request import DeletionRequest, ModelPolicy
from flows.cli import app

REQUESTS = [("dsr-0", ["star"]), ("dsr-1", ["heart"]), ("dsr-2", ["moon"])]


def _tampered(root: Path) -> None:
    data = json.loads((root / "00000001.json").read_text())
    data["request"]["classes"] = ["tree"]  # someone rewrites what was forgotten
    (root / "00000001.json").write_text(json.dumps(data))


def _missing(root: Path) -> None:
    (root / "00000001.json").unlink()


def _reordered(root: Path) -> None:
    a, b = (root / "00000000.json").read_text(), (root / "00000001.json").read_text()
    (root / "00000000.json").write_text(b)
    (root / "00000001.json").write_text(a)


BREAKS = {"tampered": (_tampered, "entry 00000001.json was changed after it was written"),
          "missing": (_missing, "entry 1 is missing (next entry is 00000002.json)"),
          "reordered": (_reordered, "entry 00000000.json does not match its name")}


@pytest.fixture
def broken(request, tmp_path, monkeypatch):
    kind = request.param
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ledger"
    ledger = Ledger(root)
    for rid, classes in REQUESTS:
        ledger.append(rid, {"mode": "global", "classes": classes, "domains": [], "requested_by": "privacy"})
    BREAKS[kind][0](root)
    return kind, root, BREAKS[kind][1]


@pytest.mark.parametrize("broken", list(BREAKS), indirect=True)
def test_every_flow_refuses_a_broken_ledger_and_names_the_entry(broken, servers, tmp_path, checked):
    from flows.deletion_request import deletion_request, rebuild
    from flows.governance import governance

    kind, root, message = broken
    policy = ModelPolicy(registered_name=f"rel-ledger-{kind}")
    before, registered = tree_state(root), registry_state()

    state = deletion_request(DeletionRequest(request_id="dsr-new", mode="global", classes=["arrow"]), policy, str(root),
                             True, str(tmp_path / "d.json"), return_state=True)
    assert state.is_failed() and message in state.message, state.message
    state = rebuild(policy, str(root), None, return_state=True)
    assert state.is_failed() and message in state.message, state.message
    state = governance(policy, str(root), True, str(tmp_path / "g.json"), return_state=True)
    assert state.is_failed() and message in state.message, state.message
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["findings"][0]["kind"] == "ledger" and report["processed"] is None
    listing = CliRunner().invoke(app, ["request", "list", "--ledger", str(root)])
    assert listing.exit_code == 1 and message in listing.output

    assert tree_state(root) == before and registry_state() == registered
    checked(f"{kind} entry: deletion-request, rebuild and governance runs Failed and `request list` exited 1, each "
            f"naming it ({message}); nothing registered, ledger bytes unchanged", bad_registrations=0, ledger_delta=0)


def _concurrent_appends(location: str, n: int) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(n)
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "CLIPFORGET_"))}
    with ctx.Pool(n) as pool:
        return pool.starmap(__import__("reliability_workers").append_at_once,
                            [(location, f"dsr-{i}", barrier, env) for i in range(n)])


def test_conditional_write_is_enforced_by_the_s3_server(servers):
    """What the S3 ledger's concurrency rests on: a second If-None-Match PUT of a key fails (412)."""
    from botocore.exceptions import ClientError

    c, b = servers["client"], servers["bucket"]
    c.put_object(Bucket=b, Key="cond/once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        c.put_object(Bucket=b, Key="cond/once", Body=b"second", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert c.get_object(Bucket=b, Key="cond/once")["Body"].read() == b"first"


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_appends_at_the_same_moment_all_land_once(where, servers, tmp_path, checked):
    n = 6
    location = str(tmp_path / "ledger") if where == "folder" else f"s3://{servers['bucket']}/race-{tmp_path.name}/"
    hashes = _concurrent_appends(location, n)
    entries = Ledger(location).entries()  # verifies the chain
    assert sorted(e.request_id for e in entries) == sorted(f"dsr-{i}" for i in range(n))
    assert [e.seq for e in entries] == list(range(n)) and sorted(hashes) == sorted(e.hash for e in entries)
    if where == "folder":
        assert not [p for p in (tmp_path / "ledger").iterdir() if p.name.startswith(".tmp")]
    checked(f"{n} processes released by one barrier append to one {where} ledger: {n} entries, seq 0..{n - 1}, chain "
            "verified (0 lost, 0 doubled)", ledger_delta=0)

