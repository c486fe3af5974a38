"""Start numba and MKL in the test process the way the CLI does: thread settings first."""
import os
import sys

from phi_rnn import affinity

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# Two threads (or one on a 1-CPU box), no binding: the batch strategy really runs in parallel.
affinity.configure(threads=min(2, len(os.sched_getaffinity(0))), policy="none")

import pytest  # noqa: E402

from phi_rnn import blas, gemm_choice  # noqa: E402

gemm_choice.use_default()  # the backend training and sampling run when none is asked for

# Set in CI (.ci/run): the libxsmm backend must then be built and tested, never skipped.
REQUIRE_LIBXSMM = "PHI_RNN_REQUIRE_LIBXSMM"


def _require_libxsmm():
    if "libxsmm" not in blas.available():
        if os.environ.get(REQUIRE_LIBXSMM):
            pytest.fail(blas.SMALL_GEMM_MISSING)
        pytest.skip(f"{blas.SMALL_GEMM_MISSING} (CI sets {REQUIRE_LIBXSMM}=1: fails there)")


@pytest.fixture(params=blas.BACKENDS)
def blas_backend(request):
    """Each float32 GEMM backend in turn (libxsmm only where `make native` built it)."""
    if request.param == "libxsmm":
        _require_libxsmm()
    elif request.param not in blas.available():  # OpenBLAS, oneDNN: dependencies, always there
        pytest.fail(blas.MISSING[request.param])
    chosen = blas.backend()
    blas.set_backend(request.param)
    yield request.param
    blas.set_backend(chosen)


@pytest.fixture
def with_libxsmm():
    """For tests that switch between the backends themselves; restores the choice after."""
    _require_libxsmm()
    chosen = blas.backend()
    yield
    blas.set_backend(chosen)
    blas.count_calls(False)


SHARED_MEMORY = "/dev/shm"
MPICH_SEGMENT = "mpich_shm_"


def _mpich_segments():
    try:
        return {name for name in os.listdir(SHARED_MEMORY) if name.startswith(MPICH_SEGMENT)}
    except OSError:
        return set()


def _mapped_anywhere(path):
    """Whether a live process still maps `path` (one this user can see)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if path in maps.read():
                    return True
        except OSError:
            continue
    return False


@pytest.fixture(autouse=True)
def remove_the_shared_memory_of_killed_ranks():
    """An MPI rank killed by a test leaves its MPICH shared-memory segment behind, and later
    jobs' MPI_Init can fail on it (UCX: "failed to unpack address"): after each test, every
    segment it created that no live process maps any more is removed."""
    before = _mpich_segments()
    yield
    for name in _mpich_segments() - before:
        path = os.path.join(SHARED_MEMORY, name)
        if not _mapped_anywhere(path):
            try:
                os.unlink(path)
            except OSError:
                pass
