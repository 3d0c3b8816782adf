"""gunicorn settings for textgen (plain assignments; every value overridable by environment)."""

# The master process never imports torch: it forks workers, and a torch thread pool started
# before fork deadlocks the children (pytorch#49555, gunicorn#2478). Models are prepared by a
# subprocess and loaded by each worker after fork.

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from textgen.config import ConfigError, available_cores, settings_from_env
from textgen.server.placeholder import Placeholder


def _int_env(name: str, default: int) -> int:
    """One of gunicorn's own GUNICORN_* variables (textgen's settings are validated by
    textgen.config, the declaration every part reads)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        sys.exit(f"textgen: {name} must be an integer, got {raw!r}")
    if value < 1:
        sys.exit(f"textgen: {name} must be at least 1, got {value}")
    return value


# textgen.config imports neither torch nor the model stack (tests/test_layers.py).
try:
    _settings = settings_from_env()
except ConfigError as exc:
    sys.exit(f"textgen: {exc}")

# --- Server socket ---------------------------------------------------------
bind = _settings.bind
backlog = 256

# --- Workers and threads ---------------------------------------------------
# Every worker runs torch on its own threads: workers x torch threads must not exceed the cores,
# or the workers fight over them and all get slower. Default: one worker using every core
# (one model copy, and batching within a worker pays better than more workers).
_CORES = available_cores()
workers = _int_env("GUNICORN_WORKERS", 1)
if os.environ.get("TEXTGEN_TORCH_THREADS"):
    _torch_threads = _settings.torch_threads
else:
    _torch_threads = max(1, _CORES // workers)
if workers * _torch_threads > _CORES:
    sys.exit(
        f"textgen: {workers} workers x {_torch_threads} torch threads = "
        f"{workers * _torch_threads} exceeds the {_CORES} cores; lower GUNICORN_WORKERS or "
        "TEXTGEN_TORCH_THREADS"
    )
os.environ["TEXTGEN_TORCH_THREADS"] = str(_torch_threads)
# Read by OpenMP/MKL when torch is imported in the worker.
os.environ["OMP_NUM_THREADS"] = str(_torch_threads)
os.environ["TOKENIZERS_PARALLELISM"] = "false"

# gthread, changed (textgen/server/worker.py): requests are read whole before a thread takes
# them, a request that would wait for a busy thread gets 429 at once, and a worker takes no
# connections until its models are ready unless no other worker is.
worker_class = "textgen.server.worker.TextgenWorker"


# A streaming client holds a request thread for its whole request. Enough threads for every
# request the engines admit (TEXTGEN_MAX_QUEUE per model) and 16 more for /health and quick
# refusals: beyond that the engine answers 429 at once instead of requests waiting unseen.
threads = _int_env("GUNICORN_THREADS", _settings.max_queue * len(_settings.models) + 16)
# gthread workers heartbeat from their main loop, not from request threads, so this bounds a
# stuck worker, not a generation; it must exceed model loading, which runs in the background.
timeout = _int_env("GUNICORN_TIMEOUT", 600)
# On SIGTERM (or when recycled) a worker stops accepting and lets what it admitted finish: the
# longest a request may run (TEXTGEN_MAX_TIMEOUT) and time to send its end. A few seconds
# before this, textgen ends what is still running with a final error event
# (textgen/server/worker.py); the master kills the worker at it.
graceful_timeout = _int_env("GUNICORN_GRACEFUL_TIMEOUT", int(_settings.max_timeout) + 15)
# Recycling (off by default): a worker that served this many requests drains as on SIGTERM
# and is replaced; the jitter keeps workers from being replaced together.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS") or 0)
max_requests_jitter = max_requests // 10
keepalive = 5
# Each worker loads its own model after fork (see above).
preload_app = False

# Each instance would otherwise share $HOME/.gunicorn/gunicorn.ctl with every other one.
control_socket_disable = True

# --- Logging ---------------------------------------------------------------
# textgen writes one line per request itself (logger textgen.access: route, model, tokens,
# time to first token, the client as the proxy saw it), once the response has ended.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
if _settings.log_format == "json":
    # gunicorn's own lines in the same JSON as textgen's; workers inherit the root handler.
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "textgen.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": _settings.log_level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": loglevel.upper(), "handlers": [], "propagate": True},
            # textgen.access has a line per request already.
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
        },
    }

# --- Metrics -----------------------------------------------------------------
# prometheus_client's multiprocess mode: each worker writes its samples to files here and
# /metrics sums them (child_exit drops a dead worker's live gauges).
_OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="textgen-metrics-")
_METRICS_DIR = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])

# --- Behind nginx ------------------------------------------------------------
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


# --- Server hooks ------------------------------------------------------------
def on_starting(server):
    """Download/convert every configured model once, before any worker starts, or stop."""
    from textgen.models.cache import ModelCache
    from textgen.models.sources import is_prepared

    # Ready workers leave a file named by their pid here (see textgen/server/worker.py).
    server.textgen_ready_dir = tempfile.mkdtemp(prefix="textgen-ready-")
    # Counts of an earlier run would be summed into this one's.
    _METRICS_DIR.mkdir(parents=True, exist_ok=True)
    for stale in _METRICS_DIR.glob("*.db"):
        stale.unlink()

    server.log.info(
        "textgen: %d worker(s) x %d torch thread(s) on %d cores", workers, _torch_threads, _CORES
    )
    if _settings.auth != "none":
        # Once, here: workers starting together would race to create the tables.
        from textgen.auth.db import migrate

        migrate(_settings.database_url)
    cache = ModelCache(_settings.model_cache)
    if all(is_prepared(spec, cache, _settings.compile) for spec in _settings.models):
        return
    # Conversion imports torch, which must not happen in this process (see the top). A SIGTERM
    # or SIGINT meanwhile stops the conversion too, instead of leaving it running.
    stopped, running = [], []

    def stop(signum, _frame):
        # Only this: the handler may run inside child.wait(), which must not be re-entered.
        stopped.append(signum)
        for child in running:
            child.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    # Meanwhile the port answers /readyz 503 with the step (the pull's latest log line).
    placeholder = Placeholder(bind)
    placeholder.start()
    try:
        pull = subprocess.Popen(
            [sys.executable, "-m", "textgen", "pull"], stderr=subprocess.PIPE, text=True
        )
        running.append(pull)
        if stopped:
            pull.terminate()
        assert pull.stderr is not None
        for line in pull.stderr:
            sys.stderr.write(line)
            if line.strip():
                placeholder.step = step_of(line)
        returncode = pull.wait()
    finally:
        placeholder.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        server.log.info("textgen: stopped while preparing models")
        sys.exit(128 + stopped[0])
    if returncode != 0:
        server.log.error("textgen: models could not be prepared; not starting")
        sys.exit(returncode)


def step_of(line):
    """What a log line of `textgen pull` says it is doing (its message, for JSON lines)."""
    text = line.strip()
    try:
        return json.loads(text).get("message", text)
    except (ValueError, AttributeError):
        return text


def pre_fork(server, worker):
    worker.ready_dir = Path(server.textgen_ready_dir)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    (Path(server.textgen_ready_dir) / str(worker.pid)).unlink(missing_ok=True)
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    shutil.rmtree(server.textgen_ready_dir, ignore_errors=True)
    if _OWN_METRICS_DIR:
        shutil.rmtree(_METRICS_DIR, ignore_errors=True)


def post_fork(server, worker):
    server.log.info("worker %s: loading models in the background", worker.pid)
