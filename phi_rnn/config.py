"""Every option of `train` and `sample` in one place: char-rnn's flags and defaults
(train.lua / sample.lua; `--rnn_size` and `--rnn-size` alike) plus phi_rnn's own, the
allowed range of each (one table, also checked on every checkpoint's options) and which
flags the command line gave."""
import argparse
import math
import re

from phi_rnn.cells import MODELS
from phi_rnn.errors import UsageError

MAX_SIZE = {"rnn_size": 1 << 15, "num_layers": 64, "seq_length": 1 << 16, "batch_size": 1 << 16}
STRATEGIES = ("batch", "gemm")
PRECISIONS = ("fp32", "bf16")
ENCODINGS = ("utf-8", "bytes")
MAX_SEED = 2**64 - 1
MAX_EPOCHS = 1e9
MIN_TEMPERATURE = 1e-30  # its inverse must stay finite in float32
# options that define the model and its training math: a checkpoint's, kept on --resume
RUN_OPTIONS = ("model", "rnn_size", "num_layers", "learning_rate", "learning_rate_decay",
               "learning_rate_decay_after", "decay_rate", "dropout", "seq_length", "batch_size",
               "grad_clip", "train_frac", "val_frac", "seed", "encoding", "lr_warmup", "lr_scaling")
# run options a checkpoint may lack: it then trained with these values (char-rnn's schedule)
RUN_OPTION_DEFAULTS = {"lr_warmup": 0, "lr_scaling": "none"}
LR_SCALINGS = ("none", "linear", "sqrt")
REFERENCE_BATCH = 50  # char-rnn's batch_size: --learning_rate is the rate for it under --lr_scaling
ARCH_OPTIONS = ("model", "rnn_size", "num_layers")  # a checkpoint's, kept on --init_from
GIVEN = "given_flags"  # namespace attribute: the options given on the command line


class _Store(argparse.Action):
    """argparse's plain store, which also records that the flag was given: a value given on
    purpose counts even when it equals the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN, getattr(namespace, GIVEN, frozenset()) | {self.dest})


def given_flags(namespace):
    """Removes and returns the set of options the command line gave."""
    return set(vars(namespace).pop(GIVEN, ()))


def _add(parser, name, **kw):
    """Add --name with its dashed twin (--rnn_size / --rnn-size)."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*flags, dest=name, action=_Store, **kw)


def add_train_arguments(p):
    g = p.add_argument_group("data")
    _add(g, "data_dir", default="data/tinyshakespeare", help="directory holding input.txt")
    _add(g, "encoding", default="utf-8", choices=ENCODINGS,
         help="symbols are Unicode code points (utf-8) or bytes (char-rnn's exact behaviour)")
    g = p.add_argument_group("model")
    _add(g, "rnn_size", type=int, default=128, help="size of the RNN's internal state")
    _add(g, "num_layers", type=int, default=2, help="number of layers")
    _add(g, "model", default="lstm", choices=MODELS, help="cell type")
    g = p.add_argument_group("optimization")
    _add(g, "learning_rate", type=float, default=2e-3)
    _add(g, "learning_rate_decay", type=float, default=0.97)
    _add(g, "learning_rate_decay_after", type=float, default=10, help="epoch after which to decay")
    _add(g, "decay_rate", type=float, default=0.95, help="RMSprop decay")
    _add(g, "dropout", type=float, default=0.0, help="dropout on layer inputs above the first and before the decoder")
    _add(g, "seq_length", type=int, default=50, help="timesteps to unroll")
    _add(g, "batch_size", type=int, default=50)
    _add(g, "lr_warmup", type=int, default=0, metavar="N",
         help="raise the learning rate linearly over the first N iterations: iteration i <= N uses "
              "rate * i / N (rate / N at iteration 1, the full rate at N), then char-rnn's schedule; "
              "0 = off (char-rnn). Kept on --resume")
    _add(g, "lr_scaling", default="none", choices=LR_SCALINGS,
         help=f"scale --learning_rate, the rate for char-rnn's batch of {REFERENCE_BATCH}, to --batch_size: "
              f"linear = rate * batch_size / {REFERENCE_BATCH}, sqrt = rate * sqrt(batch_size / "
              f"{REFERENCE_BATCH}); none = as given (char-rnn). Kept on --resume")
    _add(g, "max_epochs", type=float, default=50)
    _add(g, "max_iters", type=int, default=None, help="stop after this many iterations (phi_rnn)")
    _add(g, "grad_clip", type=float, default=5, help="clamp gradients elementwise to [-clip, clip]")
    _add(g, "train_frac", type=float, default=0.95)
    _add(g, "val_frac", type=float, default=0.05)
    _add(g, "init_from", default="", help="initialize weights (and architecture) from a checkpoint")
    _add(g, "resume", default="", help="continue a run exactly from a checkpoint, or `latest`")
    _add(g, "seed", type=int, default=123)
    g = p.add_argument_group("bookkeeping")
    _add(g, "print_every", type=int, default=1)
    _add(g, "eval_val_every", type=int, default=1000)
    _add(g, "val_max_batches", type=int, default=None,
         help="evaluate only the first N validation batches, the same ones each time (default: all)")
    _add(g, "checkpoint_dir", default="cv")
    _add(g, "savefile", default="lstm")
    _add(g, "keep", type=int, default=0, help="keep the last K checkpoints and the best (0 = all)")
    _add(g, "patience", type=int, default=0,
         help="stop after this many evaluations without a lower validation loss (0 = never, as char-rnn)")
    _add(g, "target_val_loss", type=float, default=None, metavar="X",
         help="stop at the first evaluation whose validation loss is at or below X, with its checkpoint, "
              "and record the iterations, epochs, training and wall seconds it took (the checkpoint's "
              "meta `target_reached`); seconds add up across --resume. On --resume this command's value "
              "counts, not the checkpoint's")
    g = p.add_argument_group("speed")
    _add(g, "strategy", default="batch", choices=STRATEGIES,
         help="batch: threads split the batch; gemm: MKL-threaded GEMM per step")
    _add_precision(g)


def _add_precision(g):
    _add(g, "precision", default="fp32", choices=PRECISIONS,
         help="fp32: float32 throughout; bf16: mixed precision, the GEMMs' operands in bfloat16 with float32 "
              "accumulation, weights, gradients and cell arithmetic (needs a CPU with avx512_bf16 or "
              "amx_bf16); checkpoints are float32 either way")


def add_sample_arguments(p):
    p.add_argument("checkpoint", help="checkpoint .npz, or `latest` / `best` (in cv/)")
    _add(p, "length", type=int, default=2000, help="characters to sample")
    _add(p, "temperature", type=float, default=1.0)
    _add(p, "primetext", default="", help="text to prime the state with (echoed)")
    _add(p, "sample", type=int, default=1, choices=(0, 1), help="1 = sample, 0 = argmax")
    _add(p, "seed", type=int, default=123)
    _add(p, "out", default=None, help="write the text to this file (atomically) instead of stdout")
    _add_precision(p)


def _int(low, high=None, text=None):
    def problem(value):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {value!r}"
        if value < low:
            return f"{text or ('must be positive' if low == 1 else f'must be at least {low}')}, got {value}"
        if high is not None and value > high:
            return f"{value} is absurd (limit {high})" if text is None else f"{text}, got {value}"
        return None
    return problem


def _float(low, high, low_open=False, high_open=False, text=None):
    """A finite number in the interval; nan and inf never are."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    text = text or f"must be in {interval}"

    def problem(value):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"must be a number, got {value!r}"
        fine = (math.isfinite(value) and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high))
        return None if fine else f"{text}, got {value}"
    return problem


def _choice(choices):
    def problem(value):
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"
    return problem


POSITIVE = _float(0, math.inf, low_open=True, high_open=True, text="must be positive and finite")
SEED = _int(0, MAX_SEED, text=f"must be in [0, {MAX_SEED}]")
# name: problem(value) -> None, or what is wrong with it
TRAIN_RANGES = {
    **{name: _int(1, limit) for name, limit in MAX_SIZE.items()},
    "model": _choice(MODELS),
    "encoding": _choice(ENCODINGS),
    "learning_rate": POSITIVE,
    "learning_rate_decay": _float(0, 1, low_open=True),
    "learning_rate_decay_after": _float(0, math.inf, high_open=True, text="must be finite and at least 0"),
    "decay_rate": _float(0, 1, high_open=True),
    "dropout": _float(0, 1, high_open=True),
    "grad_clip": POSITIVE,
    "train_frac": _float(0, 1, low_open=True),
    "val_frac": _float(0, 1, high_open=True),
    "max_epochs": _float(0, MAX_EPOCHS, low_open=True, text=f"must be positive and at most {MAX_EPOCHS:g}"),
    "max_iters": lambda v: None if v is None else _int(1)(v),
    "seed": SEED,
    "print_every": _int(1, text="must be at least 1"),
    "eval_val_every": _int(1, text="must be at least 1"),
    "val_max_batches": lambda v: None if v is None else _int(1)(v),
    "keep": _int(0, text="must be 0 (keep all) or positive"),
    "patience": _int(0, text="must be 0 (off) or positive"),
    "target_val_loss": lambda v: None if v is None else POSITIVE(v),
    "lr_warmup": _int(0, text="must be 0 (off) or positive"),
    "lr_scaling": _choice(LR_SCALINGS),
    "strategy": _choice(STRATEGIES),
    "precision": _choice(PRECISIONS),
}
SAMPLE_RANGES = {
    "length": _int(1),
    "temperature": _float(MIN_TEMPERATURE, math.inf, high_open=True,
                          text=f"must be positive (at least {MIN_TEMPERATURE:g}) and finite"),
    "seed": SEED,
    "precision": _choice(PRECISIONS),
}
# a savefile becomes part of file names: lm_<savefile>_epoch<e>_<loss>.npz
SAVEFILE = re.compile(r"[\w+-][\w.+-]*")
MAX_SAVEFILE_BYTES = 200


def option_problem(name, value, ranges=TRAIN_RANGES):
    """None when `value` is allowed for option `name`, else what is wrong (a phrase)."""
    return ranges[name](value)


def _check(condition, message):
    if not condition:
        raise UsageError(message)


def _check_ranges(o, ranges):
    for name in ranges:
        problem = option_problem(name, getattr(o, name), ranges)
        _check(problem is None, f"--{name} {problem}")


def validate_train(o):
    _check_ranges(o, TRAIN_RANGES)
    _check(o.train_frac + o.val_frac <= 1 + 1e-9,
           f"--train_frac {o.train_frac} + --val_frac {o.val_frac} exceed 1")
    _check(SAVEFILE.fullmatch(o.savefile) is not None and len(o.savefile.encode()) <= MAX_SAVEFILE_BYTES,
           f"--savefile {o.savefile!r} must be a name for files: letters, digits, _ + - . (not first), "
           f"at most {MAX_SAVEFILE_BYTES} bytes; no /, spaces or control characters")
    _check(not (o.init_from and o.resume), "give --init_from or --resume, not both")


def validate_sample(o):
    _check_ranges(o, SAMPLE_RANGES)
