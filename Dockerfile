# textgen on CPU. The model cache is a volume, so the GGUF conversion (or a Hub download), the
# quantized weights and the compiled decoder are made once and survive container restarts:
#   docker build -t textgen .
#   docker run -p 8000:8000 -v textgen-models:/models textgen
# Where no image registry can be reached, deploy/container/build.sh builds it with podman on a
# local Debian base and this machine's torch wheel; deploy/container/test.sh runs it for real.

# Any Debian bookworm (or python:3.11 on it): Python, venv and g++ are installed below if absent.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
# On every layer from here on, so a builder can tell (and prune) this image's build cache.
LABEL org.opencontainers.image.title=textgen

# Python 3.11 with venv (the pinned wheels are cp311; bookworm's python3 is 3.11), and a C++
# compiler: Inductor compiles the int8/int4 decoder once, into the model cache.
RUN set -eu; missing=""; \
    python3 -c "import ensurepip, venv" 2>/dev/null || missing="python3 python3-venv"; \
    command -v c++ >/dev/null || missing="$missing g++"; \
    if [ -n "$missing" ]; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version"

# The CPU build of torch; PyPI's default torch wheel for Linux is the multi-GB CUDA build.
# These are build arguments, seen by the install step only: a build that cannot reach the
# PyTorch index passes TORCH_INDEX_URL="" and a directory of wheels mounted into the build
# (PIP_FIND_LINKS), and PIP_CERT for a proxy that re-signs TLS (deploy/container/build.sh).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=""
ARG PIP_CERT=""

ENV PIP_NO_CACHE_DIR=1
WORKDIR /app
# The pinned dependencies in a layer of their own, so that a change to textgen's source does
# not reinstall them (torch alone is 1 GB installed); deploy/install.sh finds them in place.
COPY requirements.txt ./
RUN python3 -m venv /opt/venv \
 && export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" \
 && /opt/venv/bin/python -m pip install --quiet --upgrade pip \
 && /opt/venv/bin/python -m pip install --quiet -r requirements.txt
COPY pyproject.toml README.md ./
COPY deploy/install.sh deploy/install.sh
COPY textgen textgen
COPY wsgi.py gunicorn.conf.py ./
# The same install steps `make setup` (and so CI) runs.
RUN PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" deploy/install.sh /opt/venv/bin/python

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TEXTGEN_MODEL_CACHE=/models \
    TEXTGEN_BIND=0.0.0.0:8000 \
    HF_HOME=/models/hf-home

# Not root (uid and gid 10001, as deploy/kubernetes/ runs it). /models belongs to it before
# VOLUME, so a new named volume starts out its own (a host directory mounted there must be
# writable by uid 10001). The root filesystem may be read-only: only /models and /tmp are written.
RUN groupadd --system --gid 10001 textgen \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/textgen textgen \
 && mkdir -p /models && chown textgen /models
USER textgen
VOLUME ["/models"]
EXPOSE 8000
# /readyz: 503 while the models are prepared (first start: minutes, once), loaded or warmed up,
# and while draining; the start period covers a first start's conversion and compile.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('TEXTGEN_BIND', ':8000').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4)"]
# Exec form: gunicorn is PID 1 and receives `docker stop`'s SIGTERM itself (a graceful drain).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
