"""textgen's gunicorn worker: gthread, changed so that no client can hold what others need.

- A request is read whole on the worker's main loop (non-blocking, bounded in size, time and
  memory) before a request thread takes it: a client that sends slowly holds a socket, never
  a thread. Headers over 64 KiB get 431, a body over the limit 413 (and the connection is
  closed), a request not received within ``TEXTGEN_READ_TIMEOUT`` 408.
- A request that would wait for a busy thread is answered at once: 429 with ``Retry-After``.
- The worker takes no connections until its models are ready, unless no other worker is
  (a first start): a loading worker leaves the traffic to the ready ones.
- gunicorn's own error answers (400, 414, 431, 501, ...) are JSON in textgen's error shape.
- Stopping drains: no new connections, /readyz 503, admitted requests finish (see drain).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from textgen.errors import TYPES_BY_STATUS, QueueFull, error_body
from textgen.server.framing import Framer

READ_CHUNK = 64 * 1024
ACCEPT_BATCH = 64
DEFAULT_READ_TIMEOUT = 30.0
LINGER_S = 2.0
# Before graceful_timeout, the time to end what still runs and send each its last event.
DRAIN_MARGIN_S = 5.0
REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
CODES = {
    400: "invalid_chunked_body",
    408: "request_timeout",
    413: "request_entity_too_large",
    429: "server_busy",
    431: "request_header_fields_too_large",
    503: "server_busy",
}


def error_bytes(
    status: int, reason: str, message: str, code: str | None, headers: dict[str, str]
) -> bytes:
    """A complete HTTP/1.1 error answer in textgen's JSON shape; the connection closes."""
    kind = TYPES_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = json.dumps(error_body(message, kind, None, code)).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "Connection: close"]
    lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error``, answering JSON instead of HTML."""
    util.write_nonblock(sock, error_bytes(status_int, reason, mesg, None, {}))


@dataclass
class Reading:
    """A request being received: its framing so far, and when it began and must be
    complete."""

    started: float
    deadline: float
    framer: Framer
    continued: bool = False  # "100 Continue" sent


class TextgenWorker(ThreadWorker):
    """See the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reading: dict[Any, Reading] = {}
        self.lingering: dict[Any, float] = {}  # refused, until the client stops sending
        self.buffered = 0
        self.in_flight = 0  # requests handed to threads and not yet returned from them
        self.counting = threading.Lock()
        self.ready_mark: Path | None = None
        self.draining = False
        self.stop_asked: float | None = None  # when a SIGTERM was put off (see handle_exit)
        # Set by the master's pre_fork hook: where ready workers leave a file named by pid.
        self.ready_dir: Path | None = None

    def init_process(self) -> None:
        util.write_error = write_json_error  # this process only: the worker's own answers
        super().init_process()

    # --- settings from the app --------------------------------------------------------
    @property
    def max_body(self) -> int:
        return int(getattr(self.wsgi, "config", {}).get("MAX_CONTENT_LENGTH") or 1 << 20)

    @property
    def read_timeout(self) -> float:
        registry = self.registry
        return DEFAULT_READ_TIMEOUT if registry is None else float(registry.settings.read_timeout)

    def retry_after(self) -> int:
        """A thread frees when a request finishes: the engines' estimate of the first one."""
        registry = self.registry
        try:
            return int(registry.retry_after()) if registry is not None else 1
        except Exception:  # an estimate must never fail the refusal itself
            return 1

    @property
    def registry(self) -> Any:
        return getattr(self.wsgi, "extensions", {}).get("textgen.registry")

    @property
    def buffer_budget(self) -> int:
        """Bytes all requests being received may hold at once."""
        return max(64 << 20, 8 * self.max_body)

    # --- receiving whole requests -----------------------------------------------------
    def accept(self, listener: Any) -> None:
        """Accept every connection waiting (up to ACCEPT_BATCH), not one per wake-up of the
        loop: each pass of the loop waits for the GIL behind the request threads, so under a
        burst of clients one connection a pass left the rest waiting in the backlog for a
        second and more."""
        for _ in range(ACCEPT_BATCH):
            accepted = self.nr_conns
            super().accept(listener)
            if self.nr_conns == accepted or self.nr_conns >= self.worker_connections:
                return

    def enqueue_req(self, conn: Any) -> None:
        if self.cfg.is_ssl:  # TLS ends at the proxy; a TLS socket is read the stock way
            self.hand_over(conn)
            return
        now = time.monotonic()
        reading = Reading(now, now + self.read_timeout, Framer(self.max_body))
        self.reading[conn] = reading
        conn.sock.setblocking(False)
        if conn.parser is not None:  # read ahead by the last request on this connection
            ahead = conn.parser.unreader.take_buffered()
            if ahead and self.judge(conn, ahead):
                return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_readable, conn))
        if conn.parser is None:  # a new connection: its request has most often arrived with it
            self.on_readable(conn, conn.sock)

    def on_readable(self, conn: Any, _sock: Any) -> None:
        try:
            data = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
            return
        if self.buffered + len(data) > self.buffer_budget:
            self.refuse(conn, 503, "the server is receiving too much at once; try again", 1)
            return
        self.judge(conn, data)

    def judge(self, conn: Any, data: bytes) -> bool:
        """Act on a request once ``data`` has arrived; whether it left the reading state."""
        reading = self.reading[conn]
        self.buffered += len(data)
        verdict = reading.framer.feed(data)
        if verdict.status is not None:
            self.refuse(conn, verdict.status, verdict.message)
            return True
        if not verdict.complete:
            if not reading.continued and reading.framer.expects_continue:
                reading.continued = True
                util.write_nonblock(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            return False
        self.stop_reading(conn)
        full = self.queue_full(reading.framer)
        if full is not None:
            self.answer(conn, reading, 429, full.detail, full.retry_after, full.code)
            return True
        if self.in_flight >= self.cfg.threads:
            message = "every request thread of this worker is busy; try again"
            self.answer(conn, reading, 429, message, self.retry_after())
            return True
        conn.init()
        conn.parser.unreader.unread(verdict.data)
        conn.data_ready = True
        self.hand_over(conn)
        return True

    def queue_full(self, framer: Framer) -> QueueFull | None:
        """The registry's refusal of a generation request while every model's
        queue is full, or None. Answered here, it costs the main loop a fraction of a
        millisecond; through a request thread, the app's parse and checks among dozens of
        streaming threads took a second (bench/RESULTS.md, reliability probes)."""
        method, path = framer.method_and_path
        paths = getattr(self.wsgi, "extensions", {}).get("textgen.generation_paths", ())
        registry = self.registry
        if method != b"POST" or registry is None or path.decode("latin-1") not in paths:
            return None
        try:
            return registry.refusal()
        except Exception:  # a check must never fail the request: the app decides then
            return None

    def hand_over(self, conn: Any) -> None:
        with self.counting:
            self.in_flight += 1
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        """A request on a thread. The thread counts as free once it returns (not when the main
        loop later hears so): a client that sends its next request as soon as it has read an
        answer must find the thread free."""
        try:
            return super().handle(conn)
        finally:
            with self.counting:
                self.in_flight -= 1

    def stop_reading(self, conn: Any) -> Reading:
        reading = self.reading.pop(conn)
        self.buffered -= len(reading.framer.buffer)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        return reading

    def refuse(self, conn: Any, status: int, message: str, retry_after: int | None = None) -> None:
        self.answer(conn, self.stop_reading(conn), status, message, retry_after)

    def answer(
        self,
        conn: Any,
        reading: Reading,
        status: int,
        message: str,
        retry_after: int | None,
        code: str | None = None,
    ) -> None:
        """Send a JSON error from the main loop and close (the send buffer takes it whole)."""
        code = code or CODES[status]
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        try:
            conn.sock.send(error_bytes(status, REASONS[status], message, code, headers))
        except OSError:
            pass
        self.observe(conn, reading, status, code, message)
        self.linger(conn)

    def observe(self, conn: Any, reading: Reading, status: int, code: str, message: str) -> None:
        """A refusal's access line and metrics, as the app writes them for its own answers
        (api/observe.py); the worker's log says it while the app has none."""
        record = getattr(self.wsgi, "extensions", {}).get("textgen.refused")
        client = conn.client[0] if isinstance(conn.client, tuple) else str(conn.client)
        if record is None:
            self.log.warning("refused a request from %s: %d %s", client, status, message)
            return
        method, path = (part.decode("latin-1") for part in reading.framer.method_and_path)
        try:
            record(method, path, status, client, code, time.monotonic() - reading.started)
        except Exception:  # counting must never fail the refusal
            self.log.exception("could not record a refused request")

    def linger(self, conn: Any) -> None:
        """Close after the client stops sending (for at most LINGER_S): closing a socket with
        unread bytes resets it, and the client would lose the answer (nginx's lingering
        close)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_linger, conn))
        except (OSError, ValueError, KeyError):
            self.close(conn)
            return
        self.lingering[conn] = time.monotonic() + LINGER_S

    def on_linger(self, conn: Any, _sock: Any) -> None:
        try:
            if conn.sock.recv(READ_CHUNK):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.end_linger(conn)

    def end_linger(self, conn: Any) -> None:
        del self.lingering[conn]
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.close(conn)

    def drop(self, conn: Any) -> None:
        self.stop_reading(conn)
        self.close(conn)

    def close(self, conn: Any) -> None:
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn, reading in list(self.reading.items()):
            if now > reading.deadline:
                if reading.framer.buffer:
                    message = f"the request was not received within {self.read_timeout:g} s"
                    self.refuse(conn, 408, message)
                else:
                    self.drop(conn)
        for conn, deadline in list(self.lingering.items()):
            if now > deadline:
                self.end_linger(conn)

    # --- readiness ------------------------------------------------------------------------
    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled and self.may_accept())
        if not self.alive and not self.draining:
            self.drain()

    # --- stopping -----------------------------------------------------------------------
    def handle_exit(self, sig: Any, frame: Any) -> None:
        """SIGTERM. In a reload (SIGHUP) the master starts the new workers and stops the old
        ones at once: while a new one is still loading its models, this one keeps serving
        (for half of graceful_timeout at most), so that requests are not left to a worker that
        can only answer 503. Otherwise it stops now."""
        if self.stop_asked is None and self.successor_starting():
            self.stop_asked = time.monotonic()
            return
        self.stop()

    def stop(self) -> None:
        """End the main loop. /readyz turns 503 first: a request thread that finds the worker
        no longer alive answers "Connection: close", and that answer must not still say
        ready (the client's next look would find the listener closed)."""
        registry = self.registry
        if registry is not None:
            registry.drain()
        super().handle_exit(signal.SIGTERM, None)

    def successor_starting(self) -> bool:
        """Whether the master has another worker that is not ready yet (Linux: the master's
        children, from /proc; the master forks the new workers before it stops the old)."""
        if self.ready_dir is None:
            return False
        try:
            children = Path(f"/proc/{self.ppid}/task/{self.ppid}/children").read_text().split()
        except OSError:
            return False
        return any(
            int(pid) != os.getpid() and not (self.ready_dir / pid).exists() and alive(int(pid))
            for pid in children
        )

    def drain(self) -> None:
        """The main loop has ended (SIGTERM, or recycled after max_requests): take no more
        connections, turn /readyz to 503, and let admitted requests finish. gunicorn waits
        for them up to graceful_timeout; DRAIN_MARGIN_S before that, whatever still runs
        is ended with a final error event, so that its client hears why before the master
        kills this worker."""
        self.draining = True
        for listener in self.sockets:
            listener.close()  # new connections go to other workers, or are refused
        registry = self.registry
        if registry is None:
            return
        registry.drain()
        timer = threading.Timer(
            max(1.0, self.cfg.graceful_timeout - DRAIN_MARGIN_S), registry.close
        )
        timer.daemon = True
        timer.start()

    def may_accept(self) -> bool:
        """Ready, or no other worker is (then this one answers 503 until it is)."""
        return self.app_ready() or not self.others_ready()

    def notify(self) -> None:
        """The heartbeat, once a second from the main loop: also leave the ready mark, stop
        accepting while loading if another worker is ready, and stop when a put-off
        SIGTERM's successor is ready (or has taken too long)."""
        super().notify()
        if self.ready_mark is None and self.app_ready():
            self.mark_ready()
        if self._accepting and not self.may_accept():
            # Loading, and accepting since no worker was ready (a first start): another one is
            # now, so this one leaves the traffic to it until its own models are ready.
            super().set_accept_enabled(False)
        if self.stop_asked is not None and self.alive:
            waited = time.monotonic() - self.stop_asked
            if not self.successor_starting() or waited > self.cfg.graceful_timeout / 2:
                self.stop()

    def app_ready(self) -> bool:
        registry = self.registry
        return registry is None or registry.status()["status"] == "ready"

    def mark_ready(self) -> None:
        if self.ready_dir is not None:
            self.ready_mark = self.ready_dir / str(os.getpid())
            self.ready_mark.touch()

    def others_ready(self) -> bool:
        if self.ready_dir is None:
            return False
        for mark in self.ready_dir.glob("[0-9]*"):
            if mark.name != str(os.getpid()) and alive(int(mark.name)):
                return True
        return False

    def run(self) -> None:
        super().run()
        if self.ready_mark is not None:
            self.ready_mark.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
