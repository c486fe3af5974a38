"""Plain-numpy reference implementation of char-rnn's models (LSTM, GRU.lua, RNN.lua),
written for clarity, not speed: every phi_rnn kernel is checked against it. One timestep at
a time, exact numpy transcendentals, float64. Parameter names and shapes follow the
checkpoint format; state is (L, 2, B, H) with c (LSTM only) in [:, 1].
"""
import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- cells: one step, one layer
# Each forward returns (h, c, saved); each backward takes saved and returns
# (d pre-activation blocks (B, G), d h_prev, d c_prev, d input-to-h2h for U's gradient).

def lstm_step(P, inp, h, c):
    H = h.shape[1]
    a = inp @ P["w_ih"].T + P["b_ih"] + h @ P["w_hh"].T + P["b_hh"]
    i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), sigmoid(a[:, 2 * H:3 * H])
    g = np.tanh(a[:, 3 * H:])
    c_new = f * c + i * g
    h_new = o * np.tanh(c_new)
    return h_new, c_new, (i, f, o, g, c, c_new)


def lstm_step_backward(P, saved, h_prev, dh, dc):
    i, f, o, g, c_prev, c = saved
    tc = np.tanh(c)
    dc = dc + dh * o * (1 - tc ** 2)
    da = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                         dh * tc * o * (1 - o), dc * i * (1 - g ** 2)], axis=1)
    return da, da @ P["w_hh"], dc * f, da.T @ h_prev


def gru_step(P, inp, h, c):
    """char-rnn GRU.lua: blocks update z, reset r, candidate; h2h of the candidate sees r*h."""
    H = h.shape[1]
    xi = inp @ P["w_ih"].T + P["b_ih"]
    U, bh = P["w_hh"], P["b_hh"]
    z = sigmoid(xi[:, :H] + h @ U[:H].T + bh[:H])
    r = sigmoid(xi[:, H:2 * H] + h @ U[H:2 * H].T + bh[H:2 * H])
    rh = r * h
    cand = np.tanh(xi[:, 2 * H:] + rh @ U[2 * H:].T + bh[2 * H:])
    h_new = z * cand + (1 - z) * h
    return h_new, c, (z, r, cand, rh)


def gru_step_backward(P, saved, h_prev, dh, dc):
    z, r, cand, rh = saved
    H = h_prev.shape[1]
    U = P["w_hh"]
    dz = dh * (cand - h_prev)
    dac = dh * z * (1 - cand ** 2)
    drh = dac @ U[2 * H:]
    daz = dz * z * (1 - z)
    dar = drh * h_prev * r * (1 - r)
    da = np.concatenate([daz, dar, dac], axis=1)
    dh_prev = dh * (1 - z) + drh * r + daz @ U[:H] + dar @ U[H:2 * H]
    dU = np.concatenate([daz.T @ h_prev, dar.T @ h_prev, dac.T @ rh], axis=0)
    return da, dh_prev, dc, dU


def rnn_step(P, inp, h, c):
    h_new = np.tanh(inp @ P["w_ih"].T + P["b_ih"] + h @ P["w_hh"].T + P["b_hh"])
    return h_new, c, (h_new,)


def rnn_step_backward(P, saved, h_prev, dh, dc):
    (h,) = saved
    da = dh * (1 - h ** 2)
    return da, da @ P["w_hh"], dc, da.T @ h_prev


CELLS = {"lstm": (lstm_step, lstm_step_backward), "gru": (gru_step, gru_step_backward),
         "rnn": (rnn_step, rnn_step_backward)}


def _layer(params, l):
    return {k: params[f"layers.{l}.{k}"] for k in ("w_ih", "w_hh", "b_ih", "b_hh")}


def forward(model, params, x, y, state, num_layers, masks=None):
    """x, y (T, B) token ids; state (L, 2, B, H). masks: optional {layer: (T, B, H)} dropout
    multipliers on each layer's input (layer L = the decoder's input). Returns (loss
    averaged over T, cache, final state)."""
    step = CELLS[model][0]
    T, B = x.shape
    V = params["decoder.bias"].shape[0]
    h = [state[l, 0].astype(np.float64) for l in range(num_layers)]
    c = [state[l, 1].astype(np.float64) for l in range(num_layers)]
    cache, loss = [], 0.0
    for t in range(T):
        inp = np.eye(V)[x[t]]
        record = {"inp": [], "h_prev": [], "saved": []}
        for l in range(num_layers):
            if l > 0 and masks is not None:
                inp = inp * masks[l][t]
            record["inp"].append(inp)
            record["h_prev"].append(h[l])
            h[l], c[l], saved = step(_layer(params, l), inp, h[l], c[l])
            record["saved"].append(saved)
            inp = h[l]
        if masks is not None:
            inp = inp * masks[num_layers][t]
        record["top"] = inp
        record["logp"] = log_softmax(inp @ params["decoder.weight"].T + params["decoder.bias"])
        loss += -record["logp"][np.arange(B), y[t]].mean()
        cache.append(record)
    final = np.stack([np.stack([h[l], c[l]]) for l in range(num_layers)])
    return loss / T, cache, final


def backward(model, params, x, y, cache, num_layers, masks=None):
    """Gradient of the sum over timesteps of the per-step batch-mean NLL (char-rnn's)."""
    step_backward = CELLS[model][1]
    T, B = x.shape
    grads = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}
    H = params["layers.0.w_hh"].shape[1]
    dh_next = [np.zeros((B, H)) for _ in range(num_layers)]
    dc_next = [np.zeros((B, H)) for _ in range(num_layers)]
    for t in range(T - 1, -1, -1):
        record = cache[t]
        dlogits = np.exp(record["logp"])
        dlogits[np.arange(B), y[t]] -= 1.0
        dlogits /= B
        grads["decoder.weight"] += dlogits.T @ record["top"]
        grads["decoder.bias"] += dlogits.sum(0)
        d_inp = dlogits @ params["decoder.weight"]
        if masks is not None:
            d_inp = d_inp * masks[num_layers][t]
        for l in range(num_layers - 1, -1, -1):
            P = _layer(params, l)
            da, dh_next[l], dc_next[l], dU = step_backward(
                P, record["saved"][l], record["h_prev"][l], d_inp + dh_next[l], dc_next[l])
            grads[f"layers.{l}.w_ih"] += da.T @ record["inp"][l]
            grads[f"layers.{l}.w_hh"] += dU
            grads[f"layers.{l}.b_ih"] += da.sum(0)
            grads[f"layers.{l}.b_hh"] += da.sum(0)
            d_inp = da @ P["w_ih"]
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
