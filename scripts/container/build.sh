#!/usr/bin/env bash
# Build the Dockerfile with podman on this machine: scripts/container/build.sh [VARIANT] [TAG]
#
#   VARIANT  cpu or cuda [cuda]; TAG [localhost/modelctl:<variant>]
#
# The build reads wheels from this machine's local wheel folders instead of the network:
# every local find-links directory and file:// index of pip's configuration is mounted
# read-only at the same path, with a pip.conf naming them (and the host's CA bundle, for
# what pip still fetches from the index). torch therefore comes from disk; pip only
# downloads what no local folder has. The Dockerfile itself knows nothing of this.
#
# The default variant here is cuda because this machine's local folders hold torch's
# default (CUDA) wheels; the cpu variant takes torch from PyTorch's CPU index, which needs
# that index to be reachable.
#
# Layers are cached in podman's storage (env.sh): a rebuild after a source change redoes
# only the project's own layers.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
variant="${1:-cuda}"
tag="${2:-localhost/modelctl:$variant}"
python="${PYTHON:-python3}"

"$here/setup.sh"
# shellcheck source=env.sh
. "$here/env.sh"

# pip's configured local sources: "find-links" directories and file:// indexes.
mounts=()
find_links=()
indexes=()
while IFS= read -r line; do
    key="${line%%=*}"
    value="${line#*=}"
    value="${value#\'}"; value="${value%\'}"
    case "$key" in
        *find-links|*extra-index-url|*index-url) ;;
        *) continue ;;
    esac
    for item in $value; do
        path="${item#file://}"
        [ -d "$path" ] || continue
        if [ "${key##*.}" = find-links ]; then
            find_links+=("$path"); mounts+=("$path")
        else
            # A simple index links its files relatively (../../files/...): mount its parent.
            indexes+=("file://$path"); mounts+=("$(dirname "$path")")
        fi
    done
done < <("$python" -m pip config list 2>/dev/null; env | grep -E '^PIP_(FIND_LINKS|EXTRA_INDEX_URL|INDEX_URL)=' \
         | sed -E 's/^PIP_FIND_LINKS=/env.find-links=/; s/^PIP_EXTRA_INDEX_URL=/env.extra-index-url=/; s/^PIP_INDEX_URL=/env.extra-index-url=/')

pipconf="$MODELCTL_CONTAINER_CACHE/pip.conf"
{
    echo "[global]"
    echo "cert = /etc/modelctl-build-ca.crt"
    [ "${#find_links[@]}" -gt 0 ] && echo "find-links = $(printf '%s\n' "${find_links[@]}" | sort -u | tr '\n' ' ')"
    [ "${#indexes[@]}" -gt 0 ] && echo "extra-index-url = $(printf '%s\n' "${indexes[@]}" | sort -u | tr '\n' ' ')"
} > "$pipconf"

ca=/etc/ssl/certs/ca-certificates.crt
args=(--volume "$pipconf:/etc/pip.conf:ro")
[ -f "$ca" ] && args+=(--volume "$ca:/etc/modelctl-build-ca.crt:ro")
for dir in $(printf '%s\n' "${mounts[@]}" | sort -u); do
    args+=(--volume "$dir:$dir:ro")
done

echo "build.sh: podman build VARIANT=$variant -> $tag (local wheels: $(printf '%s\n' "${mounts[@]}" | sort -u | tr '\n' ' '))" >&2
# --format docker keeps the HEALTHCHECK (the OCI image format has none).
podman build --pull=never --layers --format docker --network host \
    --build-arg "VARIANT=$variant" "${args[@]}" --tag "$tag" --file "$root/Dockerfile" "$root"
# Layers of earlier builds that no tagged image uses any more.
podman image prune --force >/dev/null
