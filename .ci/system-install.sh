#!/bin/sh
# Installs what the tests need beyond Python, from Debian/Ubuntu packages, root only:
#   - a single-node Slurm (sbatch, srun, scancel) with its PBS wrappers (qsub/qstat/qdel), so
#     that tests/test_submit.py can submit real jobs (tests/slurm_cluster.py configures and starts it);
#   - libxsmm 1.17, which `make native` links into native/build/libsmall_gemm.so: the libxsmm
#     GEMM backend (phi_rnn/blas.py).
# Skips the download when everything is installed.
set -eu
PACKAGES=""
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v qsub >/dev/null; then
    PACKAGES="munge slurmctld slurmd slurm-client slurm-wlm-torque"
fi
if [ ! -f /usr/include/libxsmm.h ]; then
    PACKAGES="$PACKAGES libxsmm-dev"
fi
if [ -z "$PACKAGES" ]; then
    echo "system-install: already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "system-install: must run as root to apt-get install $PACKAGES" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends $PACKAGES
