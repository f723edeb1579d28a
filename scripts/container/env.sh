# shellcheck shell=bash
# Sourced by the other scripts here: podman's settings for this kind of machine, and the
# cache directory that keeps the base image tarball and podman's storage (built layers)
# between runs.
#
#   MODELCTL_CONTAINER_CACHE  cache directory [~/.cache/modelctl/container]
#
# containers.conf: runc, not crun (crun fails here with "cgroups in hybrid mode not
# supported"), and a nofile ulimit within this machine's hard limit (crun's and podman's
# default asks for more: "setrlimit RLIMIT_NOFILE: Operation not permitted").
# storage.conf: podman's images and layers under the cache directory (overlay driver).

MODELCTL_CONTAINER_CACHE="${MODELCTL_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelctl/container}"
mkdir -p "$MODELCTL_CONTAINER_CACHE"
MODELCTL_CONTAINER_CACHE="$(cd "$MODELCTL_CONTAINER_CACHE" && pwd)"
export MODELCTL_CONTAINER_CACHE

_nofile_hard="$(ulimit -Hn)"
[ "$_nofile_hard" = unlimited ] && _nofile_hard=1048576
_nofile=$(( _nofile_hard < 65536 ? _nofile_hard : 65536 ))
_conf="$MODELCTL_CONTAINER_CACHE/containers.conf"
_want="[containers]
default_ulimits = [\"nofile=${_nofile}:${_nofile}\", \"nproc=4096:4096\"]

[engine]
runtime = \"runc\"
"
if [ ! -f "$_conf" ] || [ "$(cat "$_conf")" != "$_want" ]; then
    printf '%s' "$_want" > "$_conf"
fi
export CONTAINERS_CONF="$_conf"

_storage="$MODELCTL_CONTAINER_CACHE/storage.conf"
_want="[storage]
driver = \"overlay\"
graphroot = \"$MODELCTL_CONTAINER_CACHE/storage\"
runroot = \"/run/modelctl-containers\"
"
if [ ! -f "$_storage" ] || [ "$(cat "$_storage")" != "$_want" ]; then
    printf '%s' "$_want" > "$_storage"
fi
export CONTAINERS_STORAGE_CONF="$_storage"
unset _conf _storage _want _nofile _nofile_hard
