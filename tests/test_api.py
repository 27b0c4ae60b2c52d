"""The Python API of README ("Python API"): load, forget, evaluate, save; submit a deletion request."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import clipforget as cf
from clipforget.io.checkpoints import sha256_file
from flows.cli import app


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("render") / "toy"
    r = CliRunner().invoke(app, ["toy", "render", "--out", str(out), "--per-cell", "3", "--seed", "12"])
    assert r.exit_code == 0, r.output
    return out


def test_public_names_resolve():
    for name in cf.__all__:
        assert getattr(cf, name) is not None, name
    with pytest.raises(AttributeError):
        cf.no_such_name  # noqa: B018


def test_forget_and_evaluate_as_the_cli_does(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path / "cache"))
    model = cf.load_model("toy")
    synthesis = cf.synthesis_for(model, prototypes_per_cell=2, steps=30, seed=1)
    out = tmp_path / "api.safetensors"
    result = cf.forget(model, mode="global", classes=["star"], out=out, data=data, synthesis=synthesis)
    report = result.report
    assert report["output"]["sha256"] == sha256_file(out)
    assert report["forget_cells"] == ["star/photo", "star/painting", "star/cartoon", "star/sketch"]
    # the gate's verdict is in the report, by the same rules the pipeline registers on
    assert isinstance(report["passed"], bool) and report["checks"]
    assert report["passed"] == all(c["passed"] for c in report["checks"])
    assert (report["rejected"] is None) == report["passed"]

    # the same request through `clipforget forget` (same bank, same settings) writes the same bytes
    cli_out = tmp_path / "cli.safetensors"
    r = CliRunner().invoke(app, ["forget", "--model", "toy", "--mode", "global", "--classes", "star", "--data",
                                 str(data), "--prototypes-per-cell", "2", "--steps", "30", "--seed", "1",
                                 "--out", str(cli_out), "--json", str(tmp_path / "cli.json")])
    assert r.exit_code == 0, r.output
    assert sha256_file(cli_out) == sha256_file(out)
    assert json.loads((tmp_path / "cli.json").read_text())["checks"] == report["checks"]

    # evaluating the saved checkpoint gives the report's after-accuracies
    after = cf.evaluate(cf.load_model("toy", checkpoint=out), data=data)
    assert {str(s.cell): s.accuracy for s in after.cells} == {f"{c['class']}/{c['domain']}": c["after"]
                                                               for c in report["cells"]}


def test_submit_appends_once_and_refuses_a_bad_request(tmp_path):
    ledger = tmp_path / "ledger"
    request = {"request_id": "dsr-1", "requested_by": "privacy team", "mode": "global", "classes": ["heart"]}
    entry, appended = cf.submit(request, ledger=ledger)
    assert appended and entry.seq == 0 and entry.request_id == "dsr-1"
    again, appended = cf.submit(request, ledger=ledger)
    assert not appended and again.hash == entry.hash
    with pytest.raises(ValueError, match="unknown class 'dragon'"):
        cf.submit({**request, "request_id": "dsr-2", "classes": ["dragon"]}, ledger=ledger)
    assert [e.request_id for e in cf.Ledger(str(ledger)).entries()] == ["dsr-1"]
