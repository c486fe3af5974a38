"""Which machine a study's points belong to: machine.json, written when a study starts in a
directory, and the check that keeps one machine's points out of another machine's study.

A machine is identified by its CPU model, vector instruction set, sockets, cores, logical
CPUs and NUMA nodes (not its host name: the nodes of a job array share a study). The
default results directory is named after it, and resuming into a directory whose
machine.json names another machine is refused, or its points set aside on request.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from phi_rnn.affinity import read_topology
from .run import REPO_ROOT, json_files

IDENTITY = ("cpu", "isa", "sockets", "cores", "logical_cpus", "numa_nodes")
ISAS = ("avx512f", "avx2", "avx", "sse4_2")  # the best one present names the vector width
STUDY_FILES = ("points", "failed", "results.csv", "results.json", "results.md", "machine.json",
               "speedup.png", "efficiency.png", "gflops.png", "model.png")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    for line in Path(cpuinfo).read_text().splitlines():
        if line.startswith("flags"):
            return line.partition(":")[2].split()
    return []


def vector_isa(flags):
    return next((isa for isa in ISAS if isa in flags), "none").replace("avx512f", "avx512")


def this_machine():
    """This machine as speed.py reports it, plus the vector ISA, caches and NUMA layout."""
    topology = read_topology(allowed=sorted(os.sched_getaffinity(0)))
    flags = cpu_flags()
    return {"cpu": topology.model_name, "isa": vector_isa(flags), "sockets": len(topology.sockets),
            "cores": len(topology.cores), "logical_cpus": len(topology.cpus),
            "numa_nodes": len(topology.nodes), "hostname": os.uname().nodename,
            "vendor": topology.vendor, "family": topology.family, "model": topology.model,
            "flags": [f for f in flags if f.startswith(("avx", "fma", "amx", "sse4"))],
            "caches": [f"{name} {size} x{count}" for name, size, count in topology.cache_summary()],
            "numa": {str(n): cpus for n, cpus in topology.nodes.items()},
            "allowed_cpus": topology.allowed}


def identity(machine):
    return {k: (machine or {}).get(k) for k in IDENTITY}


def slug(machine):
    """results/scale-<slug>: e.g. intel-xeon-gold-6338-cpu-2-00ghz-32c-avx512."""
    name = re.sub(r"\((r|tm)\)|\bprocessor\b", "", machine["cpu"], flags=re.I)
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"
    return f"{name}-{machine['cores']}c-{machine['isa']}"


def describe(machine):
    m = identity(machine)
    return (f"{m['cpu']} ({m['isa']}, {m['sockets']} socket(s), {m['cores']} cores, "
            f"{m['logical_cpus']} CPUs, {m['numa_nodes']} NUMA nodes)")


def topo_report():
    """`python -m phi_rnn topo`'s text: the placement phi_rnn plans and verifies here."""
    proc = subprocess.run([sys.executable, "-m", "phi_rnn", "topo"], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return (proc.stdout + proc.stderr).strip()


def recorded_machine(out):
    """The machine of OUT's machine.json, else of its first point file; None when empty."""
    path = out / "machine.json"
    if path.exists():
        return json.loads(path.read_text()).get("machine")
    for point in json_files(out / "points"):
        return json.loads(point.read_text()).get("result", {}).get("machine")
    return None


def claim(out, set_aside, write_json):
    """Make OUT this machine's study: write machine.json when OUT has none; when it names
    another machine, move that machine's files to OUT/set-aside-<its slug>/ (set_aside) or
    return the one-line reason to refuse. Returns None when OUT is ours."""
    mine = this_machine()
    theirs = recorded_machine(out)
    if theirs is not None and identity(theirs) != identity(mine):
        if not set_aside:
            return (f"{out} holds points measured on {describe(theirs)}; this machine is "
                    f"{describe(mine)}: give another --out, or --set-aside to move them aside")
        aside = out / f"set-aside-{slug({**identity(theirs), 'cpu': theirs.get('cpu') or 'unknown'})}"
        aside.mkdir(parents=True, exist_ok=True)
        for name in STUDY_FILES:
            if (out / name).exists():
                shutil.move(str(out / name), str(aside / name))
        print(f"set aside the points of {describe(theirs)} in {aside}", file=sys.stderr)
        theirs = None
    if theirs is None or not (out / "machine.json").exists():
        write_json(out / "machine.json", {"machine": mine, "topo": topo_report()})
    return None
