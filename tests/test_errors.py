"""Every bad input: one clear line on stderr naming the problem, exit status 2, no
traceback, and no existing file changed."""
import hashlib
import json
import os
import re

import numpy as np
import pytest

from cli_helpers import TINY_MODEL, run_cli, trained_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a trained checkpoint and assorted broken files, made once."""
    root = tmp_path_factory.mktemp("errors")
    corpus, good = trained_checkpoint(root, 20000, 2)
    raw = open(good, "rb").read()
    (root / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (root / "garbage.npz").write_bytes(os.urandom(4096))
    np.savez(root / "foreign.npz", weights=np.zeros(3))
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    np.savez(root / "version9.npz", **dict(arrays, meta=np.array(json.dumps(dict(meta, format_version=9)))))
    np.savez(root / "weights_only.npz", **{k: a for k, a in arrays.items() if k not in ("optim.rms", "train_losses")})
    # a different corpus: same length, other characters
    other = root / "other"
    other.mkdir()
    text = open(os.path.join(corpus, "input.txt"), encoding="utf-8").read()
    (other / "input.txt").write_text(text.replace("e", "\u00e9").replace("z", "#"), encoding="utf-8")
    for name, content in {"empty": b"", "short": b"tiny corpus\n" * 10,
                          "latin1": ("caf\u00e9 " * 4000).encode("latin-1")}.items():
        (root / name).mkdir()
        (root / name / "input.txt").write_bytes(content)
    (root / "dirinput" / "input.txt").mkdir(parents=True)
    (root / "a_file").write_text("not a directory")
    (root / "nolatest").mkdir()
    return {"root": str(root), "corpus": corpus, "good": good}


T = ["train", "--data_dir", "{corpus}", *TINY_MODEL, "--max_iters", "2", "--checkpoint_dir", "{root}/cv2"]
CASES = [
    # (id, argv, message regex)
    ("missing corpus", ["train", "--data_dir", "{root}/nowhere"], r"corpus .*nowhere/input.txt does not exist"),
    ("empty corpus", ["train", "--data_dir", "{root}/empty"], r"corpus .*empty/input.txt is empty"),
    ("directory corpus", ["train", "--data_dir", "{root}/dirinput"], r"is a directory, not a text file"),
    ("corpus too short", ["train", "--data_dir", "{root}/short"], r"corpus too short: 120 characters .*try --seq_length"),
    ("invalid utf-8", ["train", "--data_dir", "{root}/latin1"], r"invalid UTF-8 at byte 3 .*--encoding bytes"),
    ("rnn_size 0", T + ["--rnn_size", "0"], r"--rnn_size must be positive, got 0"),
    ("num_layers negative", T + ["--num_layers", "-1"], r"--num_layers must be positive"),
    ("absurd seq_length", T + ["--seq_length", "1000000000"], r"--seq_length 1000000000 is absurd"),
    ("batch_size 0", T + ["--batch_size", "0"], r"--batch_size must be positive"),
    ("dropout 1", T + ["--dropout", "1"], r"--dropout must be in \[0, 1\)"),
    ("dropout negative", T + ["--dropout", "-0.1"], r"--dropout must be in \[0, 1\)"),
    ("fractions over 1", T + ["--train_frac", "0.9", "--val_frac", "0.2"], r"--train_frac 0.9 \+ --val_frac 0.2 exceed 1"),
    ("learning rate negative", T + ["--learning_rate", "-1"], r"--learning_rate must be positive"),
    ("not a number", T + ["--rnn_size", "abc"], r"invalid int value: 'abc'"),
    ("unwritable checkpoint dir", T[:-1] + ["{root}/a_file/cv"], r"checkpoint directory .*a_file/cv is not writable"),
    ("init_from missing", T + ["--init_from", "{root}/missing.npz"], r"checkpoint .*missing.npz does not exist"),
    ("resume truncated", T + ["--resume", "{root}/truncated.npz"], r"truncated.npz is truncated or corrupt"),
    ("resume garbage", T + ["--resume", "{root}/garbage.npz"], r"garbage.npz is truncated or corrupt"),
    ("resume foreign npz", T + ["--resume", "{root}/foreign.npz"], r"foreign.npz is not a phi_rnn checkpoint"),
    ("other format version", T + ["--resume", "{root}/version9.npz"], r"format version 9; this phi_rnn reads version 1"),
    ("resume weights only", T + ["--resume", "{root}/weights_only.npz"], r"cannot resume from .*weights_only.npz: it lacks optim.rms, train_losses; --init_from"),
    ("resume latest without one", T[:-1] + ["{root}/nolatest", "--resume", "latest"], r"no checkpoint in .*nolatest: .*latest is missing"),
    ("vocabulary mismatch", ["train", "--data_dir", "{root}/other", "--init_from", "{good}", "--checkpoint_dir", "{root}/cv3"],
     r"vocabulary mismatch .*the data has '#', '\u00e9' not in the checkpoint; the checkpoint has 'e'"),
    ("init_from and resume", T + ["--init_from", "{good}", "--resume", "{good}"], r"give --init_from or --resume, not both"),
    ("threads 0", T + ["--threads", "0"], r"--threads must be a positive integer, got 0"),
    ("threads negative", T + ["--threads", "-2"], r"--threads must be a positive integer, got -2"),
    ("threads over CPUs", T + ["--threads", "4096"], r"--threads 4096 is more than the \d+ logical CPUs.*--oversubscribe"),
    ("temperature 0", ["sample", "{good}", "--temperature", "0"], r"--temperature must be positive"),
    ("length 0", ["sample", "{good}", "--length", "0"], r"--length must be positive"),
    ("primetext unknown", ["sample", "{good}", "--primetext", "a\u20acb"], r"not in the model's vocabulary: '\u20ac'"),
    ("sample missing checkpoint", ["sample", "{root}/nope.npz"], r"checkpoint .*nope.npz does not exist"),
    ("sample directory without latest", ["sample", "{root}/nolatest"], r"no checkpoint in .*nolatest"),
    ("sample truncated", ["sample", "{root}/truncated.npz"], r"truncated or corrupt"),
]


def _snapshot(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            files[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return files


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, argv, message):
    before = _snapshot(world["root"])
    result = run_cli(*[a.format(**world) for a in argv])
    after = _snapshot(world["root"])
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("phi_rnn")
    assert re.search(message, lines[0]), lines[0]
    assert all(after.get(path) == digest for path, digest in before.items()), "an existing file changed"
    assert not [p for p in set(after) - set(before) if not p.endswith((".npz", ".tokens")) or "/cv" in p]


def test_there_are_at_least_twenty_distinct_cases():
    assert len({c[2] for c in CASES}) >= 20


@pytest.mark.parametrize("library, variable, message", [
    ("libxsmm", "PHI_RNN_SMALL_GEMM", "libxsmm backend not built: apt install libxsmm-dev"),
    ("openblas", "PHI_RNN_OPENBLAS", "openblas backend not installed: pip install scipy-openblas32")])
def test_blas_without_its_library_is_one_line_exit_2_and_the_default_is_another(world, tmp_path, library,
                                                                                  variable, message):
    """Where a small-GEMM library is missing (here: its variable names no file), asking for
    it is a usage error; without --blas the run goes on another backend and says so."""
    argv = [a.format(**world) for a in T[:-1]] + [str(tmp_path / "cv")]
    missing = {variable: os.path.join(world["root"], "no-library.so")}
    result = run_cli(*argv, "--blas", library, env=missing)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"phi_rnn: error: --blas {library}: {message}")
    result = run_cli(*argv, env=missing)
    assert result.returncode == 0, result.stderr
    gemm = [line for line in result.stdout.splitlines() if line.startswith("gemm: ")]
    assert len(gemm) == 1 and not gemm[0].startswith(f"gemm: {library}"), gemm
