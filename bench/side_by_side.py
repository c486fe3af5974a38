"""What the side-by-side benchmarks (speed.py, sampling.py, mpi_speed.py, backends.py) share:
each implementation measured in a worker process of its own, PyTorch's side when torch is
importable, the machine and versions as their reports name them, and the report's last step.
Imports nothing that starts a runtime."""
import json
import os
import platform
import resource
import subprocess
import sys
from typing import Callable, NamedTuple

from phi_rnn.errors import UsageError

RUNTIME_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "NUMBA_", "OPENBLAS_")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_record(topology):
    """The machine as a report names it (the scaling study tells machines apart by it)."""
    return {"cpu": topology.model_name, "sockets": len(topology.sockets), "cores": len(topology.cores),
            "logical_cpus": len(topology.cpus), "numa_nodes": len(topology.nodes), "hostname": platform.node()}


def versions():
    import numba
    import numpy
    from phi_rnn import __version__
    from phi_rnn.blas import mkl_version
    return {"python": platform.python_version(), "numpy": numpy.__version__, "numba": numba.__version__,
            "mkl": mkl_version(), "phi_rnn": __version__}


def run_worker(kind, argv, threads, script):
    """`script --worker kind` in a fresh process per implementation (the calling process loads
    no runtime: once libgomp loads it pins the main thread, and children would inherit that).
    phi_rnn's worker applies the plan; PyTorch's runs as users run it, with only the thread
    count set (our spinning OpenMP settings would make its autograd thread fight its own
    workers). Returns the worker's JSON; a bad input the worker refused is a UsageError."""
    cmd = [sys.executable, os.path.abspath(script), *argv, "--threads", str(threads), "--worker", kind]
    env = dict(os.environ)
    if kind == "torch":
        env = {k: v for k, v in env.items() if not k.startswith(RUNTIME_PREFIXES)}
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode == 2:  # bad input, said in one line
        line = result.stderr.strip().splitlines()[-1]
        raise UsageError(line.removeprefix(f"{os.path.basename(script)}: error: "))
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{kind} worker failed: {tail}")
    return json.loads(result.stdout)


def run_torch_reference(argv, threads, script):
    """The PyTorch worker's JSON with its torch version added; None when torch is not
    importable or the worker fails (then with a warning)."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        result = run_worker("torch", argv, threads, script)
    except RuntimeError as e:
        print(f"{os.path.basename(script)}: warning: {e}", file=sys.stderr)
        return None
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    result["version"] = out.stdout.strip()
    return result


def bf16_support():
    """This CPU's bfloat16, as phi_rnn sees it, asked of a fresh process (phi_rnn.bf16 loads
    the GEMM libraries and their OpenMP runtime, which the calling process keeps out of):
    {"flags": the native bfloat16 flags /proc/cpuinfo lists, "native": those oneDNN may use
    (phi_rnn.bf16.native_features), "refusal": phi_rnn.bf16.refusal() where none, else None}."""
    probe = ("import json; from phi_rnn import bf16; native = bf16.native_features(); print(json.dumps("
             "{'flags': [f for f in bf16.NATIVE_FEATURES if f in bf16.cpu_flags()], 'native': list(native), "
             "'refusal': None if native else bf16.refusal()}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"flags": [], "native": [], "refusal": f"phi_rnn.bf16 does not load here ({tail})"}
    return json.loads(result.stdout)


def print_machine(r):
    """The first lines of a report: machine, versions, thread placement."""
    print(f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['logical_cpus']} CPUs; "
          + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    print(r["placement"])
    if "gemm" in r:
        print(f"gemm: {r['gemm']}" + (f"; vectors {r['vector']}" if r.get("vector") else ""))


def print_sides(r, describe):
    """One line per side measured, phi_rnn's and (when it ran) PyTorch's: describe(side) after
    the side's name."""
    for name in ("phi_rnn", "torch"):
        if r[name]:
            print(f"{name:8s} {describe(r[name])}")


class TorchSide(NamedTuple):
    """How a benchmark runs and reads PyTorch's side: its worker's arguments, thread count and
    script; summarize(worker JSON) -> report["torch"]; ratios(phi_rnn's, torch's) -> the
    report's ratio fields."""
    argv: list
    threads: int
    script: str
    summarize: Callable
    ratios: Callable


def finish(report, as_json, print_text, torch_side=None):
    """A benchmark's last step: PyTorch's side of the same measurement added when torch_side is
    given and torch runs here (report["torch"], its version, the ratios); then the report
    printed as one JSON object (as_json) or as text. Returns the exit status, 0."""
    theirs = run_torch_reference(torch_side.argv, torch_side.threads, torch_side.script) if torch_side else None
    if theirs:
        report["torch"] = torch_side.summarize(theirs)
        report["versions"]["torch"] = theirs["version"]
        report.update(torch_side.ratios(report["phi_rnn"], report["torch"]))
    if as_json:
        print(json.dumps(report))
    else:
        print_text(report)
    return 0
