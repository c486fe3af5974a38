"""The scaling study's Markdown report: the machine, the measured points with the model's
time and error for each, the model's extrapolation apart, the failed points."""
from .model import VALIDATION_BAR
from .points import FIELD_DEFAULTS, SERIES_FIELDS, series_name, series_of, shown_fields
from .run import write_atomic


def fmt(value, spec):
    return "" if value is None else format(value, spec)


def fmt_ms(value):
    # tiny test configs run in microseconds; keep three significant digits there
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def shown(series, fields):
    """The values of `series` (all SERIES_FIELDS) for the fields the report shows."""
    return [str(v) for f, v in zip(SERIES_FIELDS, series) if f in fields]


def write_markdown(path, rows, models, machine):
    fields = shown_fields(rows)
    series_cols = " | ".join(fields)
    lines = ["# Scaling study", ""] + machine_markdown(machine)
    lines += ["## Measured", "",
              "Speedup is throughput (chars/s) over the 1-rank 1-thread point of the same "
              "series; efficiency = speedup / (ranks x threads). *model ms* is bench/scale/model.py's "
              "time for the point, built from measured parts, and *error* its difference from "
              "the measured median. *allreduce* is the gradient's allreduce as rank 0 saw it "
              "(including any wait for a slower rank), as a share of the iteration. *part* is "
              "the part measured in the point's own process (bench/scale/parts.py): *k* how "
              "much slower a block's GEMMs run with every block at once (batch strategy), *G* "
              "the iteration's GEMMs threaded by MKL, in ms (gemm strategy).", ""]
    if "precision" in fields:
        lines += [BF16_NOTE, ""]
    lines += [f"| {series_cols} | threads | batch | median ms | min-max ms | chars/s | GFLOP/s "
              "| % peak | speedup | efficiency | part | model ms | error | allreduce |",
              "|" + "---|" * (len(fields) + 13)]
    ok_rows = [r for r in rows if r["status"] == "ok"]
    for row in ok_rows:
        error, share = row.get("model_error"), row.get("allreduce_share")
        lines.append(
            f"| {' | '.join(shown(series_of(row), fields))} | {row['threads']} | {row['batch_size']} "
            f"| {fmt_ms(row['median_ms'])} | {fmt_ms(row['min_ms'])}-{fmt_ms(row['max_ms'])} "
            f"| {row['chars_per_s']:.0f} | {fmt(row['gflops'], '.1f')} "
            f"| {fmt(row['pct_peak'], '.1f')} | {fmt(row['speedup'], '.2f')} "
            f"| {fmt(row['efficiency'], '.2f')} | {measured_part(row)} | {fmt_ms(row['model_ms']) if row.get('model_ms') else ''} "
            f"| {'' if error is None else f'{100 * error:+.1f}%'} "
            f"| {'' if share is None else f'{100 * share:.1f}%'} |")
    lines += bf16_markdown(ok_rows, fields)
    errors = [abs(r["model_error"]) for r in ok_rows if r.get("model_error") is not None]
    lines += ["", "## Model", ""]
    if errors:
        within = sum(e <= VALIDATION_BAR for e in errors)
        lines += [f"The model reproduces {within} of {len(errors)} measured points within "
                  f"{100 * VALIDATION_BAR:.0f}%; the largest error is {100 * max(errors):.1f}%.",
                  ""]
    lines += ["Time per iteration from measured parts (bench/scale/model.py): the block "
              "kernels' time for b batch rows on one core, slowed by the contention k measured "
              "with every block at once, the partial-gradient reduction and the optimizer "
              "against the bandwidth one thread reached, the serial rest, and the parallel "
              "regions per iteration times the measured fork/join cost; for the gemm strategy "
              "the 1-thread time outside the GEMMs plus the GEMMs' time G threaded by MKL. The "
              "rows below are the model, not measurements: beyond the thread counts measured, "
              "k stays at its value at the largest, the GEMMs' speedup follows Amdahl's law "
              "fitted through the measured ones, and each core keeps its rates (no "
              "memory-bandwidth ceiling).", "",
              f"| {series_cols} | threads | batch | model ms | speedup | efficiency "
              "| idle threads | batch ms | gemm ms | hybrid ms (not implemented) |",
              "|" + "---|" * (len(fields) + 9)]
    for m in models:
        for x in m["extrapolated"]:
            other = x.get("by_strategy", {})
            lines.append(
                f"| {' | '.join(str(m[f]) for f in fields)} | {x['threads']} "
                f"| {x['batch_size']} | {fmt_ms(x['median_ms'])} | {x['speedup']:.2f} "
                f"| {x['efficiency']:.2f} | {x['idle_threads']} | "
                + " | ".join("" if other.get(s) is None else fmt_ms(other[s]) for s in ("batch", "gemm", "hybrid"))
                + " |")
    unmodelled = [m for m in models if not m["modelled"]]
    if unmodelled:
        lines += ["", "Series without a model: " + "; ".join(
            f"{' '.join(series_name(tuple(m.get(f, FIELD_DEFAULTS.get(f)) for f in SERIES_FIELDS)))} ({m['note']})"
            for m in unmodelled)]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed points", ""]
        lines += [f"- `{r['key']}` (point {r['index']}): {r['error']}" for r in failed]
    write_atomic(path, "\n".join(lines) + "\n")


BF16_NOTE = ("*precision* bf16: bfloat16 GEMM operands, float32 accumulation (speed.py --precision bf16). "
             "Its points are measured only: the model's parts are float32's, so they have no *model ms*; "
             "their *% peak* is of the float32 sgemm peak, as the float32 points'.")


def bf16_markdown(ok_rows, fields):
    """The bfloat16 points next to their float32 twins (same point, fp32): measured only."""
    by_key = {r["key"]: r for r in ok_rows}
    pairs = [(by_key.get(r["key"].replace(f"-{r['precision']}-t", "-t")), r)
             for r in ok_rows if r.get("precision", "fp32") != "fp32"]
    if not pairs:
        return []
    others = [f for f in fields if f != "precision"]
    lines = ["", "## bfloat16 against float32", "",
             "Measured, both: the bf16 point and the fp32 point that differs from it in precision alone "
             "(no model figure: the model is float32's). *bf16 GEMM peak* is the bfloat16 GEMM rate "
             "measured with the point.", "",
             f"| {' | '.join(others)} | threads | batch | fp32 ms | bf16 ms | bf16 / fp32 | bf16 GEMM peak GFLOP/s |",
             "|" + "---|" * (len(others) + 6)]
    for fp32, bf16 in pairs:
        lines.append(
            f"| {' | '.join(shown(series_of(bf16), others))} | {bf16['threads']} | {bf16['batch_size']} "
            f"| {fmt_ms(fp32['median_ms']) if fp32 else 'not measured'} | {fmt_ms(bf16['median_ms'])} "
            f"| {fmt(fp32 and bf16['median_ms'] / fp32['median_ms'], '.2f')} "
            f"| {fmt(bf16.get('bf16_peak_gflops'), '.1f')} |")
    return lines


def measured_part(row):
    """'k 1.05' or 'G 29.8': the part measured with the point (bench/scale/parts.py)."""
    if row.get("contention") is not None:
        return f"k {row['contention']:.2f}"
    if row.get("gemm_threaded_ms") is not None and row["threads"] > 1:
        return f"G {fmt_ms(row['gemm_threaded_ms'])}"
    return ""


def machine_markdown(machine):
    if not machine.get("versions"):
        return ["No finished points.", ""]
    m = machine.get("machine") or {}
    lines = ["## Machine", "",
             f"- CPU: {m.get('cpu')} ({m.get('isa', 'vector ISA not recorded')}; "
             f"{m.get('sockets')} sockets, {m.get('cores')} cores, "
             f"{m.get('logical_cpus')} logical CPUs, {m.get('numa_nodes')} NUMA nodes), "
             f"host {m.get('hostname')}"]
    if m.get("caches"):
        lines.append("- Caches: " + ", ".join(m["caches"]))
    lines += ["- Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
              f"- GEMM backend: {machine.get('gemm')}",
              "- Environment: " + (", ".join(f"`{k}={v}`" for k, v in machine.get("env", {}).items())
                                   or "no OMP_/KMP_/MKL_/NUMBA_ variables set")]
    for other in machine.get("other_machines", []):
        lines.append(f"- Also measured on: {other.get('hostname')} ({other.get('cpu')})")
    if machine.get("topo"):
        lines += ["", "`python -m phi_rnn topo` on this machine:", "", "```", machine["topo"], "```"]
    return lines + [""]
