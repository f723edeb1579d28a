#!/usr/bin/env bash
# Load generators of `make bench` (benchmarks/loadgen.py) that pip cannot provide: wrk (HTTP/1.1)
# and h2load (HTTP/2, gRPC; Debian's nghttp2-client), from Debian's packages. Never fatal: without
# them the benchmark skips the runs that need them and says why in BENCHMARKS.md.
set -uo pipefail

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "bench: ${missing[*]} missing (the native engine's wrk/h2load runs need them); install them as root" >&2
    exit 0
fi
echo "bench: installing ${missing[*]} (apt)"
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || echo "bench: could not install ${missing[*]}" >&2
exit 0
