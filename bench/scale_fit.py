"""The scaling study's fitted model: Amdahl's law, optionally with a per-doubling overhead,
fitted per series by least squares on relative error and extrapolated to Xeon Phi counts."""
import math
from dataclasses import dataclass

import numpy as np

EXTRAPOLATE_TO = (64, 68, 272)  # Xeon Phi 7210 cores, 7250 cores, 7250 hardware threads


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
