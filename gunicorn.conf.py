"""gunicorn settings for textgen (plain assignments; every value overridable by environment)."""

# The master process never imports torch: it forks workers, and a torch thread pool started
# before fork deadlocks the children (pytorch#49555, gunicorn#2478). Models are prepared by a
# subprocess and loaded by each worker after fork.

import os
import subprocess
import sys


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _int_env(name: str, default: int) -> int:
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


# --- Server socket ---------------------------------------------------------
bind = os.environ.get("TEXTGEN_BIND", "127.0.0.1:8000")
backlog = 256

# --- Workers and threads ---------------------------------------------------
# Every worker runs torch on its own threads: workers x torch threads must not exceed the cores,
# or the workers fight over them and all get slower. Default: one worker using every core
# (one model copy, and batching within a worker pays better than more workers).
_CORES = _cores()
workers = _int_env("GUNICORN_WORKERS", 1)
_torch_default = max(1, _CORES // workers)
_torch_threads = _int_env("TEXTGEN_TORCH_THREADS", _torch_default)
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

worker_class = "gthread"
# Request threads mostly wait on the engine (a streaming client holds one for its whole
# request); they are cheap, and enough of them lets every batch slot be used and /health answer.
threads = _int_env("GUNICORN_THREADS", 32)
# gthread workers heartbeat from their main loop, not from request threads, so this bounds a
# stuck worker, not a generation; it must exceed model loading, which runs in the background.
timeout = _int_env("GUNICORN_TIMEOUT", 600)
graceful_timeout = 60
keepalive = 5
# Each worker loads its own model after fork (see above).
preload_app = False

# --- Logging ---------------------------------------------------------------
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'

# --- Behind nginx ------------------------------------------------------------
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


# --- Server hooks ------------------------------------------------------------
def on_starting(server):
    """Download/convert every configured model once, before any worker starts, or stop."""
    from textgen.config import ConfigError, settings_from_env
    from textgen.models.cache import ModelCache
    from textgen.models.sources import is_prepared

    server.log.info(
        "textgen: %d worker(s) x %d torch thread(s) on %d cores", workers, _torch_threads, _CORES
    )
    try:
        settings = settings_from_env()
    except ConfigError as exc:
        server.log.error("textgen: %s", exc)
        sys.exit(1)
    cache = ModelCache(settings.model_cache)
    if all(is_prepared(spec, cache, settings.compile) for spec in settings.models):
        return
    # Conversion imports torch, which must not happen in this process (see the top).
    result = subprocess.run([sys.executable, "-m", "textgen", "pull"], check=False)
    if result.returncode != 0:
        server.log.error("textgen: models could not be prepared; not starting")
        sys.exit(result.returncode)


def post_fork(server, worker):
    server.log.info("worker %s: loading models in the background", worker.pid)
