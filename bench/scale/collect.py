"""Collecting a scaling study: the point files of OUT merged into rows with speedups and
the model of model.py, written as results.csv/json, machine.json, results.md and PNG plots."""
import csv
import io
import json

import numpy as np

from .model import EXTRAPOLATE_TO, build_models, extrapolate, validate
from .plot import write_plots
from .points import OPTIONAL_FIELDS, SERIES_FIELDS, Point, series_of, shown_fields
from .report import write_markdown
from .run import json_files, write_atomic, write_json_atomic

CSV_FIELDS = ("index", "key", "status", "scaling", "config", "model", "num_layers", "rnn_size",
              "batch_size", "seq_length", "vocab", "ranks", "threads", "cores", "strategy", "blas", "policy",
              "precision", "median_ms", "min_ms", "max_ms", "spread_pct", "chars_per_s", "gflop_per_iter",
              "gflops", "peak_gflops", "bf16_peak_gflops", "pct_peak", "speedup", "efficiency", "contention",
              "gemm_threaded_ms",
              "model_ms", "model_error",
              "allreduce_ms", "allreduce_share", "gemm", "placement", "error")
# columns of a study with bfloat16 points only (results.csv of a float32 study is as it was)
BF16_COLUMNS = ("precision", "bf16_peak_gflops")
CURVE_THREADS = sorted({int(round(p)) for p in np.geomspace(1, max(EXTRAPOLATE_TO), 40)})


def load_records(out):
    """Finished and failed point records in OUT; a success supersedes a failure."""
    def read_all(sub):
        return {path.stem: json.loads(path.read_text())
                for path in json_files(out / sub)}
    done = read_all("points")
    failed = {k: v for k, v in read_all("failed").items() if k not in done}
    return done, failed


def record_to_row(record):
    point = record["point"]
    row = {f: point[f] for f in ("index", "scaling", "config", "num_layers", "rnn_size",
                                 "seq_length", "vocab", "model", "strategy", "policy",
                                 "threads")}
    row["blas"] = point.get("blas", "")
    row["ranks"] = point.get("ranks", 1)
    row["precision"] = point.get("precision", "fp32")
    row["cores"] = row["ranks"] * row["threads"]
    row["key"] = Point(**point).key
    row["batch_size"] = record["batch_size"]
    result = record.get("result")
    if result is None:
        row.update(status="failed", error=record.get("error", ""))
        return row
    timing = result["phi_rnn"]
    row.update(status="ok", error="", placement=result.get("placement", ""), gemm=result.get("gemm", ""),
               gflop_per_iter=result.get("gflop_per_iter"),
               peak_gflops=result.get("peak_gflops"),
               small_gemm_peak_gflops=result.get("small_gemm_peak_gflops"),
               profile=result.get("profile"), parts=result.get("parts"), mean_ms=float(np.mean(timing["ms"])))
    if row["precision"] != "fp32":  # pct_peak stays of the float32 sgemm peak; this is bfloat16's
        row["bf16_peak_gflops"] = result.get("bf16_peak_gflops")
    for field in ("median_ms", "min_ms", "max_ms", "chars_per_s", "gflops", "pct_peak"):
        row[field] = timing.get(field)
    row["spread_pct"] = 100.0 * (timing["max_ms"] - timing["min_ms"]) / timing["median_ms"]
    parts = row["parts"] or {}  # measured with the point (bench/scale/parts.py)
    row["contention"] = parts["contention"]["contention"] if "contention" in parts else None
    row["gemm_threaded_ms"] = parts["gemm"]["threaded_ms"] if "gemm" in parts else None
    mpi = result.get("mpi")  # ranks > 1: the allreduce as rank 0 saw it (bench/mpi_speed.py)
    row["allreduce_ms"] = mpi["allreduce_ms"] if mpi else None
    row["allreduce_share"] = mpi["allreduce_share"] if mpi else None
    return row


def one_rank(series):
    """The series with one rank: the baseline of every ranks count."""
    return tuple(1 if f == "ranks" else v for f, v in zip(SERIES_FIELDS, series))


def add_speedups(rows):
    """Speedup = throughput on p cores (ranks x threads) / throughput of the 1-rank 1-thread
    point of the same series (time per character, so strong and weak scaling read alike);
    efficiency = speedup / p."""
    baseline = {series_of(r): r for r in rows
                if r["status"] == "ok" and r["threads"] == 1 and r.get("ranks", 1) == 1}
    for row in rows:
        base = baseline.get(one_rank(series_of(row)))
        if row["status"] != "ok" or base is None:
            row["speedup"] = row["efficiency"] = None
            continue
        ms_per_char = row["median_ms"] / (row["batch_size"] * row["seq_length"])
        base_ms_per_char = base["median_ms"] / (base["batch_size"] * base["seq_length"])
        row["speedup"] = base_ms_per_char / ms_per_char
        row["efficiency"] = row["speedup"] / (row.get("ranks", 1) * row["threads"])


NO_MODEL = ("no model: needs profiled 1-thread points (the series' and its shape's batch series)",
            "no model: it models one process; bench/README.md models the allreduce over nodes")
NO_BF16_MODEL = "no model: its parts are float32's; bfloat16 is measured only"


def no_model_note(entry):
    if entry.get("precision", "fp32") != "fp32":
        return NO_BF16_MODEL
    return NO_MODEL[entry["ranks"] > 1]


def model_series(rows, region_ms):
    """The model per series (model.py): every measured row gets model_ms and
    model_error; returns one entry per series with its extrapolation."""
    models = build_models(rows, region_ms)
    validate(rows, models)
    entries = []
    for series in dict.fromkeys(series_of(r) for r in rows if r["status"] == "ok"):
        members = sorted((r for r in rows if r["status"] == "ok" and series_of(r) == series),
                         key=lambda r: r["threads"])
        model = models.get(series)
        errors = [abs(r["model_error"]) for r in members if r["model_error"] is not None]
        entry = dict(zip(SERIES_FIELDS, series), modelled=model is not None,
                     max_error=max(errors) if errors else None, extrapolated=[])
        entry["note"] = "" if model else no_model_note(entry)
        if model and len(members) > 1:  # a block series (one thread count) is a part, not a curve
            entry["extrapolated"] = extrapolate(series, model, members[0])
            entry["curve"] = [[p, model.time_ms(p)] for p in CURVE_THREADS]
            entry["base_ms"] = members[0]["median_ms"]
        entries.append(entry)
    return entries


def load_region_costs(out):
    """{(policy, threads): ms} from OUT/regions/ (barrier.py's measurements)."""
    costs = {}
    for path in json_files(out / "regions"):
        record = json.loads(path.read_text())
        costs[(record["policy"], record["threads"])] = record["region_us"] / 1e3
    return costs


def machine_description(done, recorded):
    """machine.json: the hardware as recorded when the study started (recorded; as speed.py
    saw it for older studies), versions and GEMM backends as the points ran, the study's env."""
    seen = {}
    for record in done.values():
        result = record["result"]
        seen.setdefault(json.dumps(result.get("machine"), sort_keys=True), result)
    description = dict(recorded)
    if not seen:
        return description
    first = next(iter(seen.values()))
    description.setdefault("machine", first.get("machine"))
    gemms = dict.fromkeys(r["result"].get("gemm") for r in done.values())
    description.update(versions=first.get("versions"), gemm="; ".join(map(str, gemms)),
                       env=next(iter(done.values())).get("env", {}))
    if len(seen) > 1:
        description["other_machines"] = [r.get("machine") for r in list(seen.values())[1:]]
    return description


def collect(out):
    """Merge OUT/points and OUT/failed into the CSV/JSON/Markdown/PNG outputs."""
    done, failed = load_records(out)
    rows = [record_to_row(r) for r in list(done.values()) + list(failed.values())]
    rows.sort(key=lambda r: (r["index"], r["key"]))
    add_speedups(rows)
    models = model_series(rows, load_region_costs(out))
    path = out / "machine.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    machine = machine_description(done, recorded)
    write_json_atomic(out / "machine.json", machine)
    hidden = [f for f in OPTIONAL_FIELDS if f not in shown_fields(rows)]
    write_json_atomic(out / "results.json", {"machine": machine, "points": without(rows, hidden),
                                             "models": without(models, hidden)})
    write_csv(out / "results.csv", rows, [] if "precision" not in hidden else BF16_COLUMNS)
    write_markdown(out / "results.md", rows, models, machine)
    plotted = write_plots(out, rows, models)
    return rows, models, plotted


def without(entries, fields):
    """Copies of the dicts `entries` less `fields` (the optional fields a study leaves out)."""
    return [{k: v for k, v in e.items() if k not in fields} for e in entries]


def write_csv(path, rows, left_out=()):
    fields = [f for f in CSV_FIELDS if f not in left_out]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})
    write_atomic(path, text.getvalue())
