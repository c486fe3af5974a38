"""The scaling study's plots: speedup, efficiency and GFLOP/s against cores (ranks x threads)."""
import numpy as np

from .model import EXTRAPOLATE_TO
from .points import SERIES_FIELDS, series_name, series_of


def series_labels(series_list):
    """Label series by the fields that differ between them, leaving out the scaling mode
    (each panel has one); config and strategy when nothing differs."""
    fields = range(1, len(SERIES_FIELDS))
    varying = [i for i in fields if len({s[i] for s in series_list}) > 1] or [1, 3]
    return {s: " ".join(series_name(s)[i] for i in varying) for s in series_list}


def write_plots(out, rows, models):
    """speedup.png, efficiency.png, gflops.png: one panel per scaling mode, measured points
    solid with markers against cores (ranks x threads; one line per ranks count), the model
    (model.py) dashed out to the extrapolation range. One-rank series measured at one
    thread count only (the block series) are left out; a ranks point alone is a marker."""
    import matplotlib  # imported here: --list/--point jobs should not pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("speedup") is not None]
    counts = {}
    for r in measured:
        counts.setdefault(series_of(r), set()).add(r["cores"])
    measured = [r for r in measured if len(counts[series_of(r)]) > 1 or r["ranks"] > 1]
    if not measured:
        return []
    curves = {tuple(m[f] for f in SERIES_FIELDS): m for m in models if m.get("curve")}
    series_list = list(dict.fromkeys(series_of(r) for r in measured))
    labels = series_labels(series_list)
    scalings = list(dict.fromkeys(s[0] for s in series_list))
    p_ideal = np.array([1, max(EXTRAPOLATE_TO)])
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
                                 key=lambda r: r["cores"])
                cores = [r["cores"] for r in members]
                line, = ax.plot(cores, [r[metric] for r in members], "o-",
                                label=labels[series])
                model = curves.get(series)
                if model:
                    p_model, ms = np.array(model["curve"]).T
                    work = p_model if scaling == "weak" else 1.0
                    speedup = model["base_ms"] * work / ms
                    values = {"speedup": speedup, "efficiency": speedup / p_model,
                              "gflops": members[0]["gflops"] * speedup}[metric]
                    ax.plot(p_model, values, "--", color=line.get_color(),
                            label=f"{labels[series]}: model")
            if metric == "speedup":
                ax.plot(p_ideal, p_ideal, ":", color="gray", label="ideal")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(plain)
            if metric != "efficiency":
                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_formatter(plain)
            else:
                ax.set_ylim(0, 1.1)
            ax.set_xlabel("cores (ranks x threads)")
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
