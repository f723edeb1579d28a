#!/usr/bin/env bash
# System packages the project needs that pip cannot provide: Java 17 for TorchServe.
set -euo pipefail

java_ok() {
    command -v java >/dev/null 2>&1 || return 1
    local v
    v=$(java -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
    [ "${v%%.*}" -ge 17 ] 2>/dev/null
}

if java_ok; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "TorchServe needs Java 17+: install openjdk-17-jre-headless (root is needed)" >&2
    exit 1
fi
echo "installing Java 17 for TorchServe (apt)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
java_ok
