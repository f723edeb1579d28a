#!/usr/bin/env bash
# podman with the project's settings and storage (env.sh): scripts/container/podman.sh ARGS...
set -euo pipefail
# shellcheck source=env.sh
. "$(cd "$(dirname "$0")" && pwd)/env.sh"
exec podman "$@"
