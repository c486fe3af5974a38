"""Training through the real CLI: it learns, writes char-rnn-named checkpoints in the
documented format whose recorded validation loss an independent implementation reproduces,
resumes exactly, and survives SIGTERM; --target_val_loss stops at the target and records the
time it took (adding up across resumes); --lr_warmup and --lr_scaling set each iteration's rate."""
import argparse
import glob
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import reference as R
from cli_helpers import ROOT, SHAKESPEARE, TINY_MODEL, run_cli, small_corpus, trained_checkpoint, train_losses
from phi_rnn import checkpoint, data, metrics
from phi_rnn.train import idle_threads_note, measured_recipe, scaled_learning_rate


def test_short_run_on_tinyshakespeare_lowers_the_loss(tmp_path):
    result = run_cli("train", "--data_dir", os.path.dirname(SHAKESPEARE), "--max_iters", 120,
                     "--eval_val_every", 60, "--print_every", 1, "--checkpoint_dir", tmp_path, check=True)
    losses = train_losses(result.stdout)
    assert len(losses) == 120
    assert losses[0] > 4.0  # ~ln(65) at the start
    assert np.mean(losses[-10:]) < 3.1, losses[-10:]
    assert "1/21150 (epoch 0.002), train_loss = " in result.stdout
    saved = sorted(glob.glob(str(tmp_path / "lm_lstm_epoch*.npz")))
    assert len(saved) == 2  # evaluated at 60 and at the last iteration
    for path in saved:
        meta = json.loads(str(np.load(path)["meta"]))
        val = meta["val_losses"][str(meta["iteration"])]
        assert os.path.basename(path) == f"lm_lstm_epoch{meta['iteration'] / 423:.2f}_{val:.4f}.npz"
    assert open(tmp_path / "latest").read().strip() == os.path.basename(saved[-1])


def test_checkpoint_format_and_independent_validation_loss(tmp_path):
    corpus, path = trained_checkpoint(tmp_path, 30000, 40)
    assert glob.glob(str(tmp_path / "cv" / "lm_lstm_epoch*.npz")) == [path]
    with np.load(path, allow_pickle=False) as z:  # no pickles anywhere
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    H, V = 16, len(meta["vocab"])
    assert meta["format_version"] == 1 and meta["model"] == "lstm" and meta["iteration"] == 40
    for layer, n_in in ((0, V), (1, H)):
        assert arrays[f"layers.{layer}.w_ih"].shape == (4 * H, n_in)
        assert arrays[f"layers.{layer}.w_hh"].shape == (4 * H, H)
        assert arrays[f"layers.{layer}.b_ih"].shape == arrays[f"layers.{layer}.b_hh"].shape == (4 * H,)
    assert arrays["decoder.weight"].shape == (V, H) and arrays["decoder.bias"].shape == (V,)
    assert all(a.dtype == np.float32 for k, a in arrays.items() if k != "meta")
    recorded = meta["val_losses"]["40"]
    assert path.endswith(f"_{recorded:.4f}.npz")

    # independent: numpy reference model, char-rnn's split computed here from the raw text
    text = open(os.path.join(corpus, "input.txt"), encoding="utf-8").read()
    index = {ch: i for i, ch in enumerate(chr(s) for s in meta["vocab"])}
    ids = np.array([index[ch] for ch in text])
    xs, ys = R.char_rnn_batches(ids, 8, 16)
    ntrain = int(np.floor(len(xs) * 0.95))
    params = {k: v.astype(np.float64) for k, v in arrays.items() if k.startswith(("layers", "decoder"))}
    state = np.zeros((2, 2, 8, H))
    losses = []
    for x, y in zip(xs[ntrain:], ys[ntrain:]):
        loss, _, state = R.forward("lstm", params, x.T, y.T, state, 2)
        losses.append(loss)
    assert abs(np.mean(losses) - recorded) < 1e-4


def _final(cv):
    ck = checkpoint.load(checkpoint.resolve("latest", str(cv)))
    return ck


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_resume_is_bit_identical_across_epoch_and_decay(tmp_path, dropout):
    corpus = small_corpus(tmp_path / "data", 12000)  # 12000 // 128 = 93 batches: 88 train
    common = ["--data_dir", corpus, "--rnn_size", 16, "--num_layers", 2, "--batch_size", 8,
              "--seq_length", 16, "--dropout", dropout, "--learning_rate_decay_after", 0,
              "--learning_rate_decay", 0.5, "--eval_val_every", 50, "--print_every", 1]
    straight = run_cli("train", *common, "--max_iters", 120, "--checkpoint_dir", tmp_path / "a", check=True)
    first = run_cli("train", *common, "--max_iters", 60, "--checkpoint_dir", tmp_path / "b", check=True)
    second = run_cli("train", *common, "--max_iters", 120, "--resume", "latest",
                     "--checkpoint_dir", tmp_path / "b", check=True)
    assert "decayed learning rate" in second.stdout  # epoch 1 ends at iteration 88
    assert train_losses(first.stdout) + train_losses(second.stdout) == train_losses(straight.stdout)
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    np.testing.assert_array_equal(a.arrays["optim.rms"], b.arrays["optim.rms"])
    np.testing.assert_array_equal(a.arrays["train_losses"], b.arrays["train_losses"])
    assert len(a.arrays["train_losses"]) == 120
    assert a.meta["learning_rate"] == b.meta["learning_rate"] == 2e-3 * 0.5


def test_conflicting_flags_on_resume_and_init_from_are_named_and_ignored(tmp_path):
    corpus, path = trained_checkpoint(str(tmp_path), 12000, 3)
    cv = tmp_path / "cv"
    resumed = run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--resume", "latest", "--max_iters", 5,
                      "--eval_val_every", 5, "--learning_rate", 0.01, "--dropout", 0.5, "--checkpoint_dir", cv,
                      check=True)
    assert "warning: --learning_rate 0.01 ignored: a resumed run keeps the checkpoint's 0.002" in resumed.stdout
    assert "warning: --dropout 0.5 ignored" in resumed.stdout
    assert "--rnn_size" not in resumed.stdout  # given, but equal to the checkpoint's
    ck = _final(cv)
    assert ck.meta["iteration"] == 5 and ck.meta["options"]["learning_rate"] == 0.002
    assert ck.meta["options"]["dropout"] == 0.0

    fresh = run_cli("train", "--data_dir", corpus, "--init_from", path, "--rnn_size", 32, "--max_iters", 2,
                    "--batch_size", 8, "--seq_length", 16, "--eval_val_every", 2, "--checkpoint_dir",
                    tmp_path / "cv2", check=True)
    assert "warning: --rnn_size 32 ignored: --init_from takes the checkpoint's 16" in fresh.stdout
    assert _final(tmp_path / "cv2").meta["rnn_size"] == 16


def test_sigterm_at_random_moments_leaves_a_resumable_checkpoint(tmp_path):
    corpus = small_corpus(tmp_path / "data", 40000)
    rnd = random.Random(1234)
    cv = tmp_path / "cv"
    args = [sys.executable, "-m", "phi_rnn", "train", "--data_dir", corpus, *map(str, TINY_MODEL),
            "--eval_val_every", "25", "--checkpoint_dir", str(cv)]
    for attempt in range(3):
        resume = ["--resume", "latest"] if attempt else []
        proc = subprocess.Popen(args + resume, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = []
        while not any("train_loss" in l for l in lines):  # training has started
            lines.append(proc.stdout.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines)  # EOF before training: fail, not hang
        time.sleep(rnd.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGTERM)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
        assert proc.returncode == 143, out
        assert "SIGTERM received: saved checkpoint" in out
        ck = _final(cv)  # loads and validates
        assert ck.meta["iteration"] >= 1
        if attempt:
            assert f"resuming from" in out and ck.meta["iteration"] > previous
        previous = ck.meta["iteration"]
    done = run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--checkpoint_dir", cv,
                   "--resume", "latest", "--max_iters", previous + 3, check=True)
    assert f"{previous + 1}/" in done.stdout


def test_bytes_encoding_trains_on_non_utf8_text_and_samples(tmp_path):
    corpus = tmp_path / "latin1"
    corpus.mkdir()
    text = open(SHAKESPEARE, encoding="utf-8").read(20000).replace("e", "\u00e9")
    (corpus / "input.txt").write_bytes(text.encode("latin-1"))  # not valid UTF-8
    run_cli("train", "--data_dir", corpus, "--encoding", "bytes", *TINY_MODEL, "--max_iters", 5,
            "--eval_val_every", 5, "--checkpoint_dir", tmp_path / "cv", check=True)
    ck = checkpoint.load("latest", str(tmp_path / "cv"))
    assert ck.meta["encoding"] == "bytes" and 0xe9 in ck.vocab and max(ck.vocab) < 256
    sample = run_cli("sample", ck.path, "--length", 50, "--primetext", "Fi", check=True)
    assert sample.stdout.startswith("Fi")


# ------------------------------------------------------------------ time to a target loss

TARGET = 3.45  # the tiny LSTM on the first 30000 characters passes it within a few hundred iterations


def _rows(cv):
    return metrics.read_rows(metrics.log_path(str(cv), "lstm"))


def _target_run(corpus, cv, *extra, max_iters=1000, target=TARGET):
    return run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", max_iters, "--eval_val_every", 10,
                   "--print_every", 1000, "--target_val_loss", target, "--checkpoint_dir", cv, *extra, check=True)


def test_target_val_loss_stops_at_the_first_evaluation_reaching_it_and_records_the_time(tmp_path):
    corpus, cv = small_corpus(tmp_path / "data", 30000), tmp_path / "cv"
    result = _target_run(corpus, cv)
    ck = _final(cv)
    reached = ck.meta["target_reached"]
    val = {int(i): loss for i, loss in ck.meta["val_losses"].items()}
    assert reached["iteration"] == ck.meta["iteration"] == max(val) < 1000
    assert val[max(val)] == reached["val_loss"] <= TARGET < min(loss for i, loss in val.items() if i < max(val))
    assert reached["target_val_loss"] == TARGET and reached["epoch"] == ck.meta["epoch"]
    assert checkpoint.resolve("best", str(cv)) == ck.path  # the lowest so far, pointed to as usual
    assert 0 < reached["training_seconds"] < reached["wall_seconds"] <= ck.meta["wall_seconds"]
    assert ck.meta["training_seconds"] == reached["training_seconds"]
    rows = _rows(cv)
    assert rows[-1]["iteration"] == reached["iteration"] and rows[-1]["val_loss"] == reached["val_loss"]
    assert (rows[-1]["training_seconds"], rows[-1]["wall_seconds"]) == (reached["training_seconds"],
                                                                        reached["wall_seconds"])
    for column in ("training_seconds", "wall_seconds"):
        assert [r[column] for r in rows] == sorted(r[column] for r in rows)
    assert (f"validation loss {reached['val_loss']:.4f} reached --target_val_loss {TARGET:g} at iteration "
            f"{reached['iteration']} (epoch ") in result.stdout
    assert f"the checkpoint is {ck.path}" in result.stdout and "not reached" not in result.stdout


def test_target_time_adds_up_across_a_resume(tmp_path):
    corpus, cv = small_corpus(tmp_path / "data", 30000), tmp_path / "cv"
    first = _target_run(corpus, cv, max_iters=20, target=0.5)
    assert "--target_val_loss 0.5 not reached in 20 iterations (" in first.stdout
    before = _final(cv).meta
    assert "target_reached" not in before and 0 < before["training_seconds"] < before["wall_seconds"]
    _target_run(corpus, cv, "--resume", "latest")
    reached = _final(cv).meta["target_reached"]
    assert reached["training_seconds"] > before["training_seconds"] and reached["wall_seconds"] > before["wall_seconds"]
    rows = _rows(cv)
    assert [int(r["iteration"]) for r in rows] == list(range(1, reached["iteration"] + 1))
    assert rows[19]["training_seconds"] == before["training_seconds"]  # the first run's row 20, kept
    assert rows[20]["training_seconds"] > before["training_seconds"] and rows[20]["wall_seconds"] > before["wall_seconds"]
    for column in ("training_seconds", "wall_seconds"):
        assert [r[column] for r in rows] == sorted(r[column] for r in rows)


def test_a_checkpoint_without_the_schedule_options_and_seconds_resumes_as_char_rnn(tmp_path):
    """A checkpoint whose meta lacks lr_warmup, lr_scaling and the seconds trained with
    char-rnn's schedule: it resumes with it, its seconds counted from 0."""
    corpus, path = trained_checkpoint(str(tmp_path), 12000, 3)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    for name in ("lr_warmup", "lr_scaling"):
        del meta["options"][name]
    del meta["training_seconds"], meta["wall_seconds"]
    np.savez(path, **dict(arrays, meta=np.array(json.dumps(meta))))
    run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--resume", path, "--max_iters", 5, "--eval_val_every", 5,
            "--checkpoint_dir", tmp_path / "cv", check=True)
    ck = _final(tmp_path / "cv")
    assert ck.meta["options"]["lr_warmup"] == 0 and ck.meta["options"]["lr_scaling"] == "none"
    assert [r["learning_rate"] for r in _rows(tmp_path / "cv")][3:] == [2e-3, 2e-3]
    assert 0 < ck.meta["training_seconds"] < ck.meta["wall_seconds"]


# ------------------------------------------------------------------ the learning rate's schedule

def _rate_run(corpus, cv, iters, *extra):
    return run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", iters, "--eval_val_every", 6,
                   "--print_every", 1, "--checkpoint_dir", cv, *extra, check=True)


def test_warmup_and_scaling_give_each_iteration_its_rate_and_resume_keeps_them(tmp_path):
    corpus = small_corpus(tmp_path / "data", 12000)
    schedule = ("--lr_warmup", 10, "--lr_scaling", "sqrt")
    first = _rate_run(corpus, tmp_path / "halves", 6, *schedule)
    rate = 2e-3 * math.sqrt(8 / 50)
    assert (f"learning rate {rate:g}: --learning_rate 0.002 x sqrt(8/50) (--lr_scaling sqrt), rising linearly "
            f"from {rate / 10:g} at iteration 1 to it at iteration 10 (--lr_warmup 10)") in first.stdout
    resumed = _rate_run(corpus, tmp_path / "halves", 15, "--resume", "latest", "--lr_warmup", 0)
    assert "warning: --lr_warmup 0 ignored: a resumed run keeps the checkpoint's 10" in resumed.stdout
    rows = _rows(tmp_path / "halves")
    assert [r["learning_rate"] for r in rows] == [rate * i / 10 if i < 10 else rate for i in range(1, 16)]
    straight = _rate_run(corpus, tmp_path / "straight", 15, *schedule)
    assert train_losses(first.stdout) + train_losses(resumed.stdout) == train_losses(straight.stdout)
    a, b = _final(tmp_path / "halves"), _final(tmp_path / "straight")
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)


def test_warmup_0_and_no_scaling_are_char_rnn_to_the_bit(tmp_path):
    corpus = small_corpus(tmp_path / "data", 12000)
    plain = _rate_run(corpus, tmp_path / "plain", 8)
    given = _rate_run(corpus, tmp_path / "given", 8, "--lr_warmup", 0, "--lr_scaling", "none")
    assert "learning rate" not in plain.stdout and train_losses(plain.stdout) == train_losses(given.stdout)
    a, b = _final(tmp_path / "plain"), _final(tmp_path / "given")
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    assert all(r["learning_rate"] == 2e-3 for r in _rows(tmp_path / "plain"))


def test_scaling_is_from_char_rnns_batch_of_50():
    o = lambda scaling, batch: argparse.Namespace(learning_rate=2e-3, batch_size=batch, lr_scaling=scaling)
    assert scaled_learning_rate(o("none", 200)) == 2e-3
    assert scaled_learning_rate(o("linear", 200)) == pytest.approx(8e-3)
    assert scaled_learning_rate(o("sqrt", 200)) == pytest.approx(4e-3)
    assert scaled_learning_rate(o("linear", 50)) == scaled_learning_rate(o("sqrt", 50)) == 2e-3


@pytest.mark.parametrize("flag, value, message", [
    ("--target_val_loss", "nan", "--target_val_loss must be positive and finite, got nan"),
    ("--target_val_loss", "inf", "--target_val_loss must be positive and finite, got inf"),
    ("--target_val_loss", "0", "--target_val_loss must be positive and finite, got 0.0"),
    ("--lr_warmup", "-1", "--lr_warmup must be 0 (off) or positive, got -1"),
    ("--lr_warmup", "1.5", "argument --lr_warmup/--lr-warmup: invalid int value: '1.5'"),
    ("--lr_scaling", "cube", "argument --lr_scaling/--lr-scaling: invalid choice: 'cube'")])
def test_bad_schedule_and_target_values_are_one_line_exit_2(tmp_path, flag, value, message):
    result = run_cli("train", "--data_dir", tmp_path, flag, value, "--checkpoint_dir", tmp_path / "cv")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("phi_rnn"), result.stderr
    assert message in lines[0]


# ------------------------------------------------------------------ the idle-thread note's recipe

def test_idle_thread_note_gives_the_measured_recipe_or_the_rule(tmp_path):
    path = tmp_path / "recipes.json"
    assert measured_recipe(4, str(path)) is None  # no study result
    path.write_text(json.dumps({"recipes": [
        {"threads": 4, "batch_size": 64, "lr_scaling": "linear", "lr_warmup": 100, "wall_seconds": 812.5},
        {"threads": 8, "batch_size": 0, "lr_scaling": "linear", "lr_warmup": 100}]}))
    recipe = measured_recipe(4, str(path))
    assert recipe == {"batch_size": 64, "lr_scaling": "linear", "lr_warmup": 100}
    assert measured_recipe(8, str(path)) is None and measured_recipe(2, str(path)) is None  # invalid; none
    path.write_text(json.dumps({"recipes": [
        {"threads": 4, "batch_size": 64, "lr_scaling": "none", "lr_warmup": 0, "precision": "bf16"}]}))
    assert measured_recipe(4, str(path))["precision"] == "bf16"
    assert "precision" not in measured_recipe(4, str(path), bf16_runs=False)  # refused there: not advised
    note = idle_threads_note(4, 2, "batch", recipe=recipe)
    assert "fastest recipe at 4 threads is --batch_size 64 --lr_scaling linear --lr_warmup 100" in note
    rule = idle_threads_note(4, 2, "batch")
    assert "--batch_size 4 (or a multiple of it;" in rule and "--lr_scaling linear or sqrt" in rule
    assert "--lr_warmup N" in rule and "\n" not in rule and "\n" not in note
