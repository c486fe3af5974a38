"""Generation against training: a random network with its in-memory checkpoint, and how often
a Generator's argmax text is the float32 training network's argmax."""
import numpy as np

from phi_rnn import checkpoint
from phi_rnn.model import Network

PRIME = "()*"


def network_and_checkpoint(model, vocab_size, rnn_size, num_layers, scale, rng):
    """A float32 Network of char-rnn's init times `scale` (sharper than at init) and a
    checkpoint of its weights, vocabulary chr(40) .."""
    net = Network(model, vocab_size, rnn_size, num_layers)
    net.init_params(rng)
    net.params.data[:] *= scale
    meta = {"model": model, "num_layers": num_layers, "rnn_size": rnn_size,
            "vocab": list(range(40, 40 + vocab_size))}
    return net, checkpoint.Checkpoint("memory", {k: v.copy() for k, v in net.params.views.items()}, meta, {})


def argmax_agreement(gen, net, rng, length=200):
    """The share of steps at which `gen`'s argmax text (primed with PRIME), replayed through
    `net`, is `net`'s argmax."""
    gen.prime(PRIME)
    text = "".join(gen.generate(length, 1.0, True, rng))
    tokens = gen.encode(PRIME + text)
    x = tokens[:-1].reshape(-1, 1)
    net.forward(x, np.zeros_like(x), net.zero_state(1))
    logits = net.decoder.x @ net.params["decoder.weight"].T + net.params["decoder.bias"]
    first = len(PRIME) - 1
    return float(np.mean(np.argmax(logits, axis=1)[first:] == tokens[first + 1:]))
