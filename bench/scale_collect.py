"""Collecting a scaling study: the point files of OUT merged into rows with speedups and
fitted models, written as results.csv/json, machine.json, results.md and PNG plots."""
import csv
import io
import json
from dataclasses import asdict

from scale_fit import EXTRAPOLATE_TO, best_fit
from scale_plot import write_plots
from scale_points import SERIES_FIELDS, Point, series_of
from scale_report import write_markdown
from scale_run import write_atomic, write_json_atomic

CSV_FIELDS = ("index", "key", "status", "scaling", "config", "model", "num_layers", "rnn_size",
              "batch_size", "seq_length", "vocab", "threads", "strategy", "blas", "policy",
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


def record_to_row(record):
    point = record["point"]
    row = {f: point[f] for f in ("index", "scaling", "config", "num_layers", "rnn_size",
                                 "seq_length", "vocab", "model", "strategy", "policy",
                                 "threads")}
    row["blas"] = point.get("blas", "")
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
    models = fit_series(rows)
    path = out / "machine.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    machine = machine_description(done, recorded)
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
