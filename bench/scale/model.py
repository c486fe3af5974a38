"""A model of the time per training iteration built from measured parts, checked against every
measured point of a study and extrapolated to many-core counts (labelled as a model).

Batch strategy, p threads, batch B: n = min(p, B) blocks of at most b = ceil(B / n) rows, one
per thread; p - n threads idle.

    t(p) = R(b) (1 + (k(p) - 1) g) + Red(n, p) + Opt(p) + Rest(B) + N(p) c(p)

  R(b)      the block kernels (every layer's recurrence, the decoder; forward and backward) on
            b rows, measured on one core: the 1-thread point at batch b (the block series)
  k(p), g   contention: a block's GEMMs run by all n blocks' threads at once take k(p) times
            as long as run by one thread alone (parts.py, measured in the p-thread
            point's process); g is the GEMMs' share of R(b) there
  Red(n,p)  the per-block partial gradients summed: (n + 1) P floats streamed by p threads at
            the bandwidth one thread reached summing one part at 1 thread (2 P floats)
  Opt(p)    RMSprop over the P parameters (bandwidth-bound): its 1-thread time over p
  Rest(B)   serial: Python, the weight transposes, numpy (1-thread time outside the kernels;
            linear in B over the block series)
  N(p) c(p) parallel regions per iteration times the fork/join cost of one, measured at p
            threads by barrier.py (c(1) = 0: one thread takes the serial kernels)

Gemm strategy: one block, serial kernels, MKL-threaded GEMMs. With W the series' GEMMs on one
thread and S = t(1) - W the rest, both from its 1-thread point's process, G(p) the GEMMs
threaded by MKL in the p-thread point's process at its batch (parts.py; it holds MKL's
own fork/join per call), w = B(p) / B(1) the work (1 for strong scaling) and s(p) = w W / G(p)
their speedup: t(p) = w (S + W / s(p)) = w S + G(p). (The one-thread run inside the p-thread
process is not W: it shares the machine with p - 1 spinning OpenMP threads, which a
1-thread run does not.)

Beyond the thread counts measured: k(p) stays what it was at the largest (each core keeps the
share of cache and bandwidth it had there), s(p) follows Amdahl's law fitted through the
measured speedups, c(p) a + b log2(p) through the measured costs.

Hybrid (costed so as to decide on it; phi_rnn does not implement it, bench/README.md says
why): n blocks with teams of q threads (n q <= p) that split each per-step product of a block
by columns: R(ceil(B/n)) / q plus a team barrier per step and layer, forward and twice
backward (3 T L c(q)); the best n and q are taken (q = 1: batch).

The parts come from speed.py's profile (mean ms per kernel, scaled to the median), its
measured parts (speed.py --parts) and barrier.py's region cost; points without a
profile (older studies) get no model.

Other studies ask the model for an iteration's time with predict_iteration_seconds.
"""
import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .points import SERIES_FIELDS, series_of
from .run import REPO_ROOT

EXTRAPOLATE_TO = (16, 64, 68, 128)  # a 16-core node, Xeon Phi 7210 / 7250 cores, 2 x 64-core
VALIDATION_BAR = 0.15
# the study whose measured parts predict_iteration_seconds reads unless told another
MEASURED_STUDY = REPO_ROOT / "results" / "scale-amd-epyc-2c-avx512"


def regions_per_iteration(num_layers):
    """Parallel regions of one batch-strategy iteration: block kernels (forward and backward
    per layer, decoder forward and backward), reductions (decoder weight and bias; per layer
    w_hh, bias, w_ih) and the optimizer."""
    return (2 * num_layers + 2) + (3 * num_layers + 2) + 1


def profile_parts(row):
    """{block, reduce, optimizer, rest} ms of a measured row, from speed.py's profile (mean
    ms per iteration) scaled to the row's median; None without a profile."""
    profile, mean = row.get("profile"), row.get("mean_ms")
    if not profile or not mean:
        return None
    parts = {"block": 0.0, "reduce": 0.0, "optimizer": 0.0}
    for label, ms in profile.items():
        kind = "reduce" if "reduce" in label else "optimizer" if "rmsprop" in label else "block"
        parts[kind] += ms
    parts["rest"] = max(mean - sum(parts.values()), 0.0)
    scale = row["median_ms"] / mean
    return {k: v * scale for k, v in parts.items()}


@dataclass
class RegionCost:
    """c(p), the fork/join cost of one parallel region in ms: measured where measured, else
    a + b log2(p) through the measured counts above 1 (b alone through one)."""
    measured: dict  # threads -> ms

    def __call__(self, p):
        if p <= 1:
            return 0.0
        if p in self.measured:
            return self.measured[p]
        known = sorted(q for q in self.measured if q > 1)
        if not known:
            return 0.0
        if len(known) == 1:
            return self.measured[known[0]] * math.log2(p) / math.log2(known[0])
        x = np.log2(known)
        slope, intercept = np.polyfit(x, [self.measured[q] for q in known], 1)
        return max(float(intercept + slope * math.log2(p)), 0.0)


class BlockSeries:
    """R(b) and Rest(B) of one network shape, from its 1-thread batch-strategy points."""

    def __init__(self, rows):
        by_batch = {}
        for row in rows:
            parts = profile_parts(row)
            if parts:
                by_batch[row["batch_size"]] = parts
        self.batches = sorted(by_batch)
        self.block = [by_batch[b]["block"] for b in self.batches]
        self.rest = [by_batch[b]["rest"] for b in self.batches]

    def __bool__(self):
        return bool(self.batches)

    def block_ms(self, b):
        """Measured R(b); between measured batches linear; beyond them per row as the nearest."""
        bs, rs = self.batches, self.block
        if b <= bs[0]:
            return rs[0] * b / bs[0]
        if b >= bs[-1]:
            return rs[-1] * b / bs[-1]
        return float(np.interp(b, bs, rs))

    def rest_ms(self, batch):
        if len(self.batches) == 1:
            return self.rest[0]
        slope, intercept = np.polyfit(self.batches, self.rest, 1)
        return max(float(intercept + slope * batch), 0.0)


def shape_of(row):
    return (row["model"], row["num_layers"], row["rnn_size"], row["seq_length"], row["vocab"],
            row.get("blas", ""))


def block_series(rows):
    """Every network shape's block series: its 1-thread batch-strategy rows, any scaling."""
    groups = {}
    for row in rows:
        if row["status"] == "ok" and row["threads"] == 1 and row["strategy"] == "batch":
            groups.setdefault(shape_of(row), []).append(row)
    return {shape: BlockSeries(members) for shape, members in groups.items()}


@dataclass
class Contention:
    """k(p) and g of the batch strategy (module docstring): {threads: (k, g)} from the
    series' points measured with parts.py's block_contention."""
    measured: dict

    def __call__(self, p):
        """(k(p), g): k(1) = 1; between measured counts linear in log2 p; beyond the largest
        measured count, its value."""
        known = sorted(self.measured)
        if p <= 1 or not known:
            return 1.0, 0.0
        if p in self.measured:
            return self.measured[p]
        if p > known[-1]:
            return self.measured[known[-1]]
        counts = [1] + known
        k = float(np.interp(math.log2(p), np.log2(counts), [1.0] + [self.measured[q][0] for q in known]))
        return k, self.measured[min(q for q in known if q > p)][1]

    def block_ms(self, p, one_core_ms):
        k, share = self(p)
        return one_core_ms * (1 + (k - 1) * share)


@dataclass
class ThreadedGemm:
    """The gemm strategy's time (module docstring): S, W at the base batch on one thread and
    the measured speedups {threads: s(p) = w W / G(p)} of its GEMMs threaded by MKL."""
    serial_ms: float  # S
    gemm_ms: float  # W
    speedups: dict

    def speedup(self, p):
        """s(p): measured where measured; else Amdahl's law 1 / (f + (1 - f) / p) with f
        least-squares through the measured counts (f > 1 where threading slowed them)."""
        if p <= 1:
            return 1.0
        if p in self.speedups:
            return self.speedups[p]
        known = [q for q in self.speedups if q > 1]
        if not known:
            return 1.0
        x = np.array([1 - 1 / q for q in known])
        y = np.array([1 / self.speedups[q] - 1 / q for q in known])
        serial = max(float(x @ y / (x @ x)), 0.0)
        return 1 / (serial + (1 - serial) / p)

    def time_ms(self, p, work):
        return work * (self.serial_ms + self.gemm_ms / self.speedup(p))


@dataclass
class Model:
    """The model of one series (fixed shape, strategy, policy; threads vary). `gemm` is the
    gemm-strategy series' of the same shape (None where it was not measured with its parts);
    `contention` the batch-strategy series'."""
    strategy: str
    num_layers: int
    seq_length: int
    base_batch: int
    weak: bool
    one_thread: dict  # the parts of the series' 1-thread point
    blocks: BlockSeries
    regions: RegionCost
    contention: Contention
    gemm: ThreadedGemm = None

    def batch(self, p):
        return self.base_batch * p if self.weak else self.base_batch

    def time_ms(self, p, strategy=None):
        """The model's time at p threads; None for the gemm strategy without its parts."""
        strategy = strategy or self.strategy
        batch = self.batch(p)
        if strategy == "gemm":
            return self.gemm.time_ms(p, batch / self.base_batch) if self.gemm else None
        if strategy == "hybrid":
            return min(self._hybrid_ms(p, batch, n, q) for n in range(1, min(p, batch) + 1)
                       for q in range(1, p // n + 1))
        blocks = min(p, batch)
        rows = math.ceil(batch / blocks)
        return (self.contention.block_ms(p, self.blocks.block_ms(rows)) + self._shared_ms(p, blocks, batch)
                + regions_per_iteration(self.num_layers) * self.regions(p))

    def _shared_ms(self, p, blocks, batch):
        """Reductions, optimizer and the serial rest."""
        one = self.one_thread
        return (one["reduce"] * (blocks + 1) / (2 * p) + one["optimizer"] / p
                + self.blocks.rest_ms(batch))

    def _hybrid_ms(self, p, batch, blocks, team):
        rows = math.ceil(batch / blocks)
        team_barriers = 3 * self.seq_length * self.num_layers * self.regions(team)
        return (self.contention.block_ms(p, self.blocks.block_ms(rows)) / team + team_barriers
                + self._shared_ms(p, blocks, batch)
                + regions_per_iteration(self.num_layers) * self.regions(p))

    def idle_threads(self, p):
        return max(p - self.batch(p), 0) if self.strategy == "batch" else 0


def _measured_parts(row, name):
    return (row.get("parts") or {}).get(name)


def sibling(series, strategy):
    """The series of the same shape, scaling, policy and library with another strategy."""
    index = SERIES_FIELDS.index("strategy")
    return series[:index] + (strategy,) + series[index + 1:]


def contention_of(rows, blocks):
    """The Contention of the batch-strategy rows `rows` (one series): k and g where a point
    measured them (g: the GEMMs alone over R(b) of their block rows)."""
    measured = {}
    for row in rows:
        parts = _measured_parts(row, "contention")
        if parts and row["threads"] > 1:
            share = min(parts["alone_ms"] / blocks.block_ms(parts["block_rows"]), 1.0)
            measured[row["threads"]] = (parts["contention"], share)
    return Contention(measured)


def threaded_gemm_of(rows):
    """The ThreadedGemm of the gemm-strategy rows `rows` (one series); None without a
    1-thread point that measured its GEMMs."""
    one = next((r for r in rows if r["threads"] == 1 and _measured_parts(r, "gemm")), None)
    if one is None:
        return None
    gemm_ms = min(_measured_parts(one, "gemm")["one_thread_ms"], one["median_ms"])
    speedups = {r["threads"]: r["batch_size"] / one["batch_size"] * gemm_ms / _measured_parts(r, "gemm")["threaded_ms"]
                for r in rows if r["threads"] > 1 and _measured_parts(r, "gemm")}
    return ThreadedGemm(serial_ms=one["median_ms"] - gemm_ms, gemm_ms=gemm_ms, speedups=speedups)


def build_models(rows, region_ms):
    """One Model per series that has a profiled 1-thread point and its block series (a gemm
    series also its measured GEMMs), with region costs (region_ms: {(policy, threads): ms});
    returns {series: Model}. Rows of another precision than float32 are left out: the parts
    and the formula are float32's (bfloat16's GEMMs and conversions are other parts)."""
    rows = [r for r in rows if r.get("precision", "fp32") == "fp32"]
    blocks = block_series(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    members = {}
    for row in ok:
        members.setdefault(series_of(row), []).append(row)
    ones = {s: r for s, r in ((series_of(r), r) for r in ok if r["threads"] == 1)}
    models = {}
    for series, own in members.items():
        base = ones.get(series) or _one_thread_of_any_policy(series, ones)
        parts = profile_parts(base) if base else None
        shape_blocks = blocks.get(shape_of(base)) if base else None
        if not parts or not shape_blocks:
            continue
        fields = dict(zip(SERIES_FIELDS, series))
        gemm_rows = members.get(sibling(series, "gemm"), [])
        if fields["strategy"] == "gemm" and threaded_gemm_of(gemm_rows) is None:
            continue
        costs = RegionCost({p: ms for (policy, p), ms in region_ms.items()
                            if policy == fields["policy"]})
        models[series] = Model(
            strategy=fields["strategy"], num_layers=base["num_layers"],
            seq_length=base["seq_length"], base_batch=base["batch_size"],
            weak=fields["scaling"] == "weak", one_thread=parts, blocks=shape_blocks, regions=costs,
            contention=contention_of(members.get(sibling(series, "batch"), []), shape_blocks),
            gemm=threaded_gemm_of(gemm_rows))
    return models


def _one_thread_of_any_policy(series, ones):
    """At one thread the policy places nothing: a series measured only at more threads (say
    scatter at 16) takes the 1-thread point of its series under another policy."""
    policy = SERIES_FIELDS.index("policy")
    same = lambda s: s[:policy] + s[policy + 1:]  # noqa: E731
    return next((row for s, row in ones.items() if same(s) == same(series)), None)


def validate(rows, models):
    """Adds model_ms and model_error (relative) to every measured row that has a model;
    returns the largest |error| (None when no row has one)."""
    worst = None
    for row in rows:
        model = models.get(series_of(row)) if row["status"] == "ok" else None
        if model is None:
            row["model_ms"] = row["model_error"] = None
            continue
        row["model_ms"] = model.time_ms(row["threads"])
        row["model_error"] = row["model_ms"] / row["median_ms"] - 1
        worst = max(worst or 0.0, abs(row["model_error"]))
    return worst


def extrapolate(series, model, base_row):
    """The model's rows for EXTRAPOLATE_TO: time, speedup over the measured 1-thread point,
    idle threads, and for strong scaling what the other strategies would take (gemm None
    where its series was not measured with its parts)."""
    out = []
    for p in EXTRAPOLATE_TO:
        ms = model.time_ms(p)
        work = model.batch(p) / model.base_batch
        speedup = base_row["median_ms"] * work / ms
        entry = {"threads": p, "batch_size": model.batch(p), "median_ms": ms,
                 "speedup": speedup, "efficiency": speedup / p,
                 "chars_per_s": base_row["chars_per_s"] * speedup,
                 "idle_threads": model.idle_threads(p)}
        if not model.weak:
            entry["by_strategy"] = {s: model.time_ms(p, s) for s in ("batch", "gemm", "hybrid")}
        out.append(entry)
    return out


@functools.lru_cache(maxsize=None)
def _study(out):
    """(rows, {series: Model}) of the finished points of the study in directory `out`."""
    from .collect import load_records, load_region_costs, record_to_row  # collect imports this module
    done, _ = load_records(out)
    rows = [record_to_row(record) for record in done.values()]
    return rows, build_models(rows, load_region_costs(out))


def predict_iteration_seconds(config, threads, model="lstm", study=MEASURED_STUDY):
    """Seconds per training iteration (forward, backward, RMSprop) at `threads` threads under
    the batch strategy, as the model puts it from the parts measured in `study` (a results
    directory of this package).

    config: anything with num_layers, rnn_size, batch_size and seq_length (a points.Config,
    e.g. points.parse_config("char-rnn"), or train's options); any batch_size and threads.
    The network's shape (model, num_layers, rnn_size, seq_length; the study's vocabulary, GEMM
    backend and compact placement) must be one whose block series the study measured: its
    strong-scaling batch series with the most thread counts gives R(b), Rest(B), k(p), g, the
    reduction, optimizer and region costs. Raises ValueError for another shape."""
    rows, models = _study(Path(study))
    shape = (model, config.num_layers, config.rnn_size, config.seq_length)
    counts = {}
    for row in rows:
        if ((row["model"], row["num_layers"], row["rnn_size"], row["seq_length"]) == shape
                and row["scaling"] == "strong" and row["strategy"] == "batch" and row["policy"] == "compact"
                and not row["blas"] and row["ranks"] == 1 and series_of(row) in models):
            counts.setdefault(series_of(row), set()).add(row["threads"])
    if not counts:
        raise ValueError(f"{Path(study).name} measured no batch-strategy series of a {model} "
                         f"{config.num_layers} x {config.rnn_size}, seq {config.seq_length}")
    series = max(counts, key=lambda s: len(counts[s]))
    at_batch = dataclasses.replace(models[series], base_batch=config.batch_size, weak=False)
    return at_batch.time_ms(threads) / 1e3
