"""Data-parallel training over MPI with real ranks (`mpiexec -n 2`, mpi4py + the mpich wheel of
the [mpi] extra): phi_rnn.distributed's exchange (one allreduce of the gradient with the loss and
the stop flags riding along, gathered state, agreement on errors), the same results as one
process with the same global batch, bit-identical run to run, checkpoints that resume across
rank counts, signals and a dying rank, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cli_helpers import ROOT, TINY_MODEL, run_cli, small_corpus, train_losses
from phi_rnn import data, distributed
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


def mpi_command(ranks, *args):
    return [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "phi_rnn", *map(str, args)]


def run_mpi(ranks, *args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(mpi_command(ranks, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def checked(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def latest(cv):
    with open(os.path.join(cv, "latest")) as f:
        return os.path.join(cv, f.read().strip())


def arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files if name != "meta"}


def train_args(root, iters, *extra):
    corpus = os.path.join(root, "data")
    if not os.path.exists(corpus):
        small_corpus(corpus, 20000)
    return ("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", iters, "--eval_val_every", iters,
            "--checkpoint_dir", os.path.join(root, "cv"), *extra)


needs_mpi = pytest.mark.usefixtures("require_mpi")


# ------------------------------------------------------------------------- without ranks


def test_stream_ranges_are_contiguous_and_cover_the_batch():
    for batch, ranks in [(50, 2), (50, 3), (128, 16), (7, 7)]:
        ranges = [distributed.stream_range(batch, r, ranks) for r in range(ranks)]
        assert ranges[0][0] == 0 and ranges[-1][1] == batch
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    with pytest.raises(UsageError, match="--batch_size 3 is smaller than the 4 MPI ranks"):
        distributed.stream_range(3, 0, 4)


def test_a_ranks_loader_gathers_its_columns_of_the_global_batch():
    ids = (np.arange(2000) * 7 % 37).astype(np.uint8)
    whole = data.CharLoader(ids, 10, 5, 0.9, 0.1, 37)
    part = data.CharLoader(ids, 10, 5, 0.9, 0.1, 37)
    for split in ("train", "train", "val"):
        (x, y), (xp, yp) = whole.next_batch(split), part.next_batch(split, 3, 7)
        assert np.array_equal(x[:, 3:7], xp) and np.array_equal(y[:, 3:7], yp)


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
from phi_rnn import data, distributed
world = distributed.connect()
start, stop = world.stream_range(6)
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
# one file per rank: mpiexec forwards the ranks' stdout in chunks that may interleave
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "streams": [start, stop], "grads": grads.data.tolist(), "loss": loss,
               "flags": flags, "local": [world.local_rank, world.local_size], "agreed": agreed,
               "gathered": None if gathered is None else gathered[0, 0, :, 0].tolist()}, f)
sys.exit(world.finish(0))
"""


def test_one_allreduce_carries_gradient_loss_and_flags(require_mpi, tmp_path):
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", EXCHANGE, str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
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


ALONE = """
import sys
from phi_rnn import data, distributed
distributed.FINISH_TIMEOUT_S = 2
world = distributed.connect()
if world.rank == 1:
    sys.exit(world.finish(2, "only rank 1 failed"))
world.comm.Barrier()  # rank 0 waits for a rank that never comes
"""


def test_a_rank_failing_alone_aborts_the_job_instead_of_hanging(require_mpi):
    start = time.monotonic()
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", ALONE], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode != 0
    assert "phi_rnn: error: rank 1 (" in result.stderr and "): only rank 1 failed" in result.stderr


FRESH_CORPUS = """
import json, sys, time
from phi_rnn import data, distributed
world = distributed.connect()
said = []
if world.root:
    time.sleep(1.0)  # a rank that raced would start encoding meanwhile
corpus = world.root_first(lambda: data.load_corpus(sys.argv[1], log=lambda line, **_: said.append(line)))
with open(f"{sys.argv[2]}/rank{world.rank}.json", "w") as f:
    json.dump({"said": said, "sha256": corpus.sha256, "cache": corpus.cache, "ids": corpus.ids[:50].tolist(),
               "mapped": type(corpus.ids).__name__}, f)
sys.exit(world.finish(0))
"""


def test_a_new_corpus_is_encoded_by_rank_0_alone_and_mapped_by_the_others(require_mpi, tmp_path):
    corpus = small_corpus(tmp_path / "data", 20000)
    time.sleep(data.RACY_NS / 1e9)  # older than that, rank 0 records its stat and rank 1 trusts it
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", FRESH_CORPUS, os.path.join(corpus, "input.txt"),
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert any(line.startswith("encoding ") for line in first["said"])
    assert second["said"] == []  # it found rank 0's finished cache: no encoding, no check
    assert first["sha256"] == second["sha256"] and first["ids"] == second["ids"]
    assert first["cache"] == second["cache"] and second["mapped"] == "memmap"
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")] == []  # no temp left


# ------------------------------------------------------------------------- training on ranks

# Measured on the development VM (AMD EPYC Zen4, AVX-512, libxsmm backend), 2 ranks x 1 thread
# against 1 process x 2 threads on these tiny models: identical to the bit over 100 iterations
# (LSTM) and 50 (GRU; LSTM with dropout): each rank runs the per-thread products of the thread it
# replaces, its gradient is scaled by 1/2 (exact) and the two halves are summed once either way.
# Uneven splits or other kernels for the threaded products differ by float32 rounding, which the
# tolerances allow.
LOSS_TOLERANCE = 2e-5
PARAM_TOLERANCE = 1e-4


@needs_mpi
@pytest.mark.parametrize("model, iters, extra", [("lstm", 100, ()), ("gru", 50, ()),
                                                 ("lstm", 50, ("--dropout", "0.3"))],
                         ids=["lstm-100", "gru-50", "lstm-dropout-50"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, model, iters, extra):
    args = ("--model", model, *extra)
    single = run_cli(*train_args(tmp_path / "one", iters, *args), "--threads", 2, check=True)
    ranks = checked(run_mpi(2, *train_args(tmp_path / "one", iters, *args, "--checkpoint_dir",
                                           tmp_path / "two"), "--threads", 1))
    one_losses, two_losses = train_losses(single.stdout), train_losses(ranks.stdout)
    assert len(one_losses) == len(two_losses) == iters  # only rank 0 prints
    assert np.max(np.abs(np.subtract(one_losses, two_losses))) < LOSS_TOLERANCE
    one, two = arrays(latest(tmp_path / "one" / "cv")), arrays(latest(tmp_path / "two"))
    assert one["state"].shape == two["state"].shape  # every stream's state, gathered by rank 0
    for name in one:
        assert np.max(np.abs(one[name] - two[name]), initial=0) < PARAM_TOLERANCE, name
    assert "MPI: MPICH" in ranks.stdout and "2 ranks x 1 thread (" in ranks.stdout and "rank 1: " in ranks.stdout


def same_arrays(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@needs_mpi
def test_bit_identical_run_to_run_and_across_a_resume(tmp_path):
    """Two runs of 2 ranks x 1 thread agree to the bit, and so does one that stops half way and
    resumes on 2 ranks."""
    args = ("--dropout", "0.2", "--threads", 1)
    for name in ("first", "second"):
        checked(run_mpi(2, *train_args(tmp_path, 20, *args, "--checkpoint_dir", tmp_path / name)))
    checked(run_mpi(2, *train_args(tmp_path, 10, *args, "--checkpoint_dir", tmp_path / "halves")))
    checked(run_mpi(2, *train_args(tmp_path, 20, *args, "--checkpoint_dir", tmp_path / "halves"),
                    "--resume", "latest"))
    first = arrays(latest(tmp_path / "first"))
    same_arrays(first, arrays(latest(tmp_path / "second")))
    same_arrays(first, arrays(latest(tmp_path / "halves")))


@needs_mpi
def test_two_ranks_stop_together_at_the_target_val_loss(tmp_path):
    """Every rank sees the same validation loss: all stop at the evaluation that reaches the
    target (a rank left training would make finish() abort the job), rank 0 records it."""
    result = checked(run_mpi(2, *train_args(tmp_path, 1000, "--threads", 1, "--eval_val_every", 10,
                                            "--target_val_loss", 3.45)))
    meta = json.loads(str(np.load(latest(tmp_path / "cv"))["meta"]))
    reached = meta["target_reached"]
    assert reached["iteration"] == meta["iteration"] < 1000 and reached["val_loss"] <= 3.45
    assert 0 < reached["training_seconds"] < reached["wall_seconds"]
    assert result.stdout.count("reached --target_val_loss 3.45 at iteration") == 1  # rank 0 alone says it


def run_ranks(ranks, *args):
    """`ranks` MPI ranks of one thread each (4 on this 2-core machine share cores), or one
    process of two threads for ranks == 1."""
    if ranks == 1:
        return run_cli(*args, "--threads", 2, check=True)
    return checked(run_mpi(ranks, *args, "--threads", 1, *(("--oversubscribe",) if ranks > 2 else ())))


@needs_mpi
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2), (4, 1), (4, 2), (2, 4)])
def test_checkpoints_resume_across_rank_counts(tmp_path, first, then):
    """A checkpoint written by `first` ranks (the state of all streams gathered by rank 0)
    resumes on `then` ranks (each taking its streams' state) as a straight run there would go."""
    straight = run_ranks(then, *train_args(tmp_path, 20, "--checkpoint_dir", tmp_path / "straight"))
    run_ranks(first, *train_args(tmp_path, 10, "--checkpoint_dir", tmp_path / "resumed"))
    resumed = run_ranks(then, *train_args(tmp_path, 20, "--checkpoint_dir", tmp_path / "resumed"),
                        "--resume", "latest")
    assert f"resuming from {tmp_path / 'resumed'}" in resumed.stdout
    expected, got = train_losses(straight.stdout)[10:], train_losses(resumed.stdout)
    assert len(got) == len(expected) == 10
    assert np.max(np.abs(np.subtract(expected, got))) < LOSS_TOLERANCE
    a, b = arrays(latest(tmp_path / "straight")), arrays(latest(tmp_path / "resumed"))
    for name in a:
        assert np.max(np.abs(a[name] - b[name]), initial=0) < PARAM_TOLERANCE, name


def start_ranks(tmp_path, *extra):
    """2 ranks training for long, checkpointing every 5 iterations; returns (process, rank pids)
    once rank 0 has printed iteration 8."""
    args = train_args(tmp_path, 100000, "--threads", 1, "--eval_val_every", 5, *extra)
    process = subprocess.Popen(mpi_command(2, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    pids, lines = {}, []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("rank ") and ", pid " in line:
            pids[int(line.split()[1].rstrip(":"))] = int(line.split(", pid ")[1].split(",")[0])
        if line.startswith("8/"):
            return process, pids, lines
    process.wait(timeout=60)
    raise AssertionError(f"training stopped early: {''.join(lines)}{process.stderr.read()}")


@needs_mpi
def test_sigterm_to_one_rank_stops_all_at_the_same_iteration(tmp_path):
    """A walltime SIGTERM reaches ranks at different moments; here only rank 1 gets it. The stop
    flag rides along with the gradient's allreduce, so both stop at the same iteration, rank 0
    writes the _interrupted checkpoint and every rank (and mpiexec) exits 143."""
    process, pids, _ = start_ranks(tmp_path)
    os.kill(pids[1], signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, out + err
    assert "SIGTERM received: saved checkpoint" in out
    path = latest(tmp_path / "cv")
    assert path.endswith("_interrupted.npz")
    resumed = run_cli(*train_args(tmp_path, 12, "--threads", 2), "--resume", "latest", check=True)
    assert "resuming from" in resumed.stdout and train_losses(resumed.stdout)


@needs_mpi
def test_sigterm_to_mpiexec_leaves_a_resumable_checkpoint(tmp_path):
    process, _, _ = start_ranks(tmp_path)
    process.send_signal(signal.SIGTERM)  # mpiexec forwards it to every rank
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, out + err
    assert latest(tmp_path / "cv").endswith("_interrupted.npz")
    checked(run_mpi(2, *train_args(tmp_path, 12, "--threads", 1), "--resume", "latest"))


@needs_mpi
def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_stays(tmp_path):
    process, pids, _ = start_ranks(tmp_path)
    saved = latest(tmp_path / "cv")
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    process.communicate(timeout=60)
    assert time.monotonic() - start < 30 and process.returncode != 0
    assert latest(tmp_path / "cv") == saved or "epoch" in latest(tmp_path / "cv")
    resumed = run_cli(*train_args(tmp_path, 100000, "--threads", 2, "--max_iters", 12), "--resume", "latest",
                      check=True)
    assert "resuming from" in resumed.stdout


@needs_mpi
@pytest.mark.parametrize("bad", [("--data_dir", "/nonexistent/corpus"), ("--rnn_size", "0"),
                                 ("--batch_size", "1")], ids=["missing-corpus", "bad-flag", "batch-below-ranks"])
def test_bad_input_one_line_from_rank_0_and_exit_2_everywhere(tmp_path, bad):
    result = run_mpi(2, *train_args(tmp_path, 5, "--threads", 1), *bad, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phi_rnn: error: "), result.stderr


@pytest.mark.parametrize("rank, output", [("0", 1), ("1", 0)])
def test_ranks_without_mpi4py_one_line(tmp_path, rank, output):
    """Started by a launcher as 2 ranks where mpi4py cannot be imported: one line (rank 0), exit 2."""
    code = ("import sys; sys.modules['mpi4py'] = None; from phi_rnn.cli import main; "
            f"sys.exit(main({list(map(str, train_args(tmp_path, 5)))!r}))")
    env = dict(os.environ, PMI_SIZE="2", PMI_RANK=rank)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == output and all("mpi4py" in line for line in lines), result.stderr


# ------------------------------------------------------------------------- bench/mpi_speed.py

MPI_SPEED = os.path.join(ROOT, "bench", "mpi_speed.py")
TINY_BENCH = ("--rnn_size", "16", "--num_layers", "3", "--batch_size", "4", "--seq_length", "8", "--iters", "2",
              "--warmup", "1", "--rounds", "1")


@needs_mpi
def test_the_overlap_arm_sums_what_the_one_allreduce_sums():
    """bench/mpi_speed.py --overlap: per-layer nonblocking allreduces give the same sums to the bit (checked
    inside every run, reported), and each arm's figures are there."""
    result = subprocess.run([sys.executable, MPI_SPEED, *TINY_BENCH, "--overlap", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["overlap"]["identical_sums"] is True
    assert len(report["overlap_over_ranks_by_round"]) == 1
    for arm in ("ranks", "overlap"):
        assert 0 < report[arm]["allreduce_share"] < 1 and report[arm]["median_ms"] > 0


@needs_mpi
def test_mpi_speed_bad_input_is_one_line_and_status_2():
    cores = len(os.sched_getaffinity(0))
    for bad in (("--ranks", "0"), ("--ranks", "2", "--threads", str(cores))):  # the second: more than a rank's cores
        result = subprocess.run([sys.executable, MPI_SPEED, *TINY_BENCH, *bad], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("mpi_speed.py: error: "), \
            result.stderr
