"""textgen's gunicorn worker (textgen/server/worker.py) under real gunicorn, on a tiny model:
slow clients, oversized and malformed framing, a worker with every thread busy, and workers
that load while another serves (issue: reliability)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import gunicorn, wait_healthy
from tests.services import free_port
from tests.tiny_models import save_tiny_llama

pytestmark = pytest.mark.slow

THREADS = 4


def start(tmp: Path, **env: str) -> tuple[subprocess.Popen[str], str, Path]:
    """gunicorn on a tiny Llama; its process, URL and log file."""
    model = tmp / "tiny-llama"
    if not model.exists():
        save_tiny_llama(model, max_positions=2048)
    port = free_port()
    log = tmp / f"gunicorn-{port}.log"
    settings = {
        "TEXTGEN_MODELS": json.dumps([{"name": "tiny-llama", "source": str(model)}]),
        "TEXTGEN_MODEL_CACHE": str(tmp / "cache"),
        "TEXTGEN_BIND": f"127.0.0.1:{port}",
        "TEXTGEN_TORCH_THREADS": "1",
        **env,
    }
    process = gunicorn(settings, log=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url, 180)
    return process, url, log


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=90)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One worker with few threads, a 2 s read timeout, a batch of one row and long streams."""
    env = {
        "GUNICORN_THREADS": str(THREADS),
        "TEXTGEN_READ_TIMEOUT": "2",
        "TEXTGEN_MAX_BATCH": "1",
        "TEXTGEN_MAX_NEW_TOKENS": "2000",
    }
    process, url, _ = start(tmp_path_factory.mktemp("worker"), **env)
    try:
        yield url
    finally:
        stop(process)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def exchange(url: str, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes."""
    with connect(url) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def head_and_error(answer: bytes) -> tuple[str, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.decode("latin-1"), json.loads(body)["error"]


GENERATE = b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


def test_slow_clients_hold_no_thread(server: str) -> None:
    # More slow clients than threads: half stop inside their headers, half inside a body.
    slow = []
    for number in range(10 * THREADS):
        sock = connect(server)
        if number % 2:
            sock.sendall(GENERATE + b"Content-Length: 100000\r\n\r\n{")
        else:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        slow.append(sock)
    try:
        assert requests.get(f"{server}/health", timeout=5).status_code == 200
        body = {"prompt": "Hi", "max_new_tokens": 2}
        assert requests.post(f"{server}/generate", json=body, timeout=5).status_code == 200
        # Past the read timeout each slow client is told why, and closed.
        for sock in slow:
            sock.settimeout(30)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            head, error = head_and_error(answer)
            assert head.startswith("HTTP/1.1 408") and error["code"] == "request_timeout"
    finally:
        for sock in slow:
            sock.close()


def test_headers_over_64_kib_are_a_json_431(server: str) -> None:
    answer = exchange(server, b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")
    head, error = head_and_error(answer)
    assert head.startswith("HTTP/1.1 431") and "65536" in error["message"]


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5000000\r\n\r\n" + b"x" * 100_000,
        b"Transfer-Encoding: chunked\r\n\r\n" + (b"100000\r\n" + b"a" * 0x100000 + b"\r\n") * 2,
    ],
    ids=["content-length", "chunked"],
)
def test_a_body_over_the_limit_is_a_413_that_closes(server: str, framing: bytes) -> None:
    answer = exchange(server, GENERATE + framing)
    head, error = head_and_error(answer)
    assert head.startswith("HTTP/1.1 413") and "Connection: close" in head
    assert error["code"] == "request_entity_too_large"


def test_a_chunked_body_is_served_and_a_malformed_one_is_a_400(server: str) -> None:
    data = b'{"prompt": "Hi", "max_new_tokens": 1}'
    good = GENERATE + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    good += b"5\r\n" + data[:5] + b"\r\n" + f"{len(data) - 5:x}\r\n".encode() + data[5:]
    assert exchange(server, good + b"\r\n0\r\n\r\n").startswith(b"HTTP/1.1 200")
    bad = GENERATE + b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + data + b"\r\n0\r\n\r\n"
    head, error = head_and_error(exchange(server, bad))
    assert head.startswith("HTTP/1.1 400") and error["code"] == "invalid_chunked_body"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (GENERATE + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ],
)
def test_gunicorns_own_errors_are_json(server: str, request_bytes: bytes, status: int) -> None:
    head, error = head_and_error(exchange(server, request_bytes))
    assert head.startswith(f"HTTP/1.1 {status}")
    assert error["type"] == "invalid_request_error" and error["message"]


def test_expect_100_continue_is_answered_before_the_body(server: str) -> None:
    data = b'{"prompt": "Hi", "max_new_tokens": 1}'
    with connect(server) as sock:
        sock.sendall(
            GENERATE
            + b"Expect: 100-continue\r\nConnection: close\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"100 Continue") == 0


def test_a_request_that_would_wait_for_a_thread_is_a_429_at_once(server: str) -> None:
    # Every thread holds a stream: the batch has one row, so the last of them waits until
    # the others have each generated 2,000 tokens.
    body = json.dumps({"prompt": "Hi", "max_new_tokens": 2000, "ignore_eos": True, "stream": True})
    streams = [connect(server) for _ in range(THREADS)]
    for sock in streams:
        sock.sendall(GENERATE + f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    # A probe sent at once could take a thread before the last stream is read, and that stream
    # would be the one refused (rightly): the worker reads them within milliseconds.
    time.sleep(0.3)
    try:
        # Until the worker has handed all of them to its threads, /health still gets one.
        for _ in range(100):
            probe = requests.get(f"{server}/health", timeout=30)
            if probe.status_code != 200:
                break
            time.sleep(0.05)
        assert probe.status_code == 429, probe.text
        assert probe.json()["error"]["code"] == "server_busy"
        assert int(probe.headers["Retry-After"]) >= 1
        assert probe.elapsed.total_seconds() < 20  # answered, not queued (a sanity bound)
    finally:
        for sock in streams:
            sock.close()
    # The threads come back once the streams' clients are gone.
    deadline = time.monotonic() + 60
    while requests.get(f"{server}/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_full_queue_is_refused_by_the_worker_before_a_thread_takes_it(tmp_path: Path) -> None:
    # Two streams fill the queue for as long as the test needs: 30,000 tokens each.
    save_tiny_llama(tmp_path / "tiny-llama", max_positions=32768)
    env = {"TEXTGEN_MAX_QUEUE": "2", "TEXTGEN_MAX_BATCH": "1", "GUNICORN_THREADS": "8"}
    process, url, log = start(tmp_path, TEXTGEN_MAX_NEW_TOKENS="30000", **env)
    body = json.dumps({"prompt": "Hi", "max_new_tokens": 30000, "ignore_eos": True, "stream": True})
    streams = [connect(url) for _ in range(2)]
    try:
        for sock in streams:
            sock.sendall(GENERATE + f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        for sock in streams:
            assert sock.recv(12) == b"HTTP/1.1 200"
        for route in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses"):
            refused = requests.post(f"{url}{route}", json={"prompt": "Hi"}, timeout=30)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "queue_full"
            assert "retry after" in refused.json()["error"]["message"]
            assert int(refused.headers["Retry-After"]) >= 1
            # Answered by the worker's main loop: the app sets X-Request-ID on every answer.
            assert "X-Request-ID" not in refused.headers
        # The rest of the API is served as usual, and the refusals are counted.
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
        assert requests.post(f"{url}/tokenize", json={"prompt": "Hi"}, timeout=30).ok
        metrics = requests.get(f"{url}/metrics", timeout=30).text
        assert 'textgen:request_rejections_total{reason="queue_full"} 4.0' in metrics
        assert (
            'textgen:http_requests_total{method="POST",model_name="",route="/v1/responses",'
            'status="429"} 1.0'
        ) in metrics
    finally:
        for sock in streams:
            sock.close()
        stop(process)
    # Each refusal has its access line, as the app's own answers do.
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    refused = [line for line in lines if line.get("status") == 429]
    assert [line["route"] for line in refused] == [
        "/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses"
    ]  # fmt: skip
    assert all(line["error"] == "queue_full" and line["client"] for line in refused)


def test_a_reloading_worker_takes_no_traffic_while_another_is_ready(tmp_path: Path) -> None:
    process, url, log = start(tmp_path, GUNICORN_WORKERS="2")
    try:
        # /health answers once one worker is ready; the other may still be loading (and then
        # takes no connections). Both must be ready, or killing the first leaves only a
        # loading worker, which rightly answers 503 until it is ready.
        # A worker lists its engines in /info once its models are ready (a loading worker may
        # answer /info too: at a first start no worker is ready, and every one accepts).
        pids: set[int] = set()
        deadline = time.monotonic() + 120
        while len(pids) < 2:
            assert time.monotonic() < deadline, "the second worker never became ready"
            info = requests.get(f"{url}/info", timeout=10).json()
            if info["engines"]:
                pids.add(info["pid"])
        os.kill(pids.pop(), signal.SIGKILL)
        statuses: list[int] = []
        seen: set[int] = set()
        small = {"prompt": "Hi", "max_new_tokens": 1}
        stop_at = time.monotonic() + 30
        while time.monotonic() < stop_at and not (seen - pids and len(statuses) > 50):
            response = requests.post(f"{url}/generate", json=small, timeout=30)
            statuses.append(response.status_code)
            seen.add(requests.get(f"{url}/info", timeout=30).json()["pid"])
        # Without the worker's readiness check the replacement took requests while loading.
        assert statuses.count(200) == len(statuses), log.read_text()[-3000:]
        assert seen - pids, "the replacement worker never served"
    finally:
        stop(process)


# --- fuzzing every POST route -----------------------------------------------------------------
FIELDS = {
    "/generate": [
        "prompt",
        "prompts",
        "messages",
        "model",
        "models",
        "strategy",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "num_beams",
        "num_return_sequences",
        "seed",
        "stream",
        "stop",
        "logit_bias",
        "response_format",
        "chat",
        "ignore_eos",
        "logprobs",
        "timeout",
        "repetition_penalty",
        "no_repeat_ngram_size",
    ],
    "/v1/completions": [
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "logprobs",
        "echo",
        "stop",
        "seed",
        "logit_bias",
        "best_of",
        "suffix",
        "user",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
    ],
    "/v1/chat/completions": [
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stop",
        "seed",
        "response_format",
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "logit_bias",
        "stream_options",
    ],
    "/tokenize": ["prompt", "messages", "model", "chat", "add_special_tokens"],
    "/detokenize": ["tokens", "model", "skip_special_tokens"],
}
VALID = {
    "/generate": {"prompt": "Hi", "max_new_tokens": 3},
    "/v1/completions": {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 3},
    "/v1/chat/completions": {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
    },
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1, 2]},
}
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))  # per route; the probe runs more


def fuzz_bodies() -> Any:
    """Bodies as an attacker writes them: raw bytes, any JSON, and objects with the route's
    own field names holding any value (small numbers, so that valid ones finish fast)."""
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-3, 40)
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=12)
        | st.sampled_from(["tiny-llama", "greedy", "sampling", "beam", "user", "system", "\ud800"])
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["role", "content", "type", "text", "json_schema", "schema"])
                | st.text(max_size=6),
                inner,
                max_size=4,
            )
        ),
        max_leaves=12,
    )

    def structured(route: str, size: int = 6) -> Any:
        return st.dictionaries(st.sampled_from(FIELDS[route]), values, max_size=size)

    return st.sampled_from(sorted(FIELDS)).flatmap(
        lambda route: st.tuples(
            st.just(route),
            st.one_of(
                structured(route).map(lambda body: json.dumps(body).encode()),
                # A valid body with one or two fields changed: gets past validation more often.
                structured(route, 2).map(lambda c: json.dumps({**VALID[route], **c}).encode()),
                values.map(lambda body: json.dumps(body).encode()),
                st.binary(max_size=64),
            ),
        )
    )


def test_fuzzed_bodies_get_json_answers_and_never_a_5xx(server: str) -> None:
    from hypothesis import HealthCheck, given, settings

    pid = requests.get(f"{server}/info", timeout=10).json()["pid"]
    seen: dict[int, int] = {}

    @settings(
        max_examples=FUZZ_EXAMPLES * len(FIELDS),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(fuzz_bodies())
    def check(case: tuple[str, bytes]) -> None:
        route, body = case
        headers = {"Content-Type": "application/json"}
        response = requests.post(f"{server}{route}", data=body, headers=headers, timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (route, body, response.text)
        if response.headers["Content-Type"].startswith("text/event-stream"):
            assert "server_error" not in response.text, (route, body, response.text)
        else:
            answer = response.json()
            assert response.status_code == 200 or answer["error"]["message"], (route, body)

    check()
    assert requests.get(f"{server}/info", timeout=10).json()["pid"] == pid  # no restart
    assert len(seen) > 1 and sum(seen.values()) >= FUZZ_EXAMPLES * len(FIELDS)
    print("fuzz status counts:", dict(sorted(seen.items())))


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_stopping_during_preparation_stops_the_pull(tmp_path: Path) -> None:
    model = save_tiny_llama(tmp_path / "tiny-llama")
    env = {
        # int8 weights not yet in the cache: the master runs `textgen pull` first.
        "TEXTGEN_MODELS": json.dumps([{"name": "t", "source": str(model), "dtype": "int8"}]),
        "TEXTGEN_MODEL_CACHE": str(tmp_path / "cache"),
        "TEXTGEN_BIND": f"127.0.0.1:{free_port()}",
        "TEXTGEN_COMPILE": "0",
    }
    process = gunicorn(env, log=(tmp_path / "log").open("w"))
    deadline = time.monotonic() + 60
    while not (pulls := children(process.pid)):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode != 0
    for pid in pulls:  # stopped and reaped by the master, not left running as an orphan
        assert not Path(f"/proc/{pid}").exists()
