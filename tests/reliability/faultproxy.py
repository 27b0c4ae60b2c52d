"""A fault-injecting HTTP proxy on loopback, in front of a real server (the moto S3 server, an `mlflow server`).

`plan(rule)` decides per request: forward it, answer an error status without forwarding, forward it and then
answer an error (the server did the work, the client never heard: the case that doubles writes), or stall
before forwarding. Rules see the method and path, and the proxy counts what it saw.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERROR_BODY = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>injected</Message></Error>'


@dataclass
class Fault:
    kind: str = "pass"  # pass | status | after | stall | drop
    status: int = 503
    seconds: float = 0.0


@dataclass
class Seen:
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, fault kind)

    def count(self, kind: str | None = None, method: str | None = None) -> int:
        return sum(1 for m, _, k in self.requests if (kind is None or k == kind) and (method is None or m == method))


class FaultProxy:
    def __init__(self, target: str) -> None:
        self.target = urlparse(target)
        self.rule: Callable[[str, str, int], Fault] = lambda method, path, n: Fault()
        self.seen = Seen()
        self._n = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    n = proxy._n
                    proxy._n += 1
                fault = proxy.rule(self.command, self.path, n)
                proxy.seen.requests.append((self.command, self.path, fault.kind))
                if fault.kind == "status":
                    return self._answer(fault.status, ERROR_BODY % (b"ServiceUnavailable" if fault.status == 503
                                                                   else b"InternalError"))
                if fault.kind == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault.kind == "stall":
                    time.sleep(fault.seconds)
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                headers["Host"] = f"{proxy.target.hostname}:{proxy.target.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if fault.kind == "after":  # the server did it; the client hears an error
                    conn.close()
                    return self._answer(fault.status, ERROR_BODY % b"InternalError")
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def plan(self, rule: Callable[[str, str, int], Fault]) -> Seen:
        """Apply `rule(method, path, n)` from now on (n counts requests since this call); returns the new tally."""
        with self._lock:
            self._n = 0
            self.seen = Seen()
            self.rule = rule
        return self.seen

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def first(n: int, fault: Fault) -> Callable[[str, str, int], Fault]:
    """The first n requests get `fault`, the rest pass."""
    return lambda method, path, i: fault if i < n else Fault()


def always(fault: Fault) -> Callable[[str, str, int], Fault]:
    return lambda method, path, i: fault
