"""The request ledger: append-only, hash-chained, unique ids, tampering and loss detected."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from clipforget.governance.ledger import GENESIS, Ledger, LedgerError, cumulative_forget_cells
from clipforget.method.grid import Cell, resolve_grid

STAR = {"mode": "global", "classes": ["star"], "domains": [], "requested_by": "privacy@example.com"}
HOUSE = {"mode": "domain", "classes": ["house"], "domains": ["sketch"], "requested_by": "privacy@example.com"}


def test_append_chains_entries_and_duplicates_are_no_ops(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    assert ledger.verify() == GENESIS
    first, appended = ledger.append("req-1", STAR)
    assert appended and first.seq == 0 and first.prev_hash == GENESIS
    second, _ = ledger.append("req-2", HOUSE)
    assert second.prev_hash == first.hash and ledger.verify() == second.hash
    again, appended = ledger.append("req-1", STAR)
    assert not appended and again == first and len(ledger.entries()) == 2
    with pytest.raises(LedgerError, match="already in the ledger with other content"):
        ledger.append("req-1", HOUSE)
    with pytest.raises(LedgerError, match="request id"):
        ledger.append("../escape", STAR)
    assert len(ledger.entries()) == 2


def test_tampered_missing_and_reordered_entries_are_detected(tmp_path):
    ledger = Ledger(tmp_path)
    for i, req in enumerate([STAR, HOUSE, {**STAR, "classes": ["tree"]}]):
        ledger.append(f"req-{i}", req)
    files = sorted(tmp_path.glob("*.json"))

    data = json.loads(files[1].read_text())
    data["request"]["classes"] = ["circle"]  # someone edits what was forgotten
    original = files[1].read_text()
    files[1].write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="00000001.json was changed"):
        ledger.verify()
    files[1].write_text(original)
    assert ledger.verify() == ledger.entries()[-1].hash

    files[1].unlink()  # an entry is lost
    with pytest.raises(LedgerError, match="entry 1 is missing"):
        ledger.verify()


def test_cumulative_forget_set_is_the_union_in_request_order(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append("req-1", STAR)
    ledger.append("req-2", HOUSE)
    ledger.append("req-3", {**STAR, "requested_by": "someone else"})  # same cells again
    cells = cumulative_forget_cells(ledger.entries(), resolve_grid("toy"))
    assert cells[:4] == [Cell("star", d) for d in ("photo", "painting", "cartoon", "sketch")]
    assert cells[4:] == [Cell("house", "sketch")]


def test_concurrent_appends_keep_one_chain(tmp_path):
    ledger = Ledger(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: ledger.append(f"req-{i}", {**STAR, "n": i}), range(16)))
    entries = ledger.entries()
    assert [e.seq for e in entries] == list(range(16)) and len({e.request_id for e in entries}) == 16


def test_an_entry_is_never_overwritten_even_without_the_lock(tmp_path):
    """Two writers on different machines share no file lock: the exclusive create alone keeps one chain."""
    from clipforget.governance.ledger import FolderStore

    store = FolderStore(tmp_path)
    assert store.create("00000000.json", "first") and not store.create("00000000.json", "second")
    assert store.read("00000000.json") == "first" and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_up_to_a_head_and_a_head_that_is_gone(tmp_path):
    ledger = Ledger(tmp_path)
    first, _ = ledger.append("req-1", STAR)
    second, _ = ledger.append("req-2", HOUSE)
    assert [e.request_id for e in ledger.up_to(first.hash)] == ["req-1"]
    assert ledger.up_to(GENESIS) == [] and len(ledger.up_to(second.hash)) == 2
    (tmp_path / "00000001.json").unlink()  # the newest entry is lost: only a recorded head can tell
    assert ledger.verify() == first.hash
    with pytest.raises(LedgerError, match="no entry has hash"):
        ledger.up_to(second.hash)


def test_a_head_is_found_by_its_prefix(tmp_path):
    ledger = Ledger(tmp_path)
    first, _ = ledger.append("req-1", STAR)
    assert ledger.resolve(first.hash[:12]) == first.hash == ledger.resolve(first.hash)
    with pytest.raises(LedgerError, match="no entry hash starts with"):
        ledger.resolve("ffffffffffff" if not first.hash.startswith("ffffff") else "000000000000")
    with pytest.raises(LedgerError, match="at least 6"):
        ledger.resolve(first.hash[:3])
