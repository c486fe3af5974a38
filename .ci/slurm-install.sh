#!/bin/sh
# Installs a single-node Slurm with its PBS wrappers (qsub/qstat/qdel) so that
# tests/test_submit.py can submit real jobs; tests/slurm_cluster.py configures and
# starts it.  Debian/Ubuntu, root only.  Skips the download when already installed.
set -eu
PACKAGES="munge slurmctld slurmd slurm-client slurm-wlm-torque"
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
   && command -v munged >/dev/null && command -v qsub >/dev/null; then
    echo "slurm-install: already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm-install: must run as root to apt-get install $PACKAGES" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends $PACKAGES
