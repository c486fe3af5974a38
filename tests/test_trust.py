"""Never lose work: failed writes keep the previous checkpoint, divergence stops cleanly,
--keep prunes, a closed terminal checkpoints, one run per checkpoint directory, and results
are deterministic for a given seed and thread count (with or without pinning)."""
import glob
import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np

from cli_helpers import ROOT, TINY_MODEL, run_cli, small_corpus, train_losses, trained_checkpoint
from phi_rnn import checkpoint


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    corpus = small_corpus(tmp_path / "data")
    cv = tmp_path / "cv"
    run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", 5, "--eval_val_every", 5,
            "--checkpoint_dir", cv, check=True)
    (good,) = glob.glob(str(cv / "*.npz"))
    content = open(good, "rb").read()
    result = run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", 10, "--eval_val_every", 5,
                     "--checkpoint_dir", cv, "--resume", "latest", preexec_fn=_limit_file_size(4096))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot write checkpoint" in result.stderr and f"{good} is intact" in result.stderr
    assert glob.glob(str(cv / "*.npz")) == [good] and open(good, "rb").read() == content
    assert not [n for n in os.listdir(cv) if n.startswith(".tmp-")]  # no half-written leftovers
    assert checkpoint.resolve("latest", str(cv)) == good


def test_exploding_loss_stops_with_status_3_and_keeps_last_good_checkpoint(tmp_path):
    corpus = small_corpus(tmp_path / "data")
    cv = tmp_path / "cv"
    result = run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--learning_rate", 30, "--grad_clip", 1000,
                     "--eval_val_every", 1, "--max_iters", 200, "--checkpoint_dir", cv)
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phi_rnn: error: loss is"), result.stderr
    assert "try a lower --learning_rate" in lines[0] and "error" not in result.stdout
    last_good = checkpoint.load("latest", str(cv))
    assert np.all(np.isfinite(last_good.params["decoder.weight"]))
    losses = last_good.arrays["train_losses"]
    assert all(np.isfinite(losses)) and max(losses) <= 3 * losses[0]


def test_keep_prunes_to_last_k_and_the_best(tmp_path):
    corpus = small_corpus(tmp_path / "data")
    cv = tmp_path / "cv"
    run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", 12, "--eval_val_every", 2,
            "--keep", 2, "--checkpoint_dir", cv, check=True)
    ck = checkpoint.load("latest", str(cv))
    vals = {int(k): v for k, v in ck.meta["val_losses"].items()}
    names = sorted(os.path.basename(p) for p in glob.glob(str(cv / "*.npz")))
    best = min(vals, key=vals.get)
    expect = {f"lm_lstm_epoch{i / ck.meta['iteration'] * ck.meta['epoch']:.2f}_{vals[i]:.4f}.npz"
              for i in {10, 12, best}}
    assert set(names) == expect


def test_same_seed_same_threads_identical_and_pinning_does_not_change_results(tmp_path):
    corpus = small_corpus(tmp_path / "data")
    args = ["train", "--data_dir", corpus, *TINY_MODEL, "--dropout", 0.2, "--max_iters", 30,
            "--eval_val_every", 30, "--threads", 2]
    runs = [run_cli(*args, "--policy", policy, "--checkpoint_dir", tmp_path / policy, check=True)
            for policy in ("compact", "scatter", "none")]
    losses = [train_losses(r.stdout) for r in runs]
    assert len(losses[0]) == 30 and losses[0] == losses[1] == losses[2]
    assert "policy compact, CPUs [0, 1]" in runs[0].stdout
    assert "verified: OpenMP threads on CPUs [0, 1]" in runs[0].stdout


def test_atomic_write_respects_the_umask_and_leaves_nothing_behind_on_failure(tmp_path):
    from phi_rnn.files import TEMP_PREFIX, atomic_write
    target = tmp_path / "f"
    previous = os.umask(0o027)
    try:
        atomic_write(str(target), lambda f: f.write(b"one"))
        assert target.read_bytes() == b"one" and (target.stat().st_mode & 0o777) == 0o640
        os.umask(0o002)
        atomic_write(str(target), lambda f: f.write(b"two"))
        assert target.read_bytes() == b"two" and (target.stat().st_mode & 0o777) == 0o664
    finally:
        os.umask(previous)

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    try:
        atomic_write(str(target), fail)
    except OSError as e:
        assert e.errno == 28
    else:
        raise AssertionError("the failure was swallowed")
    assert target.read_bytes() == b"two"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)]


def test_checkpoint_and_latest_are_readable_by_the_group_under_umask_002(tmp_path):
    corpus = small_corpus(tmp_path / "data")
    cv = tmp_path / "cv"
    previous = os.umask(0o002)
    try:
        run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", 1, "--checkpoint_dir", cv, check=True)
    finally:
        os.umask(previous)
    (npz,) = glob.glob(str(cv / "*.npz"))
    for path in (npz, str(cv / "latest")):
        assert os.stat(path).st_mode & 0o777 == 0o664, path


def _start_training(corpus, cv, *more):
    """A long training run in the background; returns once it has printed an iteration."""
    proc = subprocess.Popen([sys.executable, "-m", "phi_rnn", "train", "--data_dir", corpus, *map(str, TINY_MODEL),
                             "--checkpoint_dir", str(cv), *map(str, more)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    while not any("train_loss" in line for line in lines):
        lines.append(proc.stdout.readline())
        assert lines[-1] or proc.poll() is None, "".join(lines) + proc.stderr.read()
    return proc


def test_sighup_with_the_terminal_gone_checkpoints_and_exits_129(tmp_path):
    """A closed terminal or ssh session: stdout's reader is gone, then SIGHUP arrives."""
    corpus = small_corpus(tmp_path / "data", 40000)
    cv = tmp_path / "cv"
    proc = _start_training(corpus, cv, "--eval_val_every", 1000)
    proc.stdout.close()  # later progress lines fail to write (EPIPE), as on a dead terminal (EIO)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=60) == 129
    assert proc.stderr.read() == ""
    ck = checkpoint.load("latest", str(cv))
    assert ck.path.endswith("_interrupted.npz") and ck.meta["iteration"] >= 1


def test_one_run_per_checkpoint_directory_and_the_lock_dies_with_its_holder(tmp_path):
    corpus = small_corpus(tmp_path / "data", 40000)
    cv = tmp_path / "cv"
    first = _start_training(corpus, cv, "--eval_val_every", 5, "--keep", 2)
    second = run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", 3, "--keep", 2, "--checkpoint_dir", cv)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"is in use by another training run (pid {first.pid} on " in lines[0]
    assert "give another --checkpoint_dir" in lines[0]

    deadline = time.monotonic() + 120  # a loaded machine may reach the first checkpoint (iteration 5) late
    while not (cv / "latest").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run wrote no checkpoint"
        time.sleep(0.1)
    first.kill()  # SIGKILL: no handler runs; the kernel drops the lock with the process
    first.wait(timeout=60)
    first.stdout.close()
    first.stderr.close()
    stale = cv / ".tmp-abc123-lm_lstm_epoch0.50_3.0000.npz"  # as a kill mid-write leaves it
    stale.write_bytes(b"half a checkpoint")
    third = run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--checkpoint_dir", cv, "--resume", "latest",
                    "--max_iters", checkpoint.load("latest", str(cv)).meta["iteration"] + 2, check=True)
    # ours, and the first run's own when the SIGKILL cut one of its checkpoint writes (it writes every 5 iterations)
    assert re.search(r"removed [12] temporary file\(s\) of an interrupted checkpoint write", third.stdout), third.stdout
    assert not [n for n in os.listdir(cv) if n.startswith(".tmp-")]


def test_a_flag_given_equal_to_its_default_still_warns_on_resume(tmp_path):
    corpus = small_corpus(tmp_path / "data")
    cv = tmp_path / "cv"
    run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--learning_rate", 0.01, "--max_iters", 2,
            "--checkpoint_dir", cv, check=True)
    resumed = run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--learning_rate", 0.002, "--max_iters", 3,
                      "--checkpoint_dir", cv, "--resume", "latest", check=True)
    assert "warning: --learning_rate 0.002 ignored: a resumed run keeps the checkpoint's 0.01" in resumed.stdout
    assert checkpoint.load("latest", str(cv)).meta["learning_rate"] == 0.01


def test_sample_into_a_pipe_closed_early_ends_quietly(tmp_path):
    _, path = trained_checkpoint(str(tmp_path), 12000, 2)
    command = (f"set -o pipefail; {sys.executable} -m phi_rnn sample {path} --length 200000 | head -c 100; "
               "status=${PIPESTATUS[0]}; echo; echo status $status")
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stderr == ""
    text, status = result.stdout.rsplit("\n", 2)[0], result.stdout.splitlines()[-1]
    assert len(text) == 100 and status == "status 0", result.stdout


def test_the_temp_file_cleaner_removes_only_what_no_write_holds(tmp_path):
    """A write killed mid-way leaves an unlocked temporary file: removed. One being written
    (locked by atomic_write until it has its name) is kept, whoever cleans; a FIFO with a
    temporary file's name is neither opened (it would block) nor removed."""
    import threading
    from phi_rnn import files
    (tmp_path / ".tmp-killed-latest").write_bytes(b"half a pointer")
    os.mkfifo(tmp_path / ".tmp-fifo-latest")
    seen = []

    def write(f):
        f.write(b"whole\n")
        seen.append(files.remove_stale_temp_files(str(tmp_path)))  # a cleaner while this write is under way

    writer = threading.Thread(target=files.atomic_write, args=(str(tmp_path / "latest"), write), daemon=True)
    writer.start()
    writer.join(60)
    assert seen == [[".tmp-killed-latest"]]
    assert (tmp_path / "latest").read_bytes() == b"whole\n"
    assert sorted(os.listdir(tmp_path)) == [".tmp-fifo-latest", "latest"]
