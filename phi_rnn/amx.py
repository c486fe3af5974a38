"""bfloat16 products on AMX tiles (tdpbf16ps): LSTM training's per-step products, and
generation's batch of one (row_product, at the end).

A step multiplies a block's few batch rows by a layer's recurrent weights: (nb, H) @ (H, 4H)
forward, (nb, 4H) @ (4H, H) backward, nb = 25 or 50 for char-rnn. MKL's bfloat16 GEMM runs
them on AMX too, but at these sizes its call costs several times the tile work
(bench/bf16_gemm.py: the per-step rows). This kernel is only the tile work. The weights are
laid out once per update as tdpbf16ps reads them (tile_into): pairs along K, in tiles of 16
pair rows by 16 columns, each tile 1 KiB of consecutive bytes and a column slice's tiles one
after another down K, so the product streams W from L2 in order, as the prefetcher likes
(the plain pair layout's 16 rows of a tile lie a weight row apart: several times slower).

Tiles: a group of up to 64 rows of C is four row tiles of one 16-column slice (tmm0-3, the
last one shorter when the rows run out), read (or zeroed) once, updated over all of K and
written once; per 32 of K, W's tile (tmm6) is loaded once and meets A's row tiles, which take
tmm4 and tmm5 in turn (a load need not wait for the product reading the other) and tmm7 for
a shorter last one. Every group but a shorter last one has the same configuration, loaded
once. K must be a multiple of 32 and N of 16 (fits()); model.Network takes MKL's packed
product for other shapes.

Linux gives a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM);
available() asks for it once and says no when it is refused, or when the CPU or the code
numba generates lacks AMX. tdpbf16ps accumulates in float32 with denormals flushed, and A
and W are bfloat16 already (the kernels round them), so the result is the float32 sum of
bfloat16 products, as MKL's.
"""
import ctypes
import functools
import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from phi_rnn import bf16
from phi_rnn.bf16_dot import declare, emit_rounding

TILE_ROWS = 16  # rows of a tile (of A and C; of W: pairs of K)
TILE_BYTES = 64  # bytes of a tile row: 16 float32 of C, 32 bfloat16 of A, 16 pairs of W
K_STEP = 32  # K covered by one tdpbf16ps
_HELPER = "phi_rnn.amx.tile_product"

_i1, _i8, _i16, _i64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(64)
_ptr = _i8.as_pointer()
_config_type = ir.ArrayType(_i8, 64)

# tile numbers: four row tiles of C for one 16-column slice; A's slices for the full row
# tiles, two taken in turn (a load into one need not wait for the product reading the
# other), and for the last, shorter one; W's slice
C_TILES = (0, 1, 2, 3)
A_FULL = (4, 5)
W_SLICE, A_LAST = 6, 7
GROUP_ROWS = len(C_TILES) * TILE_ROWS

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64


@functools.lru_cache(maxsize=None)
def available():
    """Whether the per-step products can run here: the CPU has AMX bf16 tiles, numba compiles
    for them, Linux grants this process the tile state, and PHI_RNN_AMX is not 0 (MKL's packed
    products instead: the comparison in bench/README)."""
    if os.environ.get("PHI_RNN_AMX", "1") == "0":
        return False
    if not {"amx_bf16", "amx_tile"} <= set(bf16.cpu_flags()):
        return False
    if not {"+amx-bf16", "+amx-tile"} <= bf16.compiled_features():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def fits(m, n, k):
    """Whether tile_product takes (m, k) @ (k, n): K in whole tdpbf16ps steps, N in tiles."""
    return m > 0 and n > 0 and k > 0 and n % TILE_ROWS == 0 and k % K_STEP == 0


def runs_lstm_steps(rnn_size):
    """Whether an LSTM of rnn_size units gets its per-step products here: tiles available and
    both products' shapes fitting, W_hh^T (H, 4H) forward and W_hh (4H, H) backward."""
    return available() and fits(1, 4 * rnn_size, rnn_size) and fits(1, rnn_size, 4 * rnn_size)


def tiles_shape(k, n):
    """The shape of W's tiles for a (k, n) W: (n/16, k/32, 16, 16) uint32."""
    return (n // TILE_ROWS, k // K_STEP, TILE_ROWS, TILE_ROWS)


@njit(parallel=True, cache=True, error_model="numpy")
def tile_into(bits, out):
    """out (N/16, K/32, 16, 16) uint32 = `bits` (K, N) bfloat16 bits (or float32, rounded
    here) as tdpbf16ps reads W:
    pairs along K (the low half row 2*k2, the high half row 2*k2 + 1) in tiles of 16 pair rows
    by 16 columns, a column slice's tiles one after another down K, each tile's rows
    consecutive (64 bytes): the product streams W sequentially. Column slices in parallel."""
    for j in prange(out.shape[0]):
        _tile_slice(bits, out, j)


@njit(parallel=True, cache=True, error_model="numpy")
def round_and_tile(values, rounded, weights, tiles, tasks):
    """Every update's bfloat16 operands in one parallel pass over `tasks` (task_list): each
    values[i] (1-d float32) rounded into rounded[i] (1-d uint16), and each weights[i] (2-d
    float32, (K, N)) rounded and laid out as tiles[i] (tile_into's layout). One parallel
    region: starting one costs more than a weight matrix's work on a virtual machine's
    sleeping cores."""
    for n in prange(tasks.shape[0]):
        i, start = tasks[n, 1], tasks[n, 2]
        if tasks[n, 0] == 0:
            src, dst = values[i], rounded[i]
            bf16.round_range(src[start:min(start + bf16.ROUND_CHUNK, src.shape[0])], dst[start:])
        else:
            _tile_slice(weights[i], tiles[i], start)


def task_list(values, tiles):
    """round_and_tile's tasks: (0, i, start) per chunk of values[i], (1, i, j) per column
    slice j of tiles[i]."""
    tasks = [(0, i, start) for i, a in enumerate(values) for start in range(0, a.size, bf16.ROUND_CHUNK)]
    tasks += [(1, i, j) for i, out in enumerate(tiles) for j in range(out.shape[0])]
    return np.array(tasks, np.int64).reshape(-1, 3)


@njit(cache=True, error_model="numpy")
def _tile_slice(w, out, j):
    """Column slice j of tile_into's layout of W (K, N): bfloat16 bits, or float32 rounded
    here."""
    for s in range(out.shape[1]):
        for r in range(TILE_ROWS):
            k = 2 * (s * TILE_ROWS + r)
            low = w[k, j * TILE_ROWS:(j + 1) * TILE_ROWS]
            high = w[k + 1, j * TILE_ROWS:(j + 1) * TILE_ROWS]
            dst = out[j, s, r]
            for c in range(TILE_ROWS):
                dst[c] = np.uint32(bf16.as_bits(low[c])) | (np.uint32(bf16.as_bits(high[c])) << np.uint32(16))


@njit(cache=True, error_model="numpy")
def _check(a, tiles, c):
    m, n = c.shape
    k = a.shape[1]
    if a.shape[0] != m or tiles.shape[0] * TILE_ROWS != n or tiles.shape[1] * K_STEP != k:
        raise ValueError("tile_product: shapes do not match (tiles must be tiles_shape(K, N))")
    if a.strides[1] != 2 or c.strides[1] != 4 or not tiles.flags.c_contiguous:
        raise ValueError("tile_product: a's and c's rows and the tiles must be contiguous")


@njit(cache=True, error_model="numpy")
def tile_product(a, tiles, beta, c):
    """c (M, N) = a (M, K) @ W + beta * c, beta 0 or 1 (0: c is not read); a bfloat16 bits
    (uint16), W given as its tiles (tile_into, contiguous), c float32; K a multiple of 32, N
    of 16, a's and c's rows contiguous. Only where available()."""
    _check(a, tiles, c)
    if beta != 0 and beta != 1:
        raise ValueError("tile_product: beta must be 0 or 1")
    _tile_product(a, tiles, a, tiles, c, beta != 0, False)


@njit(cache=True, error_model="numpy")
def tile_product_sum(a, tiles_a, b, tiles_b, c):
    """c (M, N) = a (M, Ka) @ Wa + b (M, Kb) @ Wb, each as tile_product's operands; c is not
    read. A layer's gates from its input and its previous h in one pass over c."""
    _check(a, tiles_a, c)
    _check(b, tiles_b, c)
    _tile_product(a, tiles_a, b, tiles_b, c, False, True)


@intrinsic
def _tile_product(typingctx, a, tiles_a, b, tiles_b, c, accumulate, two_sources):
    sig = types.void(a, tiles_a, b, tiles_b, c, accumulate, two_sources)

    def codegen(context, builder, signature, args):
        a_arr, wa_arr, b_arr, wb_arr, c_arr = [context.make_array(t)(context, builder, v)
                                               for t, v in zip(signature.args[:5], args[:5])]
        kb = builder.select(args[6], builder.extract_value(b_arr.shape, 1), _const(0))
        helper = _define_helper(builder.module)
        builder.call(helper, [builder.bitcast(a_arr.data, _ptr), builder.extract_value(a_arr.strides, 0),
                              builder.bitcast(wa_arr.data, _ptr), builder.extract_value(wa_arr.strides, 0),
                              builder.extract_value(a_arr.shape, 1),
                              builder.bitcast(b_arr.data, _ptr), builder.extract_value(b_arr.strides, 0),
                              builder.bitcast(wb_arr.data, _ptr), builder.extract_value(wb_arr.strides, 0), kb,
                              builder.bitcast(c_arr.data, _ptr), builder.extract_value(c_arr.strides, 0),
                              builder.extract_value(c_arr.shape, 0), builder.extract_value(c_arr.shape, 1),
                              args[5]])
        return context.get_dummy_value()
    return sig, codegen


def _const(value):
    return ir.Constant(_i64, value)


def _tile(value):
    return ir.Constant(_i8, value)


class _Source:
    """One sum term's operands inside the helper: A's base (i8*) and row stride in bytes, W's
    tiles' base and the bytes of one column slice of them, K (0: no term)."""

    def __init__(self, a, lda, w, w_slice_bytes, k):
        self.a, self.lda, self.w, self.w_slice_bytes, self.k = a, lda, w, w_slice_bytes, k


class _Operands:
    """The helper's arguments: the two sources, C's base and row stride in bytes, M, N, and
    whether C is read (beta 1) or zeroed (beta 0)."""

    def __init__(self, args):
        self.sources = (_Source(*args[0:5]), _Source(*args[5:10]))
        self.c, self.ldc, self.m, self.n, self.accumulate = args[10:]


def _define_helper(module):
    """void helper(a, lda, wa, wa_slice_bytes, Ka, b, ldb, wb, wb_slice_bytes, Kb, c, ldc, M, N,
    accumulate): C (+)= A @ Wa + B @ Wb (Kb 0: the first term only); defined once per module."""
    source = [_ptr, _i64, _ptr, _i64, _i64]
    fn = declare(module, _HELPER, ir.VoidType(), source + source + [_ptr, _i64, _i64, _i64, _i1])
    if not fn.is_declaration:
        return fn
    fn.linkage = "internal"
    ops = _Operands(fn.args)
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    config = builder.alloca(_config_type, name="tile_config")
    config.align = 64
    groups = builder.udiv(builder.add(ops.m, _const(GROUP_ROWS - 1)), _const(GROUP_ROWS))
    with cgutils.for_range(builder, groups) as group:
        row0 = builder.mul(group.index, _const(GROUP_ROWS))
        rows = builder.sub(ops.m, row0)
        rows = builder.select(builder.icmp_unsigned("<", rows, _const(GROUP_ROWS)), rows, _const(GROUP_ROWS))
        # a group's configuration: only the last group can differ from the one before
        first_or_last = builder.or_(builder.icmp_unsigned("==", group.index, _const(0)),
                                    builder.icmp_unsigned("<", rows, _const(GROUP_ROWS)))
        shape = _GroupShape(builder, rows)
        with builder.if_then(first_or_last):
            _configure(builder, config, shape)
        with cgutils.for_range(builder, builder.udiv(ops.n, _const(TILE_ROWS))) as column:
            _column_slice(builder, ops, row0, builder.mul(column.index, _const(TILE_ROWS)), shape)
    builder.call(declare(module, "llvm.x86.tilerelease", ir.VoidType(), []), [])
    builder.ret_void()
    return fn


class _GroupShape:
    """A group of up to 64 rows as row tiles: `full` tiles of 16 rows, then one of `last`
    rows (0: none); `tiles` in all."""

    def __init__(self, builder, rows):
        self.full = builder.udiv(rows, _const(TILE_ROWS))
        self.last = builder.urem(rows, _const(TILE_ROWS))
        self.tiles = builder.add(self.full, builder.zext(builder.icmp_unsigned(">", self.last, _const(0)), _i64))

    def rows_of(self, builder, i):
        """Rows of row tile i (0 past the group's tiles)."""
        return builder.select(builder.icmp_unsigned("<", _const(i), self.full), _const(TILE_ROWS),
                              builder.select(builder.icmp_unsigned("==", _const(i), self.full), self.last,
                                             _const(0)))


def _configure(builder, config, shape):
    """Load a palette-1 tile configuration for a group: C row tiles as the group's, A's full
    and last slices, W's slice of 16 pair rows; every row 64 bytes."""
    builder.store(ir.Constant(_config_type, None), config)
    base = builder.bitcast(config, _ptr)
    builder.store(_tile(1), base)  # palette 1
    full_rows = builder.select(builder.icmp_unsigned(">", shape.full, _const(0)), _const(TILE_ROWS), _const(0))
    rows = {tile: shape.rows_of(builder, i) for i, tile in enumerate(C_TILES)}
    rows.update({A_FULL[0]: full_rows, A_FULL[1]: full_rows, A_LAST: shape.last, W_SLICE: _const(TILE_ROWS)})
    for tile, count in rows.items():
        colsb = builder.select(builder.icmp_unsigned(">", count, _const(0)), ir.Constant(_i16, TILE_BYTES),
                               ir.Constant(_i16, 0))
        builder.store(colsb, builder.bitcast(builder.gep(base, [_const(16 + 2 * tile)]), _i16.as_pointer()))
        builder.store(builder.trunc(count, _i8), builder.gep(base, [_const(48 + tile)]))
    builder.call(declare(builder.module, "llvm.x86.ldtilecfg", ir.VoidType(), [_ptr]), [base])


def _column_slice(builder, ops, row0, n0, shape):
    """C[group rows, n0 : n0 + 16] (+)= each source's A rows @ W[:, n0 : n0 + 16]: the C tiles
    read (or zeroed) once, W's slice streamed once over K, A's slices from L1."""
    module = builder.module
    load = declare(module, "llvm.x86.tileloadd64", ir.VoidType(), [_i8, _ptr, _i64])
    store = declare(module, "llvm.x86.tilestored64", ir.VoidType(), [_i8, _ptr, _i64])
    zero = declare(module, "llvm.x86.tilezero", ir.VoidType(), [_i8])
    row_of = [builder.add(row0, _const(TILE_ROWS * i)) for i in range(len(C_TILES))]
    present = [builder.icmp_unsigned("<", _const(i), shape.tiles) for i in range(len(C_TILES))]
    is_last = [builder.icmp_unsigned("==", _const(i), shape.full) for i in range(len(C_TILES))]

    def c_at(i):
        return builder.gep(ops.c, [builder.add(builder.mul(row_of[i], ops.ldc), builder.mul(n0, _const(4)))])

    for i, tile in enumerate(C_TILES):
        with builder.if_then(present[i]):
            with builder.if_else(ops.accumulate) as (then, otherwise):
                with then:
                    builder.call(load, [_tile(tile), c_at(i), ops.ldc])
                with otherwise:
                    builder.call(zero, [_tile(tile)])
    for source in ops.sources:
        _accumulate(builder, source, row_of, n0, present, is_last)
    for i, tile in enumerate(C_TILES):
        with builder.if_then(present[i]):
            builder.call(store, [_tile(tile), c_at(i), ops.ldc])


def _accumulate(builder, source, row_of, n0, present, is_last):
    """The C tiles of a column slice += source's A rows @ its W's slice, over its K."""
    module = builder.module
    load = declare(module, "llvm.x86.tileloadd64", ir.VoidType(), [_i8, _ptr, _i64])
    dot = declare(module, "llvm.x86.tdpbf16ps", ir.VoidType(), [_i8, _i8, _i8])
    slice_base = builder.mul(builder.udiv(n0, _const(TILE_ROWS)), source.w_slice_bytes)
    with cgutils.for_range(builder, builder.udiv(source.k, _const(K_STEP))) as step:
        a_col = builder.mul(step.index, _const(K_STEP * 2))  # bytes into A's rows
        w_at = builder.add(slice_base, builder.mul(step.index, _const(TILE_ROWS * TILE_BYTES)))
        builder.call(load, [_tile(W_SLICE), builder.gep(source.w, [w_at]), _const(TILE_BYTES)])
        for i, tile in enumerate(C_TILES):
            with builder.if_then(present[i]):
                a_at = builder.gep(source.a, [builder.add(builder.mul(row_of[i], source.lda), a_col)])
                with builder.if_else(is_last[i]) as (last, full):
                    with last:
                        builder.call(load, [_tile(A_LAST), a_at, source.lda])
                        builder.call(dot, [_tile(tile), _tile(A_LAST), _tile(W_SLICE)])
                    with full:
                        a_tile = A_FULL[i % 2]
                        builder.call(load, [_tile(a_tile), a_at, source.lda])
                        builder.call(dot, [_tile(tile), _tile(a_tile), _tile(W_SLICE)])


# ---------------------------------------------------------------- a batch of one (generation)
# Generation multiplies one row by each weight matrix per character. A tdpbf16ps on a one-row
# A tile computes 16 outputs over 32 of K, and at one row the product is bound by loading W's
# tiles (one per tdpbf16ps), not by the instruction: sooner than vdpbf16ps (bf16_dot), which
# is bound by its issue rate (bench/README). The row's bfloat16 copy is made in the helper,
# into A tiles loaded once per ROW_A_TILES steps of K and kept while every column slice's W
# tiles stream past them; C is one row tile per column slice. Loading the configuration and
# releasing the tiles cost about as much as a small product: generation configures them once
# per call (configure_rows ... release) and runs row_product_configured in between.
ROW_A_TILES = 6  # tmm0-5: A's steps of K held at once
ROW_W, ROW_C = 6, 7
_ROW_HELPER = "phi_rnn.amx.row_product"


@njit(cache=True, error_model="numpy")
def row_product(a, tiles, beta, c):
    """c (1, N) = a (1, K) @ W + beta * c, beta 0 or 1 (0: c is not read): a float32,
    rounded to bfloat16 here; W given as its tiles (tile_into, contiguous, 64-byte aligned
    for speed); c float32; K a multiple of 32, N of 16, a's and c's rows contiguous. Only
    where available() and bf16_dot.available() (the rounding is vcvtneps2bf16)."""
    configure_rows()
    row_product_configured(a, tiles, beta, c)
    release()


@njit(cache=True, error_model="numpy")
def row_product_configured(a, tiles, beta, c):
    """row_product between configure_rows() and release(), both left to the caller."""
    if c.shape[0] != 1 or a.shape[0] != 1 or tiles.shape[0] * TILE_ROWS != c.shape[1] \
            or tiles.shape[1] * K_STEP != a.shape[1]:
        raise ValueError("row_product: shapes do not match (one row; tiles must be tiles_shape(K, N))")
    if a.strides[1] != 4 or c.strides[1] != 4 or not tiles.flags.c_contiguous:
        raise ValueError("row_product: a's and c's rows and the tiles must be contiguous")
    if beta != 0 and beta != 1:
        raise ValueError("row_product: beta must be 0 or 1")
    _row_product(a, tiles, c, beta != 0)


@intrinsic
def configure_rows(typingctx):
    """Load row_product_configured's tile configuration (palette 1: A's tiles and C's one row
    of 64 bytes, W's 16 rows)."""
    def codegen(context, builder, signature, args):
        config = cgutils.alloca_once(builder, _config_type)
        config.align = 64
        builder.store(ir.Constant(_config_type, None), config)
        base = builder.bitcast(config, _ptr)
        builder.store(_tile(1), base)
        for tile in range(8):
            colsb = builder.bitcast(builder.gep(base, [_const(16 + 2 * tile)]), _i16.as_pointer())
            builder.store(ir.Constant(_i16, TILE_BYTES), colsb)
            builder.store(_tile(TILE_ROWS if tile == ROW_W else 1), builder.gep(base, [_const(48 + tile)]))
        builder.call(declare(builder.module, "llvm.x86.ldtilecfg", ir.VoidType(), [_ptr]), [base])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def release(typingctx):
    """Return the tiles to their initial state (tilerelease)."""
    def codegen(context, builder, signature, args):
        builder.call(declare(builder.module, "llvm.x86.tilerelease", ir.VoidType(), []), [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _row_product(typingctx, a, tiles, c, accumulate):
    sig = types.void(a, tiles, c, accumulate)

    def codegen(context, builder, signature, args):
        a_arr, w_arr, c_arr = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:3], args[:3])]
        helper = _define_row_helper(builder.module)
        builder.call(helper, [builder.bitcast(a_arr.data, _ptr), builder.extract_value(a_arr.shape, 1),
                              builder.bitcast(w_arr.data, _ptr), builder.bitcast(c_arr.data, _ptr),
                              builder.extract_value(c_arr.shape, 1), args[3]])
        return context.get_dummy_value()
    return sig, codegen


def _define_row_helper(module):
    """void helper(i8* x, i64 K, i8* tiles, i8* c, i64 N, i1 accumulate), defined once per
    module; the tiles configured by configure_rows."""
    fn = declare(module, _ROW_HELPER, ir.VoidType(), [_ptr, _i64, _ptr, _ptr, _i64, _i1])
    if not fn.is_declaration:
        return fn
    fn.linkage = "internal"
    x, k, w, c, n, accumulate = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    load = declare(module, "llvm.x86.tileloadd64", ir.VoidType(), [_i8, _ptr, _i64])
    store = declare(module, "llvm.x86.tilestored64", ir.VoidType(), [_i8, _ptr, _i64])
    zero = declare(module, "llvm.x86.tilezero", ir.VoidType(), [_i8])
    dot = declare(module, "llvm.x86.tdpbf16ps", ir.VoidType(), [_i8, _i8, _i8])
    # x in bfloat16 on the stack, 64-byte aligned: one A tile row (32 values) per step of K
    steps = builder.udiv(k, _const(K_STEP))
    rounded = builder.alloca(ir.VectorType(_i16, TILE_ROWS), size=builder.mul(steps, _const(2)), name="x_bf16")
    rounded.align = 64
    emit_rounding(builder, x, k, builder.mul(steps, _const(2)), rounded)
    a_rows = builder.bitcast(rounded, _ptr)
    slice_bytes = builder.mul(steps, _const(TILE_ROWS * TILE_BYTES))
    held = builder.udiv(builder.add(steps, _const(ROW_A_TILES - 1)), _const(ROW_A_TILES))
    with cgutils.for_range(builder, held) as part:
        s0 = builder.mul(part.index, _const(ROW_A_TILES))
        count = builder.sub(steps, s0)  # A tiles this part holds: up to ROW_A_TILES
        present = [builder.icmp_unsigned("<", _const(i), count) for i in range(ROW_A_TILES)]
        for i in range(ROW_A_TILES):
            with builder.if_then(present[i]):
                at = builder.gep(a_rows, [builder.mul(builder.add(s0, _const(i)), _const(TILE_BYTES))])
                builder.call(load, [_tile(i), at, _const(TILE_BYTES)])
        read_c = builder.or_(accumulate, builder.icmp_unsigned("!=", part.index, _const(0)))
        with cgutils.for_range(builder, builder.udiv(n, _const(TILE_ROWS))) as column:
            c_at = builder.gep(c, [builder.mul(column.index, _const(TILE_BYTES))])
            with builder.if_else(read_c) as (then, otherwise):
                with then:
                    builder.call(load, [_tile(ROW_C), c_at, _const(TILE_BYTES)])
                with otherwise:
                    builder.call(zero, [_tile(ROW_C)])
            w_at = builder.add(builder.mul(column.index, slice_bytes), builder.mul(s0, _const(TILE_ROWS * TILE_BYTES)))
            for i in range(ROW_A_TILES):
                with builder.if_then(present[i]):
                    at = builder.gep(w, [builder.add(w_at, _const(i * TILE_ROWS * TILE_BYTES))])
                    builder.call(load, [_tile(ROW_W), at, _const(TILE_BYTES)])
                    builder.call(dot, [_tile(ROW_C), _tile(i), _tile(ROW_W)])
            builder.call(store, [_tile(ROW_C), c_at, _const(TILE_BYTES)])
    builder.ret_void()
    return fn
