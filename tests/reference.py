"""Plain-numpy reference implementation of char-rnn's models, written for clarity, not
speed: every phi_rnn kernel is checked against it. One timestep at a time, exact numpy
transcendentals, float64 by default. Parameter names and shapes follow the checkpoint format.
"""
import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def lstm_forward(params, x, y, state, num_layers, masks=None):
    """params: name -> array; x, y (T, B) token ids; state (L, 2, B, H).
    masks: optional {layer: (T, B, H)} dropout multipliers on each layer's input (layer L =
    the decoder's input). Returns (loss averaged over T, cache, final state)."""
    T, B = x.shape
    V = params["decoder.bias"].shape[0]
    h = [state[l, 0].astype(np.float64) for l in range(num_layers)]
    c = [state[l, 1].astype(np.float64) for l in range(num_layers)]
    cache = []
    loss = 0.0
    for t in range(T):
        inp = np.eye(V)[x[t]]
        step = {"inp": [], "h_prev": [], "c_prev": [], "gates": [], "c": [], "h": []}
        for l in range(num_layers):
            if l > 0 and masks is not None:
                inp = inp * masks[l][t]
            H = h[l].shape[1]
            a = (inp @ params[f"layers.{l}.w_ih"].T + params[f"layers.{l}.b_ih"]
                 + h[l] @ params[f"layers.{l}.w_hh"].T + params[f"layers.{l}.b_hh"])
            i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), sigmoid(a[:, 2 * H:3 * H])
            g = np.tanh(a[:, 3 * H:])
            c_new = f * c[l] + i * g
            h_new = o * np.tanh(c_new)
            for key, val in (("inp", inp), ("h_prev", h[l]), ("c_prev", c[l]),
                             ("gates", (i, f, o, g)), ("c", c_new), ("h", h_new)):
                step[key].append(val)
            h[l], c[l] = h_new, c_new
            inp = h_new
        if masks is not None:
            inp = inp * masks[num_layers][t]
        logp = log_softmax(inp @ params["decoder.weight"].T + params["decoder.bias"])
        step["top"] = inp
        step["logp"] = logp
        loss += -logp[np.arange(B), y[t]].mean()
        cache.append(step)
    final = np.stack([np.stack([h[l], c[l]]) for l in range(num_layers)])
    return loss / T, cache, final


def lstm_backward(params, x, y, cache, num_layers, masks=None):
    """Gradient of the sum over timesteps of the per-step batch-mean NLL (char-rnn's)."""
    T, B = x.shape
    grads = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}
    H = params["layers.0.w_hh"].shape[1]
    dh_next = [np.zeros((B, H)) for _ in range(num_layers)]
    dc_next = [np.zeros((B, H)) for _ in range(num_layers)]
    for t in range(T - 1, -1, -1):
        step = cache[t]
        dlogits = np.exp(step["logp"])
        dlogits[np.arange(B), y[t]] -= 1.0
        dlogits /= B
        grads["decoder.weight"] += dlogits.T @ step["top"]
        grads["decoder.bias"] += dlogits.sum(0)
        d_inp = dlogits @ params["decoder.weight"]
        if masks is not None:
            d_inp = d_inp * masks[num_layers][t]
        for l in range(num_layers - 1, -1, -1):
            i, f, o, g = step["gates"][l]
            tc = np.tanh(step["c"][l])
            dh = d_inp + dh_next[l]
            dc = dc_next[l] + dh * o * (1 - tc ** 2)
            da = np.concatenate([dc * g * i * (1 - i), dc * step["c_prev"][l] * f * (1 - f),
                                 dh * tc * o * (1 - o), dc * i * (1 - g ** 2)], axis=1)
            grads[f"layers.{l}.w_ih"] += da.T @ step["inp"][l]
            grads[f"layers.{l}.w_hh"] += da.T @ step["h_prev"][l]
            grads[f"layers.{l}.b_ih"] += da.sum(0)
            grads[f"layers.{l}.b_hh"] += da.sum(0)
            dh_next[l] = da @ params[f"layers.{l}.w_hh"]
            dc_next[l] = dc * f
            d_inp = da @ params[f"layers.{l}.w_ih"]
            if l > 0 and masks is not None:
                d_inp = d_inp * masks[l][t]
    return grads


def char_rnn_batches(text_ids, batch_size, seq_length):
    """char-rnn's CharSplitLMMinibatchLoader, literally: returns lists of x and y batches."""
    data = np.asarray(text_ids)
    n = len(data) // (batch_size * seq_length) * batch_size * seq_length
    data = data[:n]
    ydata = data.copy()
    ydata[:-1] = data[1:]
    ydata[-1] = data[0]
    xs = np.split(data.reshape(batch_size, -1), n // (batch_size * seq_length), axis=1)
    ys = np.split(ydata.reshape(batch_size, -1), n // (batch_size * seq_length), axis=1)
    return xs, ys
