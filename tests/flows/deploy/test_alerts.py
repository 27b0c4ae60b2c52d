"""The governance alert, for real: a `prefect server`, a notification block pointing at a webhook this test serves,
the shipped automation installed with `clipforget alerts install`, and a `clipforget govern` run (its own process)
that finds the ledger tampered with: its event reaches the server, the automation fires, and the team's webhook
receives the findings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-c", "from flows.cli import main; main()"]


@pytest.fixture()
def webhook():
    """An HTTP endpoint on loopback standing in for the team's chat webhook; the bodies it received."""
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(json.loads(body or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def test_noncompliant_governance_notifies_the_team(prefect_stack, mlflow_server, webhook, tmp_path):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from clipforget.governance.ledger import Ledger
    from clipforget.governance.request import DeletionRequest

    url, received = webhook
    with temporary_settings(updates={PREFECT_API_URL: prefect_stack.url}):
        CustomWebhookNotificationBlock(name="clipforget-alerts", url=url,
                                       json_data={"text": "{{subject}}\n{{body}}"}).save("team-alerts", overwrite=True)
    env = {**prefect_stack.env, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(REPO),
           "CLIPFORGET_CACHE": os.environ["CLIPFORGET_CACHE"]}
    out = subprocess.run([*CLI, "alerts", "install", "--block", "custom-webhook/team-alerts"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clipforget.governance.noncompliant" in out.stdout, out.stdout + out.stderr
    again = subprocess.run([*CLI, "alerts", "install", "--block", "custom-webhook/team-alerts"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    with prefect_stack.client() as client:  # installing twice replaces, never duplicates
        assert len(client.read_automations_by_name("clipforget-governance-noncompliant")) == 1

    # a ledger someone rewrote after the fact: governance must fail loudly, and tell the team
    ledger = tmp_path / "ledger"
    request = DeletionRequest(request_id="dsr-alert", requested_by="tests", mode="global", classes=["star"])
    Ledger(str(ledger)).append("dsr-alert", request.ledger_record())
    entry = ledger / "00000000.json"
    data = json.loads(entry.read_text())
    data["request"]["classes"] = ["heart"]
    entry.write_text(json.dumps(data))
    report = tmp_path / "governance.json"
    t0 = time.monotonic()
    gov = subprocess.run([*CLI, "govern", "--ledger", str(ledger), "--json", str(report)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert gov.returncode == 1, gov.stdout[-3000:] + gov.stderr[-3000:]
    findings = json.loads(report.read_text())["findings"]
    assert findings[0]["kind"] == "ledger"

    deadline = time.monotonic() + 90
    while not received and time.monotonic() < deadline:
        time.sleep(1)
    assert received, f"no notification within {time.monotonic() - t0:.0f} s\n{prefect_stack.logs()}"
    text = received[0]["text"]
    assert "clipforget governance: clipforget-toy champion is NOT compliant" in text
    assert "ledger: " in text and "00000000.json was changed" in text
    print(f"governance run to team notification: {time.monotonic() - t0:.1f} s")
