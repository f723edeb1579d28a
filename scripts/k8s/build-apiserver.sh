#!/usr/bin/env bash
# A real kube-apiserver for tests, built from Debian bookworm's `kubernetes` source package
# (v1.20, with its vendored dependencies), plus etcd from apt. Prints the binary's path.
#
#   MODELCTL_K8S_CACHE  cache directory [~/.cache/modelctl/k8s]; the built binary is kept
#                       there (bin/kube-apiserver), so only the first run builds (~5 min).
#
# No package ships kube-apiserver. Steps: a deb-src entry in a private apt sources dir (the
# machine's apt configuration is left alone), `apt-get source --download-only kubernetes`,
# Go and etcd from apt, the vendored github.com/modern-go/reflect2 v1.0.1 (which breaks on
# current Go) replaced by Debian's 1.0.2, then `make WHAT=cmd/kube-apiserver`.
set -euo pipefail
cache="${MODELCTL_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelctl/k8s}"
mkdir -p "$cache/bin"
bin="$cache/bin/kube-apiserver"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
if [ ! -x "$bin" ]; then
    command -v go >/dev/null 2>&1 || need+=(golang-go)
    command -v rsync >/dev/null 2>&1 || need+=(rsync)
    command -v dpkg-source >/dev/null 2>&1 || need+=(dpkg-dev)
    [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need+=(golang-github-modern-go-reflect2-dev)
fi
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "build-apiserver.sh: ${need[*]} missing; installing them needs root (apt)" >&2
        exit 1
    fi
    echo "build-apiserver.sh: installing ${need[*]} (apt)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x "$bin" ]; then
    work="$cache/build"
    rm -rf "$work"
    mkdir -p "$work/apt/lists/partial" "$work/apt/parts" "$work/src"
    echo "deb-src $mirror bookworm main" > "$work/apt/sources.list"
    aptopts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=$work/apt/parts"
             -o "Dir::State::Lists=$work/apt/lists" -o "APT::Sandbox::User=root")
    echo "build-apiserver.sh: fetching Debian's kubernetes source package" >&2
    apt-get "${aptopts[@]}" update -qq
    (cd "$work/src" && apt-get "${aptopts[@]}" source --download-only kubernetes >/dev/null)
    dsc="$(ls "$work"/src/kubernetes_*.dsc | head -1)"
    (cd "$work/src" && dpkg-source --no-check -x "$dsc" tree >/dev/null)
    tree="$work/src/tree"
    reflect2="$tree/vendor/github.com/modern-go/reflect2"
    find "$reflect2" -maxdepth 1 \( -name '*.go' -o -name '*.s' \) -delete
    cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$reflect2/"
    cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$reflect2/" 2>/dev/null || true
    find "$reflect2" -maxdepth 1 -name '*_test.go' -delete
    mkdir -p "$work/gopath/src/k8s.io"
    ln -sfn "$tree" "$work/gopath/src/k8s.io/kubernetes"
    echo "build-apiserver.sh: make WHAT=cmd/kube-apiserver (several minutes)" >&2
    (cd "$work/gopath/src/k8s.io/kubernetes" \
        && GOPATH="$work/gopath" GO111MODULE=off GOFLAGS=-mod=vendor CGO_ENABLED=0 \
           GOCACHE="$cache/gocache" \
           make WHAT=cmd/kube-apiserver GOLDFLAGS="-s -w" >"$work/make.log" 2>&1) || {
        tail -30 "$work/make.log" >&2; exit 1; }
    cp "$tree/_output/bin/kube-apiserver" "$bin.tmp"
    mv "$bin.tmp" "$bin"
    rm -rf "$work" "$cache/gocache"
fi
echo "$bin"
