# textgen on CPU. The model cache is a volume, so the GGUF conversion (or a Hub download), the
# quantized weights and the compiled decoder are made once and survive container restarts:
#   docker build -t textgen .
#   docker run -p 8000:8000 -v textgen-models:/models textgen
FROM python:3.11-slim

# The CPU build of torch; PyPI's default torch wheel for Linux is the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TEXTGEN_MODEL_CACHE=/models \
    TEXTGEN_BIND=0.0.0.0:8000 \
    HF_HOME=/models/hf-home

# A C++ compiler: the int8/int4 decoder is compiled once, into the model cache (textgen/models/compiled.py).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt requirements-dev.txt pyproject.toml README.md ./
COPY deploy/install.sh deploy/install.sh
COPY textgen textgen
COPY wsgi.py gunicorn.conf.py ./
# The same install steps `make setup` (and so CI) runs.
RUN python -m venv /opt/venv && deploy/install.sh /opt/venv/bin/python
ENV PATH=/opt/venv/bin:$PATH

RUN useradd --system --uid 10001 textgen && mkdir -p /models && chown textgen /models
USER textgen
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
