"""The console commands other tools rely on: names, options and report fields."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipforget.io.checkpoints import load_model, sha256_file
from clipforget.method.evaluate import ZeroShotClassifier
from clipforget.method.grid import resolve_grid
from clipforget.method.prompts import TemplateSet
from flows.cli import app
from flows.cli.common import DATA_FREE_NOTE, DATA_FREE_REJECTED_NOTE, FIT_ON_IMAGES_NOTE

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("render") / "toy"
    r = invoke("toy", "render", "--out", out, "--per-cell", 3, "--seed", 11)
    assert r.exit_code == 0, r.output
    return out


def test_console_script_is_installed():
    # installed beside the interpreter running the tests (the venv's bin), whether or not that is on PATH
    exe = shutil.which("clipforget", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert exe, "the clipforget console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("eval", "forget", "toy"):
        assert cmd in out


def test_render_writes_the_pacs_layout(data):
    files = sorted(data.glob("*/*/*.png"))
    assert len(files) == 3 * 40
    assert (data / "sketch" / "house" / "2.png").is_file()


def test_eval_report(data, tmp_path):
    out = tmp_path / "eval.json"
    r = invoke("eval", "--model", "toy", "--data", data, "--json", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert 0.0 <= rep["accuracy"] <= 1.0 and rep["accuracy"] > 0.5
    assert len(rep["cells"]) == 40
    assert {"class", "domain", "accuracy", "n"} <= set(rep["cells"][0]) and rep["cells"][0]["n"] == 3
    assert rep["sha256"] == sha256_file(load_model("toy").checkpoint)


def test_forget_writes_a_loadable_checkpoint_and_a_report(data, tmp_path):
    ckpt, rep_path = tmp_path / "forgot.safetensors", tmp_path / "forget.json"
    r = invoke("forget", "--model", "toy", "--mode", "global", "--classes", "star", "--data", data,
               "--prototypes-per-cell", 2, "--steps", 30, "--seed", 1, "--out", ckpt, "--json", rep_path)
    assert r.exit_code == 0, r.output
    rep = json.loads(rep_path.read_text())
    assert rep["output"]["sha256"] == sha256_file(ckpt)
    assert rep["forget_cells"] == ["star/photo", "star/painting", "star/cartoon", "star/sketch"]
    assert rep["settings"]["synthesis"]["prototypes_per_cell"] == 2 and rep["settings"]["synthesis"]["steps"] == 30
    assert rep["settings"]["nullspace"]["kind"] in ("soft", "hard", "margin")
    for key in ("forget_before", "forget_after", "retain_before", "retain_after", "retain_drop"):
        assert key in rep["metrics"]
    assert {"prototypes_s", "nullspace_s", "fold_s", "total_s"} <= set(rep["timings"])
    assert [p["cell"] for p in rep["probe"]] == rep["forget_cells"] and "residual probe" in r.output
    assert DATA_FREE_NOTE not in r.output  # judged on the images of --data
    roles = {c["role"] for c in rep["cells"]}
    assert roles == {"forget", "retain"} and len(rep["cells"]) == 40
    # the unlearned checkpoint is an ordinary toy checkpoint, evaluable by the same command
    ev = tmp_path / "after.json"
    assert invoke("eval", "--model", "toy", "--checkpoint", ckpt, "--data", data, "--json", ev).exit_code == 0
    after = {(c["class"], c["domain"]): c["accuracy"] for c in json.loads(ev.read_text())["cells"]}
    assert after == {(c["class"], c["domain"]): c["after"] for c in rep["cells"]}


def test_forget_fitted_on_labelled_images(data, tmp_path):
    """`--fit-data`: the projection is fitted on those images (the mode's image settings), nothing is synthesized,
    and the gate judges on the other images of `--data`."""
    fit = tmp_path / "fit"
    assert invoke("toy", "render", "--out", fit, "--per-cell", 20, "--seed", 17).exit_code == 0
    ckpt, rep_path = tmp_path / "forgot.safetensors", tmp_path / "forget.json"
    r = invoke("forget", "--model", "toy", "--mode", "domain", "--classes", "house", "--domains", "sketch",
               "--fit-data", fit, "--data", data, "--out", ckpt, "--json", rep_path)
    assert r.exit_code == 0, r.output
    rep = json.loads(rep_path.read_text())
    assert rep["fit"] == {"on": "images", "data": str(fit), "images": 800} and rep["prototypes"] is None
    assert rep["settings"]["nullspace"]["retain_margin"] == 0.05  # the image settings, not the prototype ones
    cells = {(c["class"], c["domain"]): c for c in rep["cells"]}
    assert cells[("house", "sketch")]["after"] == 0.0
    assert min(c["after"] - c["before"] for c in rep["cells"] if c["role"] == "retain") >= -1 / 3  # ≤ 1 of 3 images
    assert rep["metrics"]["retain_after"] >= rep["metrics"]["retain_before"] - 0.02


def test_forget_refuses_fit_data_that_cannot_fit_or_judge(data, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(data / "photo", partial / "photo")
    out = tmp_path / "out"
    out.mkdir()
    ckpt, rep = out / "o.safetensors", out / "o.json"
    common = ["forget", "--model", "toy", "--mode", "global", "--classes", "star", "--out", str(ckpt),
              "--json", str(rep)]
    r = runner.invoke(app, [*common, "--fit-data", str(partial)])
    assert r.exit_code == 2 and "no images for 30 of 40 cells" in r.output, r.output
    r = runner.invoke(app, [*common, "--fit-data", str(data), "--data", str(data)])
    assert r.exit_code == 2 and "the same folder" in r.output, r.output
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--mode", "global", "--classes", "dragon"], "unknown class 'dragon'"),
    (["--mode", "domain", "--classes", "star"], "give both classes and domains"),
    (["--mode", "global", "--classes", "star", "--grid", "nowhere"], "unknown grid"),
    (["--mode", "domain_complete", "--domains", "sketch", "--projection", "gated"],
     "cannot forget every class of a domain (sketch)"),
])
def test_bad_requests_fail_clearly_and_write_nothing(tmp_path, args, message):
    ckpt, rep = tmp_path / "o.safetensors", tmp_path / "o.json"
    r = runner.invoke(app, ["forget", "--model", "toy", *args, "--out", str(ckpt), "--json", str(rep)])
    assert r.exit_code == 2
    assert message in r.output
    assert list(tmp_path.iterdir()) == []


def test_data_free_forget_is_judged_on_as_many_heldout_prototypes_as_each_check_needs(tmp_path):
    """No --data: the gate judges on held-out prototypes, 20 in each forgotten cell (the 0.15 bound needs 19) and 10
    in each kept cell (one flip under the 0.10 limit), unless --heldout-per-cell says otherwise."""
    ckpt, rep_path = tmp_path / "forgot.safetensors", tmp_path / "forget.json"
    r = invoke("forget", "--model", "toy", "--mode", "global", "--classes", "star", "--prototypes-per-cell", 2,
               "--steps", 1, "--precision", "fp32", "--out", ckpt, "--json", rep_path)
    assert r.exit_code == 0, r.output
    rep = json.loads(rep_path.read_text())
    assert {(c["role"], c["n"]) for c in rep["cells"]} == {("forget", 20), ("retain", 10)}
    assert rep["evaluation"]["images"] == 4 * 20 + 36 * 10
    assert "sized from the gate's limits" in rep["evaluation"]["data"]
    assert all(c["n"] >= 19 for c in rep["checks"] if "forget" in c["name"])
    assert (DATA_FREE_NOTE in r.output) == rep["passed"]  # an approval says it was not judged on images


@pytest.mark.parametrize("fit", [False, True])
def test_a_data_free_rejection_says_it_was_not_judged_on_images_and_what_would_be(tmp_path, data, fit):
    """10 held-out prototypes per forgotten cell cannot resolve the 0.15 forget limit (19 needed): the gate rejects
    for want of evidence, whatever the candidate does. The rejection is no verdict on images either, and the user is
    told what gives one (--data) and, unless the projection was already fitted on images, what fits one (--fit-data)."""
    ckpt, rep_path = tmp_path / "forgot.safetensors", tmp_path / "forget.json"
    r = invoke("forget", "--model", "toy", "--mode", "global", "--classes", "star", "--prototypes-per-cell", 2,
               "--steps", 1, "--precision", "fp32", "--heldout-per-cell", 10, "--out", ckpt, "--json", rep_path,
               *(["--fit-data", data] if fit else []))
    assert r.exit_code == 0, r.output
    rep = json.loads(rep_path.read_text())
    assert not rep["passed"] and rep["fit"]["on"] == ("images" if fit else "prototypes")
    assert any(c["n"] == 10 and not c["passed"] for c in rep["checks"] if "forget" in c["name"])
    assert "not approved" in r.output and DATA_FREE_NOTE not in r.output
    assert DATA_FREE_REJECTED_NOTE in r.output
    assert (FIT_ON_IMAGES_NOTE in r.output) == (not fit)


def test_data_free_eval(tmp_path):
    out = tmp_path / "e.json"
    r = invoke("eval", "--model", "toy", "--prototypes-per-cell", 1, "--steps", 20, "--json", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["data"].startswith("held-out prototypes") and len(rep["cells"]) == 40


def test_user_templates(data, tmp_path):
    good = tmp_path / "templates.json"
    good.write_text(json.dumps({"domains": {d: [f"a {d} {{}}."] for d in ("photo", "painting", "cartoon", "sketch")},
                                "class_only": ["a {}."]}))
    default_out, user_out = tmp_path / "default.json", tmp_path / "user.json"
    assert invoke("eval", "--model", "toy", "--data", data, "--json", default_out).exit_code == 0
    assert invoke("eval", "--model", "toy", "--data", data, "--templates", good, "--json", user_out).exit_code == 0
    assert json.loads(user_out.read_text())["accuracy"] > 0.5
    # the user's prompts build the classifier, not the defaults
    toy = load_model("toy")
    grid = resolve_grid("toy")
    default_rows = ZeroShotClassifier(toy.model, toy.tokenizer, grid).weights
    user_rows = ZeroShotClassifier(toy.model, toy.tokenizer, grid, TemplateSet.from_file(good)).weights
    assert not torch.allclose(default_rows, user_rows)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"domains": {"sketch": ["a sketch"]}}))
    r = runner.invoke(app, ["eval", "--model", "toy", "--data", str(data), "--templates", str(bad),
                            "--json", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "exactly one '{}'" in r.output
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("request_json, message", [
    ({"request_id": "dsr-1", "mode": "global", "classes": ["unicorn"]}, "unknown class 'unicorn'"),
    ({"request_id": "dsr-1", "mode": "domain", "classes": ["house"]}, "give both classes and domains"),
    ({"request_id": "../dsr", "mode": "global", "classes": ["star"]}, "request_id: String should match pattern"),
    ({"request_id": "dsr-1", "mode": "global", "classes": ["star"], "priority": "high"}, "priority: Extra inputs"),
    ({"mode": "global", "classes": ["star"]}, "request_id: Field required"),
])
def test_request_submit_refuses_bad_requests_before_the_ledger(tmp_path, request_json, message):
    request = tmp_path / "request.json"
    request.write_text(json.dumps(request_json))
    r = runner.invoke(app, ["request", "submit", str(request), "--ledger", str(tmp_path / "ledger")])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "ledger").exists()


def test_request_list_names_a_broken_ledger(tmp_path):
    from clipforget.governance.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger")
    ledger.append("dsr-1", {"mode": "global", "classes": ["star"], "domains": []})
    ledger.append("dsr-2", {"mode": "global", "classes": ["heart"], "domains": []})
    r = runner.invoke(app, ["request", "list", "--ledger", str(tmp_path / "ledger")])
    assert r.exit_code == 0 and "dsr-2  global: heart in all domains" in r.output, r.output
    (tmp_path / "ledger" / "00000000.json").unlink()
    r = runner.invoke(app, ["request", "list", "--ledger", str(tmp_path / "ledger")])
    assert r.exit_code == 1 and "entry 0 is missing" in r.output, r.output


def test_request_show_of_an_unknown_id_fails_clearly(tmp_path):
    from clipforget.governance.ledger import Ledger

    Ledger(tmp_path / "ledger").append("dsr-1", {"mode": "global", "classes": ["star"], "domains": []})
    before = (tmp_path / "ledger" / "00000000.json").read_bytes()
    r = runner.invoke(app, ["request", "show", "dsr-404", "--ledger", str(tmp_path / "ledger")])
    assert r.exit_code == 2 and "error: request 'dsr-404' is not in the ledger" in r.output, r.output
    assert (tmp_path / "ledger" / "00000000.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ledger").iterdir()) == [".lock", "00000000.json"]


EXIT_PROGRAM = """
import atexit, sys, tempfile
from pathlib import Path
import flows.cli as cli

@cli.app.command("exit-check")
def exit_check(code: int, marker: str) -> None:
    # what a real command leaves for exit: Prefect's hook stopping its temporary server, a temporary folder
    atexit.register(lambda: print("hook ran", flush=True))
    folder = tempfile.TemporaryDirectory()
    Path(marker).write_text(folder.name)
    print("buffered output", end="")  # no newline, no flush: the exit must flush it
    if code == 130:
        raise KeyboardInterrupt
    raise SystemExit(code if code != 99 else "a message")

sys.argv = ["clipforget", "exit-check", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.parametrize("code, status", [(0, 0), (1, 1), (3, 3), (99, 1), (130, 130)])
def test_a_command_exits_with_its_status_after_every_exit_hook(tmp_path, code, status):
    """`clipforget` skips the interpreter's slow module teardown at exit (2.8-3 s after a flow), but only after
    every exit hook a command registered ran: the status, the output and the cleanup are those of a normal exit."""
    marker = tmp_path / "folder"
    proc = subprocess.run([sys.executable, "-c", EXIT_PROGRAM, str(code), str(marker)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout.startswith("buffered output") and "hook ran" in proc.stdout
    assert not Path(marker.read_text()).exists()  # the temporary folder's finalizer ran
    if code == 99:
        assert "a message" in proc.stderr
