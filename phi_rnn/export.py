"""`export`: a checkpoint's model for other runtimes.

ONNX (`--to onnx`): the layer stack as ONNX's own LSTM / GRU / RNN operators, so any ONNX
runtime runs it. Inputs `tokens` (seq, batch) int64 vocabulary indices and the carried state
`h0` (and `c0` for an LSTM), (num_layers, batch, rnn_size) float32; outputs `log_probs`
(seq, batch, vocab) — the next character's log-probabilities after each input — and the
state `h` (and `c`) to feed back. One step at a time (seq = 1) generates; zeros start a
text. The vocabulary travels in the model's metadata (`vocab`, JSON, as in the checkpoint).

PyTorch (`--to torch`): a file for torch.load holding a state_dict for `rnn` = nn.LSTM /
nn.RNN (one-hot input of size vocab) and `decoder` = nn.Linear, with the model's sizes and
vocabulary. char-rnn's GRU applies the reset gate before the candidate's product and
nn.GRU after it, so no nn.GRU holds it: a GRU exports to ONNX only.

Gate blocks: char-rnn's LSTM is i, f, o, g; ONNX's i, o, f, c; PyTorch's i, f, g, o.
char-rnn's GRU, h' = z*c + (1-z)*h, is ONNX's with z' = 1 - z = sigmoid(-pre-activation):
the z rows of the weights and biases change sign; its reset gate before the product is
ONNX's linear_before_reset = 0. The i2h and h2h biases stay separate (ONNX Wb / Rb,
PyTorch bias_ih / bias_hh)."""
import io
import json
import os

import numpy as np

from phi_rnn import checkpoint, files
from phi_rnn.errors import UsageError

FORMATS = ("onnx", "torch")
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # the IR of opset 17: readable by runtimes older than this onnx package
# (order of char-rnn's gate blocks, sign of each) per target's gate order
ONNX_GATES = {"lstm": ((0, 2, 1, 3), (1, 1, 1, 1)), "gru": ((0, 1, 2), (-1, 1, 1)), "rnn": ((0,), (1,))}
ONNX_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
TORCH_GATES = {"lstm": (0, 1, 3, 2), "rnn": (0,)}
TORCH_MODULES = {"lstm": "nn.LSTM", "rnn": "nn.RNN"}


def _blocks(array, order, signs=None):
    """The gate blocks of a (G, ...) or (G,) array, reordered (and signed)."""
    parts = np.split(np.asarray(array, np.float32), len(order))
    signs = signs or (1,) * len(order)
    return np.concatenate([signs[k] * parts[b] for k, b in enumerate(order)])


def _sizes(ck):
    return ck.meta["model"], len(ck.vocab), int(ck.meta["rnn_size"]), int(ck.meta["num_layers"])


def onnx_model(ck):
    """The ONNX ModelProto of checkpoint `ck` (see the module's docstring)."""
    from onnx import TensorProto, checker, helper, numpy_helper

    model, V, H, L = _sizes(ck)
    p = ck.params
    order, signs = ONNX_GATES[model]
    nodes, weights = [], []

    def constant(name, array):
        weights.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op, inputs, outputs, **attributes):
        nodes.append(helper.make_node(op, inputs, outputs, **attributes))

    # one-hot input: OneHot instead of a (V, V) identity, so a large vocabulary stays small
    node("OneHot", ["tokens", constant("vocab_size", np.array([V], np.int64)),
                    constant("off_on", np.array([0.0, 1.0], np.float32))], ["x0"], axis=-1)
    carried = ["h", "c"] if model == "lstm" else ["h"]
    for layer in range(L):
        w = f"layers.{layer}"
        gate_w = constant(f"{w}.W", _blocks(p[f"{w}.w_ih"], order, signs)[None])
        gate_r = constant(f"{w}.R", _blocks(p[f"{w}.w_hh"], order, signs)[None])
        gate_b = constant(f"{w}.B", np.concatenate([_blocks(p[f"{w}.b_ih"], order, signs),
                                                    _blocks(p[f"{w}.b_hh"], order, signs)])[None])
        index = constant(f"{w}.index", np.array([layer], np.int64))
        for s in carried:
            node("Gather", [f"{s}0", index], [f"{w}.{s}0"], axis=0)  # (1, batch, H)
        extra = {"linear_before_reset": 0} if model == "gru" else {}
        node(ONNX_OPS[model], [f"x{layer}", gate_w, gate_r, gate_b, "", *[f"{w}.{s}0" for s in carried]],
             [f"{w}.y", *[f"{w}.{s}" for s in carried]], hidden_size=H, **extra)
        node("Squeeze", [f"{w}.y", constant(f"{w}.direction_axis", np.array([1], np.int64))], [f"x{layer + 1}"])
    for s in carried:
        node("Concat", [f"layers.{layer}.{s}" for layer in range(L)], [s], axis=0)
    node("MatMul", [f"x{L}", constant("decoder.weight_t", p["decoder.weight"].T)], ["decoder.product"])
    node("Add", ["decoder.product", constant("decoder.bias", p["decoder.bias"])], ["logits"])
    node("LogSoftmax", ["logits"], ["log_probs"], axis=-1)

    state_type = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [L, "batch", H])
    graph = helper.make_graph(
        nodes, f"phi_rnn_{model}",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["seq", "batch"]),
         *[state_type(f"{s}0") for s in carried]],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["seq", "batch", V]),
         *[state_type(s) for s in carried]],
        weights)
    proto = helper.make_model(graph, producer_name="phi_rnn",
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    proto.ir_version = ONNX_IR_VERSION
    helper.set_model_props(proto, {"vocab": json.dumps(ck.vocab), "encoding": ck.meta.get("encoding", "utf-8"),
                                   "model": model, "source": os.path.basename(ck.path)})
    checker.check_model(proto)
    return proto


def torch_checkpoint(ck):
    """{model, sizes, vocab, encoding, state_dict} for torch.save; state_dict keys `rnn.*`
    (nn.LSTM / nn.RNN, batch_first=False) and `decoder.*` (nn.Linear)."""
    import torch

    model, V, H, L = _sizes(ck)
    p = ck.params
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))
    state = {}
    for layer in range(L):
        w, order = f"layers.{layer}", TORCH_GATES[model]
        state[f"rnn.weight_ih_l{layer}"] = tensor(_blocks(p[f"{w}.w_ih"], order))
        state[f"rnn.weight_hh_l{layer}"] = tensor(_blocks(p[f"{w}.w_hh"], order))
        state[f"rnn.bias_ih_l{layer}"] = tensor(_blocks(p[f"{w}.b_ih"], order))
        state[f"rnn.bias_hh_l{layer}"] = tensor(_blocks(p[f"{w}.b_hh"], order))
    state["decoder.weight"] = tensor(p["decoder.weight"])
    state["decoder.bias"] = tensor(p["decoder.bias"])
    return {"model": model, "module": TORCH_MODULES[model], "input_size": V, "hidden_size": H, "num_layers": L,
            "vocab": list(ck.vocab), "encoding": ck.meta.get("encoding", "utf-8"), "state_dict": state}


def _serialize(ck, to):
    if to == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UsageError("export --to onnx needs the onnx package: pip install 'phi_rnn[onnx]'") from None
        return onnx_model(ck).SerializeToString()
    if ck.meta["model"] not in TORCH_GATES:
        raise UsageError(f"checkpoint {ck.path} holds a GRU: char-rnn's GRU applies the reset gate "
                         f"before the candidate's product, torch.nn.GRU after it; export it --to onnx")
    try:
        import torch
    except ImportError:
        raise UsageError("export --to torch needs PyTorch: pip install torch") from None
    buffer = io.BytesIO()
    torch.save(torch_checkpoint(ck), buffer)
    return buffer.getvalue()


def export(source, to, out):
    """Write checkpoint `source` (a path, `latest`, `best` or a directory) as `to` into `out`,
    atomically. Bad input is a UsageError; `out` is then untouched."""
    if to not in FORMATS:
        raise UsageError(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    if os.path.isdir(out):
        raise UsageError(f"output {out} is a directory")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UsageError(f"output directory {directory} " + ("is not a directory" if os.path.exists(directory)
                                                              else "does not exist"))
    ck = checkpoint.load(source)  # validated whole: shapes, NaN/inf weights, meta
    payload = _serialize(ck, to)
    try:
        files.atomic_write(out, lambda f: f.write(payload))
    except OSError as e:
        raise UsageError(f"cannot write {out} ({e.strerror})") from None
    return ck


def export_command(args, log=print):
    ck = export(args.checkpoint, args.to, args.out)
    model, V, H, L = _sizes(ck)
    log(f"exported {ck.path} ({model}, {L} x {H}, vocabulary {V}) to {args.out} ({args.to})")
    return 0
