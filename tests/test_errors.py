"""Every bad input: one clear line on stderr naming the problem, exit status 2, no
traceback, and no existing file changed."""
import hashlib
import json
import os
import re
import shutil
import time

import numpy as np
import pytest

from cli_helpers import (NOT_FILES, SHAKESPEARE, TINY_MODEL, make_not_a_file, one_line_error, run_cli, snapshot,
                         trained_checkpoint)


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
    (root / "badlatest").mkdir()
    (root / "badlatest" / "latest").write_bytes(b"\xff\xfelm_\x80.npz\n")
    for name, (change_arrays, change_meta) in BROKEN_CHECKPOINTS.items():
        broken_arrays = {k: a.copy() for k, a in arrays.items() if k != "meta"}
        broken_meta = json.loads(json.dumps(meta))
        change_arrays(broken_arrays)
        change_meta(broken_meta)
        if "meta" not in broken_arrays:  # a change_arrays that replaced meta keeps its own
            broken_arrays["meta"] = np.array(json.dumps(broken_meta))
        np.savez(root / f"{name}.npz", **broken_arrays)
    return {"root": str(root), "corpus": corpus, "good": good}


def _set(table, key, value):
    table[key] = value


def _scale(arrays, name, factor):
    arrays[name] = arrays[name] * factor


# Checkpoints that load as .npz but are not what phi_rnn writes: (change the arrays, change the meta).
# The trained model is 2 x 16 LSTM, batch 8.
nothing = lambda table: None  # noqa: E731
BROKEN_CHECKPOINTS = {
    "strings": (lambda a: _set(a, "layers.0.w_hh", np.full(a["layers.0.w_hh"].shape, "x")), nothing),
    "nooptions": (nothing, lambda m: m.pop("options")),
    "badrng": (nothing, lambda m: _set(m, "rng_state", {"bit_generator": "PCG64", "state": "garbage"})),
    "rngnotdict": (nothing, lambda m: _set(m, "rng_state", [1, 2, 3])),
    "vocabnegative": (nothing, lambda m: m["vocab"].__setitem__(0, -5)),
    "vocabsurrogate": (nothing, lambda m: m["vocab"].__setitem__(-1, 0xD800)),
    "vocabstring": (nothing, lambda m: m["vocab"].__setitem__(3, "e")),
    "vocabunsorted": (nothing, lambda m: m["vocab"].reverse()),
    "layers0": (nothing, lambda m: (_set(m, "num_layers", 0), _set(m["options"], "num_layers", 0))),
    "layersbool": (nothing, lambda m: _set(m, "num_layers", True)),
    "sizefloat": (nothing, lambda m: _set(m, "rnn_size", 16.5)),
    "optionsdisagree": (nothing, lambda m: _set(m["options"], "rnn_size", 32)),
    "optionnan": (nothing, lambda m: _set(m["options"], "learning_rate", float("nan"))),
    "badstate": (lambda a: _set(a, "state", a["state"][:, :, :3]), nothing),
    "badrms": (lambda a: _set(a, "optim.rms", a["optim.rms"][:-1]), nothing),
    "negativerms": (lambda a: _scale(a, "optim.rms", -1), nothing),
    "badlosses": (lambda a: _set(a, "train_losses", a["train_losses"][:1]), nothing),
    "nanweights": (lambda a: a["decoder.weight"].__setitem__((0, 0), np.nan), nothing),
    "infbias": (lambda a: a["layers.1.b_ih"].__setitem__(2, np.inf), nothing),
    "metanumber": (lambda a: _set(a, "meta", np.array(1.5)), nothing),
    "badposition": (nothing, lambda m: _set(m, "data_position", {"train": -1, "val": 0, "test": 0})),
    "positionbeyond": (nothing, lambda m: _set(m, "data_position", {"train": 10**6, "val": 0, "test": 0})),
    "iterationstring": (nothing, lambda m: _set(m, "iteration", "2")),
    "valnan": (nothing, lambda m: _set(m, "val_losses", {"2": float("nan")})),
}


T = ["train", "--data_dir", "{corpus}", *TINY_MODEL, "--max_iters", "2", "--checkpoint_dir", "{root}/cv2"]
CASES = [
    # (id, argv, message regex)
    ("missing corpus", ["train", "--data_dir", "{root}/nowhere"], r"corpus .*nowhere/input.txt does not exist"),
    ("empty corpus", ["train", "--data_dir", "{root}/empty"], r"corpus .*empty/input.txt is empty"),
    ("directory corpus", ["train", "--data_dir", "{root}/dirinput"], r"is a directory, not a regular file"),
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
    # every float flag finite and in range, every int flag in range
    ("seed negative", T + ["--seed", "-1"], r"--seed must be in \[0, 18446744073709551615\], got -1"),
    ("seed too big", T + ["--seed", str(2**64)], r"--seed must be in \[0, "),
    ("max_epochs inf", T + ["--max_epochs", "inf"], r"--max_epochs must be positive and at most 1e\+09, got inf"),
    ("learning_rate inf", T + ["--learning_rate", "inf"], r"--learning_rate must be positive and finite, got inf"),
    ("learning_rate nan", T + ["--learning_rate", "nan"], r"--learning_rate must be positive and finite, got nan"),
    ("decay_after nan", T + ["--learning_rate_decay_after", "nan"], r"--learning_rate_decay_after must be finite and at least 0, got nan"),
    ("decay_after negative", T + ["--learning_rate_decay_after", "-1"], r"--learning_rate_decay_after must be finite"),
    ("grad_clip inf", T + ["--grad_clip", "inf"], r"--grad_clip must be positive and finite, got inf"),
    ("decay_rate nan", T + ["--decay_rate", "nan"], r"--decay_rate must be in \[0, 1\), got nan"),
    ("learning_rate_decay nan", T + ["--learning_rate_decay", "nan"], r"--learning_rate_decay must be in \(0, 1\]"),
    ("train_frac nan", T + ["--train_frac", "nan"], r"--train_frac must be in \(0, 1\], got nan"),
    ("val_frac inf", T + ["--val_frac", "inf"], r"--val_frac must be in \[0, 1\), got inf"),
    ("dropout nan", T + ["--dropout", "nan"], r"--dropout must be in \[0, 1\), got nan"),
    ("max_iters 0", T + ["--max_iters", "0"], r"--max_iters must be positive, got 0"),
    ("print_every 0", T + ["--print_every", "0"], r"--print_every must be at least 1, got 0"),
    ("keep negative", T + ["--keep", "-1"], r"--keep must be 0 \(keep all\) or positive"),
    ("sample seed negative", ["sample", "{good}", "--seed", "-1"], r"--seed must be in \[0, "),
    ("temperature inf", ["sample", "{good}", "--temperature", "inf"], r"--temperature must be positive .* and finite, got inf"),
    ("temperature nan", ["sample", "{good}", "--temperature", "nan"], r"--temperature must be positive .*, got nan"),
    ("temperature tiny", ["sample", "{good}", "--temperature", "1e-40"], r"--temperature must be positive \(at least 1e-30\)"),
    # savefile: a name for files, checked before anything runs
    ("savefile slash", T + ["--savefile", "a/b"], r"--savefile 'a/b' must be a name for files"),
    ("savefile subdirectory", T + ["--savefile", "sub/x"], r"--savefile 'sub/x' must be a name for files"),
    ("savefile empty", T + ["--savefile", ""], r"--savefile '' must be a name for files"),
    ("savefile dotdot", T + ["--savefile", ".."], r"--savefile '..' must be a name for files"),
    ("savefile space", T + ["--savefile", "a b"], r"--savefile 'a b' must be a name"),
    ("savefile newline", T + ["--savefile", "a\nb"], r"--savefile 'a\\nb' must be a name"),
    ("savefile too long", T + ["--savefile", "x" * 201], r"at most 200 bytes"),
    # `latest` that names no checkpoint
    ("latest not utf-8", T[:-1] + ["{root}/badlatest", "--resume", "latest"], r"badlatest/latest is corrupt"),
    ("sample latest not utf-8", ["sample", "{root}/badlatest"], r"badlatest/latest is corrupt"),
    # checkpoints that load but are not what phi_rnn writes
    ("array of strings", T + ["--resume", "{root}/strings.npz"], r"layers.0.w_hh holds <U1 values, not floating point"),
    ("sample array of strings", ["sample", "{root}/strings.npz"], r"layers.0.w_hh holds <U1 values"),
    ("meta without options", T + ["--resume", "{root}/nooptions.npz"], r"incomplete metadata \(no options\)"),
    ("sample meta without options", ["sample", "{root}/nooptions.npz"], r"incomplete metadata \(no options\)"),
    ("garbage rng_state", T + ["--resume", "{root}/badrng.npz"], r"rng_state is not the state of numpy's PCG64"),
    ("rng_state a list", ["sample", "{root}/rngnotdict.npz"], r"rng_state is not the state"),
    ("vocab negative", ["sample", "{root}/vocabnegative.npz"], r"vocab entry 0 \(-5\) is not a Unicode character"),
    ("vocab surrogate", T + ["--resume", "{root}/vocabsurrogate.npz"], r"vocab entry \d+ \(55296\) is not a Unicode character"),
    ("vocab string", ["sample", "{root}/vocabstring.npz"], r"vocab entry 3 \('e'\) is not a Unicode character"),
    ("vocab unsorted", ["sample", "{root}/vocabunsorted.npz"], r"vocab is not in increasing order at entry 1"),
    ("num_layers 0", ["sample", "{root}/layers0.npz"], r"meta num_layers must be positive, got 0"),
    ("num_layers true", ["sample", "{root}/layersbool.npz"], r"meta num_layers must be an integer, got True"),
    ("rnn_size fractional", ["sample", "{root}/sizefloat.npz"], r"meta rnn_size must be an integer, got 16.5"),
    ("options disagree", T + ["--resume", "{root}/optionsdisagree.npz"], r"option rnn_size 32 disagrees with the model's 16"),
    ("option nan", T + ["--resume", "{root}/optionnan.npz"], r"option learning_rate must be positive and finite, got nan"),
    ("state wrong shape", T + ["--resume", "{root}/badstate.npz"], r"state has shape \(2, 2, 3, 16\), expected \(2, 2, 8, 16\)"),
    ("optim.rms wrong length", T + ["--resume", "{root}/badrms.npz"], r"optim.rms has shape \(\d+,\), expected"),
    ("optim.rms negative", T + ["--resume", "{root}/negativerms.npz"], r"optim.rms holds negative values"),
    ("train_losses wrong length", T + ["--resume", "{root}/badlosses.npz"], r"train_losses has shape \(1,\), expected \(2,\)"),
    ("sample NaN weights", ["sample", "{root}/nanweights.npz"], r"has non-finite weights in decoder.weight \(NaN or infinite\)"),
    ("sample infinite bias", ["sample", "{root}/infbias.npz"], r"has non-finite weights in layers.1.b_ih"),
    ("resume NaN weights", T + ["--resume", "{root}/nanweights.npz"], r"has non-finite weights in decoder.weight"),
    ("meta a number", ["sample", "{root}/metanumber.npz"], r"'meta' is not a JSON string"),
    ("data position negative", T + ["--resume", "{root}/badposition.npz"], r"data_position is not a batch index >= 0"),
    ("data position beyond", T + ["--resume", "{root}/positionbeyond.npz"], r"data position train = 1000000 does not fit this corpus"),
    ("iteration a string", ["sample", "{root}/iterationstring.npz"], r"iteration '2' is not a count"),
    ("val loss nan", ["sample", "{root}/valnan.npz"], r"val_losses is not a table of iteration: finite loss"),
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
    ("openblas", "PHI_RNN_OPENBLAS", "openblas backend not installed: pip install scipy-openblas32"),
    ("onednn", "PHI_RNN_ONEDNN", "onednn backend not installed: pip install onednn-cpu-gomp")])
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


def test_the_one_line_error_parser_for_scripts(capsys):
    """phi_rnn.cli.OneLineErrorParser, which the bench/ scripts parse with: a bad flag is
    one line on stderr and exit status 2, like the CLI's."""
    from phi_rnn.cli import OneLineErrorParser
    parser = OneLineErrorParser(prog="speed.py")
    parser.add_argument("--iters", type=int, default=30)
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--iters", "many"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("speed.py: error: argument --iters: invalid int value: 'many'")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus and a checkpoint directory with `latest`, `best` and a metrics log."""
    from phi_rnn import data
    root = tmp_path_factory.mktemp("not_files")
    corpus, latest = trained_checkpoint(root, 20000, 2)
    # the token cache records the corpus's stat, as a run but the first finds it: a resume
    # refused once under way (holding the directory) then has no stat to record. A stat is
    # only trusted once the corpus's ctime is data.RACY_NS old, so wait that out first.
    path = os.path.join(corpus, "input.txt")
    time.sleep(max(0.0, (os.stat(path).st_ctime_ns + data.RACY_NS - time.time_ns()) / 1e9 + 0.1))
    data.load_corpus(path, log=lambda *a, **k: None).keep_stat()
    assert data.load_corpus(path, log=lambda *a, **k: None)._new_stat is None  # recorded
    return {"corpus": corpus, "cv": os.path.dirname(latest), "checkpoint": latest}


# Where phi_rnn reads a file: (id, the path made not a file, argv, the line's pattern). {tmp}: this
# test's directory, holding copies of the checkpoint directory (cv, its checkpoint {checkpoint}) and
# of the corpus (data), and a mirror of tiny-shakespeare.
READ_PATHS = [
    ("checkpoint", "{tmp}/cv/{checkpoint}", ["sample", "{tmp}/cv"], r"checkpoint \S*cv/lm_\S*.npz is {kind}, not a"),
    ("latest pointer", "{tmp}/cv/latest", ["sample", "{tmp}/cv"], r"checkpoint pointer \S*cv/latest is {kind}"),
    ("best pointer", "{tmp}/cv/best",
     ["train", "--data_dir", "{corpus}", *TINY_MODEL, "--max_iters", "2", "--checkpoint_dir", "{tmp}/cv", "--init_from",
      "best"], r"checkpoint pointer \S*cv/best is {kind}"),
    ("metrics log on resume", "{tmp}/cv/lstm.metrics.csv",
     ["train", "--data_dir", "{corpus}", *TINY_MODEL, "--max_iters", "3", "--checkpoint_dir", "{tmp}/cv", "--resume",
      "latest"],
     r"metrics log \S*cv/lstm.metrics.csv is {kind}, not a regular file"),
    ("token cache", "{tmp}/data/input.txt.utf-8.tokens",
     ["train", "--data_dir", "{tmp}/data", *TINY_MODEL, "--max_iters", "2", "--checkpoint_dir", "{tmp}/cv"],
     r"token cache \S*input.txt.utf-8.tokens is {kind}, not a regular file"),
    ("data mirror", "{tmp}/mirror/tinyshakespeare.txt", ["data", "--data_dir", "{tmp}/new", "--mirror", "{tmp}/mirror"],
     r"data mirror file \S*mirror/tinyshakespeare.txt is {kind}, not a regular file"),
    ("data's corpus", "{tmp}/data/input.txt", ["data", "--data_dir", "{tmp}/data", "--mirror", "{tmp}/mirror"],
     r"corpus \S*data/input.txt is {kind}, not a regular file"),
    ("lock file", "{tmp}/cv/.lock",
     ["train", "--data_dir", "{corpus}", *TINY_MODEL, "--max_iters", "2", "--checkpoint_dir", "{tmp}/cv"],
     r"lock file \S*cv/.lock (is {kind}, not a regular file|\(Is a directory\))"),
]


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
@pytest.mark.parametrize("place, argv, message", [c[1:] for c in READ_PATHS], ids=[c[0] for c in READ_PATHS])
def test_a_fifo_device_or_directory_where_a_file_is_read_is_one_line_exit_2_at_once(trained, tmp_path, place,
                                                                                     argv, message, kind):
    """Each path phi_rnn reads, a FIFO (which would block open()), /dev/zero (whose reading
    never ends) or a directory: refused before anything is read, and nothing changed. A
    hang fails by the timeout."""
    shutil.copytree(trained["cv"], tmp_path / "cv")
    (tmp_path / "data").mkdir()
    shutil.copy(os.path.join(trained["corpus"], "input.txt"), tmp_path / "data" / "input.txt")
    (tmp_path / "mirror").mkdir()
    os.symlink(SHAKESPEARE, tmp_path / "mirror" / "tinyshakespeare.txt")
    fill = dict(tmp=str(tmp_path), corpus=trained["corpus"], checkpoint=os.path.basename(trained["checkpoint"]))
    make_not_a_file(place.format(**fill), kind)
    before = snapshot(tmp_path) | snapshot(trained["corpus"])
    line = one_line_error(run_cli(*[a.format(**fill) for a in argv], timeout=120))
    assert re.search(message.format(kind=NOT_FILES[kind]), line), line
    after = snapshot(tmp_path) | snapshot(trained["corpus"])
    # the one file a refused resume writes: the lock records the pid of the run that took it
    changed = [path for path in set(before) | set(after) if before.get(path) != after.get(path)]
    assert changed in ([], [str(tmp_path / "cv" / ".lock")]), changed


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
def test_a_gemm_backend_cache_that_is_not_a_file_is_measured_around_and_left_alone(trained, tmp_path, kind):
    """The kept GEMM backend choice has a fallback, measuring again: a FIFO, /dev/zero or a
    directory in its place is said in one line and left as it is, and the run goes on."""
    from phi_rnn import blas
    if len(blas.available()) == 1:
        pytest.skip("one GEMM library here: nothing is measured or kept")
    cache = tmp_path / "phi_rnn" / "gemm_backend.json"
    cache.parent.mkdir()
    make_not_a_file(cache, kind)
    before = snapshot(tmp_path)
    result = run_cli("sample", trained["cv"], "--length", "50", timeout=300, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0 and len(result.stdout) > 50, result.stderr
    assert result.stderr.splitlines() == [f"phi_rnn: warning: GEMM backend cache {cache} is {NOT_FILES[kind]}, not a "
                                          f"regular file: the GEMM backend is measured for this run only"]
    after = snapshot(tmp_path)
    assert [path for path in before if after.get(path) != before[path]] == []
