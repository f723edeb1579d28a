#!/usr/bin/env bash
# System packages of the built-in training datasets: builtin:fashion-mnist reads the files
# of the Debian package dataset-fashion-mnist. Installed where missing; without root this
# only warns, since nothing but that one dataset needs it.
set -euo pipefail

DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-images-idx3-ubyte.gz" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "builtin:fashion-mnist needs the Debian package dataset-fashion-mnist (root is needed): skipped" >&2
    exit 0
fi
echo "installing dataset-fashion-mnist (apt)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
test -f "$DIR/train-images-idx3-ubyte.gz"
