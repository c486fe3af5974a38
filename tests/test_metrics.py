"""What a run leaves to look at: the metrics log (one row per iteration, a killed and resumed
run gives the rows of a straight one), `best` and --patience, the progress bar on a
terminal and char-rnn's lines elsewhere, and `sample --out`."""
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

from cli_helpers import ROOT, TINY_MODEL, run_cli, small_corpus
from phi_rnn import checkpoint, metrics
from phi_rnn.sample import BLOCK, FIRST_BLOCK, Generator

TIMINGS = ("ms_per_iteration", "chars_per_s", "training_seconds", "wall_seconds")


def _rows(cv, savefile="lstm"):
    return metrics.read_rows(metrics.log_path(str(cv), savefile))


def _without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("metrics") / "data", 20000)


def test_one_row_per_iteration_with_every_column(corpus, tmp_path):
    run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", 12, "--eval_val_every", 5,
            "--checkpoint_dir", tmp_path, check=True)
    rows = _rows(tmp_path)
    assert [r["iteration"] for r in rows] == list(range(1, 13))
    assert [r["iteration"] for r in rows if r["val_loss"] is not None] == [5, 10, 12]
    ck = checkpoint.load("latest", str(tmp_path))
    assert [r["train_loss"] for r in rows] == pytest.approx(ck.arrays["train_losses"].tolist(), rel=1e-6)
    assert {int(k): v for k, v in ck.meta["val_losses"].items()} == {
        int(r["iteration"]): r["val_loss"] for r in rows if r["val_loss"] is not None}
    assert rows[-1]["epoch"] == pytest.approx(ck.meta["epoch"])
    assert all(r["learning_rate"] == 2e-3 and r["grad_param_norm"] > 0 for r in rows)
    assert all(r["chars_per_s"] == pytest.approx(8 * 16 / (r["ms_per_iteration"] / 1e3), rel=1e-6) for r in rows)


def test_killed_and_resumed_run_has_the_rows_of_a_straight_run(corpus, tmp_path):
    """SIGKILL while training, then --resume from a checkpoint before the last row written:
    the rows past it are replaced, none is missing or doubled."""
    args = ["--data_dir", corpus, "--rnn_size", 64, "--batch_size", 16, "--seq_length", 32, "--max_iters", 30,
            "--eval_val_every", 5]
    run_cli("train", *args, "--checkpoint_dir", tmp_path / "straight", check=True)

    killed = tmp_path / "killed"
    log = metrics.log_path(str(killed), "lstm")
    proc = subprocess.Popen([sys.executable, "-m", "phi_rnn", "train", *map(str, args), "--checkpoint_dir",
                             str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(log) and len(_rows(killed)) >= 7:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    rows_at_kill = len(_rows(killed))
    saved = {checkpoint.load(str(killed / name)).meta["iteration"]: name
             for name in os.listdir(killed) if name.endswith(".npz")}
    assert 5 in saved and rows_at_kill > 5
    run_cli("train", *args, "--checkpoint_dir", killed, "--resume", killed / saved[5], check=True)
    assert _without_timings(_rows(killed)) == _without_timings(_rows(tmp_path / "straight"))


def test_a_resumed_run_without_its_log_fills_it_from_the_checkpoint(tmp_path):
    path = str(tmp_path / "lstm.metrics.csv")
    history = (4, [4.1, 3.9, 3.7, 3.6], {"2": 3.8, "4": 3.5}, 100)
    metrics.MetricsLog(path, 128, history, log=lambda *a, **k: None).append(5, 0.05, (3.4, None), 2e-3, 0.5,
                                                                        (0.01, 2.5, 3.0))
    rows = metrics.read_rows(path)
    assert [(r["iteration"], r["train_loss"], r["val_loss"]) for r in rows] == [
        (1, 4.1, None), (2, 3.9, 3.8), (3, 3.7, None), (4, 3.6, 3.5), (5, 3.4, None)]
    assert rows[3]["learning_rate"] is None and rows[4]["chars_per_s"] == pytest.approx(12800)
    assert rows[3]["training_seconds"] is None and (rows[4]["training_seconds"], rows[4]["wall_seconds"]) == (2.5, 3.0)


def test_a_log_without_the_seconds_columns_is_read_and_continued(tmp_path):
    path = str(tmp_path / "lstm.metrics.csv")
    with open(path, "w") as f:
        f.write(",".join(metrics.UNTIMED_COLUMNS) + "\n1,0.01,4.1,,0.002,0.5,10.0,12800.0\n")
    assert metrics.read_rows(path)[0]["train_loss"] == 4.1 and metrics.read_rows(path)[0]["wall_seconds"] is None
    metrics.MetricsLog(path, 128, (1, [4.1], {}, 100), log=print).append(2, 0.02, (3.9, None), 2e-3, 0.4,
                                                                        (0.01, 1.0, 1.5))
    rows = metrics.read_rows(path)
    assert [(r["iteration"], r["ms_per_iteration"], r["wall_seconds"]) for r in rows] == [(1, 10.0, None), (2, 10.0, 1.5)]


def test_a_new_run_moves_the_previous_log_aside(tmp_path):
    path = str(tmp_path / "lstm.metrics.csv")
    messages = []
    for loss in (4.0, 3.0):
        m = metrics.MetricsLog(path, 1, None, log=messages.append)
        m.append(1, 0.1, (loss, None), 1e-3, 0.1, (0.01, 0.01, 0.01))
        m.close()
    assert [r["train_loss"] for r in metrics.read_rows(path)] == [3.0]
    assert [r["train_loss"] for r in metrics.read_rows(path + ".1")] == [4.0]
    assert messages == [f"a new run: the previous metrics log was moved to {path}.1"]


def test_best_names_the_lowest_validation_loss_and_patience_stops(tmp_path):
    """A tiny corpus and a high learning rate: validation stops improving within a few
    evaluations; with --patience 2 the run stops two evaluations after its best."""
    corpus = small_corpus(tmp_path / "data", 3000)
    result = run_cli("train", "--data_dir", corpus, "--rnn_size", 64, "--batch_size", 4, "--seq_length", 25,
                     "--learning_rate", 0.02, "--train_frac", 0.8, "--val_frac", 0.2, "--max_iters", 2000, "--eval_val_every", 10,
                     "--patience", 2, "--keep", 1, "--checkpoint_dir", tmp_path / "cv", check=True)
    rows = _rows(tmp_path / "cv")
    val = [(int(r["iteration"]), r["val_loss"]) for r in rows if r["val_loss"] is not None]
    best_iteration, best_loss = min(val, key=lambda v: v[1])
    assert val[-3][0] == best_iteration and len(rows) == val[-1][0] < 2000
    assert "(--patience 2): stopped" in result.stdout
    best = checkpoint.load("best", str(tmp_path / "cv"))
    assert best.meta["iteration"] == best_iteration and best.path.endswith(f"_{best_loss:.4f}.npz")
    assert os.path.exists(checkpoint.resolve("latest", str(tmp_path / "cv")))  # --keep 1 kept both
    by_name = run_cli("sample", "best", "--length", 100, cwd=tmp_path, check=True).stdout
    assert by_name == run_cli("sample", best.path, "--length", 100, check=True).stdout


def _run_on_a_terminal(argv, timeout=300):
    """Runs the CLI with stdout and stderr on a pseudo-terminal; returns (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "phi_rnn", *map(str, argv)], cwd=ROOT, stdout=slave,
                            stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    output = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(), output.decode("utf-8", "replace")


def test_a_terminal_gets_a_progress_bar_a_pipe_char_rnn_lines(corpus, tmp_path):
    args = ["train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", 40, "--eval_val_every", 20]
    status, screen = _run_on_a_terminal([*args, "--checkpoint_dir", tmp_path / "tty"])
    assert status == 0, screen
    assert "40/40" in screen and "it/s" in screen and "train_loss 3." in screen
    assert "train_loss = " not in screen and screen.count("validation loss") == 2
    piped = run_cli(*args, "--checkpoint_dir", tmp_path / "pipe", check=True).stdout
    assert "it/s" not in piped and piped.count("train_loss = ") == 40
    assert re.search(r"^40/\d+ \(epoch 0\.\d+\), train_loss = ", piped, re.M)


def test_sample_out_writes_the_text_atomically(tmp_path, corpus):
    run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", 5, "--checkpoint_dir", tmp_path,
            check=True)
    out = tmp_path / "text.txt"
    shown = run_cli("sample", tmp_path / "latest", "--length", 5000, "--primetext", "First", check=True)
    run_cli("sample", tmp_path / "latest", "--length", 5000, "--primetext", "First", "--out", out, check=True)
    assert out.read_text(encoding="utf-8") == shown.stdout and len(shown.stdout) == 5 + 5000 + 1
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not a checkpoint")
    failed = run_cli("sample", corrupt, "--out", out)
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1
    assert out.read_text(encoding="utf-8") == shown.stdout  # the previous text is intact
    failed = run_cli("sample", tmp_path / "latest", "--out", tmp_path / "no" / "text.txt")
    assert failed.returncode == 2 and "cannot write" in failed.stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
    # streamed: the first block is small, so a long text shows at once
    blocks = list(Generator(checkpoint.load(str(tmp_path / "latest"))).generate(
        20000, 1.0, False, np.random.default_rng(0)))
    assert len(blocks[0]) == FIRST_BLOCK < BLOCK and sum(map(len, blocks)) == 20000


def test_a_terminal_that_goes_away_does_not_stop_training(corpus, tmp_path):
    """The bar's terminal closed mid-run (its writes fail with EIO): training goes on, and
    SIGTERM still ends it with a checkpoint that the metrics log agrees with."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "phi_rnn", "train", "--data_dir", corpus, *map(str, TINY_MODEL),
                             "--max_iters", "1000000", "--eval_val_every", "1000000", "--checkpoint_dir", str(tmp_path)],
                            cwd=ROOT, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    screen = b""
    deadline = time.time() + 300
    while b"it/s" not in screen and time.time() < deadline:
        if select.select([master], [], [], 1)[0]:
            screen += os.read(master, 65536)
    os.close(master)  # the terminal goes away
    time.sleep(2)
    assert proc.poll() is None, "training stopped when its terminal went away"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    ck = checkpoint.load("latest", str(tmp_path))
    assert "interrupted" in ck.path and len(_rows(tmp_path)) == ck.meta["iteration"] > 0
