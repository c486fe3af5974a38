"""The LSTM cell of a batch of one (text generation) in 512-bit vectors.

Generation runs every layer's cell once per character on one row of H units: five
sigmoid/tanh per unit, a fifth of a character's time at 2 x 128. numba's loop vectoriser
uses 256-bit vectors on the CPUs LLVM tunes to prefer them (Intel's since Skylake-SP), and
numba offers no way to ask otherwise for one function; this module emits the cell as LLVM IR
on 16-lane vectors, as bf16_dot emits its product, and the cell takes about two thirds of
the time (bench/README).

The arithmetic is kernels.lstm_cell_forward's: exp(x) = 2^n * e^r from the same clamped
range, split ln 2 and degree-6 polynomial (kernels' constants), sigmoid(x) = 1 / (1 +
exp(-x)), tanh(x) = 2 / (1 + exp(-2x)) - 1 with true divisions, the products contracted
into fused multiply-adds as kernels' 'contract' flag lets LLVM do. Only the state is
written: c = f * c_prev + i * g and h = o * tanh(c), in place if asked (each unit is read
before it is written); generation reads no activation back.
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from phi_rnn.bf16_dot import LANES, declare, lanes_below, masked_load, masked_store, pointer_at

_i32, _i64, _f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
_v16f32, _v16i32 = ir.VectorType(_f32, LANES), ir.VectorType(_i32, LANES)
_ptr = ir.IntType(8).as_pointer()
_HELPER = "phi_rnn.row_cell.lstm"


@njit(cache=True, error_model="numpy")
def lstm_row_cell(gates, bias, c_prev, c, h):
    """One row's LSTM cell: gates (1, 4H) pre-activations without bias, i f o g; bias (4H);
    c_prev (1, H) in; c, h (1, H) out (c may be c_prev itself). gates are not written."""
    H = c.shape[1]
    if gates.shape[0] != 1 or gates.shape[1] != 4 * H or bias.shape[0] != 4 * H \
            or c_prev.shape != c.shape or h.shape != c.shape or c.shape[0] != 1:
        raise ValueError("lstm_row_cell: shapes do not match (one row of H units, 4H gates)")
    if gates.strides[1] != 4 or bias.strides[0] != 4 or c_prev.strides[1] != 4 or c.strides[1] != 4 \
            or h.strides[1] != 4:
        raise ValueError("lstm_row_cell: the rows must be contiguous")
    _lstm(gates, bias, c_prev, c, h)


@intrinsic
def _lstm(typingctx, gates, bias, c_prev, c, h):
    sig = types.void(gates, bias, c_prev, c, h)

    def codegen(context, builder, signature, args):
        arrays = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args, args)]
        helper = _define_helper(builder.module)
        h_units = builder.extract_value(arrays[3].shape, 1)
        builder.call(helper, [builder.bitcast(a.data, _ptr) for a in arrays] + [h_units])
        return context.get_dummy_value()
    return sig, codegen


def _define_helper(module):
    """void helper(i8* gates, i8* bias, i8* c_prev, i8* c, i8* h, i64 H), once per module:
    full vectors of 16 units, then one masked vector for the rest."""
    fn = declare(module, _HELPER, ir.VoidType(), [_ptr] * 5 + [_i64])
    if not fn.is_declaration:
        return fn
    fn.linkage = "internal"
    *pointers, units = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    math = _VectorMath(builder)
    full = builder.udiv(units, ir.Constant(_i64, LANES))
    with cgutils.for_range(builder, full) as loop:
        _cell(builder, math, pointers, units, builder.mul(loop.index, ir.Constant(_i64, LANES)), None)
    rest = builder.urem(units, ir.Constant(_i64, LANES))
    with builder.if_then(builder.icmp_unsigned(">", rest, ir.Constant(_i64, 0))):
        _cell(builder, math, pointers, units, builder.mul(full, ir.Constant(_i64, LANES)), lanes_below(builder, rest))
    builder.ret_void()
    return fn


def _cell(builder, math, pointers, units, first, mask):
    """Units first .. first + 15 (those `mask` leaves on)."""
    gates, bias, c_prev, c, h = pointers
    unit_bytes = builder.shl(first, ir.Constant(_i64, 2))
    gate_bytes = builder.shl(units, ir.Constant(_i64, 2))

    def load(base, offset):
        p = pointer_at(builder, base, offset, _v16f32)
        return builder.load(p, align=4) if mask is None else masked_load(builder, p, _v16f32, mask)

    def store(value, base):
        p = pointer_at(builder, base, unit_bytes, _v16f32)
        if mask is None:
            builder.store(value, p, align=4)
        else:
            masked_store(builder, value, p, mask)

    pre = []
    for block in range(4):  # i, f, o, g
        offset = builder.add(unit_bytes, builder.mul(gate_bytes, ir.Constant(_i64, block)))
        pre.append(builder.fadd(load(gates, offset), load(bias, offset)))
    i, f, o = (math.sigmoid(x) for x in pre[:3])
    g = math.tanh(pre[3])
    c_new = math.fma(f, load(c_prev, unit_bytes), builder.fmul(i, g))
    store(c_new, c)
    store(builder.fmul(o, math.tanh(c_new)), h)


class _VectorMath:
    """kernels' exp, sigmoid and tanh on <16 x float>."""

    def __init__(self, builder):
        from phi_rnn import kernels  # at compile time: kernels imports this module
        self.k = kernels
        self.b = builder
        module = builder.module
        self._fma = declare(module, "llvm.fma.v16f32", _v16f32, [_v16f32] * 3)
        self._floor = declare(module, "llvm.floor.v16f32", _v16f32, [_v16f32])
        self._min = declare(module, "llvm.minnum.v16f32", _v16f32, [_v16f32] * 2)
        self._max = declare(module, "llvm.maxnum.v16f32", _v16f32, [_v16f32] * 2)

    @staticmethod
    def const(value):
        return ir.Constant(_v16f32, [float(value)] * LANES)

    def fma(self, a, b, c):
        return self.b.call(self._fma, [a, b, c])

    def exp(self, x):
        b, k, K = self.b, self.const, self.k
        x = b.call(self._min, [b.call(self._max, [x, k(K._EXP_LO)]), k(K._EXP_HI)])
        n = b.call(self._floor, [self.fma(x, k(K._LOG2E), k(K._HALF))])
        r = self.fma(n, k(-K._LN2_LO), self.fma(n, k(-K._LN2_HI), x))
        p = k(K._P6)
        for coefficient in (K._P5, K._P4, K._P3, K._P2, K._P1, K._P0):
            p = self.fma(r, p, k(coefficient))
        exponent = b.shl(b.add(b.fptosi(n, _v16i32), ir.Constant(_v16i32, [127] * LANES)),
                         ir.Constant(_v16i32, [23] * LANES))
        return b.fmul(p, b.bitcast(exponent, _v16f32))

    def sigmoid(self, x):
        b, one = self.b, self.const(1.0)
        return b.fdiv(one, b.fadd(one, self.exp(b.fneg(x))))

    def tanh(self, x):
        b, one, two = self.b, self.const(1.0), self.const(2.0)
        return b.fsub(b.fdiv(two, b.fadd(one, self.exp(b.fmul(self.const(-2.0), x)))), one)
