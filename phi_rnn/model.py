"""The network: parameters in one flat buffer with named views, and the forward/backward
pass of a stack of recurrent layers plus the decoder, built from phi_rnn.kernels.

Per layer (cuDNN's structure): one input projection for all timesteps (a row gather for the
one-hot first layer, one GEMM above it), then per step only the recurrent GEMM and one fused
cell kernel; backward mirrors it, and the weight gradients are one GEMM each over all
timesteps. The decoder and the softmax cross-entropy run over all timesteps at once. With
the batch strategy each thread does all of this for its own block of batch rows (the
activation layout of kernels.py), and the blocks' partial weight gradients are summed in a
fixed order."""
import numba
import numpy as np

from phi_rnn import kernels as K
from phi_rnn.config import MODELS

GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # blocks: lstm i, f, o, g; gru z, r, c; rnn one
INIT_RANGE = 0.08


def param_shapes(model, vocab_size, rnn_size, num_layers):
    """[(name, shape)] in flat-buffer order; the names and shapes of the checkpoint format."""
    gh = GATES[model] * rnn_size
    shapes = []
    for layer in range(num_layers):
        n_in = vocab_size if layer == 0 else rnn_size
        shapes += [(f"layers.{layer}.w_ih", (gh, n_in)), (f"layers.{layer}.w_hh", (gh, rnn_size)),
                   (f"layers.{layer}.b_ih", (gh,)), (f"layers.{layer}.b_hh", (gh,))]
    shapes += [("decoder.weight", (vocab_size, rnn_size)), ("decoder.bias", (vocab_size,))]
    return shapes


class FlatBuffer:
    """One contiguous buffer and a named view onto each parameter in it."""

    def __init__(self, shapes, dtype=np.float32):
        self.data = np.zeros(sum(int(np.prod(s)) for _, s in shapes), dtype=dtype)
        self.views = {}
        offset = 0
        for name, shape in shapes:
            size = int(np.prod(shape))
            self.views[name] = self.data[offset:offset + size].reshape(shape)
            offset += size

    def __getitem__(self, name):
        return self.views[name]


def gemm_flops(model, vocab_size, rnn_size, num_layers, batch_size, seq_length):
    """GEMM floating-point operations of one training iteration. Forward: every layer's
    recurrent product, the input products of layers >= 1 (the first is a gather) and the
    decoder; backward: a data- and a weight-gradient product for each, twice the forward."""
    gh, h, rows = GATES[model] * rnn_size, rnn_size, batch_size * seq_length
    recurrent = 2 * rows * gh * h
    upper_input = 2 * rows * gh * h * (num_layers - 1)
    decoder = 2 * rows * vocab_size * h
    return 3 * (num_layers * recurrent + upper_input + decoder)


class Network:
    """A char-rnn model (LSTM, GRU or vanilla RNN): parameters, gradients, the optimizer's
    state and the workspace for one (seq_length, batch_size) shape."""

    def __init__(self, model, vocab_size, rnn_size, num_layers, dropout=0.0, strategy="batch",
                 dtype=np.float32):
        """dtype float64 exists for the finite-difference gradient checks; training is float32."""
        if model not in MODELS:
            raise ValueError(f"unknown model type {model!r}")
        self.model, self.V, self.H, self.L = model, vocab_size, rnn_size, num_layers
        self.kind = K.KINDS[model]
        self.dropout = dropout
        self.strategy = strategy
        self.dtype = np.dtype(dtype).type
        shapes = param_shapes(model, vocab_size, rnn_size, num_layers)
        self.params = FlatBuffer(shapes, dtype)
        self.grads = FlatBuffer(shapes, dtype)
        self.rms = np.zeros_like(self.params.data)
        self._shape = None

    # ------------------------------------------------------------ set-up
    def init_params(self, rng):
        """char-rnn's init: all uniform(-0.08, 0.08), then (LSTM) every i2h forget-gate bias = 1."""
        self.params.data[:] = rng.uniform(-INIT_RANGE, INIT_RANGE, self.params.data.size)
        if self.model == "lstm":
            for layer in range(self.L):
                self.params[f"layers.{layer}.b_ih"][self.H:2 * self.H] = 1.0

    def zero_state(self, batch_size):
        """(L, 2, B, H): h and c (LSTM; zeros otherwise) of every layer, carried from batch to batch."""
        return np.zeros((self.L, 2, batch_size, self.H), dtype=self.dtype)

    def _workspace(self, T, B):
        P = self._nparts(B)
        if self._shape == (T, B, P):
            return
        self._shape = (T, B, P)
        L, H, V, G = self.L, self.H, self.V, GATES[self.model] * self.H
        dt = self.dtype
        # every (T*B)-row buffer holds P blocks of batch rows, time-major inside a block
        # (kernels.py); row r of that layout is row perm[r] of the time-major (T, B) order
        self.perm = np.concatenate([(np.arange(T)[:, None] * B + np.arange(p * B // P, (p + 1) * B // P)).ravel()
                                    for p in range(P)])
        self.targets = np.zeros(T * B, np.int32)
        self.gates = np.zeros((L, T * B, G), dt)
        self.hs = np.zeros((L, T * B, H), dt)  # h after each step
        self.cs = np.zeros((L, T * B, H), dt)  # LSTM: c after each step
        self.aux = np.zeros((L, T * B, H), dt)  # LSTM: tanh(c); GRU: r*h
        self.h0 = np.zeros((L, B, H), dt)  # the state before the first step
        self.c0 = np.zeros((L, B, H), dt)
        self.dropped = np.zeros((L, T * B, H), dt)  # input of layers >= 1 and of the decoder, after dropout
        self.inputs = [None] * L  # what each of them read: a view of hs without dropout, else `dropped`
        self.masks = np.zeros((L, T * B, H), dt)
        self.logits = np.zeros((T * B, V), dt)
        self.row_loss = np.zeros(T * B, dt)
        self.d_in = np.zeros((T * B, H), dt)   # gradient of a layer's input = the outputs below
        self.dh = np.zeros((B, H), dt)
        self.dc = np.zeros((B, H), dt)
        # the forward's weights transposed (kernels.layer_forward); layer 0 uses the table w_ih0_t
        self.w_ih0_t = np.zeros((V, G), dt)
        self.w_ih_t = np.zeros((L, H, G), dt)
        self.w_hh_t = np.zeros((L, H, G), dt)
        self.dec_w_t = np.zeros((H, V), dt)
        self.no_table = np.zeros((0, G), dt)
        self.no_input = np.zeros((0, H), dt)
        # per-block partial gradients, summed in a fixed order by kernels.reduce_parts
        self.d_tables = np.zeros((P, V, G), dt)
        self.no_tables = np.zeros((P, 0, G), dt)
        self.d_biases = np.zeros((P, G), dt)
        self.d_w_hh_parts = np.zeros((P, H, G), dt)  # weight gradients transposed (kernels.layer_backward)
        self.d_w_ih_parts = np.zeros((P, H, G), dt)
        self.d_dec_w_parts = np.zeros((P, V, H), dt)
        self.d_dec_b_parts = np.zeros((P, V), dt)
        self.bias = np.zeros(G, dt)

    def _nparts(self, B):
        return max(1, min(numba.get_num_threads(), B)) if self.strategy == "batch" else 1

    def time_major(self, rows):
        """A (T*B, ...) workspace buffer of the last pass in (T, B, ...) order."""
        T, B, _ = self._shape
        out = np.empty_like(rows)
        out[self.perm] = rows
        return out.reshape(T, B, *rows.shape[1:])

    # ------------------------------------------------------------ passes
    def forward(self, x, y, state, rng=None):
        """x, y (T, B) int32 token ids; state (L, 2, B, H) is read and replaced by the final
        state. rng given = training (dropout on). Returns the loss: the mean over the batch of
        the NLL, averaged over the T steps."""
        T, B = x.shape
        self._workspace(T, B)
        p = self.params
        nparts = self._shape[2]
        training = rng is not None and self.dropout > 0
        for layer in range(self.L):
            w_ih_t, w_hh_t = self.w_ih_t[layer], self.w_hh_t[layer]
            w_hh_t[:] = p[f"layers.{layer}.w_hh"].T
            np.add(p[f"layers.{layer}.b_ih"], p[f"layers.{layer}.b_hh"], out=self.bias)
            if layer == 0:
                self.w_ih0_t[:] = p["layers.0.w_ih"].T
                table, below = self.w_ih0_t, self.no_input
            else:
                w_ih_t[:] = p[f"layers.{layer}.w_ih"].T
                table, below = self.no_table, self._layer_input(layer, training, rng)
            h0, c0 = self.h0[layer], self.c0[layer]
            h0[:], c0[:] = state[layer, 0], state[layer, 1]
            args = (self.kind, self.gates[layer], self.bias, table, x)
            per_layer = (w_ih_t, below, w_hh_t, h0, c0, self.hs[layer], self.cs[layer], self.aux[layer],
                         state[layer, 0], state[layer, 1])
            if nparts > 1:
                K.forward_parallel(*args, *per_layer, nparts)
            else:
                K.layer_forward(*args, 0, *per_layer)
        top = self._layer_input(self.L, training, rng)
        np.take(y.reshape(-1), self.perm, out=self.targets)
        self.dec_w_t[:] = p["decoder.weight"].T
        decoder = (top, self.dec_w_t, p["decoder.bias"], self.targets, self.logits, self.row_loss,
                   self.dtype(1.0 / B))
        if nparts > 1:
            K.decoder_forward_parallel(*decoder, T, nparts)
        else:
            K.decoder_forward(*decoder)
        return float(self.row_loss.sum(dtype=np.float64)) / (B * T)

    def _layer_input(self, layer, training, rng):
        """The input of layer `layer` (or of the decoder when layer == L): the outputs of the
        layer below (a view: no copy), or a copy through dropout when training; remembered in
        self.inputs[layer % L] for the backward pass."""
        below = self.hs[layer - 1]
        if training:
            below_dropped = self.dropped[layer % self.L]
            mask = self.masks[layer % self.L]
            keep = rng.random(mask.shape, dtype=np.float32) >= self.dropout
            np.multiply(keep, self.dtype(1.0 / (1.0 - self.dropout)), out=mask)
            K.multiply(below, mask, below_dropped)
            below = below_dropped
        self.inputs[layer % self.L] = below
        return below

    def backward(self, x, training_dropout):
        """Gradients of the last forward's loss (the sum over timesteps of the per-step
        batch-mean NLL, as char-rnn: not divided by T) into self.grads."""
        p, g = self.params, self.grads
        T, _, nparts = self._shape
        chunks = numba.get_num_threads()
        # self.inputs[L % L] is the decoder's input; d_in gets the gradient of it
        decoder = (self.logits, self.inputs[0], p["decoder.weight"])
        if nparts > 1:
            K.decoder_backward_parallel(*decoder, self.d_dec_w_parts, self.d_dec_b_parts, self.d_in, T, nparts)
        else:
            K.decoder_backward(*decoder, self.d_dec_w_parts[0], self.d_dec_b_parts[0], self.d_in)
        K.reduce_parts(self.d_dec_w_parts.reshape(nparts, -1), g["decoder.weight"].reshape(-1), chunks)
        K.reduce_parts(self.d_dec_b_parts, g["decoder.bias"], 1)
        for layer in range(self.L - 1, -1, -1):
            if training_dropout:
                K.multiply(self.d_in, self.masks[(layer + 1) % self.L], self.d_in)
            first = layer == 0
            below = self.no_input if first else self.inputs[layer]
            d_tables = self.d_tables if first else self.no_tables
            # d_in is read as the gradient of this layer's outputs, then holds its input's
            args = (self.kind, self.gates[layer], x)
            per_layer = (p[f"layers.{layer}.w_ih"], below, p[f"layers.{layer}.w_hh"], self.h0[layer],
                         self.c0[layer], self.hs[layer], self.cs[layer], self.aux[layer], self.d_in, self.dh,
                         self.dc)
            if nparts > 1:
                K.backward_parallel(*args, *per_layer, self.d_biases, d_tables, self.d_w_hh_parts,
                                    self.d_w_ih_parts, self.d_in, nparts)
            else:
                K.layer_backward(*args, 0, *per_layer, self.d_biases[0], d_tables[0], self.d_w_hh_parts[0],
                                 self.d_w_ih_parts[0], self.d_in)
            K.reduce_parts_transposed(self.d_w_hh_parts, g[f"layers.{layer}.w_hh"], chunks)
            d_bias = g[f"layers.{layer}.b_ih"]
            K.reduce_parts(self.d_biases, d_bias, 1)
            g[f"layers.{layer}.b_hh"][:] = d_bias
            K.reduce_parts_transposed(self.d_tables if first else self.d_w_ih_parts, g[f"layers.{layer}.w_ih"], chunks)
