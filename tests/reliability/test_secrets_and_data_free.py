"""A full deletion request with a distinctive secret in every credential variable, on the data-free path that
`make demo` and a policy without `data_uri` run (held-out prototypes, no evaluation images): S3 checkpoint and S3
ledger (moto server), Prefect (test harness), MLflow server. Then every output is searched for the secrets:
the command's output, every log record, the Prefect API's logs, artifacts, flow and task runs, every MLflow
run's params, tags and artifacts, the registered version's tags and files, the reports, the ledger and every
file of the cache. Tiny synthesis budgets (2 prototypes per cell, 10 steps) keep it to seconds; the gate is
set to pass (this run is about what is written where, not about the model), and `unlearn` below runs the same
path with the mode's real criteria.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.cli.common import DATA_FREE_NOTE, DATA_FREE_REJECTED_NOTE

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIARELIABILITY7Q3XZ",
    "AWS_SECRET_ACCESS_KEY": "rel-aws-secret-5e1f0c9b2d7a4e83b6",
    "AWS_SESSION_TOKEN": "rel-aws-session-token-77c2d1e9f0",
    "MLFLOW_TRACKING_USERNAME": "rel-mlflow-user-3b9e55",
    "MLFLOW_TRACKING_PASSWORD": "rel-mlflow-password-a41f08",
    "MLFLOW_TRACKING_TOKEN": "rel-mlflow-token-c0ffee9876",
    "PREFECT_API_KEY": "rel-prefect-key-d00d1e2f3a",
}
TINY = {"prototypes_per_cell": 2, "steps": 10, "heldout_per_cell": 2}
MARKUP = "Alice <alice@example.com> | **privacy** `team` [x](javascript:alert(1))"
NAME = "rel-secrets"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter("%(name)s %(levelname)s %(message)s").format(record))


@pytest.fixture(scope="module")
def secret_run(servers, module_tmp):
    ws = module_tmp("secrets")
    ledger = f"s3://{servers['bucket']}/ledger/{NAME}/"
    request = ws / "request.json"
    request.write_text(json.dumps({"request_id": "dsr-secret", "requested_by": MARKUP, "reason": "erasure request",
                                   "mode": "global", "classes": ["star"]}))
    policy = ws / "policy.json"
    policy.write_text(json.dumps({"checkpoint_uri": servers["checkpoint"], "registered_name": NAME, "synthesis": TINY,
                                  "thresholds": {"mode_criteria": False, "max_forget_acc": 1.0, "max_retain_drop": 1.0}}))
    handler = Records()
    loggers = [logging.getLogger(n) for n in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "mlflow",
                                              "botocore", "boto3", "clipforget")]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setenv("CLIPFORGET_CACHE", str(ws / "cache"))
        for k, v in SECRETS.items():
            mp.setenv(k, v)
        for lg in loggers:
            lg.addHandler(handler)
        try:
            runner = CliRunner()
            submit = runner.invoke(app, ["request", "submit", str(request), "--policy", str(policy), "--ledger", ledger,
                                         "--promote", "--json", str(ws / "report.json")])
            show = runner.invoke(app, ["request", "show", "dsr-secret", "--ledger", ledger, "--policy", str(policy)])
            models = runner.invoke(app, ["models", "show", f"{NAME}@champion"])
            failing = runner.invoke(app, ["unlearn", "--mode", "global", "--classes", "star", "--registered-name", NAME,
                                          "--checkpoint", f"s3://{servers['bucket']}/models/missing.safetensors"])
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
    return {"ws": ws, "ledger": ledger, "submit": submit, "outputs": [submit, show, models, failing],
            "log": handler.lines, "report": _report(ws / "report.json", submit), "servers": servers}


def _report(path: Path, result) -> dict:
    assert path.is_file(), f"no report; the command said:\n{result.output[-3000:]}"
    return json.loads(path.read_text())


def _prefect_texts() -> list[str]:
    from prefect.client.orchestration import get_client

    texts = []
    with get_client(sync_client=True) as c:
        texts += [f"{lg.name} {lg.message}" for lg in c.read_logs(limit=None) or []]
        texts += [json.dumps(a.model_dump(mode="json")) for a in c.read_artifacts()]
        texts += [json.dumps(r.model_dump(mode="json")) for r in c.read_flow_runs()]
        texts += [json.dumps(r.model_dump(mode="json")) for r in c.read_task_runs()]
    return texts


def _mlflow_texts(tmp: Path) -> tuple[list[str], list[bytes]]:
    from clipforget.io import registry

    c = registry.client()
    texts, blobs = [], []
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    for run in runs:
        texts.append(json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": list(run.data.metrics),
                                 "name": run.info.run_name}))
        local = Path(c.download_artifacts(run.info.run_id, "", str(tmp / run.info.run_id)))
        blobs += [p.read_bytes() for p in local.rglob("*") if p.is_file()]
    for m in c.search_registered_models():
        texts.append(json.dumps({"name": m.name, "description": m.description, "tags": m.tags}))
        for v in c.search_model_versions(f"name = '{m.name}'"):
            texts.append(json.dumps({"tags": v.tags, "description": v.description, "source": v.source}))
    return texts, blobs


def test_data_free_deletion_request_registers_a_version_judged_on_heldout_prototypes(secret_run, checked):
    r, report = secret_run["submit"], secret_run["report"]
    assert r.exit_code == 0, r.output
    assert DATA_FREE_NOTE in r.output
    evaluation = report["evaluation"]["data"] if isinstance(report["evaluation"], dict) else report["evaluation"]
    assert evaluation.startswith("held-out prototypes")
    assert len(report["cells"]) == 40 and {c["n"] for c in report["cells"]} == {TINY["heldout_per_cell"]}
    assert report["policy"]["data_uri"] is None and report["passed"] is True
    from clipforget.io import registry

    champ = registry.champion(NAME)
    assert champ is not None and champ["version"] == report["registered"]["version"]
    assert champ["request_ids"] == ["dsr-secret"] and champ["sha256"] == report["output"]["sha256"]
    # whoever reads the verdict (the Prefect summary, the registered version's card) learns it was not judged on images
    from prefect.artifacts import Artifact

    from clipforget.gate.verdict import DATA_FREE_CAVEAT
    from tasks.validate import artifact_key

    summary = Artifact.get(artifact_key(report["request_id"], "summary"))
    assert summary is not None and DATA_FREE_CAVEAT in summary.data
    card = registry.client().get_model_version(NAME, champ["version"]).description
    assert DATA_FREE_CAVEAT in card
    checked("request submit with a policy without data_uri: validated on 2 held-out prototypes in each of 40 "
            "cells, registered and promoted, tags name the request; the summary and the card say the verdict is "
            "data-free", bad_registrations=0)


def test_no_secret_reaches_any_output(secret_run, tmp_path, checked):
    from clipforget.governance.ledger import Ledger

    texts = [o.output for o in secret_run["outputs"]] + secret_run["log"] + _prefect_texts()
    ml_texts, blobs = _mlflow_texts(tmp_path)
    texts += ml_texts
    texts += [json.dumps(e.to_dict()) for e in Ledger(secret_run["ledger"]).entries()]
    files = [p for p in secret_run["ws"].rglob("*") if p.is_file()]
    blobs += [p.read_bytes() for p in files]
    assert len(texts) > 50 and len(blobs) > 20 and any("dsr-secret" in t for t in texts)  # the search saw the run
    assert "no such object" in secret_run["outputs"][-1].output  # and a failure's message
    found = [(k, i) for k, v in SECRETS.items() for i, t in enumerate(texts) if v in t]
    found += [(k, -i) for k, v in SECRETS.items() for i, b in enumerate(blobs) if v.encode() in b]
    where = [(k, (texts[i] if i >= 0 else blobs[-i].decode("utf-8", "replace"))[:300]) for k, i in found[:3]]
    assert found == [], where
    checked(f"{len(SECRETS)} credential variables set to distinctive values; searched {len(texts)} texts (command "
            f"output, log records, Prefect logs/artifacts/runs, MLflow params/tags/versions, ledger) and {len(blobs)} "
            "files (MLflow artifacts, reports, cache): 0 secrets found", secrets_found=len(found))


def test_only_whitelisted_bounded_tags_and_markup_kept_verbatim(secret_run, checked):
    from clipforget.io import registry

    allowed = {v for k, v in vars(registry).items() if k.startswith("TAG_") and isinstance(v, str)}
    c = registry.client()
    version = c.get_model_version(NAME, secret_run["report"]["registered"]["version"])
    tags = version.tags
    assert tags and all(k in allowed or k.startswith(registry.TAG_METRIC_PREFIX) for k in tags), sorted(tags)
    assert all(len(v) <= registry.MAX_TAG_VALUE and not any(ord(ch) < 32 for ch in v) for v in tags.values())
    assert tags[registry.TAG_REQUESTED_BY] == MARKUP  # stored as given, one line, never rendered as markup
    run_tags = c.get_run(version.run_id).data.tags
    assert all(k in allowed or k.startswith((registry.TAG_METRIC_PREFIX, "mlflow.")) for k in run_tags), sorted(run_tags)
    listing = CliRunner().invoke(app, ["request", "list", "--ledger", secret_run["ledger"]])
    assert listing.exit_code == 0 and sum("dsr-secret" in line for line in listing.output.splitlines()) == 1
    checked(f"{len(tags)} version tags, all whitelisted, each <= {registry.MAX_TAG_VALUE} characters without control "
            "characters; requested_by with markup stored verbatim on one line; `request list` keeps one line per entry")


@pytest.fixture(scope="module")
def demo_run(servers, module_tmp):
    """`clipforget unlearn` as `make demo` runs it (bundled toy weights, no data), with tiny budgets and the mode's
    own criteria: on 2 held-out prototypes a cell moves in steps of 0.5, so the gate may go either way."""
    ws = module_tmp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setenv("CLIPFORGET_CACHE", str(ws / "cache"))
        r = CliRunner().invoke(app, ["unlearn", "--mode", "global", "--classes", "star", "--registered-name", "rel-demo",
                                     "--prototypes-per-cell", "2", "--steps", "10", "--heldout-per-cell", "2",
                                     "--json", str(ws / "report.json")])
    return r, _report(ws / "report.json", r)


def test_data_free_unlearn_registers_exactly_when_the_gate_passes(demo_run, checked):
    from clipforget.io import registry

    r, report = demo_run
    evaluation = report["evaluation"]["data"] if isinstance(report["evaluation"], dict) else report["evaluation"]
    assert evaluation.startswith("held-out prototypes") and len(report["cells"]) == 40
    assert {c["n"] for c in report["cells"]} == {2}
    held = report["heldout"]  # the gate's evidence, and what the bank gave of it
    assert held["per_cell"] == "held-out prototypes (2/cell)" and held["reused"] + held["synthesized"] == 40
    failed = [c for c in report["checks"] if not c["passed"]]
    versions = registry.versions("rel-demo")
    if failed:
        assert r.exit_code == 1 and "rejected, nothing registered" in r.output and versions == []
        assert DATA_FREE_REJECTED_NOTE in r.output and DATA_FREE_NOTE not in r.output
        assert report["registered"] is None
    else:
        assert r.exit_code == 0 and "approved: registered rel-demo version 1" in r.output
        assert DATA_FREE_NOTE in r.output
        assert [v["version"] for v in versions] == ["1"] and versions[0]["sha256"] == report["output"]["sha256"]
    checked(f"unlearn without --data (the make demo path), tiny budgets, the mode's criteria: "
            f"{'rejected, nothing registered' if failed else 'approved, registered once'}; report on held-out "
            "prototypes", bad_registrations=0)


def _govern(secret_run, tmp_path, *extra: str):
    out = tmp_path / "governance.json"
    r = CliRunner().invoke(app, ["govern", "--policy", str(secret_run["ws"] / "policy.json"), "--ledger",
                                 secret_run["ledger"], "--no-promote", "--json", str(out), *extra])
    return r, json.loads(out.read_text()) if out.is_file() else None


def test_cli_rebuild_gives_the_registered_weights(secret_run, checked):
    """`clipforget rebuild` from the base checkpoint and the ledger. The digests are compared bit for bit: the
    rebuild runs in the process (same CPU, same torch thread count) that built the version, where the fold is
    deterministic; on another machine a rebuild may differ in the last bits, which this test does not claim."""
    r = CliRunner().invoke(app, ["rebuild", "--policy", str(secret_run["ws"] / "policy.json"), "--ledger",
                                 secret_run["ledger"]])
    assert r.exit_code == 0, r.output
    assert f"{NAME} version {secret_run['report']['registered']['version']}: sha256" in r.output
    assert "(identical)" in r.output
    checked("clipforget rebuild (CLI): rebuilt from base + ledger, sha256 identical to the registered weights")


def test_cli_rebuild_after_an_upgrade_changed_a_default(secret_run, monkeypatch, checked):
    """A release that changes a mode's default projection settings must still rebuild the registered weights: the
    rebuild takes the settings recorded with the version, not the new defaults."""
    from dataclasses import replace

    from clipforget.method import projection

    changed = replace(projection.MODE_DEFAULTS["global"], margin=0.2, margin_weight=10.0)
    monkeypatch.setitem(projection.MODE_DEFAULTS, "global", changed)
    r = CliRunner().invoke(app, ["rebuild", "--policy", str(secret_run["ws"] / "policy.json"), "--ledger",
                                 secret_run["ledger"]])
    assert r.exit_code == 0, r.output
    assert "(identical)" in r.output
    checked("clipforget rebuild after the mode's default margin changed: built with the settings recorded on the "
            "registered version, sha256 identical")


def test_cli_govern_fails_when_no_version_is_champion(secret_run, tmp_path, checked):
    from clipforget.io import registry

    c = registry.client()
    version = secret_run["report"]["registered"]["version"]
    c.delete_registered_model_alias(NAME, registry.CHAMPION)
    try:
        r, report = _govern(secret_run, tmp_path)
    finally:
        c.set_registered_model_alias(NAME, registry.CHAMPION, version)
    assert r.exit_code == 1 and "VIOLATION" in r.output, r.output
    assert [f["kind"] for f in report["findings"]] == ["champion"]
    assert "no version of rel-secrets holds the `champion` alias" in report["findings"][0]["message"]
    checked("govern (CLI) with the champion alias gone: exit 1, VIOLATION, finding `champion`; alias restored")


def test_cli_govern_fails_when_the_champion_weights_are_not_the_registered_ones(secret_run, tmp_path, checked):
    from clipforget.io import registry

    c = registry.client()
    version = secret_run["report"]["registered"]["version"]
    real = c.get_model_version(NAME, version).tags[registry.TAG_SHA256]
    c.set_model_version_tag(NAME, version, registry.TAG_SHA256, "f" * 64)
    try:
        r, report = _govern(secret_run, tmp_path)
    finally:
        c.set_model_version_tag(NAME, version, registry.TAG_SHA256, real)
    assert r.exit_code == 1 and "VIOLATION" in r.output, r.output
    kinds = [f["kind"] for f in report["findings"]]
    assert "weights" in kinds and f"not the registered {'f' * 16}" in report["findings"][kinds.index("weights")]["message"]
    checked("govern (CLI) when the champion's weights do not hash to its sha256 tag: exit 1, finding `weights`")


def test_mlflow_down_at_registration_then_back_registers_exactly_one_version(secret_run, servers, tmp_path,
                                                                              monkeypatch, checked):
    """MLflow answers 503 to every model-version creation (a fault-injecting proxy in front of the server), then
    comes back: the first run fails cleanly with nothing registered, the rerun registers exactly one version."""
    from faultproxy import Fault, FaultProxy

    from clipforget.io import registry

    name = "rel-mlflow-down"
    args = ["unlearn", "--mode", "global", "--classes", "heart", "--registered-name", name, "--request-id", "down-1",
            "--prototypes-per-cell", "2", "--steps", "10", "--heldout-per-cell", "2", "--no-mode-criteria",
            "--max-forget-acc", "1", "--max-retain-drop", "1", "--json", str(tmp_path / "r.json")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPFORGET_CACHE", str(secret_run["ws"] / "cache"))  # its prototype bank: no synthesis
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the proxy's 503 reaches the task at once
    with FaultProxy(servers["mlflow"]) as proxy:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        seen = proxy.plan(lambda method, path, n: Fault("status", 503) if "model-versions/create" in path else Fault())
        down = CliRunner().invoke(app, args)
        assert down.exit_code == 1 and seen.count("status") >= 1, down.output
        assert registry.versions(name) == []
        proxy.plan(lambda method, path, n: Fault())
        up = CliRunner().invoke(app, args)
    assert up.exit_code == 0 and f"approved: registered {name} version 1" in up.output, up.output
    again = CliRunner().invoke(app, args)  # and a third run registers nothing new
    assert again.exit_code == 0 and "already registered" in again.output
    assert [v["version"] for v in registry.versions(name)] == ["1"]
    checked(f"model-version creation answered 503 ({seen.count('status')} calls): run failed, nothing registered; "
            "MLflow back: the rerun registered version 1, a third run nothing (exactly one version)",
            faults_survived=1, bad_registrations=0)


@pytest.mark.parametrize("passed", [True, False])
def test_the_prefect_summary_of_a_data_free_verdict_says_what_it_does_not_claim(passed):
    """Approved or rejected on held-out prototypes, the summary says it was not judged on images; a rejection also
    says what gives a verdict on images and what fits a projection on them. Judged on images, neither."""
    from clipforget.gate.verdict import DATA_FREE_CAVEAT, DATA_FREE_REJECTION
    from tasks.validate import summary_markdown

    metrics = {"forget_before": 1.0, "forget_after": 0.0, "forget_max_after": 0.0, "retain_before": 1.0,
               "retain_after": 0.99, "retain_drop": 0.01, "retain_max_cell_drop": 0.1, "worst_retain_cell": "square/sketch"}
    check = {"name": "max forget-cell accuracy", "value": 0.1, "limit": 0.15, "estimate": 0.0, "n": 20,
             "rule": "95% upper bound", "passed": passed}
    data_free = summary_markdown("r", "global", ["star/photo"], passed, metrics, [check], "held-out prototypes",
                                 data_free=True)
    assert (DATA_FREE_CAVEAT in data_free) == passed and (DATA_FREE_REJECTION in data_free) == (not passed)
    assert "data_uri" in data_free and ("fit_uri" in data_free) == (not passed)
    on_images = summary_markdown("r", "global", ["star/photo"], passed, metrics, [check], "images", data_free=False)
    assert DATA_FREE_CAVEAT not in on_images and DATA_FREE_REJECTION not in on_images
