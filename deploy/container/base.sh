#!/usr/bin/env bash
# Build a local Debian bookworm base image with debootstrap, for machines that cannot pull
# images (no registry but the package archives): `podman build --build-arg BASE=<it>`.
# It takes the machine's own apt sources (so apt works inside, through the same mirror) and
# CA bundle (so pip inside a build can verify a proxy that re-signs TLS). Python, venv and g++
# are left to the Dockerfile, which installs them when its base lacks them.
# Usage: deploy/container/base.sh [IMAGE]   (default textgen-base:bookworm; kept if present)
set -euo pipefail
image=${1:-textgen-base:bookworm}
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}

if podman image exists "$image"; then
  echo "base image $image present; kept"
  exit 0
fi

# The first Debian archive the machine's apt uses (deb822 .sources or one-line .list).
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1 == "URIs:" && $2 ~ /debian\/?$/ { print $2; exit }' || true)
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '$1 == "deb" && $2 ~ /debian\/?$/ { print $2; exit }' || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d /var/tmp/textgen-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}

# The machine's Debian sources replace debootstrap's one line (security and updates too);
# third-party sources stay out: their keys are not in the image.
rm -f "$rootfs/etc/apt/sources.list"
for source in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
  if [ -f "$source" ] && grep -q '/debian' "$source"; then
    cp "$source" "$rootfs/etc/apt/${source#/etc/apt/}"
  fi
done
# The bundle as it is, and each of its certificates where update-ca-certificates looks: a later
# install of ca-certificates (python3-venv pulls it in) rebuilds the bundle from those.
mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/usr/local/share/ca-certificates/host"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
awk -v dir="$rootfs/usr/local/share/ca-certificates/host" '
  /-----BEGIN CERTIFICATE-----/ { file = sprintf("%s/%03d.crt", dir, ++n) }
  file { print > file }
  /-----END CERTIFICATE-----/ { close(file); file = "" }' /etc/ssl/certs/ca-certificates.crt
# What an image needs none of: downloaded packages and the package lists.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log

tar -C "$rootfs" -c . | podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$image" >/dev/null
echo "base image $image built"
