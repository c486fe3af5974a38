"""Where phi_rnn's compiled companions are: MKL's runtime library and the outputs of
`make native`. One answer for the GEMMs (blas.py) and for the affinity check (affinity.py),
so that `phi_rnn topo` inspects the MKL that training loads. Imports nothing heavy: the
affinity controller reads it before any runtime starts.

  PHI_RNN_MKL_RT      libmkl_rt to load (else the `mkl` wheel's under sys.prefix, or a conda env's)
  PHI_RNN_NATIVE_DIR  a directory holding a `make native` build (else native/build of this
                      source tree, which an editable install or a checkout has)
  PHI_RNN_SMALL_GEMM  the libxsmm GEMM library itself (else libsmall_gemm.so in that directory)
"""
import glob
import os
import sys
from pathlib import Path

MKL_RT_ENV = "PHI_RNN_MKL_RT"
NATIVE_DIR_ENV = "PHI_RNN_NATIVE_DIR"
SMALL_GEMM_ENV = "PHI_RNN_SMALL_GEMM"


def mkl_rt_path():
    """libmkl_rt's path, or None when there is none."""
    if os.environ.get(MKL_RT_ENV):
        return os.environ[MKL_RT_ENV]
    for prefix in (sys.prefix, os.environ.get("CONDA_PREFIX", "")):
        if prefix:
            found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
            if found:
                return found[0]
    return None


def native_dir():
    return Path(os.environ.get(NATIVE_DIR_ENV) or Path(__file__).resolve().parent.parent / "native" / "build")


def small_gemm_path():
    return Path(os.environ.get(SMALL_GEMM_ENV) or native_dir() / "libsmall_gemm.so")


def affinity_probe_path():
    return native_dir() / "affinity_probe"
