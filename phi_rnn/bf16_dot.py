"""The batch-of-one bfloat16 product of text generation on AVX512_BF16's vdpbf16ps.

Generation multiplies one row (a layer's input or h) by each transposed weight matrix per
character, so it is bound by streaming every weight once. Widening bfloat16 weights to
float32 in software (kernels._row_times_bf16_matrix: a shift, then an FMA) costs more
instructions than the bytes it saves, and ran slower than float32. vdpbf16ps multiplies
bfloat16 pairs directly: each of its 16 float32 lanes gets a[2i]*b[2i] + a[2i+1]*b[2i+1], 32
multiply-adds per instruction with no conversion.

Layout ("VNNI", pair-interleaved): for out[n] = sum_k x[k] * W[k, n] (W the transposed
weight, K x N), the weights are stored as W2 (ceil(K/2), N) uint32, W2[k2, n] holding
W[2*k2, n] in its low 16 bits and W[2*k2 + 1, n] in its high 16 bits, each as bfloat16 bits
(an odd K gets a zero row). The lanes of a 512-bit load of row k2 are then 16 consecutive
outputs' pairs, and x's pair (x[2*k2], x[2*k2 + 1]) broadcast to every lane is the other
operand. x itself is rounded to bfloat16 by vcvtneps2bf16: that is a row of K bfloat16s in
memory order, which read as uint32 are the pairs with the even element low, the same order
as W2 (little-endian).

numba has no vector types, so the product is an @intrinsic that emits the whole loop as
LLVM IR: a helper function per module (internal linkage) that the intrinsic calls. It keeps
up to eight accumulators of 16 outputs in registers over a slice of K (a block of columns at a
time: independent dependency chains, out read and written once per block and slice) and
masks the loads and stores of the last block's last vector, so any N and K work. The
vector operations are LLVM's x86 intrinsics in their older integer-typed form
(llvm.x86.avx512bf16.dpbf16ps.512 on <16 x i32>, cvtneps2bf16 giving <16 x i16>): llvmlite
has no bfloat type, and LLVM's IR reader upgrades those declarations to the <N x bfloat>
form, inserting bitcasts, which LLVM then selects and folds (a weight load becomes
vdpbf16ps's memory operand).

Cost: on Sapphire/Emerald Rapids vdpbf16ps issues at a quarter of the rate of a 512-bit
FMA, so with twice the multiply-adds per instruction it computes at half float32's peak;
float32 generation, though, waits on its weights from L2, while this product waits on its
instructions (weights in L2) or its bytes (weights beyond L2, half float32's). The block is
as wide as keeps enough independent accumulators to cover the instruction's latency without
spilling registers. Where the CPU has AMX, generation multiplies the layers' weights on
tiles instead (amx.row_product: bound by streaming W's tiles from L2, sooner than this
product's issue rate); this product keeps the decoder's (its N is the vocabulary, rarely a
multiple of 16), a GRU's and the sizes tiles do not fit.

Rounding: vcvtneps2bf16 rounds to nearest even, as bf16.bf16_bits does, but treats a
denormal input as zero; vdpbf16ps accumulates in float32 with denormals flushed. Neither
matters for generation (h is tanh's output).

Only a CPU with avx512_bf16 can run this (available()); bf16.require_native also accepts a
CPU with amx_bf16 alone, and there generation keeps the widening product (model.bf16_weights).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from phi_rnn import bf16

LANES = 16  # float32 outputs per vector
BLOCK_VECTORS = 8  # accumulators kept in registers per block of columns
ROW_SLICE = 64  # pairs of K per pass over N: all of K for char-rnn's sizes (out touched once)
_HELPER = "phi_rnn.bf16_dot.accumulate_pairs"

_i1, _i16, _i32, _i64 = ir.IntType(1), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_f32 = ir.FloatType()
_v16f32, _v16i32, _v16i16, _v16i1 = (ir.VectorType(t, LANES) for t in (_f32, _i32, _i16, _i1))
_ptr = ir.IntType(8).as_pointer()


def available():
    """Whether this CPU, and the code numba generates for it, have AVX512_BF16 (numba may be
    told to compile for another CPU: NUMBA_CPU_NAME, NUMBA_CPU_FEATURES)."""
    return "avx512_bf16" in bf16.cpu_flags() and "+avx512bf16" in bf16.compiled_features()


# ---------------------------------------------------------------- layout

def pair_rows(w):
    """W2: float32 `w` (..., K, N) rounded to bfloat16 and paired along K, (..., ceil(K/2), N)
    uint32: W2[k2, n] = bits(w[2*k2, n]) | bits(w[2*k2 + 1, n]) << 16, an odd K padded with a
    zero row."""
    bits = bf16.to_bf16(w).astype(np.uint32)
    if bits.shape[-2] % 2:
        pad = np.zeros(bits.shape[:-2] + (1, bits.shape[-1]), np.uint32)
        bits = np.concatenate([bits, pad], axis=-2)
    return np.ascontiguousarray(bits[..., 0::2, :] | (bits[..., 1::2, :] << np.uint32(16)))


def unpair_rows(w2, k):
    """pair_rows' inverse on the bits: the (..., k, N) uint16 bfloat16 bits of W2."""
    low = (w2 & np.uint32(0xFFFF)).astype(np.uint16)
    high = (w2 >> np.uint32(16)).astype(np.uint16)
    out = np.empty(w2.shape[:-2] + (2 * w2.shape[-2], w2.shape[-1]), np.uint16)
    out[..., 0::2, :] = low
    out[..., 1::2, :] = high
    return out[..., :k, :]


def generation_weights(transposed):
    """Generation's weights for row_product: `transposed` (kernels.TransposedWeights,
    float32) with w_ih_t, w_hh_t and dec_w_t paired (pair_rows: uint32, kernels.gemm's
    batch-of-one product on vdpbf16ps); the one-hot table w_ih0_t (gathered, not
    multiplied), bias and dec_b are transposed's own arrays."""
    t = transposed
    return t._replace(w_ih_t=pair_rows(t.w_ih_t), w_hh_t=pair_rows(t.w_hh_t), dec_w_t=pair_rows(t.dec_w_t))


# ---------------------------------------------------------------- the product

@njit(cache=True, error_model="numpy")
def row_product(a, b, beta, c):
    """c (1, N) = a (1, K) @ W + beta * c, float32 a and c, W bfloat16 given as b = its
    pairs (pair_rows: (ceil(K/2), N) uint32, rows with unit column stride); a is rounded to
    bfloat16. a's and c's rows contiguous."""
    x = a[0]
    out = c[0]
    if b.shape[0] != (x.shape[0] + 1) // 2 or b.shape[1] != out.shape[0]:
        raise ValueError("row_product: shapes do not match (b must be a's pairs by c's columns)")
    if x.strides[0] != 4 or out.strides[0] != 4 or b.strides[1] != 4:
        raise ValueError("row_product: a's and c's rows and b's columns must be contiguous")
    if beta == 0:  # as BLAS: c is not read
        out[:] = 0
    elif beta != 1:
        for n in range(out.shape[0]):
            out[n] = beta * out[n]
    _accumulate_pairs(x, b, out)


@intrinsic
def _accumulate_pairs(typingctx, x, w2, out):
    """out (N) += bf16(x) (K) @ W, W given as its pairs w2 (ceil(K/2), N): a call of the
    module's helper (_define_helper) on the arrays' pointers, sizes and w2's row stride."""
    sig = types.void(x, w2, out)

    def codegen(context, builder, signature, args):
        xs, ws, outs = (context.make_array(t)(context, builder, v) for t, v in zip(signature.args, args))
        helper = _define_helper(builder.module)
        builder.call(helper, [builder.bitcast(xs.data, _ptr), builder.extract_value(xs.shape, 0),
                              builder.bitcast(ws.data, _ptr), builder.extract_value(ws.strides, 0),
                              builder.bitcast(outs.data, _ptr), builder.extract_value(outs.shape, 0)])
        return context.get_dummy_value()
    return sig, codegen


def declare(module, name, ret, args):
    """The function `name` of type ret(args) in `module` (an LLVM intrinsic or a helper),
    declared on first use (amx.py and row_cell.py emit through it too)."""
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _define_helper(module):
    """void helper(i8* x, i64 K, i8* w, i64 w_row_bytes, i8* out, i64 N), defined once per module."""
    fn = declare(module, _HELPER, ir.VoidType(), [_ptr, _i64, _ptr, _i64, _ptr, _i64])
    if not fn.is_declaration:
        return fn
    fn.linkage = "internal"
    x, k, w, w_row_bytes, out, n = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    # x's bfloat16 copy lives on the stack, a vector of 16 per chunk of x (the last padded
    # with zeros): read as i32 it is x's pairs. The alloca stays in the entry block, so a
    # caller that inlines the helper frees it on return.
    chunks = builder.lshr(builder.add(k, ir.Constant(_i64, LANES - 1)), ir.Constant(_i64, 4))
    pairs_of_x = builder.alloca(_v16i16, size=chunks, name="x_bf16")
    pairs_of_x.align = 64
    emit_rounding(builder, x, k, chunks, pairs_of_x)
    x_pairs = builder.bitcast(pairs_of_x, _i32.as_pointer())
    k2 = builder.lshr(builder.add(k, ir.Constant(_i64, 1)), ir.Constant(_i64, 1))
    # K in slices of ROW_SLICE pairs, each across all of N: out is read and written once per
    # slice and block, and weights beyond L2 are read a slice of rows at a time, each row
    # moving forward, streams the hardware prefetcher follows (a block down all of a wide
    # matrix's K visits a new page per row).
    slices = builder.udiv(builder.add(k2, ir.Constant(_i64, ROW_SLICE - 1)), ir.Constant(_i64, ROW_SLICE))
    with cgutils.for_range(builder, slices) as sl:
        k0 = builder.mul(sl.index, ir.Constant(_i64, ROW_SLICE))
        left = builder.sub(k2, k0)
        rows = builder.select(builder.icmp_unsigned("<", left, ir.Constant(_i64, ROW_SLICE)), left,
                              ir.Constant(_i64, ROW_SLICE))
        pairs = _Pairs(builder.gep(x_pairs, [k0]), rows, builder.gep(w, [builder.mul(k0, w_row_bytes)]),
                       w_row_bytes, out)
        _blocks(builder, pairs, n)
    builder.ret_void()
    return fn


def _blocks(builder, pairs, n):
    """Full blocks of BLOCK_VECTORS vectors, then one block of the remaining 1..BLOCK_VECTORS
    vectors whose last is masked (a switch: each width its own loop, its accumulators in
    registers)."""
    fn = builder.function
    width = LANES * BLOCK_VECTORS
    full = builder.udiv(n, ir.Constant(_i64, width))
    with cgutils.for_range(builder, full) as loop:
        pairs.block(builder, builder.mul(loop.index, ir.Constant(_i64, width)), BLOCK_VECTORS, None)
    start = builder.mul(full, ir.Constant(_i64, width))
    rest = builder.sub(n, start)
    vectors = builder.lshr(builder.add(rest, ir.Constant(_i64, LANES - 1)), ir.Constant(_i64, 4))
    tail = builder.sub(rest, builder.shl(builder.sub(vectors, ir.Constant(_i64, 1)), ir.Constant(_i64, 4)))
    done = fn.append_basic_block("done")
    switch = builder.switch(vectors, done)
    for count in range(1, BLOCK_VECTORS + 1):
        case = fn.append_basic_block(f"rest{count}")
        switch.add_case(ir.Constant(_i64, count), case)
        builder.position_at_end(case)
        pairs.block(builder, start, count, lanes_below(builder, tail))
        builder.branch(done)
    builder.position_at_end(done)


def lanes_below(builder, count):
    """<16 x i1>: lane i is on when i < count (count an i64, at most LANES)."""
    iota = ir.Constant(_v16i32, list(range(LANES)))
    return builder.icmp_unsigned("<", iota, splat(builder, builder.trunc(count, _i32), _v16i32))


def splat(builder, value, vtype):
    v = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vtype, ir.Undefined), ir.Constant(_v16i32, [0] * LANES))


def masked_load(builder, ptr, vtype, mask):
    suffix = "v16f32" if vtype == _v16f32 else "v16i32"
    f = declare(builder.module, f"llvm.masked.load.{suffix}.p0", vtype, [ptr.type, _i32, _v16i1, vtype])
    return builder.call(f, [ptr, ir.Constant(_i32, 4), mask, ir.Constant(vtype, None)])


def masked_store(builder, value, ptr, mask):
    f = declare(builder.module, "llvm.masked.store.v16f32.p0", ir.VoidType(), [_v16f32, ptr.type, _i32, _v16i1])
    builder.call(f, [value, ptr, ir.Constant(_i32, 4), mask])


def pointer_at(builder, base, byte_offset, vtype):
    """A pointer to a vtype at base + byte_offset (i8 arithmetic)."""
    return builder.bitcast(builder.gep(base, [byte_offset]), vtype.as_pointer())


def emit_rounding(builder, x, k, chunks, dst):
    """IR: dst[c] (<16 x i16>*) = vcvtneps2bf16(x[16c .. 16c+15]) for c < chunks, x (i8*) K
    float32, lanes past K read as zero: a row rounded to bfloat16 (amx.row_product's too)."""
    convert = declare(builder.module, "llvm.x86.avx512bf16.cvtneps2bf16.512", _v16i16, [_v16f32])
    with cgutils.for_range(builder, chunks) as loop:
        first = builder.shl(loop.index, ir.Constant(_i64, 4))
        mask = lanes_below(builder, builder.select(
            builder.icmp_unsigned("<", builder.sub(k, first), ir.Constant(_i64, LANES)),
            builder.sub(k, first), ir.Constant(_i64, LANES)))
        v = masked_load(builder, pointer_at(builder, x, builder.shl(first, ir.Constant(_i64, 2)), _v16f32), _v16f32, mask)
        builder.store(builder.call(convert, [v]), builder.gep(dst, [loop.index]))


class _Pairs:
    """The product's operands inside the helper: x's pairs (i32*), their count K2, w's
    base and row stride in bytes, out (i8*)."""

    def __init__(self, x_pairs, k2, w, w_row_bytes, out):
        self.x_pairs, self.k2, self.w, self.w_row_bytes, self.out = x_pairs, k2, w, w_row_bytes, out

    def block(self, builder, start, count, last_mask):
        """out[start : start + 16*count] += the product's columns there, `count` accumulators
        in registers over the whole K loop; the last vector's loads and stores masked by
        last_mask (None: none masked)."""
        dot = declare(builder.module, "llvm.x86.avx512bf16.dpbf16ps.512", _v16f32, [_v16f32, _v16i32, _v16i32])
        # vector allocas in the entry block: promoted to registers
        accs = [cgutils.alloca_once(builder, _v16f32) for _ in range(count)]
        byte0 = builder.shl(start, ir.Constant(_i64, 2))  # float32 and uint32 columns: 4 bytes
        offsets = [builder.add(byte0, ir.Constant(_i64, 4 * LANES * j)) for j in range(count)]
        masks = [last_mask if (j == count - 1 and last_mask is not None) else None for j in range(count)]
        for acc, off, mask in zip(accs, offsets, masks):
            p = pointer_at(builder, self.out, off, _v16f32)
            builder.store(builder.load(p, align=4) if mask is None else masked_load(builder, p, _v16f32, mask), acc)
        with cgutils.for_range(builder, self.k2) as loop:
            x = splat(builder, builder.load(builder.gep(self.x_pairs, [loop.index]), align=4), _v16i32)
            row = builder.mul(loop.index, self.w_row_bytes)
            for acc, off, mask in zip(accs, offsets, masks):
                p = pointer_at(builder, self.w, builder.add(row, off), _v16i32)
                wv = builder.load(p, align=4) if mask is None else masked_load(builder, p, _v16i32, mask)
                builder.store(builder.call(dot, [builder.load(acc), x, wv]), acc)
        for acc, off, mask in zip(accs, offsets, masks):
            p = pointer_at(builder, self.out, off, _v16f32)
            if mask is None:
                builder.store(builder.load(acc), p, align=4)
            else:
                masked_store(builder, builder.load(acc), p, mask)
