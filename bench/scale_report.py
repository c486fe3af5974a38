"""The scaling study's Markdown report: the machine, measured rows and model rows apart,
the fitted models, the failed points."""
from scale_points import SERIES_FIELDS, series_of
from scale_run import write_atomic


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
              "| " + " | ".join(SERIES_FIELDS) + " | threads | batch | source "
              "| median ms | min-max ms | chars/s | GFLOP/s | % peak | speedup | efficiency |",
              "|" + "---|" * (len(SERIES_FIELDS) + 10)]
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
              "| " + " | ".join(SERIES_FIELDS) + " | fit | serial fraction s | overhead c "
              "| RMS rel. error | note |", "|" + "---|" * (len(SERIES_FIELDS) + 5)]
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
