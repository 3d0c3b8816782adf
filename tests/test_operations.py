"""Operations, for real: gunicorn with two workers behind Debian's nginx on loopback; Prometheus
metrics summed across workers; one JSON log line per request with the client nginx saw; and
a drain on SIGTERM that lets open streams finish."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, gunicorn, in_threads, tiny_config, wait_healthy
from tests.services import free_port, wait_until
from tests.tiny_models import save_tiny_llama
from textgen import create_app

pytestmark = pytest.mark.slow

CLIENT = "127.0.0.5"  # loopback is all of 127/8: a client address other than nginx's own


@dataclass
class Stack:
    app: str  # gunicorn, directly
    edge: str  # nginx in front of it
    log: Path
    metrics_dir: Path
    process: subprocess.Popen[str]


def server_env(tmp: Path, port: int, **extra: str) -> dict[str, str]:
    model = tmp / "tiny-llama"
    if not model.exists():
        save_tiny_llama(model, max_positions=2048)
    return {
        "TEXTGEN_MODELS": json.dumps([{"name": "tiny-llama", "source": str(model)}]),
        "TEXTGEN_MODEL_CACHE": str(tmp / "cache"),
        "TEXTGEN_BIND": f"127.0.0.1:{port}",
        "TEXTGEN_TORCH_THREADS": "1",
        **extra,
    }


def start_nginx(tmp: Path, listen: int, upstream: int) -> subprocess.Popen[bytes]:
    """Debian's nginx with deploy/nginx/textgen.conf, pointed at the test's ports."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed (Debian package nginx; deploy/system.sh)")
    site = (REPO / "deploy" / "nginx" / "textgen.conf").read_text()
    site = site.replace("server 127.0.0.1:8000", f"server 127.0.0.1:{upstream}")
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    (tmp / "textgen.conf").write_text(site)
    user = "user root;" if os.geteuid() == 0 else ""
    temp = " ".join(f"{kind}_temp_path {tmp / kind};" for kind in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
    (tmp / "nginx.conf").write_text(
        f"{user} worker_processes 1; pid {tmp / 'nginx.pid'}; error_log {tmp / 'nginx.err'};\n"
        "events { worker_connections 256; }\n"
        f"http {{ access_log {tmp / 'access.txt'}; {temp} include {tmp / 'textgen.conf'}; }}\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"], stderr=subprocess.PIPE
    )

    def up() -> bool:
        assert process.poll() is None, process.stderr.read() if process.stderr else "exited"
        try:
            return requests.get(f"http://127.0.0.1:{listen}/livez", timeout=5).ok
        except requests.RequestException:
            return False

    wait_until(up, "nginx")
    return process


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("ops")
    port, edge = free_port(), free_port()
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    env = server_env(
        tmp, port, GUNICORN_WORKERS="2", TEXTGEN_TRUSTED_PROXIES="127.0.0.1",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), TEXTGEN_LOG_FORMAT="json",
    )  # fmt: skip
    log = tmp / "gunicorn.log"
    process = gunicorn(env, log=log.open("w"))
    nginx = None
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}", 180, in_a_row=20)
        nginx = start_nginx(tmp, edge, port)
        yield Stack(
            f"http://127.0.0.1:{port}", f"http://127.0.0.1:{edge}", log, metrics_dir, process
        )
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=30)
        process.terminate()
        process.wait(timeout=120)


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics (parsed by prometheus_client's own parser)."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def generate(url: str, **body: Any) -> requests.Response:
    payload = {"prompt": "Hi", "max_new_tokens": 4, "ignore_eos": True, **body}
    return requests.post(f"{url}/generate", json=payload, timeout=60)


def test_metrics_are_summed_across_workers(stack: Stack) -> None:
    before = samples(stack.app)
    answers = in_threads([lambda: generate(stack.app)] * 8)
    assert [a.status_code for a in answers] == [200] * 8
    for _ in range(2):
        bad = requests.post(
            f"{stack.app}/generate", data="x", headers={"Content-Type": "text/plain"}
        )
        assert bad.status_code == 415
    ok = {"route": "/generate", "method": "POST", "status": "200", "model_name": "tiny-llama"}

    refused = {"route": "/generate", "method": "POST", "status": "415", "model_name": ""}

    def counted() -> bool:  # a request is counted once its response has closed
        now = samples(stack.app)
        name = "textgen:http_requests_total"
        return all(
            value(now, name, **labels) - value(before, name, **labels) >= n
            for labels, n in ((ok, 8), (refused, 2))
        )

    wait_until(counted, "the requests' metrics", 30)
    after = samples(stack.app)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("textgen:http_requests_total", **ok) == 8
    assert grew("textgen:http_requests_total", **refused) == 2
    assert grew("textgen:request_rejections_total", reason="media_type") == 2
    model = {"model_name": "tiny-llama"}
    assert grew("textgen:generation_tokens_total", **model) == 32
    assert grew("textgen:time_to_first_token_seconds_count", **model) == 8
    assert grew("textgen:e2e_request_latency_seconds_count", **model) == 8
    assert grew("textgen:prompt_tokens_total", **model) > 0
    # Both workers write their own files; /metrics read from either sums them.
    pids = {p.stem.rsplit("_", 1)[-1] for p in stack.metrics_dir.glob("counter_*.db")}
    assert len(pids) >= 2


def stream_lines(url: str, body: dict[str, Any]) -> Iterator[bytes]:
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200
        yield from (line for line in response.iter_lines() if line)


def test_a_stream_passes_through_nginx_as_it_is_written(stack: Stack) -> None:
    body = {"prompt": "Hi", "max_new_tokens": 1000, "ignore_eos": True, "stream": True}
    lines = stream_lines(stack.edge, body)
    first = next(lines)
    assert first.startswith(b"data: ")
    # The first event arrived while the request was still generating: nginx did not hold it.
    running = samples(stack.app)
    assert value(running, "textgen:num_requests_running", model_name="tiny-llama") >= 1
    rest = list(lines)
    assert rest[-1] == b"data: [DONE]"


def request_from(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    """A POST sent from CLIENT's address (http.client can bind the source)."""
    connection = http.client.HTTPConnection(host, port, timeout=60, source_address=(CLIENT, 0))
    connection.request("POST", path, body=body, headers=headers)
    status = connection.getresponse().status
    connection.close()
    return status


def log_line(stack: Stack, request_id: str) -> dict[str, Any]:
    def written() -> bool:
        return f'"request_id": "{request_id}"' in stack.log.read_text()

    wait_until(written, "the request's log line", 30)
    for line in stack.log.read_text().splitlines():
        if f'"request_id": "{request_id}"' in line:
            return dict(json.loads(line))
    raise AssertionError(request_id)


def test_logs_see_the_client_nginx_saw_and_nothing_spoofed(stack: Stack) -> None:
    body = json.dumps({"prompt": "Hi", "max_new_tokens": 3}).encode()
    spoof = {"Content-Type": "application/json", "X-Forwarded-For": "203.0.113.66"}
    edge_port = int(stack.edge.rsplit(":", 1)[1])
    app_port = int(stack.app.rsplit(":", 1)[1])
    assert request_from("127.0.0.1", edge_port, "/generate", body,
                        {**spoof, "X-Request-ID": "via-nginx"}) == 200  # fmt: skip
    assert request_from("127.0.0.1", app_port, "/generate", body,
                        {**spoof, "X-Request-ID": "direct"}) == 200  # fmt: skip
    via = log_line(stack, "via-nginx")
    assert via["client"] == CLIENT  # nginx replaced what the client claimed
    assert (via["route"], via["status"], via["model"]) == ("/generate", 200, "tiny-llama")
    assert via["completion_tokens"] >= 1 and via["duration_s"] > 0
    assert via["time_to_first_token_s"] is not None and "ts" in via
    assert log_line(stack, "direct")["client"] == CLIENT  # not believed from a non-proxy
    # gunicorn's own lines are JSON too.
    booting = [line for line in stack.log.read_text().splitlines() if "Booting worker" in line]
    assert booting and all(json.loads(line)["logger"] == "gunicorn.error" for line in booting)


def test_nginx_refuses_a_large_body_as_json_and_keeps_metrics_inside(stack: Stack) -> None:
    big = requests.post(
        f"{stack.edge}/generate", data=b"{" + b" " * (2 << 20) + b"}",
        headers={"Content-Type": "application/json"}, timeout=60,
    )  # fmt: skip
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "request_entity_too_large"
    edge_port = int(stack.edge.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", edge_port, source_address=(CLIENT, 0))
    connection.request("GET", "/metrics")
    assert connection.getresponse().status == 403
    connection.close()
    assert requests.get(f"{stack.edge}/metrics", timeout=30).status_code == 200


def test_sigterm_lets_open_streams_finish(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "gunicorn.log"
    process = gunicorn(server_env(tmp_path, port, GUNICORN_THREADS="8"), log=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url, 180)
    body = {"prompt": "Hi", "max_new_tokens": 1000, "ignore_eos": True, "stream": True}
    streams = [stream_lines(url, body) for _ in range(3)]
    firsts = [next(stream) for stream in streams]  # all three running
    assert all(first.startswith(b"data: ") for first in firsts)
    kept = requests.Session()  # a kept-alive connection, open before the signal
    assert kept.get(f"{url}/readyz", timeout=10).status_code == 200
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    # The load balancer's next look says: out of rotation.
    deadline = time.monotonic() + 2
    while (ready := kept.get(f"{url}/readyz", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    time.sleep(0.5)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/livez", timeout=5)  # no new connections
    for stream in streams:
        rest = list(stream)
        assert rest[-1] == b"data: [DONE]"
        assert not any(b'"error"' in line for line in rest)
    assert process.wait(timeout=120) == 0
    print(f"drained and exited in {time.monotonic() - started:.1f} s")


def test_drain_answers_draining_at_once_without_the_registrys_lock(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """SIGTERM's handler turns /readyz to 503 before the worker stops being alive (a request
    thread that sees it stopping answers "Connection: close", and that answer must not say
    ready). A signal handler may interrupt the very thread that holds the registry's lock, so
    draining must not wait for it."""
    app = create_app(tiny_config(model_dirs, tmp_path / "cache"))
    registry = app.extensions["textgen.registry"]
    assert app.test_client().get("/readyz").status_code == 200
    with registry._guard:  # as if the handler interrupted its holder
        draining = threading.Thread(target=registry.drain, daemon=True)
        draining.start()
        draining.join(10)
        assert not draining.is_alive()
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 503 and answer.get_json()["status"] == "draining"


def test_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    port = free_port()
    process = gunicorn(server_env(tmp_path, port), log=(tmp_path / "gunicorn.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, 180)
        worker = requests.get(f"{url}/livez", timeout=10).json()["pid"]
        os.kill(worker, signal.SIGKILL)

        def replaced() -> bool:
            try:
                answer = requests.get(f"{url}/readyz", timeout=5)
            except requests.RequestException:
                return False
            return answer.status_code == 200 and answer.json().get("status") == "ok"

        wait_until(replaced, "a replacement worker", 120)
        assert requests.get(f"{url}/livez", timeout=10).json()["pid"] != worker
        assert generate(url).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=120)


def test_the_port_answers_while_the_first_start_prepares(tmp_path: Path) -> None:
    """A first start quantizes the model before any worker runs: meanwhile /readyz is 503 with
    the step, not a refused connection, and each step says what it does in the log."""
    model = tmp_path / "tiny-llama"
    save_tiny_llama(model)
    port = free_port()
    env = server_env(tmp_path, port, TEXTGEN_COMPILE="0")
    env["TEXTGEN_MODELS"] = json.dumps([{"name": "t", "source": str(model), "dtype": "int8"}])
    log = tmp_path / "gunicorn.log"
    process = gunicorn(env, log=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    seen: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                answer = requests.get(f"{url}/readyz", timeout=5)
            except requests.RequestException:
                time.sleep(0.02)
                continue
            seen.append({"code": answer.status_code, **answer.json()})
            if answer.status_code == 200:
                break
        preparing = [s for s in seen if s.get("status") == "preparing"]
        assert preparing and all(s["code"] == 503 and s["detail"] for s in preparing)
        assert seen[-1]["code"] == 200
        assert "quantizing tiny-llama to int8 into the cache: once" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=120)


def test_two_instances_behind_one_upstream(tmp_path: Path) -> None:
    """Requests spread over both instances (sharing one model cache); when one dies, the
    requests that had not started on it go to the other, and the rest keep succeeding."""
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"instance-{n}.log" for n in range(2)]
    cache = tmp_path / "shared-cache"
    processes = []
    for port, log in zip(ports, logs, strict=True):
        env = server_env(tmp_path, port, TEXTGEN_MODEL_CACHE=str(cache))
        processes.append(gunicorn(env, log=log.open("w")))
    nginx = None
    try:
        for process, port in zip(processes, ports, strict=True):
            wait_healthy(process, f"http://127.0.0.1:{port}", 180, in_a_row=20)
        edge = free_port()
        site = tmp_path / "edge"
        site.mkdir()
        nginx = start_nginx(site, edge, ports[0])
        conf = site / "textgen.conf"
        both = f"server 127.0.0.1:{ports[0]} max_fails=1 fail_timeout=5s;\n" \
               f"    server 127.0.0.1:{ports[1]} max_fails=1 fail_timeout=5s;"  # fmt: skip
        conf.write_text(conf.read_text().replace(
            f"server 127.0.0.1:{ports[0]} max_fails=1 fail_timeout=5s;", both))  # fmt: skip
        nginx.send_signal(signal.SIGHUP)  # reload with both upstream servers
        time.sleep(1)
        url = f"http://127.0.0.1:{edge}"

        def served_by() -> list[int]:
            return [log.read_text().count('"route": "/generate"') for log in logs]

        for _ in range(12):
            assert generate(url).status_code == 200
        wait_until(lambda: sum(served_by()) == 12, "the log lines", 30)
        assert all(count > 0 for count in served_by()), served_by()  # both took a share

        # Instance 0 dies (master and worker) while a client keeps sending.
        worker = requests.get(f"http://127.0.0.1:{ports[0]}/livez", timeout=10).json()["pid"]
        answers = []
        for number in range(20):
            if number == 4:
                os.kill(processes[0].pid, signal.SIGKILL)
                os.kill(worker, signal.SIGKILL)
            answer = generate(url)
            answers.append(answer.status_code)
        # At most the request in flight on it when it died fails; every one after succeeds.
        assert answers.count(200) >= 19, answers
        assert answers[6:] == [200] * 14, answers
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=30)
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=120)


def test_a_reload_under_traffic_answers_every_request(tmp_path: Path) -> None:
    """SIGHUP replaces the workers: the old one drains, the new one takes connections only once
    its models are ready, so requests meanwhile wait a little rather than get a 503."""
    port = free_port()
    log = tmp_path / "gunicorn.log"
    process = gunicorn(server_env(tmp_path, port), log=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, 180)
        old = requests.get(f"{url}/livez", timeout=10).json()["pid"]
        answers: list[int] = [generate(url).status_code for _ in range(3)]
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        pid = old
        while pid == old or len(answers) < 15:
            assert time.monotonic() < deadline, answers
            answer = generate(url)
            answers.append(answer.status_code)
            pid = requests.get(f"{url}/livez", timeout=30).json()["pid"]
        assert set(answers) == {200}, answers
    finally:
        process.terminate()
        process.wait(timeout=120)
