"""What answers on the port while gunicorn's master prepares models before the first start
(converting, quantizing, compiling: minutes, once): /livez 200, everything else 503 with the
current step and Retry-After, in textgen's JSON, instead of a refused connection."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from textgen.errors import error_body


class Placeholder:
    """A small HTTP server on textgen's bind address, for the preparation only."""

    def __init__(self, bind: str) -> None:
        self.step = "preparing models"
        self.server: ThreadingHTTPServer | None = None
        self.bind = bind

    def start(self) -> None:
        if self.bind.startswith("unix:"):
            return  # a socket file is made by gunicorn itself; nothing to answer on meanwhile
        host, _, port = self.bind.rpartition(":")
        host = host.strip("[]")
        placeholder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's names)
                if self.path.split("?")[0] == "/livez":
                    self.answer(200, {"status": "alive", "detail": placeholder.step})
                elif self.path.split("?")[0] in ("/readyz", "/health"):
                    self.answer(503, {"status": "preparing", "detail": placeholder.step})
                else:
                    message = f"the server is starting: {placeholder.step}"
                    body = error_body(message, "service_unavailable", None, "model_loading")
                    self.answer(503, body)

            do_POST = do_GET  # noqa: N815

            def answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                if status == 503:
                    self.send_header("Retry-After", "10")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the preparation's own log lines are what matters here

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            self.server = Server((host, int(port)), Handler)
        except OSError:
            return  # the port is taken: gunicorn will say so when it binds
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Close the port before gunicorn binds it."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
