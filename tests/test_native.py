"""phi_rnn.native: one place that finds libmkl_rt and the `make native` build, for the GEMMs
(blas.py) and the affinity check (affinity.py) alike; each honours its variable."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from phi_rnn import native

SHOW = ("import json; from phi_rnn import affinity; mkl = affinity.load_mkl(); from phi_rnn import blas; "
        "print(json.dumps([mkl, blas.MKL_RT_PATH, str(affinity.PROBE_PATH), 'libxsmm' in blas.available()]))")


def _show(**env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PHI_RNN_SMALL_GEMM", "PHI_RNN_NATIVE_DIR"))}
    result = subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True, timeout=120,
                            env={**base, **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_training_and_topo_load_the_mkl_that_phi_rnn_mkl_rt_names():
    found = native.mkl_rt_path()
    named = os.path.join(os.path.dirname(found), ".", os.path.basename(found))  # the same file, named otherwise
    topo_mkl, training_mkl, _, _ = _show(PHI_RNN_MKL_RT=named)
    assert topo_mkl == training_mkl == named != found


def test_a_native_build_elsewhere_is_found_through_phi_rnn_native_dir(tmp_path):
    _, _, probe, libxsmm = _show(PHI_RNN_NATIVE_DIR=str(tmp_path))  # an empty directory: no build
    assert probe == str(tmp_path / "affinity_probe") and not libxsmm
    built = native.native_dir()
    if not (built / "libsmall_gemm.so").exists():
        pytest.skip("libxsmm backend not built here")
    copy = tmp_path / "build"
    shutil.copytree(built, copy)
    _, _, probe, libxsmm = _show(PHI_RNN_NATIVE_DIR=str(copy))
    assert probe == str(copy / "affinity_probe") and libxsmm
