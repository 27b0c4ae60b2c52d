"""What registry consumers and operators get, against the real components: one `unlearn` flow run (Prefect) from the
S3 (moto server) checkpoint into the `mlflow server`, then its model card, its pictures, `mlflow models serve`
answering a REST request, batch scoring, an open_clip export loaded where clipforget cannot be imported, and the
operator commands that move `champion`."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import testservers
from prefect.artifacts import Artifact

from clipforget.governance.request import UnlearnRequest
from clipforget.io import registry

NAME = "toy-consumers"
REQUEST_ID = "consumer-star"
STAR = ["star/photo", "star/painting", "star/cartoon", "star/sketch"]
PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.slow


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def registered(s3, mlflow_server, prefect_harness, module_tmp):
    """`forget star` through the unlearn flow, promoted, in a cache of its own with small synthesis settings (2
    prototypes per cell, 80 steps: seconds, not minutes), judged on the 2,000 rendered images.
    Warnings and warning log records of the run are kept."""
    from clipforget.gate.verdict import Thresholds
    from clipforget.governance.request import SynthesisSettings
    from flows.unlearn import unlearn

    cache = module_tmp("consumers-cache")
    request = UnlearnRequest(request_id=REQUEST_ID, requested_by="tests", mode="global", classes=["star"],
                             checkpoint_uri=s3["checkpoint"], data_uri=s3["eval"], registered_name=NAME, promote=True,
                             synthesis=SynthesisSettings(prototypes_per_cell=2, steps=80),
                             # limits of their own: what is tested here is what consumers get from an approved
                             # version, not the gate (tests/flows/test_pipeline_flow.py judges by the mode criteria)
                             thresholds=Thresholds(mode_criteria=False, max_forget_acc=0.35, max_retain_drop=0.3))
    report_path = module_tmp("consumers") / "report.json"
    handler = Records()
    root = logging.getLogger()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.onceregistry.clear()  # MLflow warns "once": an earlier test's warning must not hide this run's
        mp.setenv("CLIPFORGET_CACHE", str(cache))
        root.addHandler(handler)
        try:
            t0 = time.perf_counter()
            state = unlearn(request, str(report_path), return_state=True)
            seconds = time.perf_counter() - t0
        finally:
            root.removeHandler(handler)
    assert state.is_completed(), state.message
    report = json.loads(report_path.read_text())
    return {"report": report, "version": report["registered"]["version"], "seconds": seconds, "cache": str(cache),
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught] + handler.messages}


@pytest.fixture(scope="module")
def servers(s3, mlflow_server):
    return {"s3": s3, "mlflow": mlflow_server}


def test_every_version_carries_a_model_card(registered, servers):
    rep = registered["report"]
    mv = registry.client().get_model_version(NAME, registered["version"])
    card = mv.description
    assert card and len(card) <= 5000
    # what it forgets, for which request, from which base, into which weights
    for cell in STAR:
        assert f"`{cell}`" in card and f"| {cell} |" in card
    assert REQUEST_ID in card and servers["s3"]["sha256"] in card and rep["output"]["sha256"] in card
    # how it was judged: the data, the sample counts, every check with its measured value and limit
    assert servers["s3"]["eval"] in card and "2000 images" in card and "50 per cell over 40 cells" in card
    assert rep["checks"]
    for c in rep["checks"]:
        assert f"| {c['name']} | {c['value']:.4f} | {c['limit']:.4f} | yes |" in card
    # how to rebuild it, and how to use it
    assert "clipforget unlearn --model toy --checkpoint " + servers["s3"]["checkpoint"] in card
    assert "--classes star" in card and f"--request-id {REQUEST_ID}" in card
    assert f"mlflow models serve -m models:/{NAME}/{registered['version']} --env-manager local" in card
    # the console shows it too
    from typer.testing import CliRunner

    from flows.cli import app

    out = CliRunner().invoke(app, ["models", "show", f"{NAME}@champion", "--card"])
    assert out.exit_code == 0 and out.output.strip() == card.strip()


def test_pictures_in_the_mlflow_run_and_the_prefect_run(registered, servers, tmp_path):
    info = registry.show(f"{NAME}@champion")
    c = registry.client()
    files = {a.path for a in c.list_artifacts(info["run_id"], "pictures")}
    assert files == {"pictures/cells.png", "pictures/prototypes.png"}
    for name in ("cells", "prototypes"):
        url = info["pictures"][name]
        assert url.startswith(servers["mlflow"]) and info["run_id"] in url
        with urllib.request.urlopen(url, timeout=10) as r:  # what a person clicking the link gets
            assert r.read(8) == PNG
    from PIL import Image

    heat = Image.open(c.download_artifacts(info["run_id"], "pictures/cells.png", str(tmp_path)))
    strip = Image.open(c.download_artifacts(info["run_id"], "pictures/prototypes.png", str(tmp_path)))
    assert heat.width > 500 and strip.height > 4 * 100  # two panels; one row per forgotten cell
    # linked from the Prefect run: markdown with both pictures, and the heatmap as an image artifact
    md = Artifact.get(f"{REQUEST_ID}-pictures")
    assert md is not None and info["pictures"]["cells"] in md.data and info["pictures"]["prototypes"] in md.data
    image = Artifact.get(f"{REQUEST_ID}-heatmap")
    assert image is not None and image.type == "image" and info["pictures"]["cells"] in str(image.data)
    # and from the model card
    card = c.get_model_version(NAME, info["version"]).description
    assert info["pictures"]["cells"] in card


def test_registration_prints_no_misleading_warnings(registered):
    text = "\n".join(registered["warnings"])
    assert "No pretrained weights loaded" not in text and "initialized randomly" not in text
    assert "Add type hints" not in text


def _render(seed: int, per_cell: int = 1):
    from clipforget.method.grid import resolve_grid
    from clipforget.toyworld.render import render_cells

    return render_cells(resolve_grid("toy").cells, per_cell, seed=seed)



def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_mlflow_models_serve_answers_a_rest_request(registered, servers, tmp_path):
    import mlflow
    import pandas as pd

    port = testservers.free_port()
    log = tmp_path / "serve.log"
    # as in an activated virtualenv: MLflow starts the scoring server with the environment's `uvicorn`
    # (the server downloads the model into its temporary directory and leaves it there: this test's folder)
    env = {**os.environ, "MLFLOW_TRACKING_URI": servers["mlflow"], "TMPDIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        testservers.wait_until_healthy(f"http://127.0.0.1:{port}/ping", lambda: proc.poll() is None, log.read_text,
                                   "mlflow models serve")
        # the request format is discoverable: the version's serving input example is a valid request as it is
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{registered['version']}", dst_path=str(tmp_path)))
        example = json.loads((local / "serving_input_example.json").read_text())
        assert example["dataframe_split"]["columns"] == ["image"]
        assert _post(f"http://127.0.0.1:{port}/invocations", example)["predictions"][0]["label"]
        # what the README's curl line sends: base64 PNG/JPEG bytes in the `image` column
        images, cells = _render(seed=7)
        pngs = [registry.encode_png(im) for im in images]
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p).decode()] for p in pngs]}}
        served = pd.DataFrame(_post(f"http://127.0.0.1:{port}/invocations", body)["predictions"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    classes = sorted({cls for cls, _ in cells})
    assert list(served.columns[:2]) == ["label", "score"] and set(classes) <= set(served.columns)
    np.testing.assert_allclose(served[classes].sum(axis=1), 1.0, atol=1e-5)
    (tmp_path / "local").mkdir()
    local_model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", dst_path=str(tmp_path / "local"))
    expected = local_model.predict(pd.DataFrame({"image": pngs}))
    assert list(served["label"]) == list(expected["label"])
    np.testing.assert_allclose(served["score"], expected["score"], atol=1e-5)
    served_log = log.read_text()
    assert "No pretrained weights loaded" not in served_log and "Add type hints" not in served_log


def test_batch_scoring_of_a_folder(registered, tmp_path):
    """The pandas batch example of docs/CONSUMERS.md, as written there."""
    from typer.testing import CliRunner

    from flows.cli import app

    assert CliRunner().invoke(app, ["toy", "render", "--out", str(tmp_path / "photos"), "--per-cell", "1",
                                    "--seed", "8"]).exit_code == 0
    os.environ["MLFLOW_TRACKING_URI"] = registry.tracking_uri()
    # --- docs/CONSUMERS.md: batch scoring ---
    import tempfile

    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:  # MLflow copies the model's files here; gone once it is loaded
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", dst_path=tmp)
    paths = sorted(p for p in Path(tmp_path / "photos").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    scores = pd.concat([model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths[i : i + 256]]}))
                        for i in range(0, len(paths), 256)], ignore_index=True)
    scores.insert(0, "path", [str(p) for p in paths])
    scores.to_csv(tmp_path / "scores.csv", index=False)
    # ---
    table = pd.read_csv(tmp_path / "scores.csv")
    assert len(table) == 40 and list(table.columns[:3]) == ["path", "label", "score"]
    truth = [Path(p).parent.name for p in table["path"]]
    kept = [(t, p) for t, p in zip(truth, table["label"], strict=True) if t != "star"]
    assert sum(t == p for t, p in kept) >= 0.8 * len(kept)  # the kept classes are still recognized
    assert sum(p == "star" for t, p in zip(truth, table["label"], strict=True) if t == "star") <= 1  # star is gone


LOADER = r"""
import json, sys
sys.modules["clipforget"] = None  # importing clipforget (or MLflow) fails here: the folder must not need them
sys.modules["mlflow"] = None
try:
    import clipforget
except ImportError:
    pass
else:
    raise SystemExit("clipforget is importable")
import numpy as np, open_clip, torch
from PIL import Image
from safetensors.torch import load_file

folder, images = sys.argv[1], sys.argv[2:]
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
model.eval()
head = load_file(f"{folder}/zero_shot/classifier.safetensors")["classifier"]
classes = json.load(open(f"{folder}/zero_shot/labels.json"))["classes"]
with torch.no_grad():
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    f = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    probs = (model.logit_scale.exp() * f @ head.T).softmax(-1)
print(json.dumps({"labels": [classes[i] for i in probs.argmax(1)], "scores": probs.max(1).values.tolist(),
                  "modules": sorted(m for m in sys.modules if m.startswith(("clipforget", "mlflow")) and sys.modules[m])}))
"""


def test_export_loads_with_plain_open_clip(registered, tmp_path):
    import mlflow
    import pandas as pd
    from typer.testing import CliRunner

    from clipforget.io.checkpoints import TOY_CONFIG, sha256_file
    from flows.cli import app

    out = tmp_path / "export"
    r = CliRunner().invoke(app, ["export", f"models:/{NAME}@champion", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "open_clip_config.json", "open_clip_model.safetensors", "zero_shot/classifier.safetensors",
        "zero_shot/labels.json"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"] == json.loads(TOY_CONFIG.read_text()) and config["preprocess_cfg"]["size"] in (64, [64, 64])
    assert sha256_file(out / "open_clip_model.safetensors") == registered["report"]["output"]["sha256"]
    readme = (out / "README.md").read_text()
    assert "library_name: open_clip" in readme and "forgets 4 cell(s)" in readme and REQUEST_ID in readme

    images, _ = _render(seed=9)
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(registry.encode_png(im))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-c", LOADER, str(out), *map(str, paths)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["modules"] == []
    (tmp_path / "local").mkdir()
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", dst_path=str(tmp_path / "local")).predict(
        pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    assert loaded["labels"] == list(expected["label"])
    np.testing.assert_allclose(loaded["scores"], expected["score"], atol=1e-5)
    assert "No pretrained weights loaded" not in done.stderr


# --- operators: promote and rollback never point `champion` at a version that misses part of the ledger ---

OPS = "toy-operators"


def test_promote_and_rollback_refuse_versions_that_do_not_cover_the_ledger(registered, tmp_path):
    from typer.testing import CliRunner

    from clipforget.governance.ledger import Ledger
    from clipforget.governance.request import DeletionRequest
    from flows.cli import app

    ledger = tmp_path / "ledger"
    entries = []
    for rid, cls in (("dsr-a", "star"), ("dsr-b", "heart")):
        req = DeletionRequest(request_id=rid, requested_by="tests", mode="global", classes=[cls])
        entries.append(Ledger(str(ledger)).append(rid, req.ledger_record())[0])
    # three versions of one logged model: v1 built for the first request only, v2 and v3 for both
    import mlflow

    mlflow.set_registry_uri(registry.tracking_uri())
    source = registry.client().get_model_version(NAME, registered["version"]).source  # the logged model
    for ids, head in ((["dsr-a"], entries[0].hash), (["dsr-a", "dsr-b"], entries[1].hash),
                      (["dsr-a", "dsr-b"], entries[1].hash)):
        mlflow.register_model(source, OPS, tags={registry.TAG_REQUEST_IDS: ",".join(ids), registry.TAG_LEDGER_HEAD: head})

    def cli(*args):
        return CliRunner().invoke(app, [*args, "--ledger", str(ledger)])

    r = cli("models", "promote", OPS, "1")
    assert r.exit_code == 2 and "refusing" in r.output and "not built for request(s) dsr-b" in r.output, r.output
    assert registry.champion(OPS) is None
    r = cli("models", "promote", OPS, "3", "--reason", "weekly release")
    assert r.exit_code == 0, r.output
    champ = registry.champion(OPS)
    assert champ["version"] == "3" and champ["tags"][registry.TAG_PROMOTION_REASON] == "weekly release"

    r = cli("models", "rollback", OPS, "--reason", "INC-7: latency regression")
    assert r.exit_code == 0 and "from version 3 to version 2" in r.output, r.output
    champ = registry.champion(OPS)
    assert champ["version"] == "2" and "INC-7: latency regression" in champ["tags"][registry.TAG_PROMOTION_REASON]
    assert registry.show(f"{OPS}/3")["tags"][registry.TAG_ROLLED_BACK] == "INC-7: latency regression"
    # the only older version misses dsr-b: nothing to roll back to, and champion stays
    r = cli("models", "rollback", OPS, "--reason", "again")
    assert r.exit_code == 2 and "version 1 was not built for request(s) dsr-b" in r.output, r.output
    assert registry.champion(OPS)["version"] == "2"
    # nor can a rolled-back version come back by rollback; promoting it by hand is an explicit decision
    r = cli("models", "promote", OPS, "3", "--reason", "fixed")
    assert r.exit_code == 0 and registry.champion(OPS)["version"] == "3"


def test_a_rejected_build_logs_its_pictures_too(registered, servers, tmp_path):
    """Same request, settings and cache with limits no model meets: nothing is registered, but the run's report and
    pictures are in an MLflow run of their own, linked from the Prefect run."""
    from clipforget.gate.verdict import Thresholds
    from clipforget.governance.request import SynthesisSettings
    from flows.unlearn import unlearn

    m = registered["report"]["metrics"]
    assert m["forget_max_after"] > 0 or m["retain_max_cell_drop"] > 0, "a perfect model: pick another request"
    strict = UnlearnRequest(request_id="consumer-star-strict", requested_by="tests", mode="global", classes=["star"],
                            checkpoint_uri=servers["s3"]["checkpoint"], data_uri=servers["s3"]["eval"],
                            registered_name=NAME, synthesis=SynthesisSettings(prototypes_per_cell=2, steps=80),
                            thresholds=Thresholds(max_forget_acc=0.0, max_retain_drop=0.0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPFORGET_CACHE", registered["cache"])
        state = unlearn(strict, str(tmp_path / "strict.json"), return_state=True)
    assert state.is_failed()
    rep = json.loads((tmp_path / "strict.json").read_text())
    assert rep["registered"] is None and rep["pictures"]["run_id"]
    run = registry.client().get_run(rep["pictures"]["run_id"])
    assert run.data.tags[registry.TAG_PASSED] == "false" and run.data.tags[registry.TAG_REQUEST_ID] == strict.request_id
    assert {a.path for a in registry.client().list_artifacts(run.info.run_id, "pictures")} == {
        "pictures/cells.png", "pictures/prototypes.png"}
    with urllib.request.urlopen(rep["pictures"]["pictures"]["cells"], timeout=10) as r:
        assert r.read(8) == PNG
    md = Artifact.get("consumer-star-strict-pictures")
    assert md is not None and "rejected build" in md.data and rep["pictures"]["pictures"]["prototypes"] in md.data
    assert [v["version"] for v in registry.versions(NAME)] == [registered["version"]]
