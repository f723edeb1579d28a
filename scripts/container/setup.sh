#!/usr/bin/env bash
# Everything a container build needs on a Debian machine without a Docker engine:
#   1. podman, buildah, runc and debootstrap from apt, where missing (root);
#   2. podman's settings (env.sh);
#   3. the base image the Dockerfile starts FROM, debian:bookworm-slim, made locally with
#      debootstrap (no registry is reached): a minbase bookworm root file system, kept as a
#      tarball in the cache and imported into podman under that name.
# Idempotent; a second run does nothing it does not have to.
#
#   DEBIAN_MIRROR  [http://deb.debian.org/debian]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

missing=()
for tool in podman:podman buildah:buildah runc:runc debootstrap:debootstrap; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: ${missing[*]} missing; installing them needs root (apt)" >&2
        exit 1
    fi
    echo "setup.sh: installing ${missing[*]} (apt)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" uidmap >/dev/null
fi

# shellcheck source=env.sh
. "$here/env.sh"

BASE_IMAGE="docker.io/library/debian:bookworm-slim"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tarball="$MODELCTL_CONTAINER_CACHE/debian-bookworm-minbase.tar"

if ! podman image exists "$BASE_IMAGE"; then
    if [ ! -s "$tarball" ]; then
        echo "setup.sh: debootstrap --variant=minbase bookworm ($MIRROR)" >&2
        rootfs="$(mktemp -d "$MODELCTL_CONTAINER_CACHE/rootfs.XXXXXX")"
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
            tail -20 "$rootfs.log" >&2; exit 1; }
        rm -f "$rootfs.log"
        # As in Debian's own images: the updates and security suites, no apt caches.
        printf '%s\n' "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
            "deb http://deb.debian.org/debian-security bookworm-security main" \
            > "$rootfs/etc/apt/sources.list"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
        trap - EXIT
    fi
    echo "setup.sh: importing $tarball as $BASE_IMAGE" >&2
    podman import --quiet --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
fi
