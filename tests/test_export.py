"""`export`: the ONNX graph run by onnxruntime, and the PyTorch state_dict loaded into
nn.LSTM / nn.RNN, give the next-character log-probabilities of phi_rnn's own generator
within 1e-5 along 500 steps of a sampled text, for models trained a few iterations; bad
input is one line and exit status 2."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import TINY_MODEL, run_cli, small_corpus
from phi_rnn import checkpoint
from phi_rnn.sample import Generator

STEPS = 500
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model -> a checkpoint trained 30 iterations (a high learning rate: the weights move
    far from their uniform init, so the gates matter)."""
    root = tmp_path_factory.mktemp("export")
    corpus = small_corpus(root / "data", 20000)
    paths = {}
    for model in ("lstm", "gru", "rnn"):
        cv = root / f"cv-{model}"
        run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--model", model, "--learning_rate", 0.01,
                "--max_iters", 30, "--eval_val_every", 30, "--checkpoint_dir", cv, check=True)
        paths[model] = checkpoint.resolve("latest", str(cv))
    return paths


def _log_softmax(z):
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def generator_log_probs(path):
    """A text of STEPS + 1 characters sampled by phi_rnn's Generator, its vocabulary indices,
    and the generator's log-probabilities of the next character after each of its first STEPS."""
    ck = checkpoint.load(path)
    text = "".join(Generator(ck).generate(STEPS + 1, 1.0, False, np.random.default_rng(5)))
    gen = Generator(ck)
    expected = []
    for character in text[:-1]:
        gen.prime(character)
        expected.append(_log_softmax(gen.state.logits[0]))
    return ck, gen.encode(text)[:-1], np.array(expected)


def _export(tmp_path, source, to):
    out = tmp_path / f"model.{to}"
    run_cli("export", source, "--to", to, out, check=True)
    return str(out)


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn"])
def test_onnx_runs_in_onnxruntime_as_the_generator_step_by_step_and_whole(trained, tmp_path, model):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'phi_rnn[onnx]')")
    import onnx

    ck, tokens, expected = generator_log_probs(trained[model])
    path = _export(tmp_path, trained[model], "onnx")
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["model"] == model and json.loads(props["vocab"]) == ck.vocab
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    L, H = ck.meta["num_layers"], ck.meta["rnn_size"]
    state = {"h0": np.zeros((L, 1, H), np.float32)}
    if model == "lstm":
        state["c0"] = np.zeros((L, 1, H), np.float32)
    zeros = dict(state)
    step_by_step = []
    for token in tokens:  # one character per call, the state carried by the caller: generation
        log_probs, *carried = session.run(None, dict(state, tokens=np.array([[token]], np.int64)))
        step_by_step.append(log_probs[0, 0])
        state = dict(zip(state, carried))
    whole, *_ = session.run(None, dict(zeros, tokens=tokens[:, None].astype(np.int64)))
    assert np.abs(np.array(step_by_step) - expected).max() < TOLERANCE
    assert np.abs(whole[:, 0] - expected).max() < TOLERANCE
    # the distributions are far from uniform, so a wrong gate order could not pass
    assert np.median(np.ptp(expected, axis=1)) > 1.0


@pytest.mark.parametrize("model", ["lstm", "rnn"])
def test_torch_state_dict_loads_into_nn_modules_and_matches_the_generator(trained, tmp_path, model):
    torch = pytest.importorskip("torch", reason="PyTorch not installed (optional: pip install torch)")

    ck, tokens, expected = generator_log_probs(trained[model])
    saved = torch.load(_export(tmp_path, trained[model], "torch"), weights_only=True)
    assert saved["model"] == model and saved["vocab"] == ck.vocab
    rnn = {"lstm": torch.nn.LSTM, "rnn": torch.nn.RNN}[model](saved["input_size"], saved["hidden_size"],
                                                             saved["num_layers"])
    decoder = torch.nn.Linear(saved["hidden_size"], saved["input_size"])
    torch.nn.ModuleDict({"rnn": rnn, "decoder": decoder}).load_state_dict(saved["state_dict"])
    with torch.no_grad():
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(tokens).long(), saved["input_size"]).float()
        state, step_by_step = None, []
        for t in range(len(tokens)):
            out, state = rnn(one_hot[t:t + 1, None], state)
            step_by_step.append(torch.log_softmax(decoder(out[0, 0]), -1).numpy())
        whole = torch.log_softmax(decoder(rnn(one_hot[:, None])[0][:, 0]), -1).numpy()
    assert np.abs(np.array(step_by_step) - expected).max() < TOLERANCE
    assert np.abs(whole - expected).max() < TOLERANCE


def _bad(tmp_path, *argv, env=None):
    result = run_cli("export", *argv, env=env or {})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_input_is_one_line_exit_2_and_leaves_out_untouched(trained, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(open(trained["lstm"], "rb").read()[:3000])
    not_finite = tmp_path / "nan.npz"
    ck = checkpoint.load(trained["rnn"])
    arrays = dict(np.load(ck.path, allow_pickle=False))
    arrays["decoder.bias"][3] = np.nan
    np.savez(not_finite, **arrays)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "truncated or corrupt" in _bad(tmp_path, corrupt, "--to", "onnx", out)
    assert re.search("decoder.bias.*(NaN|non-finite)|(NaN|non-finite).*decoder.bias",
                     _bad(tmp_path, not_finite, "--to", "onnx", out))
    assert "does not exist" in _bad(tmp_path, tmp_path / "missing.npz", "--to", "onnx", out)
    assert "--to 'tflite': choose one of onnx, torch" in _bad(tmp_path, trained["lstm"], "--to", "tflite", out)
    assert "is a directory" in _bad(tmp_path, trained["lstm"], "--to", "onnx", tmp_path)
    assert "does not exist" in _bad(tmp_path, trained["lstm"], "--to", "onnx", tmp_path / "no" / "m.onnx")
    assert "is not a directory" in _bad(tmp_path, trained["lstm"], "--to", "onnx", a_file / "m.onnx")
    assert "cannot write /proc/m.onnx" in _bad(tmp_path, trained["lstm"], "--to", "onnx", "/proc/m.onnx")
    assert "torch.nn.GRU" in _bad(tmp_path, trained["gru"], "--to", "torch", out)
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "corrupt.npz", "model.onnx", "nan.npz"]


@pytest.mark.parametrize("to, package", [("onnx", "onnx"), ("torch", "torch")])
def test_a_missing_optional_package_is_named_in_one_line(trained, tmp_path, to, package):
    """The package made unimportable (sys.modules[name] = None), the rest of phi_rnn real."""
    code = (f"import sys; sys.modules[{package!r}] = None; from phi_rnn.cli import main; "
            f"sys.exit(main(['export', {trained['lstm']!r}, '--to', {to!r}, {str(tmp_path / 'm')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "needs" in result.stderr and "pip install" in result.stderr
    assert not os.path.exists(tmp_path / "m")
