"""The scaling study's points: what one measurement is, and the fixed order of all of them.

A point is one combination of the study's dimensions. Points are enumerated in a fixed order,
the last dimension fastest, so `--point K` names the same point in every job of a job array.
A new dimension is a field of Point with a default (old point files keep loading, old keys
stay), an entry of DIMENSIONS, and a list of values from cli.py's options.

Precision: fp32, or bf16 (speed.py --precision bf16: bfloat16 GEMM operands, float32
accumulation); a bf16 point's key ends its series fields with "-bf16", an fp32 point's key is
what it was before the dimension existed. A bf16 point runs one process (mpi_speed.py has no
bfloat16), and on a CPU without native bfloat16 it is left out when the study runs (run.py),
never renumbered: --point K names the same point on every machine.

MPI ranks: a point of R > 1 ranks runs `mpiexec -n R` with T threads per rank (bench/mpi_speed.py
--scale-point), the global batch split over the ranks as training splits it; strong scaling
keeps the global batch, weak scaling gives every rank's every thread the config's batch.
"""
import itertools
import os
import re
from dataclasses import dataclass

from phi_rnn.affinity import read_topology

# name: (num_layers, rnn_size, batch_size, seq_length)
PRESETS = {
    "char-rnn": (2, 128, 50, 50),
    "2x512": (2, 512, 50, 50),
    "3x512": (3, 512, 50, 50),
    "3x512-b128": (3, 512, 128, 100),
    "tiny": (1, 16, 4, 8),  # seconds-long points for tests and smoke runs
}
CUSTOM_CONFIG = re.compile(r"^(\d+)x(\d+)(?:-b(\d+))?(?:-s(\d+))?$")
MODELS = ("lstm", "gru", "rnn")
STRATEGIES = ("batch", "gemm")
POLICIES = ("compact", "scatter", "balanced", "none")
BLAS = ("libxsmm", "onednn", "openblas", "mkl")  # "" (the default): what speed.py picks, the fastest here
SCALINGS = ("strong", "weak")
PRECISIONS = ("fp32", "bf16")
# slowest first; a point's key lists them in this order
DIMENSIONS = ("scaling", "config", "model", "strategy", "blas", "policy", "ranks", "precision", "threads")
# a series: the points that differ only in their thread count
SERIES_FIELDS = DIMENSIONS[:-1]


@dataclass(frozen=True)
class Config:
    name: str
    num_layers: int
    rnn_size: int
    batch_size: int
    seq_length: int


@dataclass(frozen=True)
class Point:
    index: int
    scaling: str
    config: str
    num_layers: int
    rnn_size: int
    base_batch: int
    seq_length: int
    vocab: int
    model: str
    strategy: str
    policy: str
    threads: int
    blas: str = ""
    ranks: int = 1
    precision: str = "fp32"

    @property
    def cores(self):
        return self.ranks * self.threads

    @property
    def batch_size(self):
        # weak scaling keeps the work per thread (of every rank) fixed
        return self.base_batch * self.cores if self.scaling == "weak" else self.base_batch

    @property
    def key(self):
        blas = f"-{self.blas}" if self.blas else ""
        ranks = f"-r{self.ranks:03d}" if self.ranks > 1 else ""
        precision = f"-{self.precision}" if self.precision != "fp32" else ""
        return (f"{self.scaling}-{self.config}-{self.model}-{self.strategy}{blas}-{self.policy}"
                f"{ranks}{precision}-t{self.threads:03d}")

    def command(self, iters, warmup):
        """(script in bench/, its arguments) that measure this point and print speed.py's JSON."""
        if self.ranks == 1:
            return "speed.py", self.speed_args(iters, warmup)
        return "mpi_speed.py", [
            "--scale-point", "--ranks", str(self.ranks), "--threads", str(self.threads),
            "--model", self.model, "--rnn_size", str(self.rnn_size), "--num_layers", str(self.num_layers),
            "--batch_size", str(self.batch_size), "--seq_length", str(self.seq_length),
            "--vocab", str(self.vocab), "--policy", self.policy, "--strategy", self.strategy,
            "--iters", str(iters), "--warmup", str(warmup)] + (["--blas", self.blas] if self.blas else [])

    def speed_args(self, iters, warmup):
        # a bf16 point measures no parts: they are float32's GEMMs, and the model that reads
        # them models float32 only
        parts = ["--parts"] if self.precision == "fp32" else ["--precision", self.precision]
        return ["--model", self.model, "--rnn_size", str(self.rnn_size),
                "--num_layers", str(self.num_layers), "--batch_size", str(self.batch_size),
                "--seq_length", str(self.seq_length), "--vocab", str(self.vocab),
                "--threads", str(self.threads), "--policy", self.policy,
                "--strategy", self.strategy, "--iters", str(iters), "--warmup", str(warmup),
                "--no-torch", "--json", "--profile", *parts] + (["--blas", self.blas] if self.blas else [])


# a row or model entry recorded before a dimension existed has its value then
FIELD_DEFAULTS = {"ranks": 1, "precision": "fp32"}
# fields a study's reports (results.csv/json/md) carry only when some point has another value
# than its default: a study of float32 points alone re-collects byte for byte as before
OPTIONAL_FIELDS = {"precision": "fp32"}


def series_of(row):
    return tuple(row.get(f, FIELD_DEFAULTS[f]) if f in FIELD_DEFAULTS else row[f] for f in SERIES_FIELDS)


def series_name(series):
    """A series' fields as words: '2 ranks' for the ranks, the others as they are."""
    return [f"{v} rank{'s' * (v != 1)}" if f == "ranks" else str(v) for f, v in zip(SERIES_FIELDS, series)]


def shown_fields(rows):
    """The series fields a study's reports show: SERIES_FIELDS, less the optional ones every
    row has at their default."""
    return tuple(f for f in SERIES_FIELDS
                 if f not in OPTIONAL_FIELDS or any(r.get(f, OPTIONAL_FIELDS[f]) != OPTIONAL_FIELDS[f] for r in rows))


def parse_config(token):
    """A preset name, or LAYERSxSIZE[-bBATCH][-sSEQ] (batch and seq default to 50)."""
    if token in PRESETS:
        return Config(token, *PRESETS[token])
    match = CUSTOM_CONFIG.match(token)
    if not match:
        raise ValueError(f"unknown config {token!r}: use one of {', '.join(PRESETS)} "
                         "or LAYERSxSIZE[-bBATCH][-sSEQ], e.g. 2x256-b32-s100")
    layers, size, batch, seq = (int(g) if g else 50 for g in match.groups())
    if min(layers, size, batch, seq) < 1:
        raise ValueError(f"config {token!r}: every size must be at least 1")
    return Config(token, layers, size, batch, seq)


def physical_cores():
    """Cores this process may run on: a PBS cpuset can be smaller than the node."""
    topology = read_topology(allowed=sorted(os.sched_getaffinity(0)))
    return len(topology.usable_cores())


def default_threads(cores):
    """1, 2, 4, ... up to the core count, plus the core count itself (68 on a Phi 7250)."""
    counts = [1 << i for i in range(cores.bit_length()) if 1 << i <= cores]
    return sorted(set(counts + [cores]))


def enumerate_points(axes, vocab):
    """Every combination of axes[d] for d in DIMENSIONS (config values are Configs), in a
    fixed order, the last dimension fastest."""
    points = []
    for values in itertools.product(*(axes[d] for d in DIMENSIONS)):
        v = dict(zip(DIMENSIONS, values))
        c = v.pop("config")
        points.append(Point(index=len(points), config=c.name, num_layers=c.num_layers,
                            rnn_size=c.rnn_size, base_batch=c.batch_size,
                            seq_length=c.seq_length, vocab=vocab, **v))
    return points
