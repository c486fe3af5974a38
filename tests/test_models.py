"""GRU and vanilla RNN end to end through the CLI: they learn, sample, resume and
init_from like the LSTM; the checkpoint records the model type."""
import glob

import numpy as np
import pytest

from cli_helpers import TINY_MODEL, run_cli, small_corpus, train_losses
from phi_rnn import checkpoint
from phi_rnn.model import Network
from phi_rnn.sample import Generator


@pytest.mark.parametrize("model", ["gru", "rnn"])
def test_train_lowers_loss_then_sample_resume_and_init_from(tmp_path, model):
    corpus = small_corpus(tmp_path / "data", 30000)
    args = ["--data_dir", corpus, *TINY_MODEL, "--model", model, "--eval_val_every", 100]
    first = run_cli("train", *args, "--max_iters", 100, "--checkpoint_dir", tmp_path / "cv", check=True)
    losses = train_losses(first.stdout)
    assert np.mean(losses[-10:]) < losses[0] - 0.5, (losses[0], losses[-10:])
    ck = checkpoint.load("latest", str(tmp_path / "cv"))
    blocks = {"gru": 3, "rnn": 1}[model]
    assert ck.meta["model"] == model and ck.params["layers.1.w_hh"].shape == (blocks * 16, 16)

    text = run_cli("sample", ck.path, "--length", 200, "--primetext", "First", "--seed", 3, check=True).stdout
    again = run_cli("sample", ck.path, "--length", 200, "--primetext", "First", "--seed", 3, check=True).stdout
    assert text == again and text.startswith("First") and len(text) == 5 + 200 + 1

    resumed = run_cli("train", *args, "--max_iters", 110, "--resume", "latest",
                      "--checkpoint_dir", tmp_path / "cv", check=True)
    assert "resuming from" in resumed.stdout and "101/" in resumed.stdout
    # init_from takes the architecture from the checkpoint, whatever the flags say
    init = run_cli("train", "--data_dir", corpus, "--model", "lstm", "--rnn_size", 64, "--batch_size", 8,
                   "--seq_length", 16, "--init_from", ck.path, "--max_iters", 2,
                   "--checkpoint_dir", tmp_path / "cv2", check=True)
    assert f"model {model}, 2 x 16" in init.stdout
    assert checkpoint.load("latest", str(tmp_path / "cv2")).meta["model"] == model


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn"])
def test_generation_step_equals_training_network(model):
    """Argmax generation, replayed through the (T, B=1) training network, picks the same tokens."""
    rng = np.random.default_rng(0)
    net = Network(model, 9, 12, 2)
    net.init_params(rng)
    net.params.data[:] *= 20  # a sharper distribution than at init
    ck = checkpoint.Checkpoint("memory", {k: v.copy() for k, v in net.params.views.items()},
                               {"model": model, "num_layers": 2, "rnn_size": 12,
                                "vocab": [ord(c) for c in "abcdefghi"]}, {})
    gen = Generator(ck)
    gen.prime("abc")
    text = "".join(gen.generate(30, 1.0, True, rng))
    tokens = gen.encode("abc" + text)
    x = tokens[:-1].reshape(-1, 1)
    net.forward(x, np.zeros_like(x), net.zero_state(1))
    top = net.decoder.x  # the decoder's input at every step
    logits = top @ net.params["decoder.weight"].T + net.params["decoder.bias"]
    chosen = logits[np.arange(2, len(x)), tokens[3:]]
    assert np.all(chosen >= logits[2:].max(axis=1) - 1e-4)  # the argmax, up to float32 ties
    assert np.mean(np.argmax(logits, axis=1)[2:] == tokens[3:]) > 0.9
