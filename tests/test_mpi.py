"""Data-parallel training over MPI with real ranks (`mpiexec -n 2`, mpi4py + the mpich wheel of
the [mpi] extra): phi_rnn.distributed's exchange (one allreduce of the gradient with the loss and
the stop flags riding along, gathered state, agreement on errors), the same results as one
process with the same global batch, bit-identical run to run, checkpoints that resume across
rank counts, signals and a dying rank, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import ROOT
from phi_rnn import distributed
from phi_rnn.errors import UsageError

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
REQUIRE_MPI = "PHI_RNN_REQUIRE_MPI"  # set in CI (.ci/run): these tests then fail, not skip


def _mpi_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    if not os.path.exists(MPIEXEC):
        return f"no mpiexec next to {sys.executable} (the mpich wheel of the [mpi] extra)"
    return None


@pytest.fixture
def require_mpi():
    missing = _mpi_missing()
    if missing:
        if os.environ.get(REQUIRE_MPI):
            pytest.fail(missing)
        pytest.skip(f"{missing} (CI sets {REQUIRE_MPI}=1: fails there)")


# ------------------------------------------------------------------------- without ranks


def test_stream_ranges_are_contiguous_and_cover_the_batch():
    for batch, ranks in [(50, 2), (50, 3), (128, 16), (7, 7)]:
        ranges = [distributed.stream_range(batch, r, ranks) for r in range(ranks)]
        assert ranges[0][0] == 0 and ranges[-1][1] == batch
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    with pytest.raises(UsageError, match="--batch_size 3 is smaller than the 4 MPI ranks"):
        distributed.stream_range(3, 0, 4)


def test_launcher_detection():
    assert distributed.launched_size({}) is None and distributed.launched_rank({}) == 0
    assert distributed.launched_size({"PMI_SIZE": "8", "PMI_RANK": "3"}) == 8
    assert distributed.launched_rank({"PMI_SIZE": "8", "PMI_RANK": "3"}) == 3
    assert distributed.launched_size({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}) == 4
    assert distributed.launched_size({"PMIX_RANK": "0"}) == 0  # known after MPI_Init
    assert isinstance(distributed.connect({}), distributed.Single)


def test_library_names():
    assert distributed.library_version("MPICH Version:      5.0.2\nMPICH Release date: ...") == "MPICH 5.0.2"
    assert distributed.library_version("Open MPI v4.1.6, package: Debian OpenMPI, ident: 4.1.6") == "Open MPI v4.1.6"
    assert distributed.library_version("Intel(R) MPI Library 2021.13 for Linux* OS\n") == \
        "Intel(R) MPI Library 2021.13 for Linux* OS"


def test_the_loss_pair_sums_exactly():
    """The ranks' losses ride in float32 slots as (high, low); the highs sum without rounding."""
    rng = np.random.default_rng(1)
    for _ in range(100):
        losses = rng.uniform(0, 8, rng.integers(2, 65))
        pairs = np.array([distributed._split_pair(v) for v in losses], dtype=np.float32)
        highs = np.float32(0)
        for h in pairs[:, 0]:
            highs = np.float32(highs + h)
        assert float(highs) == sum(float(h) for h in pairs[:, 0])
        total = float(highs) + float(pairs[:, 1].astype(np.float64).sum())
        assert abs(total - losses.sum()) < 1e-9 * losses.sum()


def test_without_mpi4py_asking_for_ranks_is_one_clear_error():
    code = ("import sys; sys.modules['mpi4py'] = None\nfrom phi_rnn import distributed\n"
            "try:\n    distributed.connect({'PMI_SIZE': '2', 'PMI_RANK': '0'})\n"
            "except distributed.UsageError as e:\n    print(e)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("started as 2 MPI ranks, but mpi4py is not installed: pip install")


def test_single_process_never_imports_mpi4py():
    code = ("import sys; from phi_rnn import distributed; world = distributed.connect({}); "
            "print(type(world).__name__, 'mpi4py' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["Single", "False"]


# ------------------------------------------------------------------------- real ranks

EXCHANGE = """
import json, sys, types
import numpy as np
from phi_rnn import distributed
world = distributed.connect()
start, stop = world.streams(6)
rank = world.rank
grads = types.SimpleNamespace(storage=np.zeros(5 + 8, np.float32))
grads.data = grads.storage[:5]
grads.data[:] = np.arange(5) + 10 * rank
loss, flags = world.allreduce_gradient(grads, 2.0 + rank, [float(rank == 1), 0.0])
state = np.full((2, 2, stop - start, 3), rank, np.float32)
gathered = world.gather_streams(state)
try:
    world.agree(ValueError("rank 1 failed") if rank == 1 else None)
    agreed = None
except distributed.UsageError as e:
    agreed = str(e)
print(json.dumps({"rank": rank, "streams": [start, stop], "grads": grads.data.tolist(), "loss": loss,
                  "flags": flags, "local": [world.local_rank, world.local_size], "agreed": agreed,
                  "gathered": None if gathered is None else gathered[0, 0, :, 0].tolist()}))
sys.exit(world.finish(0))
"""


def test_one_allreduce_carries_gradient_loss_and_flags(require_mpi):
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", EXCHANGE], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reports = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda r: r["rank"])
    for report in reports:
        # each rank's gradient is the mean over its 3 streams: weighted 3/6 before the sum
        assert report["grads"] == [0.5 * (k + k + 10) for k in range(5)]
        assert report["loss"] == 0.5 * 2.0 + 0.5 * 3.0
        assert report["flags"] == [1.0, 0.0]  # rank 1's signal, seen by both
        assert report["local"][1] == 2
    assert [r["streams"] for r in reports] == [[0, 3], [3, 6]]
    assert reports[0]["gathered"] == [0, 0, 0, 1, 1, 1] and reports[1]["gathered"] is None
    # rank 0 prints the failing rank's message, named with its host; rank 1 has its own
    assert reports[0]["agreed"].startswith("rank 1 (") and reports[0]["agreed"].endswith("): rank 1 failed")
    assert reports[1]["agreed"] == "rank 1 failed"
