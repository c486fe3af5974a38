"""Core-count scaling study: bench/speed.py once per point, each in a fresh process.

A point is (scaling, config, model, strategy, policy, threads). Points are enumerated in a
fixed order so that `--point K` names the same point in every job of a job array. Each
finished point is one JSON file under OUT/points/ (written atomically), so an interrupted
study resumes where it stopped and separate jobs can fill one directory; `--collect OUT`
merges them into results.csv/json/md, machine.json and PNG plots, with an Amdahl model fitted
per series and extrapolated to Xeon Phi thread counts.

    python bench/scale.py                                  # default study (a few minutes on 2 cores)
    python bench/scale.py --threads 1,2,4 --configs char-rnn,3x512 --scaling strong,weak
    python bench/scale.py --list                           # the points, with their index
    python bench/scale.py --point 3 --out results/run1     # one point (job array task)
    python bench/scale.py --collect results/run1           # merge, no runs
"""
import argparse
import csv
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from phi_rnn.affinity import read_topology

SPEED_SCRIPT = Path(__file__).parent / "speed.py"
REPO_ROOT = Path(__file__).resolve().parent.parent

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
SCALINGS = ("strong", "weak")
EXTRAPOLATE_TO = (64, 68, 272)  # Xeon Phi 7210 cores, 7250 cores, 7250 hardware threads
ENV_PREFIXES = ("OMP_", "KMP_", "MKL_", "NUMBA_")
DEFAULT_ITERS, DEFAULT_WARMUP = 20, 3
QUICK_ITERS, QUICK_WARMUP = 5, 1


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

    @property
    def batch_size(self):
        # weak scaling keeps the work per thread fixed
        return self.base_batch * self.threads if self.scaling == "weak" else self.base_batch

    @property
    def key(self):
        return (f"{self.scaling}-{self.config}-{self.model}-{self.strategy}-{self.policy}"
                f"-t{self.threads:03d}")

    def speed_args(self, iters, warmup):
        return ["--model", self.model, "--rnn_size", str(self.rnn_size),
                "--num_layers", str(self.num_layers), "--batch_size", str(self.batch_size),
                "--seq_length", str(self.seq_length), "--vocab", str(self.vocab),
                "--threads", str(self.threads), "--policy", self.policy,
                "--strategy", self.strategy, "--iters", str(iters), "--warmup", str(warmup),
                "--no-torch", "--json"]


# ---------------------------------------------------------------- enumeration

def parse_config(token):
    """A preset name, or LAYERSxSIZE[-bBATCH][-sSEQ] (batch and seq default to 50)."""
    if token in PRESETS:
        return (token,) + PRESETS[token]
    match = CUSTOM_CONFIG.match(token)
    if not match:
        raise ValueError(f"unknown config {token!r}: use one of {', '.join(PRESETS)} "
                         "or LAYERSxSIZE[-bBATCH][-sSEQ], e.g. 2x256-b32-s100")
    layers, size, batch, seq = (int(g) if g else 50 for g in match.groups())
    if min(layers, size, batch, seq) < 1:
        raise ValueError(f"config {token!r}: every size must be at least 1")
    return token, layers, size, batch, seq


def physical_cores():
    """Cores this process may run on: a PBS cpuset can be smaller than the node."""
    topology = read_topology(allowed=sorted(os.sched_getaffinity(0)))
    return len(topology.usable_cores())


def default_threads(cores):
    """1, 2, 4, ... up to the core count, plus the core count itself (68 on a Phi 7250)."""
    counts = [1 << i for i in range(cores.bit_length()) if 1 << i <= cores]
    return sorted(set(counts + [cores]))


def enumerate_points(scalings, configs, models, strategies, policies, threads, vocab):
    """The study's points in a fixed order; threads vary fastest."""
    points = []
    for scaling in scalings:
        for name, layers, size, batch, seq in configs:
            for model in models:
                for strategy in strategies:
                    for policy in policies:
                        for count in threads:
                            points.append(Point(len(points), scaling, name, layers, size,
                                                batch, seq, vocab, model, strategy, policy,
                                                count))
    return points


# ---------------------------------------------------------------- running

def write_atomic(path, text):
    """Temp file + rename: a killed writer never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def relevant_env():
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_point(point, out, iters, warmup, timeout=None):
    """Run one point in a fresh process; write points/<key>.json and return None, or write
    failed/<key>.json and return the one-line reason."""
    command = [sys.executable, str(SPEED_SCRIPT)] + point.speed_args(iters, warmup)
    # recorded as it would be typed in the project directory: results carry no local paths
    typed = ["python", "bench/speed.py"] + command[2:]
    record = {"point": asdict(point), "batch_size": point.batch_size, "command": typed,
              "env": relevant_env(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    start = time.perf_counter()
    returncode, stdout, stderr = run_process_group(command, timeout)
    record["wall_s"] = round(time.perf_counter() - start, 3)
    record["stderr_tail"] = stderr[-2000:]
    result, error = parse_speed_output(returncode, stdout, stderr)
    failed_path = out / "failed" / f"{point.key}.json"
    if error:
        record.update(returncode=returncode, error=error)
        write_json_atomic(failed_path, record)
        return error
    record["result"] = result
    write_json_atomic(out / "points" / f"{point.key}.json", record)
    failed_path.unlink(missing_ok=True)  # an earlier failure of this point is superseded
    return None


INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def _unblock_interrupts():  # in the child, before exec: speed.py gets the usual signal mask
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)


def run_process_group(command, timeout):
    """(returncode or None on timeout, stdout, stderr). speed.py measures in a worker process
    of its own, so a timeout or an interrupt kills the whole process group: an orphaned
    worker would go on computing and disturb the next point's timings. Interrupts are held
    while the child starts: delivered inside Popen, one would leave it running unkilled."""
    signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=_unblock_interrupts)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)  # a held signal fires here
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr + f"\ntimed out after {timeout} s"
    except BaseException:  # Ctrl-C, or SIGTERM turned into KeyboardInterrupt
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def parse_speed_output(returncode, stdout, stderr):
    """(result, None) for a usable speed.py run, else (None, one-line reason)."""
    if returncode != 0:
        return None, last_line(stderr) or f"speed.py exited with status {returncode}"
    try:
        result = json.loads(stdout)
        float(result["phi_rnn"]["median_ms"])
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"speed.py printed no usable JSON ({type(exc).__name__}: {exc})"
    return result, None


def is_done(point, out):
    return (out / "points" / f"{point.key}.json").exists()


def run_study(points, out, iters, warmup, timeout):
    """Run every point without a result file; returns (ran, skipped, failed keys)."""
    pending = [p for p in points if not is_done(p, out)]
    skipped = len(points) - len(pending)
    failed = []
    with tqdm(pending, unit="point", desc="scale", file=sys.stderr) as bar:
        for point in bar:
            bar.set_postfix_str(point.key)
            error = run_point(point, out, iters, warmup, timeout)
            if error:
                failed.append(point.key)
                bar.write(f"failed: {point.key}: {error}")
    return len(pending), skipped, failed


# ---------------------------------------------------------------- model fit

@dataclass
class Fit:
    """t(p)/t(1) = s + (1-s)/p + c*log2(p), fitted to one series; c = 0 is plain Amdahl.

    For weak scaling t is the time per unit of work (p times the batch takes p units), so the
    same law reads as Amdahl on throughput and s is the serial fraction of the work.
    """
    name: str
    serial_fraction: float
    overhead: float
    points: int  # measured points beyond 1 thread: the ones that carry information
    rms_rel_error: float
    underdetermined: bool

    def relative_time(self, threads):
        return (self.serial_fraction + (1 - self.serial_fraction) / threads
                + self.overhead * math.log2(threads))

    def speedup(self, threads):
        return 1.0 / self.relative_time(threads)


AMDAHL = "Amdahl"
AMDAHL_OVERHEAD = "Amdahl + log2(p) overhead"


def _weighted_lstsq(columns, target, weights):
    a = np.column_stack(columns) * weights[:, None]
    solution, *_ = np.linalg.lstsq(a, target * weights, rcond=None)
    return solution


def _beyond_one_thread(threads, speedups):
    """Thread counts > 1 and their t(p)/t(1); at p = 1 every model is exact by construction."""
    p = np.asarray(threads, dtype=float)
    rel_time = 1.0 / np.asarray(speedups, dtype=float)
    return p[p > 1], rel_time[p > 1]


def fit_amdahl(threads, speedups):
    """Least squares on relative error of t(p)/t(1): every thread count counts the same,
    which matters because the extrapolation lives at the high end."""
    p, rel_time = _beyond_one_thread(threads, speedups)
    if len(p) == 0:
        return None
    (s,) = _weighted_lstsq([1 - 1 / p], rel_time - 1 / p, 1.0 / rel_time)
    s = max(0.0, float(min(s, 1.0)))  # 1-D convex problem: clipping gives the bounded optimum
    fit = Fit(AMDAHL, s, 0.0, len(p), 0.0, underdetermined=len(p) < 2)
    fit.rms_rel_error = _rms_rel_error(fit, p, rel_time)
    return fit


def fit_amdahl_overhead(threads, speedups):
    """Amdahl plus a per-doubling cost (synchronisation, wake-ups); None when it has no
    residual degree of freedom or the fit is unphysical (s outside [0, 1], c < 0)."""
    p, rel_time = _beyond_one_thread(threads, speedups)
    if len(p) < 3:
        return None
    s, c = _weighted_lstsq([1 - 1 / p, np.log2(p)], rel_time - 1 / p, 1.0 / rel_time)
    if not (0.0 <= s <= 1.0 and c >= 0.0):
        return None
    fit = Fit(AMDAHL_OVERHEAD, float(s), float(c), len(p), 0.0, underdetermined=False)
    fit.rms_rel_error = _rms_rel_error(fit, p, rel_time)
    return fit


def _rms_rel_error(fit, p, rel_time):
    model = np.array([fit.relative_time(x) for x in p])
    return float(np.sqrt(np.mean(((model - rel_time) / rel_time) ** 2)))


def best_fit(threads, speedups):
    """Amdahl, or Amdahl + overhead when its error per residual degree of freedom is lower."""
    candidates = [f for f in (fit_amdahl(threads, speedups),
                              fit_amdahl_overhead(threads, speedups)) if f]
    if not candidates:
        return None

    def error_per_dof(fit):
        params = 1 if fit.name == AMDAHL else 2
        dof = max(fit.points - params, 1)
        return fit.rms_rel_error ** 2 * fit.points / dof

    return min(candidates, key=error_per_dof)


# ---------------------------------------------------------------- collecting

SERIES_FIELDS = ("scaling", "config", "model", "strategy", "policy")
CSV_FIELDS = ("index", "key", "status", "scaling", "config", "model", "num_layers", "rnn_size",
              "batch_size", "seq_length", "vocab", "threads", "strategy", "policy",
              "median_ms", "min_ms", "max_ms", "spread_pct", "chars_per_s", "gflop_per_iter",
              "gflops", "peak_gflops", "pct_peak", "speedup", "efficiency", "gemm", "placement",
              "error")


def load_records(out):
    """Finished and failed point records in OUT; a success supersedes a failure."""
    def read_all(sub):
        return {path.stem: json.loads(path.read_text())
                for path in sorted((out / sub).glob("*.json"))}
    done = read_all("points")
    failed = {k: v for k, v in read_all("failed").items() if k not in done}
    return done, failed


def series_of(row):
    return tuple(row[f] for f in SERIES_FIELDS)


def record_to_row(record):
    point = record["point"]
    row = {f: point[f] for f in ("index", "scaling", "config", "num_layers", "rnn_size",
                                 "seq_length", "vocab", "model", "strategy", "policy",
                                 "threads")}
    row["key"] = Point(**point).key
    row["batch_size"] = record["batch_size"]
    result = record.get("result")
    if result is None:
        row.update(status="failed", error=record.get("error", ""))
        return row
    timing = result["phi_rnn"]
    row.update(status="ok", error="", placement=result.get("placement", ""), gemm=result.get("gemm", ""),
               gflop_per_iter=result.get("gflop_per_iter"),
               peak_gflops=result.get("peak_gflops"))
    for field in ("median_ms", "min_ms", "max_ms", "chars_per_s", "gflops", "pct_peak"):
        row[field] = timing.get(field)
    row["spread_pct"] = 100.0 * (timing["max_ms"] - timing["min_ms"]) / timing["median_ms"]
    return row


def add_speedups(rows):
    """Speedup = throughput at p / throughput at 1 thread of the same series (time per
    character, so strong and weak scaling read alike); efficiency = speedup / p."""
    baseline = {series_of(r): r for r in rows if r["status"] == "ok" and r["threads"] == 1}
    for row in rows:
        base = baseline.get(series_of(row))
        if row["status"] != "ok" or base is None:
            row["speedup"] = row["efficiency"] = None
            continue
        ms_per_char = row["median_ms"] / (row["batch_size"] * row["seq_length"])
        base_ms_per_char = base["median_ms"] / (base["batch_size"] * base["seq_length"])
        row["speedup"] = base_ms_per_char / ms_per_char
        row["efficiency"] = row["speedup"] / row["threads"]


def fit_series(rows):
    """One fitted model per series with a 1-thread baseline, with its extrapolations."""
    by_series = {}
    for row in rows:
        if row.get("speedup") is not None:
            by_series.setdefault(series_of(row), []).append(row)
    models = []
    for series, members in by_series.items():
        members.sort(key=lambda r: r["threads"])
        fit = best_fit([r["threads"] for r in members], [r["speedup"] for r in members])
        base = members[0]
        entry = dict(zip(SERIES_FIELDS, series), fit=asdict(fit) if fit else None,
                     note=fit_note(fit, members), extrapolated=[])
        if fit:
            entry["extrapolated"] = [extrapolate(fit, base, p) for p in EXTRAPOLATE_TO]
        models.append(entry)
    return models


def fit_note(fit, members):
    if fit is None:
        return "no fit: needs a measured point beyond 1 thread"
    notes = [f"fitted to {len(members)} points ({members[0]['threads']}-"
             f"{members[-1]['threads']} threads)"]
    if fit.underdetermined:
        notes.append(f"underdetermined: only {fit.points} point beyond 1 thread, no residual "
                     "to judge the fit; measure more thread counts before trusting it")
    if fit.serial_fraction in (0.0, 1.0) and fit.rms_rel_error > 1e-6:
        measured = "slowdown" if fit.serial_fraction else "superlinear speedup"
        notes.append(f"s at its bound: the measured {measured} is outside what Amdahl's law "
                     "can represent")
    return "; ".join(notes)


def extrapolate(fit, base, threads):
    """Model prediction at a thread count, scaled from the measured 1-thread point."""
    speedup = fit.speedup(threads)
    batch = base["batch_size"] * threads if base["scaling"] == "weak" else base["batch_size"]
    work = batch / base["batch_size"]
    return {"threads": threads, "batch_size": batch, "speedup": speedup,
            "efficiency": speedup / threads, "median_ms": base["median_ms"] * work / speedup,
            "chars_per_s": base["chars_per_s"] * speedup, "gflops": base["gflops"] * speedup}


def machine_description(done):
    """machine.json: hardware and versions as speed.py saw them, plus the study's env."""
    seen = {}
    for record in done.values():
        result = record["result"]
        seen.setdefault(json.dumps(result.get("machine"), sort_keys=True), result)
    if not seen:
        return {}
    first = next(iter(seen.values()))
    description = {"machine": first.get("machine"), "versions": first.get("versions"),
                   "gemm": first.get("gemm"), "env": next(iter(done.values())).get("env", {})}
    if len(seen) > 1:
        description["other_machines"] = [r.get("machine") for r in list(seen.values())[1:]]
    return description


def collect(out):
    """Merge OUT/points and OUT/failed into the CSV/JSON/Markdown/PNG outputs."""
    done, failed = load_records(out)
    rows = [record_to_row(r) for r in list(done.values()) + list(failed.values())]
    rows.sort(key=lambda r: (r["index"], r["key"]))
    add_speedups(rows)
    models = fit_series(rows)
    machine = machine_description(done)
    write_json_atomic(out / "machine.json", machine)
    write_json_atomic(out / "results.json", {"machine": machine, "points": rows,
                                             "models": models})
    write_csv(out / "results.csv", rows)
    write_markdown(out / "results.md", rows, models, machine)
    plotted = write_plots(out, rows, models)
    return rows, models, plotted


def write_csv(path, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS})
    write_atomic(path, text.getvalue())


# ---------------------------------------------------------------- reports

def fmt(value, spec):
    return "" if value is None else format(value, spec)


def fmt_ms(value):
    # tiny test configs run in microseconds; keep three significant digits there
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def write_markdown(path, rows, models, machine):
    lines = ["# Scaling study", ""]
    lines += machine_markdown(machine)
    lines += ["## Results", "",
              "Speedup is throughput (chars/s) over the 1-thread point of the same series; "
              "efficiency = speedup / threads. Rows marked *model* are extrapolations of the "
              "fitted model, not measurements.", "",
              "| scaling | config | model | strategy | policy | threads | batch | source "
              "| median ms | min-max ms | chars/s | GFLOP/s | % peak | speedup | efficiency |",
              "|" + "---|" * 15]
    models_by_series = {tuple(m[f] for f in SERIES_FIELDS): m for m in models}
    ok_rows = [r for r in rows if r["status"] == "ok"]
    for series in dict.fromkeys(series_of(r) for r in ok_rows):
        for row in (r for r in ok_rows if series_of(r) == series):
            lines.append(
                f"| {' | '.join(series)} | {row['threads']} | {row['batch_size']} | measured "
                f"| {fmt_ms(row['median_ms'])} | {fmt_ms(row['min_ms'])}-{fmt_ms(row['max_ms'])} "
                f"| {row['chars_per_s']:.0f} | {fmt(row['gflops'], '.1f')} "
                f"| {fmt(row['pct_peak'], '.1f')} | {fmt(row['speedup'], '.2f')} "
                f"| {fmt(row['efficiency'], '.2f')} |")
        model = models_by_series.get(series)
        if model and model["fit"]:
            source = f"model ({model['fit']['name']} fit, RMS err {100 * model['fit']['rms_rel_error']:.1f}%)"
            for x in model["extrapolated"]:
                lines.append(
                    f"| {' | '.join(series)} | {x['threads']} | {x['batch_size']} | *{source}* "
                    f"| {fmt_ms(x['median_ms'])} | | {x['chars_per_s']:.0f} | {fmt(x['gflops'], '.1f')} "
                    f"| | {x['speedup']:.2f} | {x['efficiency']:.2f} |")
    lines += ["", "## Fitted models", "",
              "t(p)/t(1) = s + (1-s)/p + c*log2(p) per series (c = 0: Amdahl), least squares on "
              "relative error. Extrapolating from a few cores to a Xeon Phi assumes the same "
              "bottlenecks there; treat it as a model, not a forecast.", "",
              "| scaling | config | model | strategy | policy | fit | serial fraction s | overhead c "
              "| RMS rel. error | note |", "|" + "---|" * 10]
    for m in models:
        fit = m["fit"] or {}
        lines.append(f"| {' | '.join(m[f] for f in SERIES_FIELDS)} | {fit.get('name', '')} "
                     f"| {fmt(fit.get('serial_fraction'), '.4f')} | {fmt(fit.get('overhead'), '.4f')} "
                     f"| {fmt(100 * fit['rms_rel_error'], '.1f') + '%' if fit else ''} | {m['note']} |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed points", ""]
        lines += [f"- `{r['key']}` (point {r['index']}): {r['error']}" for r in failed]
    write_atomic(path, "\n".join(lines) + "\n")


def machine_markdown(machine):
    if not machine:
        return ["No finished points.", ""]
    m = machine.get("machine") or {}
    lines = ["## Machine", "",
             f"- CPU: {m.get('cpu')} ({m.get('sockets')} sockets, {m.get('cores')} cores, "
             f"{m.get('logical_cpus')} logical CPUs, {m.get('numa_nodes')} NUMA nodes), "
             f"host {m.get('hostname')}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items()),
             f"- GEMM backend: {machine.get('gemm')}",
             "- Environment: " + (", ".join(f"`{k}={v}`" for k, v in machine["env"].items())
                                  or "no OMP_/KMP_/MKL_/NUMBA_ variables set")]
    for other in machine.get("other_machines", []):
        lines.append(f"- Also measured on: {other.get('hostname')} ({other.get('cpu')})")
    return lines + [""]


def series_labels(series_list):
    """Label series by the fields that differ between them, leaving out the scaling mode
    (each panel has one); config and strategy when nothing differs."""
    fields = range(1, len(SERIES_FIELDS))
    varying = [i for i in fields if len({s[i] for s in series_list}) > 1] or [1, 3]
    return {s: " ".join(s[i] for i in varying) for s in series_list}


def write_plots(out, rows, models):
    """speedup.png, efficiency.png, gflops.png: one panel per scaling mode, measured points
    solid with markers, the fitted model dashed out to the extrapolation range."""
    import matplotlib  # imported here: --list/--point jobs should not pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("speedup") is not None]
    if not measured:
        return []
    fits = {tuple(m[f] for f in SERIES_FIELDS): m["fit"] for m in models}
    series_list = list(dict.fromkeys(series_of(r) for r in measured))
    labels = series_labels(series_list)
    scalings = list(dict.fromkeys(s[0] for s in series_list))
    p_model = np.unique(np.geomspace(1, max(EXTRAPOLATE_TO), 200).round(2))
    metrics = [("speedup", "speedup"), ("efficiency", "parallel efficiency"),
               ("gflops", "GFLOP/s")]
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    written = []
    for metric, ylabel in metrics:
        fig, axes = plt.subplots(1, len(scalings), figsize=(6.5 * len(scalings), 4.8),
                                 squeeze=False)
        for ax, scaling in zip(axes[0], scalings):
            for series in (s for s in series_list if s[0] == scaling):
                members = sorted((r for r in measured if series_of(r) == series),
                                 key=lambda r: r["threads"])
                threads = [r["threads"] for r in members]
                line, = ax.plot(threads, [r[metric] for r in members], "o-",
                                label=labels[series])
                fit = fits.get(series)
                if fit:
                    model = Fit(**fit)
                    speedup = np.array([model.speedup(p) for p in p_model])
                    values = {"speedup": speedup, "efficiency": speedup / p_model,
                              "gflops": members[0]["gflops"] * speedup}[metric]
                    ax.plot(p_model, values, "--", color=line.get_color(),
                            label=f"{labels[series]} model ({fit['name']} fit)")
            if metric == "speedup":
                ax.plot(p_model, p_model, ":", color="gray", label="ideal")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(plain)
            if metric != "efficiency":
                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_formatter(plain)
            else:
                ax.set_ylim(0, 1.1)
            ax.set_xlabel("threads")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{scaling} scaling")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------- CLI

def comma_list(choices=None, convert=str):
    def parse(text):
        items = [convert(x.strip()) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        bad = [x for x in items if choices and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"invalid choice {bad[0]!r} (choose from {', '.join(choices)})")
        return list(dict.fromkeys(items))
    return parse


def thread_list(text):
    try:
        counts = comma_list(convert=int)(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"thread counts must be integers: {text!r}")
    if min(counts) < 1:
        raise argparse.ArgumentTypeError("thread counts must be at least 1")
    return sorted(counts)


def config_list(text):
    try:
        return [parse_config(token) for token in comma_list()(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad input: one line on stderr and exit status 2, like the rest of phi_rnn."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = OneLineErrorParser(
        prog="scale.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configs: " + ", ".join(f"{k} = {v[0]}x{v[1]} batch {v[2]} seq {v[3]}"
                                       for k, v in PRESETS.items())
               + "; custom LAYERSxSIZE[-bBATCH][-sSEQ].")
    parser.add_argument("--threads", type=thread_list,
                        help="thread counts (default: 1, 2, 4, ... up to the physical cores, "
                             "plus all cores)")
    parser.add_argument("--configs", type=config_list, default=config_list("char-rnn,2x512"),
                        help="presets or custom configs (default: char-rnn,2x512)")
    parser.add_argument("--models", "--model", type=comma_list(MODELS), default=["lstm"],
                        help=f"of {', '.join(MODELS)} (default lstm)")
    parser.add_argument("--strategies", type=comma_list(STRATEGIES), default=list(STRATEGIES),
                        help="batch: numba threads split the batch, sequential MKL; gemm: "
                             "serial kernels, MKL-threaded GEMMs (default: both)")
    parser.add_argument("--policies", type=comma_list(POLICIES), default=["compact"],
                        help=f"affinity policies, of {', '.join(POLICIES)} (default compact)")
    parser.add_argument("--scaling", type=comma_list(SCALINGS), default=["strong"],
                        help="strong: fixed batch; weak: batch = config batch x threads")
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--iters", type=int, help=f"timed iterations (default {DEFAULT_ITERS}, "
                                                  f"--quick {QUICK_ITERS})")
    parser.add_argument("--warmup", type=int, help=f"untimed iterations first (default "
                                                   f"{DEFAULT_WARMUP}, --quick {QUICK_WARMUP})")
    parser.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run")
    parser.add_argument("--timeout", type=float, help="seconds before a point counts as failed")
    parser.add_argument("--out", type=Path,
                        help="results directory (default results/scale-<hostname>; give it "
                             "explicitly for job arrays spread over nodes)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="print the points with their index")
    action.add_argument("--count", action="store_true", help="print the number of points")
    action.add_argument("--point", type=int, metavar="K", help="run point K only")
    action.add_argument("--collect", type=Path, metavar="DIR",
                        help="merge the point files in DIR into the reports, run nothing")
    return parser


def resolve_options(parser, args):
    if args.threads is None:
        args.threads = default_threads(physical_cores())
    if args.iters is None:
        args.iters = QUICK_ITERS if args.quick else DEFAULT_ITERS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if args.iters < 1 or args.warmup < 0 or args.vocab < 2:
        parser.error("--iters must be >= 1, --warmup >= 0 and --vocab >= 2")
    if args.out is None:
        args.out = REPO_ROOT / "results" / f"scale-{socket.gethostname()}"


def report_collected(out):
    rows, models, plots = collect(out)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"collected {ok} finished and {len(rows) - ok} failed points into {out}: "
          f"results.csv results.json results.md machine.json "
          + " ".join(p.name for p in plots))


def interrupt_on_sigterm():
    """PBS walltime kills arrive as SIGTERM: turn it into KeyboardInterrupt so the running
    speed.py is killed with us and no result file is written for the unfinished point."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.collect:
        if not args.collect.is_dir():
            parser.error(f"--collect: no such directory {args.collect}")
        report_collected(args.collect)
        return 0
    resolve_options(parser, args)
    points = enumerate_points(args.scaling, args.configs, args.models, args.strategies,
                              args.policies, args.threads, args.vocab)
    if args.count:
        print(len(points))
        return 0
    if args.list:
        for point in points:
            print(f"{point.index}\t{point.key}\tbatch {point.batch_size}")
        return 0
    interrupt_on_sigterm()
    try:
        if args.point is not None:
            return run_single(parser, args, points)
        ran, skipped, failed = run_study(points, args.out, args.iters, args.warmup,
                                         args.timeout)
    except KeyboardInterrupt:
        print(f"interrupted: finished points are kept in {args.out}; rerun to resume",
              file=sys.stderr)
        return 130
    print(f"{len(points)} points: {ran} run, {skipped} already done, {len(failed)} failed")
    for key in failed:
        print(f"  failed: {key}")
    report_collected(args.out)
    return 1 if failed else 0


def run_single(parser, args, points):
    """Job-array task: one point, no reports (--collect merges once all tasks are done)."""
    if not 0 <= args.point < len(points):
        parser.error(f"--point {args.point}: the study has points 0..{len(points) - 1}")
    point = points[args.point]
    if is_done(point, args.out):
        print(f"point {point.index} {point.key}: already done in {args.out}")
        return 0
    error = run_point(point, args.out, args.iters, args.warmup, args.timeout)
    print(f"point {point.index} {point.key}: {'failed: ' + error if error else 'done'} "
          f"in {args.out}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
