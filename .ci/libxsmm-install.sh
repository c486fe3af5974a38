#!/bin/sh
# Installs libxsmm 1.17 (Debian/Ubuntu's libxsmm-dev), which `make native` links into
# native/build/libsmall_gemm.so: the libxsmm GEMM backend (phi_rnn/blas.py). Root only.
set -eu
if [ -f /usr/include/libxsmm.h ]; then
    echo "libxsmm-install: already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "libxsmm-install: must run as root to apt-get install libxsmm-dev" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends libxsmm-dev
