"""The network: parameters in one flat buffer with named views, and the forward/backward
pass of a stack of recurrent layers plus the decoder, built from phi_rnn.kernels.

Per layer (cuDNN's structure): one input projection for all timesteps (a row gather for the
one-hot first layer, one GEMM above it), then per step only the recurrent GEMM and one fused
cell kernel; backward mirrors it, and the weight gradients are one GEMM each over all
timesteps. The decoder and the softmax cross-entropy run over all timesteps at once. With
the batch strategy each thread does all of this for its own block of batch rows (the
activation layout of kernels.py), and the blocks' partial weight gradients are summed in a
fixed order.

Precision "bf16" is mixed precision: the GEMMs' operands in bfloat16 (uint16 arrays), their
accumulation and outputs, the master weights, gradients, optimizer state, cell arithmetic
and loss in float32. The bfloat16 copies of the weights are rounded from the float32 ones
at every forward (once per update in training); activations are rounded by the kernels
that write them (kernels.to_operand)."""
import numba
import numpy as np

from phi_rnn import amx, bf16, blas
from phi_rnn import kernels as K
from phi_rnn.cells import GATES, KINDS, MODELS  # noqa: F401  (the cell types; re-exported)
from phi_rnn.config import PRECISIONS

INIT_RANGE = 0.08
RMS_CHUNKS = 64  # fixed chunking of the optimizer: results independent of the thread count
CARRIED_SLOTS = 8  # room after the flat gradient for what rides along with its allreduce (phi_rnn.distributed)


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


def aligned_zeros(shape, dtype=np.float64):
    """np.zeros whose data starts on a 64-byte boundary (a cache line). Large arrays from
    np.zeros start 16 bytes past a page boundary: then every 64-byte row an AMX tile load
    reads straddles two cache lines, several times slower (bench/README)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.zeros(count * dtype.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


class FlatBuffer:
    """One contiguous buffer and a named view onto each parameter in it; `spare` more elements
    after it in `storage` (data = storage[:size])."""

    def __init__(self, shapes, dtype=np.float32, spare=0):
        size = sum(int(np.prod(s)) for _, s in shapes)
        self.storage = aligned_zeros(size + spare, dtype=dtype)
        self.data = self.storage[:size]
        self.views = {}
        offset = 0
        for name, shape in shapes:
            size = int(np.prod(shape))
            self.views[name] = self.data[offset:offset + size].reshape(shape)
            offset += size

    def __getitem__(self, name):
        return self.views[name]


def transposed_weights(params, num_layers, out=None):
    """The forward's weights as kernels.TransposedWeights, from `params` (the checkpoint's
    names to arrays); `out`, a previous result, is refilled in place."""
    L, p = num_layers, params
    if out is None:
        G, H = p["layers.0.w_hh"].shape
        V, dt = p["decoder.bias"].shape[0], p["decoder.bias"].dtype
        shapes = ((V, G), (max(L - 1, 1), H, G), (L, H, G), (L, G), (H, V), V)
        out = K.TransposedWeights(*(aligned_zeros(shape, dt) for shape in shapes))
    blas.transpose_into(p["layers.0.w_ih"], out.w_ih0_t)
    for layer in range(L):
        if layer > 0:
            blas.transpose_into(p[f"layers.{layer}.w_ih"], out.w_ih_t[layer - 1])
        blas.transpose_into(p[f"layers.{layer}.w_hh"], out.w_hh_t[layer])
        np.add(p[f"layers.{layer}.b_ih"], p[f"layers.{layer}.b_hh"], out=out.bias[layer])
    blas.transpose_into(p["decoder.weight"], out.dec_w_t)
    out.dec_b[:] = p["decoder.bias"]
    return out


_ROUNDED = ("w_ih_t", "w_hh_t", "dec_w_t")  # the products' weights (w_ih0_t is gathered)


def bf16_weights(transposed, out=None):
    """The forward's weights with their GEMM operands in bfloat16: `transposed`
    (kernels.TransposedWeights, float32) with w_ih_t, w_hh_t and dec_w_t rounded to uint16
    bits; the one-hot table w_ih0_t (gathered, not multiplied), bias and dec_b are
    transposed's own arrays. `out`, a previous result, is refilled in place."""
    t = transposed
    if out is None:
        out = t._replace(**{name: aligned_zeros(getattr(t, name).shape, np.uint16) for name in _ROUNDED})
    for name in _ROUNDED:
        bf16.round_into(getattr(t, name), getattr(out, name))
    return out


def gemm_flops(model, vocab_size, rnn_size, num_layers, batch_size, seq_length):
    """GEMM floating-point operations of one training iteration. Forward: every layer's
    recurrent product, the input products of layers >= 1 (the first is a gather) and the
    decoder; backward: a data- and a weight-gradient product for each, twice the forward."""
    gh, h, rows = GATES[model] * rnn_size, rnn_size, batch_size * seq_length
    recurrent = 2 * rows * gh * h
    upper_input = 2 * rows * gh * h * (num_layers - 1)
    decoder = 2 * rows * vocab_size * h
    return 3 * (num_layers * recurrent + upper_input + decoder)


def packed_step_weights(model, precision, G, H, first):
    """Buffers for an LSTM layer's weights laid out for the per-step products: W_hh^T (H, G)
    and W_hh (G, H), and (above the first layer) W_ih^T (H, G), as AMX tiles where amx runs
    them (each step then takes its input's product too); else W_hh^T and W_hh in MKL's packed
    format. Empty (no packing: products on gemm) for float32 and other cells."""
    no_pack = np.zeros(0, np.uint8)
    if precision != "bf16" or model != "lstm":
        return no_pack, no_pack, no_pack
    if amx.runs_lstm_steps(H):
        step_input = no_pack if first else aligned_zeros(amx.tiles_shape(H, G), np.uint32)
        forward, backward = (aligned_zeros(amx.tiles_shape(k, n), np.uint32) for k, n in ((H, G), (G, H)))
        return forward, backward, step_input
    return bf16.packed_operand(1, G, H), bf16.packed_operand(1, H, G), no_pack


class Network:
    """A char-rnn model (LSTM, GRU or vanilla RNN): parameters, gradients, the optimizer's
    state and the workspace for one (seq_length, batch_size) shape."""

    def __init__(self, model, vocab_size, rnn_size, num_layers, dropout=0.0, strategy="batch",
                 dtype=np.float32, precision="fp32"):
        """dtype float64 exists for the finite-difference gradient checks; training is float32.
        precision "bf16": the GEMMs in bfloat16 (module docstring)."""
        if model not in MODELS:
            raise ValueError(f"unknown model type {model!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        self.model, self.V, self.H, self.L = model, vocab_size, rnn_size, num_layers
        self.kind = KINDS[model]
        self.dropout = dropout
        self.strategy = strategy
        self.precision = precision
        self.dtype = np.dtype(dtype).type
        # the dtype of every GEMM operand: the activations' float type, or bfloat16's bits
        self.operand_dtype = np.uint16 if precision == "bf16" else self.dtype
        shapes = param_shapes(model, vocab_size, rnn_size, num_layers)
        self.params = FlatBuffer(shapes, dtype)
        self.grads = FlatBuffer(shapes, dtype, spare=CARRIED_SLOTS)
        self.rms = aligned_zeros(self.params.data.shape, dtype)  # RMSprop's running mean of squared gradients
        t = self.transposed = transposed_weights(self.params, num_layers)  # refilled by every forward
        p = self.params
        if precision == "bf16":  # the operands' copies, rounded by every forward
            self.params_op = FlatBuffer(shapes, np.uint16)
            t = self.transposed_op = bf16_weights(self.transposed)
            p = self.params_op
        # The LSTM's recurrent bfloat16 weights are laid out once per update for the per-step
        # products (repacking them at every step costs about as much as the product): as AMX
        # tiles for phi_rnn's own tile kernel where it runs, else in MKL's packed format
        G, H = self.transposed.w_hh_t.shape[2], rnn_size
        self.packed = [packed_step_weights(model, precision, G, H, layer == 0) for layer in range(num_layers)]
        self.weights = [K.LayerWeights(t.w_ih0_t if layer == 0 else t.w_ih_t[layer - 1], t.w_hh_t[layer],
                                       t.bias[layer], p[f"layers.{layer}.w_ih"], p[f"layers.{layer}.w_hh"],
                                       *self.packed[layer])
                        for layer in range(num_layers)]
        self.decoder_weights = K.DecoderWeights(t.dec_w_t, t.dec_b, p["decoder.weight"])
        self._tiling = self._bf16_tasks() if precision == "bf16" else None
        # (start, total): the batch's rows are streams start.. of a global batch of `total` (an MPI
        # rank's share). Dropout masks are drawn for the whole global batch in (T, stream, H)
        # order, so they depend neither on the thread count nor on the ranks. None: (0, B).
        self.streams = None
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
        return aligned_zeros((self.L, 2, batch_size, self.H), dtype=self.dtype)

    def _bf16_tasks(self):
        """round_and_tile's arguments where the LSTM runs on AMX tiles (None elsewhere: then
        every operand is rounded and MKL packs the recurrent weights): the recurrent weights,
        both ways, and an upper layer's input weights forward laid out as tiles from float32,
        and rounded only the operands the products read besides: an upper layer's input
        weights for its input gradient and the decoder's, both ways. The bfloat16 copies the
        tiles stand for are not kept up to date (nothing reads them)."""
        if self.weights[0].w_hh_t_packed.dtype != np.uint32:
            return None
        t, op, p = self.transposed, self.transposed_op, self.params
        read = [f"layers.{layer}.w_ih" for layer in range(1, self.L)] + ["decoder.weight"]
        values = tuple(p[name].reshape(-1) for name in read) + (t.dec_w_t.reshape(-1),)
        rounded = tuple(self.params_op[name].reshape(-1) for name in read) + (op.dec_w_t.reshape(-1),)
        pairs = [(t.w_hh_t[layer], w.w_hh_t_packed) for layer, w in enumerate(self.weights)]
        pairs += [(p[f"layers.{layer}.w_hh"], w.w_hh_packed) for layer, w in enumerate(self.weights)]
        pairs += [(t.w_ih_t[layer - 1], w.w_ih_t_packed) for layer, w in enumerate(self.weights)
                  if w.w_ih_t_packed.size]
        tiles = tuple(out for _, out in pairs)
        return values, rounded, tuple(w for w, _ in pairs), tiles, amx.task_list(values, tiles)

    def _refresh_weights(self):
        """The forward's transposed weights (and in bfloat16 all operands) from the parameters."""
        transposed_weights(self.params, self.L, out=self.transposed)
        if self.precision != "bf16":
            return
        if self._tiling:
            amx.round_and_tile(*self._tiling)
            return
        bf16.round_into(self.params.data, self.params_op.data)
        bf16_weights(self.transposed, out=self.transposed_op)
        for w in self.weights:
            if w.w_hh_t_packed.size:
                bf16.pack_into(False, w.w_hh_t, 1, w.w_hh_t_packed)
                bf16.pack_into(False, w.w_hh, 1, w.w_hh_packed)

    def _workspace(self, T, B):
        P = max(1, min(numba.get_num_threads(), B)) if self.strategy == "batch" else 1
        if self._shape == (T, B, P):
            return
        self._shape = (T, B, P)
        self.passes = K.training_passes(P)
        L, H, V, G = self.L, self.H, self.V, GATES[self.model] * self.H
        rows = lambda width, dtype=self.dtype: aligned_zeros((T * B, width), dtype)  # noqa: E731
        state = lambda: aligned_zeros((B, H), self.dtype)  # noqa: E731
        separate = self.precision == "bf16"  # operands apart from the float arrays (else the same array)
        op = self.operand_dtype
        # every (T*B)-row buffer holds P blocks of batch rows, time-major inside a block
        # (kernels.py); row r of that layout is row perm[r] of the time-major (T, B) order
        self.perm = np.concatenate([(np.arange(T)[:, None] * B + np.arange(p * B // P, (p + 1) * B // P)).ravel()
                                    for p in range(P)])
        # x of each layer above the first is set by every forward (the outputs below, or their copy
        # through dropout); the first layer reads the tokens
        # gates_op holds one layer's gate gradients in backward: all layers share it; aux_op is a
        # GEMM operand only for GRU (r*h), scratch the others never touch
        gates_op = rows(G, op) if separate else None
        shared_aux_op = rows(H, op) if separate and self.model != "gru" else None
        self.acts = []
        for _ in range(L):
            gates, hs, aux, h0 = rows(G), rows(H), rows(H), state()
            self.acts.append(K.LayerActivations(
                np.zeros((0, H), op), gates, hs, rows(H), aux, h0, state(), state(), state(),
                gates_op if separate else gates, rows(H, op) if separate else hs,
                (shared_aux_op if shared_aux_op is not None else rows(H, op)) if separate else aux,
                aligned_zeros((B, H), op) if separate else h0))
        logits = rows(V)
        self.decoder = K.DecoderActivations(None, aligned_zeros(T * B, np.int32), logits,
                                            aligned_zeros(T * B, self.dtype), rows(V, op) if separate else logits)
        self.dropped = aligned_zeros((L, T * B, H), op)  # [l - 1]: input of layer l (l = L: the decoder's)
        self.masks = aligned_zeros((L, T * B, H), self.dtype)  # after dropout, and the masks that made it
        # Gradient scratch shared by all layers: backward runs one layer at a time, top down, and
        # sums its partial weight gradients into self.grads before the next layer starts.
        # layer_grads: d_out holds the gradient of each layer's outputs in turn (the decoder's
        # input's, then each layer's input's); dh, dc, d_rh are zeroed or overwritten by each layer.
        self.layer_grads = K.LayerGradients(rows(H), state(), state(), state())
        # per-block partial weight gradients, summed in a fixed order by kernels.reduce_parts(_transposed);
        # only d_w_ih_t differs in shape: the first layer's is the (V, G) one-hot table's
        shared_d_bias, shared_d_w_hh_t = aligned_zeros((P, G), self.dtype), aligned_zeros((P, H, G), self.dtype)
        d_table = aligned_zeros((P, V, G), self.dtype)
        shared_d_w_ih_t_above = aligned_zeros((P, H, G), self.dtype) if L > 1 else None
        self.weight_grads = [K.WeightGradients(shared_d_bias, d_table if layer == 0 else shared_d_w_ih_t_above,
                                               shared_d_w_hh_t) for layer in range(L)]
        self.decoder_grads = K.DecoderGradients(aligned_zeros((P, V, H), self.dtype), aligned_zeros((P, V), self.dtype))

    # ------------------------------------------------------------ passes
    def forward(self, x, y, state, rng=None, same_weights=False):
        """x, y (T, B) int32 token ids; state (L, 2, B, H) is read and replaced by the final
        state. rng given = training (dropout on). Returns the loss: the mean over the batch of
        the NLL, averaged over the T steps. same_weights: the parameters have not changed since
        the last forward, whose derived copies (transposed, bfloat16, packed) still hold."""
        T, B = x.shape
        self._workspace(T, B)
        if not same_weights:
            self._refresh_weights()
        dropout = rng is not None and self.dropout > 0
        for layer in range(self.L):
            a = self.acts[layer]
            if layer > 0:
                a = self.acts[layer] = a._replace(x=self._input(layer, dropout, rng))
            a.h0[:], a.c0[:] = state[layer, 0], state[layer, 1]
            self.passes.layer_forward(self.kind, layer == 0, x, self.weights[layer], a)
            state[layer, 0], state[layer, 1] = a.h_last, a.c_last
        dec = self.decoder = self.decoder._replace(x=self._input(self.L, dropout, rng))
        np.take(y.reshape(-1), self.perm, out=dec.targets)
        self.passes.decoder_forward(self.decoder_weights, dec, self.dtype(1.0 / B), T)
        return float(dec.row_loss.sum(dtype=np.float64)) / (B * T)

    def _input(self, layer, dropout, rng):
        """The input of layer `layer` (the decoder's when layer == L), a GEMM operand: the
        outputs of the layer below (a view: no copy), or with dropout a copy through a fresh
        mask."""
        below = self.acts[layer - 1]
        if not dropout:
            return below.hs_op
        mask = self.masks[layer - 1]
        T, B, _ = self._shape
        start, total = self.streams or (0, B)
        keep = rng.random((T, total, self.H), dtype=np.float32)[:, start:start + B] >= self.dropout
        np.multiply(keep.reshape(T * B, self.H)[self.perm], self.dtype(1.0 / (1.0 - self.dropout)), out=mask)
        K.multiply(below.hs, mask, self.dropped[layer - 1])
        return self.dropped[layer - 1]

    def backward(self, x, training_dropout):
        """Gradients of the last forward's loss (the sum over timesteps of the per-step
        batch-mean NLL, as char-rnn: not divided by T) into self.grads."""
        g = self.grads
        T, _, P = self._shape
        chunks = numba.get_num_threads()
        d = self.layer_grads
        self.passes.decoder_backward(self.decoder_weights, self.decoder, d.d_out, self.decoder_grads, T)
        K.reduce_parts(self.decoder_grads.d_w.reshape(P, -1), g["decoder.weight"].reshape(-1), chunks)
        K.reduce_parts(self.decoder_grads.d_b, g["decoder.bias"], 1)
        for layer in range(self.L - 1, -1, -1):
            if training_dropout:  # through the dropout on the input of the layer above
                K.multiply(d.d_out, self.masks[layer], d.d_out)
            dw = self.weight_grads[layer]
            self.passes.layer_backward(self.kind, layer == 0, x, self.weights[layer], self.acts[layer], d, dw)
            K.reduce_parts_transposed(dw.d_w_hh_t, g[f"layers.{layer}.w_hh"], chunks)
            K.reduce_parts(dw.d_bias, g[f"layers.{layer}.b_ih"], 1)
            g[f"layers.{layer}.b_hh"][:] = g[f"layers.{layer}.b_ih"]
            K.reduce_parts_transposed(dw.d_w_ih_t, g[f"layers.{layer}.w_ih"], chunks)

    # ------------------------------------------------------------ optimizer
    def update(self, learning_rate, decay_rate, grad_clip):
        """One RMSprop step, char-rnn's: clamp the gradients to [-grad_clip, grad_clip],
        m = decay_rate*m + (1-decay_rate)*g^2, p -= learning_rate*g/(sqrt(m)+1e-8). Returns
        |clamped gradient| / |updated parameters| (char-rnn's grad/param norm)."""
        sq_grad = np.zeros(RMS_CHUNKS)
        sq_param = np.zeros(RMS_CHUNKS)
        K.rmsprop_step(self.params.data, self.grads.data, self.rms, learning_rate, decay_rate, grad_clip,
                       RMS_CHUNKS, sq_grad, sq_param)
        return float(np.sqrt(sq_grad.sum()) / np.sqrt(sq_param.sum()))
