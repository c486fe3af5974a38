"""Text generation from a checkpoint: char-rnn's sample.lua (temperature, primetext echoed,
argmax with --sample 0), one compiled call per block of characters."""
import argparse
import io
import mmap
import sys

import numpy as np

from phi_rnn import amx, bf16_dot, checkpoint, data, files
from phi_rnn import kernels as K
from phi_rnn.errors import UsageError
from phi_rnn.model import KINDS, FlatBuffer, bf16_weights, transposed_weights

BLOCK = 4096  # characters generated per compiled call, then written out
FIRST_BLOCK = 64  # the first blocks are smaller: a big model's text shows at once
_HUGE_PAGE = 2 << 20


def _in_one_huge_page(weights):
    """`weights`, a namedtuple of arrays, copied (each keeping its dtype) into one 2 MB-aligned region advised
    for transparent huge pages, each array 64-byte aligned; the same namedtuple of the copies.
    Generation streams every weight once per character from L2; on scattered 4 KB pages the
    ~0.8 MB of a 2 x 128 model evict each other in L2's sets (three 512 x 128 products:
    11.2 us scattered, 10.1 us in one huge page)."""
    sizes = [-(-a.nbytes // 64) * 64 for a in weights]
    nbytes = sum(sizes)
    length = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE + _HUGE_PAGE
    region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared memory gets no THP
    raw = np.frombuffer(region, np.uint8)  # keeps the mapping alive
    start = -raw.ctypes.data % _HUGE_PAGE
    if hasattr(region, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE, start, length - _HUGE_PAGE)
    copies, offset = [], start
    for a, size in zip(weights, sizes):
        view = raw[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        copies.append(view)
        offset += size
    return type(weights)(*copies)


def generation_state(num_layers, hidden, gate_units, vocab_size):
    """A zero kernels.GenerationState: named views of one flat float32 buffer."""
    L, H = num_layers, hidden
    shapes = [("h", (L, 1, H)), ("c", (L, 1, H)), ("h_next", (1, H)), ("aux", (1, H)),
              ("gates", (1, gate_units)), ("logits", (1, vocab_size))]
    return K.GenerationState(**FlatBuffer(shapes).views)


def _bf16_weights(transposed, kind):
    """The products' weights in bfloat16 (half the bytes streamed per character): paired for
    vdpbf16ps (bf16_dot.generation_weights, uint32) where the CPU has avx512_bf16, else
    plain bfloat16 bits (uint16) for the product that widens them in software. Where AMX
    tiles run and the shapes fit them, an LSTM's layers' weights as tiles instead (sooner,
    bench/README): kernels.generation_step multiplies them inside generate's tile
    configuration, which the GRU's and RNN's steps (training's functions) do not know."""
    if not bf16_dot.available():
        return bf16_weights(transposed)
    H, G = transposed.w_hh_t.shape[1:]
    if kind != K.LSTM or not amx.available() or not amx.fits(1, G, H):
        return bf16_dot.generation_weights(transposed)
    return transposed._replace(w_ih_t=_tiles(transposed.w_ih_t), w_hh_t=_tiles(transposed.w_hh_t),
                               dec_w_t=bf16_dot.pair_rows(transposed.dec_w_t))


def _tiles(stacked):
    """Each (K, N) matrix of `stacked` (layers, K, N) float32 rounded and laid out as AMX
    tiles (amx.tile_into)."""
    tiles = np.empty((stacked.shape[0],) + amx.tiles_shape(*stacked.shape[1:]), np.uint32)
    for layer, w in enumerate(stacked):
        amx.tile_into(w, tiles[layer])
    return tiles


class Generator:
    """A batch-of-one copy of a checkpoint's network, laid out for kernels.generation_step:
    `weights` (kernels.TransposedWeights in one huge page: float32, or with precision "bf16"
    the products' weights in bfloat16, _bf16_weights) and `state` (kernels.GenerationState)."""

    def __init__(self, ck, precision="fp32"):
        p, L = ck.params, int(ck.meta["num_layers"])
        self.kind = KINDS[ck.meta["model"]]
        self.encoding = ck.meta.get("encoding", "utf-8")
        self.vocab = ck.vocab
        self.index = {s: i for i, s in enumerate(self.vocab)}
        weights = transposed_weights(p, L)
        self.weights = _in_one_huge_page(_bf16_weights(weights, self.kind) if precision == "bf16" else weights)
        # logits start equal: with no primetext the first character is uniform, as in char-rnn
        self.state = generation_state(L, int(ck.meta["rnn_size"]), self.weights.bias.shape[1], len(self.vocab))

    def encode(self, text):
        symbols = data.text_to_symbols(text, self.encoding)
        unknown = sorted({s for s in symbols if s not in self.index})
        if unknown:
            names = ", ".join(data.describe_symbol(s, self.encoding) for s in unknown)
            raise UsageError(f"primetext has characters not in the model's vocabulary: {names}")
        return np.array([self.index[s] for s in symbols], dtype=np.int32)

    def prime(self, text):
        K.prime(self.kind, self.encode(text), self.weights, self.state)

    def generate(self, length, temperature, argmax, rng):
        """Yields the text in blocks (growing from FIRST_BLOCK to BLOCK characters)."""
        decode = data.make_decoder(self.encoding)
        start, block = 0, FIRST_BLOCK
        while start < length:
            n = min(block, length - start)
            start, block = start + n, min(2 * block, BLOCK)
            out = np.empty(n, np.int32)
            K.generate(self.kind, rng.random(n), temperature, argmax, self.weights, self.state, out)
            yield decode([self.vocab[t] for t in out])


def sample(o, out=None):
    """Writes the text to `out` (stdout). A reader that goes away (`| head`) ends it with
    BrokenPipeError; any other failed write (a full disk) is a UsageError."""
    if o.out:
        return _sample_to_file(o)
    out = out or sys.stdout
    ck = checkpoint.load(o.checkpoint)
    gen = Generator(ck, o.precision)
    rng = np.random.default_rng(o.seed)
    if o.primetext:
        gen.prime(o.primetext)
    try:
        out.write(o.primetext)
        for text in gen.generate(o.length, o.temperature, o.sample == 0, rng):
            out.write(text)
            out.flush()
        out.write("\n")
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise UsageError(f"cannot write the sample ({e.strerror})") from None
    return 0


def _sample_to_file(o):
    """--out: the text streamed into a temporary file that replaces o.out when complete, so an
    interrupted or failed run leaves the previous file as it was."""
    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        sample(argparse.Namespace(**dict(vars(o), out=None)), text)
        text.detach()  # flushed; atomic_write owns f

    try:
        files.atomic_write(o.out, write)
    except OSError as e:
        raise UsageError(f"cannot write {o.out} ({e.strerror})") from None
    return 0
