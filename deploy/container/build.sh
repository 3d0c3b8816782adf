#!/usr/bin/env bash
# Build the textgen image with podman where no image registry can be reached: on the local
# Debian base (base.sh builds it once), with this machine's CPU torch wheel mounted into the
# install step instead of the PyTorch index (which a plain `docker build .` uses).
# Usage: deploy/container/build.sh [IMAGE [PODMAN-BUILD-OPTIONS...]]   (default textgen:local;
#        e.g. --no-cache to rebuild every layer)
#   TEXTGEN_WHEELS   a directory holding torch's CPU wheel (default /opt/wheels)
#   TORCH_INDEX_URL  use this index for torch instead (then no wheel directory is needed)
set -euo pipefail
image=${1:-textgen:local}
shift $(($# > 0 ? 1 : 0))
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
base=${TEXTGEN_BASE_IMAGE:-textgen-base:bookworm}
wheels=${TEXTGEN_WHEELS:-/opt/wheels}

"$here/base.sh" "$base"

# --format docker: the OCI format has no HEALTHCHECK, and podman would drop it.
args=(--format docker --pull=never --build-arg "BASE=$base"
  # The base carries this machine's CA bundle; pip verifies the registry (or its proxy) with it.
  --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
else
  # Without the CPU wheel, pip would take PyPI's torch of that version: the multi-GB CUDA build.
  torch=$(sed -n 's/^torch==//p' "$repo/requirements.txt")
  if ! ls "$wheels"/torch-"$torch"+cpu-*.whl >/dev/null 2>&1; then
    echo "no CPU wheel of torch $torch in $wheels; set TEXTGEN_WHEELS or TORCH_INDEX_URL" >&2
    exit 1
  fi
  args+=(--build-arg TORCH_INDEX_URL= -v "$wheels:/opt/wheels:ro"
    --build-arg PIP_FIND_LINKS=/opt/wheels)
fi
podman build "${args[@]}" "$@" -t "$image" "$repo"
# Earlier builds this one untagged, and cached layers no tagged image uses any more (up to
# 2 GB a build otherwise): the Dockerfile labels every layer of its own.
podman image prune -f --filter label=org.opencontainers.image.title=textgen >/dev/null
