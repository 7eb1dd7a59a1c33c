"""A real HTTP webhook on 127.0.0.1 (the operator's service outside the system): it records
each POSTed JSON body and answers what the test set, or holds the answer back (a hung
webhook) until the test ends."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["WebhookAnswer", "WebhookServer", "webhook_server"]


@dataclass
class WebhookAnswer:
    status: int = 200
    body: bytes = b'{"decision": "allow"}'
    headers: dict[str, str] = field(default_factory=dict)
    #: hold the answer until the server stops (a webhook that never answers in time).
    hang: bool = False


@dataclass
class WebhookServer:
    url: str
    answer: WebhookAnswer
    received: list[dict[str, Any]]
    released: threading.Event

    def answer_json(self, payload: dict[str, Any], status: int = 200) -> None:
        self.answer = WebhookAnswer(status, json.dumps(payload).encode())


@contextmanager
def webhook_server() -> Iterator[WebhookServer]:
    """A webhook server on an ephemeral 127.0.0.1 port, answering ``allow`` until told."""
    state = WebhookServer("", WebhookAnswer(), [], threading.Event())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  (http.server's name)
            length = int(self.headers.get("Content-Length") or 0)
            state.received.append(json.loads(self.rfile.read(length)))
            answer = state.answer
            if answer.hang:
                state.released.wait(30)
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/enroll-check"
    thread = threading.Thread(target=server.serve_forever, name="test-webhook", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.released.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
