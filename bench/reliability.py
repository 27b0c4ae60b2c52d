"""The reliability table (docs/RELIABILITY.md): run tests/reliability, turn its JUnit XML into markdown.

    python bench/reliability.py --markdown docs/RELIABILITY.md            # run the cases, write the table
    python bench/reliability.py --xml runs/reliability.xml --markdown ... # only convert an earlier run's XML

Each case records what it checked (pytest's `record_property("checked", ...)`, see tests/reliability/conftest.py)
and counters the summary adds up: faults_survived, bad_registrations, ledger_delta (entries lost or doubled) and
secrets_found. A case that failed shows its failure message; the summary counts it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {
    "test_bad_input": "Bad input (request submit / unlearn)",
    "test_no_pickle": "Security: no unpickling on any load path",
    "test_secrets_and_data_free": "Security: secrets, tags; the data-free path; rebuild and govern through the CLI",
    "test_nullspace_properties": "Security of the method: property tests of the nullspace builder (hypothesis)",
    "test_s3_faults": "Faults: S3 through a fault-injecting proxy",
    "test_ledger_faults": "Faults: broken ledgers and concurrent appends",
    "test_signals": "Faults: SIGTERM and Ctrl-C",
    "test_disk_full": "Faults: a full disk",
    "test_kill_and_race": "Faults: SIGKILL and races between processes; governance findings",
}
COUNTERS = ("faults_survived", "bad_registrations", "ledger_delta", "secrets_found")
NOTES = """## Decisions where the issue was silent

- **Limits.** A request or policy file is at most 1 MiB and UTF-8; `requested_by` is one line of 1-256 characters
  without control characters (markup is kept verbatim: it is only ever a tag value and a CLI line, never rendered);
  `reason` at most 4,000 characters; synthesis budgets 1-1,024 prototypes (and held-out prototypes) per cell and
  1-100,000 steps; thresholds and the target cosine must be finite. Grid names are 1-200 characters without `/`,
  `,`, `\\`, control characters or surrounding spaces (cells are named `class/domain` and joined by `,`).
- **Images.** Evaluation images are checked before any work: at least 8x8 and at most 40 million pixels, a valid
  header and PNG/JPEG structure (`PIL.Image.verify`, no decoding), and every file and folder must resolve inside
  the data folder (symlinks out of it are refused). A mirrored S3 prefix that fails the check is not kept.
- **Checkpoints.** A safetensors header is checked against the file size before any reader maps it; NaN or Inf
  weights are refused; a state dict that does not fit the architecture names its missing, unexpected or
  mis-shaped tensors. A non-safetensors file is read only with `weights_only=True`; a pickle is refused.
- **Signals.** The first SIGTERM or Ctrl-C prints one line, lets Prefect record the run as crashed for up to 2 s,
  then ends every child process and exits with 128 + the signal number; a second signal ends it at once.
  Commands called in-process (tests, notebooks) keep their host's handlers. The temporary Prefect server a command
  starts for itself ends with the command on Linux however the command ends, SIGKILL included (`PR_SET_PDEATHSIG`;
  `tests/flows/test_runners.py`).
- **S3 timeouts.** `CLIPFORGET_S3_TIMEOUT` (default 60 s) bounds one call, so a stalled endpoint is retried instead
  of hanging.
- **MLflow user.** Runs are tagged `mlflow.user=clipforget` instead of the tracking username MLflow would record.
- **Registration, exactly once.** A version's model card is written last, after its aliases: a version without one
  was cut short (the process died after creating it), and the next run for that request id completes it
  (`candidate` alias, model card from the report logged with its run) instead of registering another. Two runs that
  create a version for one request id at the same moment both look again afterwards: the lowest version stays, the
  other run deletes its own version and run and reports the one that stayed.
- **Two submits at once.** Each `request submit` appends its entry, then builds the ledger head it reads. When both
  read the same head they build one version id (registered once); when the first read only its own entry, its
  version covers that entry and the later head's version covers both. `--promote` moves `champion` to whichever
  registers last, which can be the older head: governance would then report `coverage` (the newer head is registered
  already, so it builds nothing) until `clipforget models promote` moves it (read from the code; the race cases run
  without `--promote`).
"""


def run_tests(xml: Path) -> float:
    xml.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                    "tests/reliability",
                    f"--junitxml={xml}", "-o", "junit_family=xunit1"], cwd=REPO, check=False)
    return time.perf_counter() - t0


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def cases(xml: Path) -> list[dict]:
    out = []
    for tc in ET.parse(xml).getroot().iter("testcase"):
        module = tc.get("classname", "").rsplit(".", 1)[-1]
        name = tc.get("name", "")
        m = re.match(r"^(test_\w+)\[(.*)\]$", name)
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        failure = next((tc.find(k) for k in ("failure", "error") if tc.find(k) is not None), None)
        skipped = tc.find("skipped") is not None
        out.append({
            "module": module, "test": m.group(1) if m else name, "case": m.group(2) if m else name.removeprefix("test_")
            .replace("_", " "), "seconds": float(tc.get("time") or 0), "checked": props.get("checked", ""),
            "counters": {k: json.loads(props[k]) for k in COUNTERS if k in props},
            "result": "skipped" if skipped else ("FAILED" if failure is not None else "passed"),
            "failure": (failure.get("message") or "")[:300] if failure is not None else ""})
    return out


def markdown(rows: list[dict], seconds: float | None) -> str:
    import torch

    passed = sum(r["result"] == "passed" for r in rows)
    total = {k: sum(r["counters"].get(k, 0) for r in rows) for k in COUNTERS}
    bad_input = [r for r in rows if r["module"] == "test_bad_input" and r["test"] == "test_bad_input"]
    lines = [
        "# Reliability and security: the case table",
        "",
        "Every row is a test in `tests/reliability/` run against the real components the suite starts (a moto S3",
        "server over HTTP, an `mlflow server` subprocess, Prefect's test harness; a fault-injecting HTTP proxy on",
        "loopback in front of moto and MLflow; real `clipforget` processes for the signal, SIGKILL and race cases). "
        "Regenerate with",
        "",
        "```bash",
        ".venv/bin/python bench/reliability.py --markdown docs/RELIABILITY.md",
        "```",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}, torch CPU capability "
        f"`{torch.backends.cpu.get_cpu_capability()}`)" + (f", {seconds:.0f} s for the whole folder" if seconds else "")
        + " on two pytest workers (each starts the session servers of tests/conftest.py once, shared with "
        "tests/flows in a whole-suite run).",
        "",
        "## Summary",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| cases tried | {len(rows)} |",
        f"| cases passed | {passed} |",
        f"| bad-input cases (one error line, exit code, nothing registered, ledger unchanged, no partial file) | "
        f"{sum(r['result'] == 'passed' for r in bad_input)} of {len(bad_input)} |",
        f"| faults survived (completed, or failed cleanly and completed on a rerun) | {total['faults_survived']} |",
        f"| bad registrations | {total['bad_registrations']} |",
        f"| ledger entries lost or doubled | {total['ledger_delta']} |",
        f"| secrets found in any output | {total['secrets_found']} |",
        "",
    ]
    by_module: dict[str, list[dict]] = {}
    for r in rows:
        by_module.setdefault(r["module"], []).append(r)
    for module, title in [*SECTIONS.items(), *((m, m) for m in by_module if m not in SECTIONS)]:
        group = by_module.get(module)
        if not group:
            continue
        lines += [f"## {title}", "", "| case | what was checked | result | s |", "| --- | --- | :---: | ---: |"]
        for r in group:
            what = r["checked"] or r["failure"]
            result = r["result"] if r["result"] == "passed" else f"**{r['result']}**: {_cell(r['failure'])}"
            lines.append(f"| {_cell(r['case'])} | {_cell(what)} | {result} | {r['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n" + NOTES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xml", type=Path, help="convert this JUnit XML instead of running the tests")
    ap.add_argument("--markdown", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    ap.add_argument("--seconds", type=float, help="with --xml: the measured wall time of that run, for the header")
    args = ap.parse_args()
    seconds = args.seconds
    xml = args.xml
    if xml is None:
        xml = REPO / "runs" / "reliability.xml"
        seconds = run_tests(xml)
    rows = cases(xml)
    args.markdown.write_text(markdown(rows, seconds))
    print(f"{len(rows)} cases, {sum(r['result'] == 'passed' for r in rows)} passed; wrote {args.markdown}")
    if any(r["result"] == "FAILED" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
