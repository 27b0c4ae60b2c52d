"""SIGKILL and races, with real `clipforget` processes against the suite's servers (moto S3, `mlflow server`,
Prefect's test harness), a fault-injecting proxy where a moment must be held, and the governance findings that
only a real build and audit produce.

- SIGKILL mid-synthesis: the prototype bank holds only whole files; the rerun reuses the banked cells,
  synthesizes only the rest and registers exactly one version.
- SIGKILL mid-registration (after the model version was created, before its aliases and model card): the rerun
  completes that version; exactly one version for the request id.
- Two flows registering one request id at the same moment (the proxy holds both model-version creations until
  both arrived): one version stays, the other run reuses it.
- Two processes filling the same bank cells at the same moment: whole files, bit-identical to one process alone.
- Two `request submit` at the same moment on one ledger (folder; S3 with both ledger writes held until both
  arrived): both entries once, chain intact, one cumulative version covering both, no version id twice.
- Governance findings `build` (the pending batch fails the gate) and `retain` (the champion misses the policy's
  retain criteria) after the policy was tightened.

Tiny synthesis budgets (2 prototypes per cell, 10 or 20 steps, 2 held-out) keep each case to seconds of work; the
processes' own start-up (imports) is most of their time.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

CLIPFORGET = str(Path(sys.executable).parent / "clipforget")
TINY = ["--prototypes-per-cell", "2", "--steps", "10", "--heldout-per-cell", "2"]
LAX = ["--no-mode-criteria", "--max-forget-acc", "1", "--max-retain-drop", "1"]
TINY_POLICY = {"synthesis": {"prototypes_per_cell": 2, "steps": 10, "heldout_per_cell": 2},
               "thresholds": {"mode_criteria": False, "max_forget_acc": 1.0, "max_retain_drop": 1.0}}
N_CELLS = 40  # the toy grid


def _unlearn(name: str, request_id: str, report: Path, *extra: str) -> list[str]:
    return ["unlearn", "--mode", "global", "--classes", "heart", "--registered-name", name, "--request-id", request_id,
            *TINY, *LAX, "--json", str(report), *extra]


@pytest.fixture(scope="module")
def warm(servers, module_tmp) -> Path:
    """A prototype bank holding every cell of the toy grid at the tiny budgets (the build's prototypes and the
    held-out ones), made by one in-process `unlearn`: the cases below that are about registration copy it."""
    ws = module_tmp("warm")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setenv("CLIPFORGET_CACHE", str(ws / "cache"))
        r = CliRunner().invoke(app, _unlearn("rel-warm", "warm-1", ws / "r.json"))
    assert r.exit_code == 0, r.output
    return ws / "cache" / "prototypes"


def _cache(warm: Path, dst: Path) -> Path:
    shutil.copytree(warm, dst / "prototypes")
    return dst


def _env(tmp_path: Path, cache: Path, **extra: str) -> dict:
    """A `clipforget` process on the harness's Prefect server, its own cache and Prefect home."""
    import prefect.settings

    return {**os.environ, "CLIPFORGET_CACHE": str(cache), "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_API_URL": str(prefect.settings.PREFECT_API_URL.value()),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([CLIPFORGET, *args], cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT)


def _until(done: Callable[[], bool], procs: list[subprocess.Popen], logs: list[Path], what: str,
           timeout: float = 300) -> None:
    """Poll until `done()`; fail at once when a process ended first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        for p, log in zip(procs, logs, strict=True):
            assert p.poll() is None, f"ended (rc {p.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n" + logs[0].read_text()[-3000:]
        time.sleep(0.05)


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 400) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, log.read_text()


def _bank_files(cache: Path) -> list[Path]:
    root = cache / "prototypes"
    return sorted(root.rglob("*.safetensors")) if root.is_dir() else []


def _read_whole(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), not __contains__


def _versions_for(name: str, request_id: str) -> list:
    from clipforget.io import registry

    c = registry.client()
    return c.search_model_versions(f"name = '{name}' and tags.`{registry.TAG_REQUEST_ID}` = '{request_id}'")


def test_sigkill_mid_synthesis_leaves_whole_bank_files_and_the_rerun_reuses_them(servers, warm, tmp_path, checked):
    """SIGKILL once the first synthesis chunk is banked (4 cells a chunk, 10 chunks): every bank file is whole, no
    temp file a reader would take, nothing registered; the rerun reuses exactly the banked cells, synthesizes the
    rest and registers one version. (The bank starts with the held-out prototypes only, so that every prototype
    of the build is synthesized here and nothing else is.)"""
    from clipforget.io import registry

    name, rid = "rel-kill-synth", "kill-synth-1"
    cache = tmp_path / "cache"
    heldout = [p for p in warm.rglob("*.safetensors") if "images" in _read_whole(p)]
    assert len(heldout) == N_CELLS
    for p in heldout:
        (cache / "prototypes" / p.relative_to(warm)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, cache / "prototypes" / p.relative_to(warm))
    env = _env(tmp_path, cache, CLIPFORGET_CELLS_PER_TASK="4")
    args = _unlearn(name, rid, tmp_path / "report.json")
    log = tmp_path / "killed.txt"
    proc = _start(args, env, log)
    try:
        _until(lambda: len(_bank_files(cache)) > N_CELLS, [proc], [log], "a banked cell")
        proc.kill()  # SIGKILL: no handler, no cleanup
    finally:
        rc, _ = _wait(proc, log)
    assert rc == -9
    files = [p for p in _bank_files(cache) if p.name not in {h.name for h in heldout}]
    for f in files:
        assert "images" not in _read_whole(f)  # whole (a partial file raises), and one of the build's cells
    others = [p.name for p in (cache / "prototypes").rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in others), others  # a cut write stays a hidden temp
    assert 0 < len(files) < N_CELLS, len(files)
    assert registry.versions(name) == [] and not (tmp_path / "report.json").exists()

    rerun = subprocess.run([CLIPFORGET, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prototypes"]["reused"] == len(files), report["prototypes"]
    assert report["prototypes"]["synthesized"] == N_CELLS - len(files), report["prototypes"]
    assert [v["version"] for v in registry.versions(name)] == ["1"] and len(_versions_for(name, rid)) == 1
    checked(f"SIGKILL after the first chunk was banked: {len(files)} bank file(s), all whole, {len(others)} hidden "
            f"temp file(s), nothing registered; the rerun reused {len(files)} cells, synthesized "
            f"{N_CELLS - len(files)}, registered version 1 (exactly one)", faults_survived=1, bad_registrations=0)


def test_sigkill_mid_registration_then_rerun_leaves_one_complete_version(servers, warm, tmp_path, checked):
    """The proxy in front of MLflow holds the first alias call (the version exists, its aliases and model card do
    not) and the process is SIGKILLed there; the rerun completes that version instead of registering another."""
    from faultproxy import Fault, FaultProxy

    from clipforget.io import registry

    name, rid = "rel-kill-register", "kill-reg-1"
    cache = _cache(warm, tmp_path / "cache")
    reached, release = threading.Event(), threading.Event()

    def rule(method: str, path: str, n: int) -> Fault:
        if method == "POST" and "registered-models/alias" in path:
            reached.set()
            release.wait(120)
            return Fault("status", 503)
        return Fault()

    args = _unlearn(name, rid, tmp_path / "report.json", "--promote")
    log = tmp_path / "killed.txt"
    with FaultProxy(servers["mlflow"]) as proxy:
        proxy.plan(rule)
        proc = _start(args, _env(tmp_path, cache, MLFLOW_TRACKING_URI=proxy.url), log)
        try:
            _until(reached.is_set, [proc], [log], "the alias call")
            proc.kill()
        finally:
            release.set()
            rc, _ = _wait(proc, log)
    assert rc == -9
    left = _versions_for(name, rid)
    assert len(left) == 1 and not left[0].aliases and not left[0].description  # created, then cut short

    rerun = subprocess.run([CLIPFORGET, *args], cwd=tmp_path, env=_env(tmp_path, cache), capture_output=True,
                           text=True, timeout=400)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0 and f"already registered {name} version 1" in out, out[-3000:]
    assert "was cut short while registering" in out, out[-3000:]
    assert [v["version"] for v in registry.versions(name)] == ["1"] and len(_versions_for(name, rid)) == 1
    mv = registry.client().get_model_version(name, "1")
    assert {registry.CANDIDATE, registry.CHAMPION} <= set(mv.aliases), mv.aliases
    assert mv.description.startswith(f"# {name} version 1"), mv.description[:200]
    checked("SIGKILL while the first alias call was held (version 1 created, no alias, no model card): the rerun "
            "completed version 1 (candidate and champion aliases, model card); exactly one version for the request id",
            faults_survived=1, bad_registrations=0)


def test_two_flows_registering_one_request_id_at_once_leave_one_version(servers, warm, tmp_path, checked):
    """Two `unlearn` processes, same request id; the proxy holds each model-version creation until both arrived,
    so both create one: the later version is withdrawn, its run deleted, and that run reports the earlier one."""
    from faultproxy import Fault, FaultProxy

    from clipforget.io import registry

    name, rid = "rel-race-register", "race-1"
    barrier, lock, held = threading.Barrier(2, timeout=120), threading.Lock(), []

    def rule(method: str, path: str, n: int) -> Fault:
        if method == "POST" and "model-versions/create" in path:
            with lock:
                hold = len(held) < 2
                held.append(n)
            if hold:
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    pass
        return Fault()

    procs, logs = [], []
    with FaultProxy(servers["mlflow"]) as proxy:
        proxy.plan(rule)
        for i in range(2):
            cache = _cache(warm, tmp_path / f"cache{i}")
            (tmp_path / f"p{i}").mkdir()
            logs.append(tmp_path / f"p{i}" / "out.txt")
            procs.append(_start(_unlearn(name, rid, tmp_path / f"p{i}" / "report.json"),
                                _env(tmp_path, cache, MLFLOW_TRACKING_URI=proxy.url), logs[-1]))
        results = [_wait(p, log) for p, log in zip(procs, logs, strict=True)]
        barrier.abort()
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert len(held) == 2  # both runs created a version at the same moment
    reports = [json.loads((tmp_path / f"p{i}" / "report.json").read_text()) for i in range(2)]
    assert {r["registered"]["version"] for r in reports} == {"1"}, [r["registered"] for r in reports]
    assert [v["version"] for v in registry.versions(name)] == ["1"] and len(_versions_for(name, rid)) == 1
    c = registry.client()
    runs = c.search_runs([c.get_experiment_by_name(registry.EXPERIMENT).experiment_id],
                         f"tags.`{registry.TAG_REQUEST_ID}` = '{rid}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert registry.CANDIDATE in c.get_model_version(name, "1").aliases
    checked("two unlearn processes, one request id, both model-version creations held until both arrived: both "
            "exited 0 reporting version 1; one version and one run remain (the later version withdrawn)",
            bad_registrations=0)


def test_two_processes_filling_one_bank_cell_leave_a_whole_identical_file(tmp_path, checked):
    """Two processes released by one barrier synthesize the same two cells into one bank: both finish, the files
    are whole and bit-identical to what one process alone banks (same seed)."""
    from reliability_workers import fill_bank_cells

    cells = ["star/photo", "heart/sketch"]
    ctx = multiprocessing.get_context("spawn")
    env = {k: v for k, v in os.environ.items() if k.startswith(("CLIPFORGET_", "OMP_", "MKL_"))}
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        alone = pool.apply(fill_bank_cells, (str(tmp_path / "alone"), cells, 20, None, env))
        barrier = manager.Barrier(2)
        both = pool.starmap(fill_bank_cells, [(str(tmp_path / "shared"), cells, 20, barrier, env)] * 2)
    assert all(r["synthesized"] == cells for r in both), both  # both really synthesized them, at once
    shared = tmp_path / "shared" / "prototypes"
    assert sorted(p.name for p in shared.rglob("*") if p.is_file()) == sorted(Path(p).name for p in alone["paths"])
    for mine, ref in zip(both[0]["paths"], alone["paths"], strict=True):
        got, want = _read_whole(Path(mine)), _read_whole(Path(ref))
        assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want), mine
    checked(f"two processes released by one barrier filled cells {', '.join(cells)} of one bank: both synthesized, "
            "2 files, whole, no temp file left, tensors bit-identical to one process alone")


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_two_submits_at_once_land_both_and_one_version_covers_both(where, servers, warm, tmp_path, checked):
    """Two `request submit` processes at once on one ledger. Each appends its entry, then builds the ledger head it
    reads: when both read the same head they build one version id (registered once); when the first read only its
    own entry, there are two versions, the later head's covering both. Either way: both entries once, the chain
    verifies, one version covers both, no version id is registered twice."""
    from faultproxy import Fault, FaultProxy

    from clipforget.governance.ledger import Ledger
    from clipforget.io import registry

    name = f"rel-race-submit-{where}"
    bucket = servers["bucket"]
    prefix = f"race-submit-{tmp_path.name}/"
    ledger = str(tmp_path / "ledger") if where == "folder" else f"s3://{bucket}/{prefix}"
    (tmp_path / "policy.json").write_text(json.dumps({"registered_name": name, **TINY_POLICY}))
    barrier, lock, held = threading.Barrier(2, timeout=120), threading.Lock(), []

    def rule(method: str, path: str, n: int) -> Fault:  # hold the first ledger write of each until both arrived
        if method == "PUT" and prefix in path:
            with lock:
                hold = len(held) < 2
                held.append(path)
            if hold:
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    pass
        return Fault()

    ids = ["race-a", "race-b"]
    with FaultProxy(servers["endpoint"]) as proxy:
        proxy.plan(rule)
        procs, logs = [], []
        for rid, cls in zip(ids, ["heart", "tree"], strict=True):
            d = tmp_path / rid
            d.mkdir()
            (d / "request.json").write_text(json.dumps({"request_id": rid, "requested_by": "privacy", "mode": "global",
                                                        "classes": [cls]}))
            logs.append(d / "out.txt")
            extra = {"AWS_ENDPOINT_URL": proxy.url} if where == "s3" else {}
            procs.append(_start(["request", "submit", str(d / "request.json"), "--policy", str(tmp_path / "policy.json"),
                                 "--ledger", ledger, "--json", str(d / "report.json")],
                                _env(d, _cache(warm, d / "cache"), **extra), logs[-1]))
        results = [_wait(p, log) for p, log in zip(procs, logs, strict=True)]
        barrier.abort()
    for rc, out in results:
        assert rc == 0, out[-3000:]
    if where == "s3":
        assert len(held) >= 2  # both entries' writes met at the server (one of them then retried the next seq)
    entries = Ledger(ledger).entries()  # verifies the chain
    assert sorted(e.request_id for e in entries) == ids and [e.seq for e in entries] == [0, 1]
    versions = registry.versions(name)
    built = [v["request_id"] for v in versions]
    assert len(built) == len(set(built)), built  # no version id twice
    order = [e.request_id for e in entries]
    assert all(v["request_ids"] == order[: len(v["request_ids"])] for v in versions), versions  # heads of this ledger
    covering = [v for v in versions if v["request_ids"] == order]
    assert len(covering) == 1 and covering[0]["ledger_head"] == entries[-1].hash, versions
    checked(f"two request submit processes at once on one {where} ledger"
            f"{' (both ledger writes held until both arrived)' if where == 's3' else ''}: both exited 0; 2 entries, "
            f"seq 0..1, chain verified (0 lost, 0 doubled); {len(versions)} version(s), each id once, version "
            f"{covering[0]['version']} covers both requests", ledger_delta=0, bad_registrations=0)


def test_governance_names_build_and_retain_findings(servers, warm, tmp_path, monkeypatch, checked):
    """A champion built and promoted by governance under a lax policy (2 held-out prototypes per cell); then the
    policy is tightened to the mode's criteria: governance builds the pending head under it and the gate rejects it
    (finding `build`), and the champion's audit cannot show the retain criteria on 2 images per cell (finding
    `retain`, naming the worst retained cell and its n: "not enough evidence" when none of its 2 images flipped, the
    measured drop when one did); the run fails and names both."""
    from clipforget.gate.verdict import Thresholds
    from clipforget.governance.ledger import Ledger
    from clipforget.governance.request import ModelPolicy
    from flows.governance import governance

    name = "rel-govern-findings"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPFORGET_CACHE", str(_cache(warm, tmp_path / "cache")))
    ledger = tmp_path / "ledger"
    Ledger(ledger).append("dsr-g1", {"mode": "global", "classes": ["heart"], "domains": [], "requested_by": "privacy"})
    lax = ModelPolicy.model_validate({"registered_name": name, **TINY_POLICY})
    state = governance(lax, str(ledger), True, str(tmp_path / "lax.json"), return_state=True)
    first = json.loads((tmp_path / "lax.json").read_text())
    assert state.is_completed() and first["passed"], first["findings"]
    assert first["processed"]["version"] == "1" and first["champion"]["version"] == "1"

    strict = lax.model_copy(update={"thresholds": Thresholds()})  # the mode's own criteria
    state = governance(strict, str(ledger), True, str(tmp_path / "strict.json"), return_state=True)
    report = json.loads((tmp_path / "strict.json").read_text())
    findings = {f["kind"]: f for f in report["findings"]}
    assert state.is_failed() and not report["passed"], report["findings"]
    assert {"build", "retain"} <= set(findings), list(findings)
    assert "was rejected" in findings["build"]["message"] and report["processed"]["version"] is None
    assert findings["retain"]["cells"] and findings["retain"]["cells"][0] in findings["retain"]["message"]
    retain = findings["retain"]["message"]
    assert "n=2" in retain and ("not enough evidence (n=" in retain or " lost, " in retain), retain
    assert findings["build"]["message"] in state.message and findings["retain"]["message"] in state.message
    checked(f"champion built under a lax policy, then the policy tightened to the mode's criteria: governance "
            f"Failed with findings {', '.join(findings)}; build: {findings['build']['message'][:120]}; retain: "
            f"{findings['retain']['message'][:120]}", bad_registrations=0)
