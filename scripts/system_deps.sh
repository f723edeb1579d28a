#!/usr/bin/env bash
# System packages the project needs that pip cannot provide: Java 17 (a JDK) for TorchServe, and
# nginx, the authenticating proxy in front of TorchServe's REST inference API
# (service/serving/torchserve/proxy.py). Both from Debian's packages.
set -euo pipefail

java_ok() {
    command -v java >/dev/null 2>&1 || return 1
    local v
    v=$(java -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
    [ "${v%%.*}" -ge 17 ] 2>/dev/null
}

nginx_ok() {
    # Debian installs it in /usr/sbin, which a non-root PATH may lack.
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]
}

jdk_ok() {
    # jcmd (the JDK's diagnostic tool): `make soak` and tests/test_soak.py read the frontend's
    # JVM flags and live heap with it; operators use it the same way.
    command -v jcmd >/dev/null 2>&1
}

missing=()
{ java_ok && jdk_ok; } || missing+=(openjdk-17-jdk-headless)
nginx_ok || missing+=(nginx)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "modelctl needs ${missing[*]} (TorchServe: Java 17+; the REST proxy: nginx); install them as root" >&2
    exit 1
fi
echo "installing ${missing[*]} (apt)"
apt-get update -qq
# --no-install-recommends: nginx only, no default site packages. The package's own service
# is not used: modelctl runs nginx as a child process with its own generated config.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
java_ok
jdk_ok
nginx_ok
