"""Thread-affinity controller: topology -> placement plan -> runtime environment -> verification.

phi_rnn's parallel work runs on ONE OpenMP runtime.  numba's `omp` threading layer (pip's numba
links GNU libgomp) and MKL's `GNU` threading layer (libmkl_gnu_thread, which calls libgomp) share
libgomp's thread pool, so numba kernels and MKL GEMMs never oversubscribe each other, and MKL called
inside a numba prange runs sequentially (nested parallelism is off).  phi_rnn's float32 GEMMs that
run on one thread (inside a prange block, or all of them in a one-thread run) go to the measured
backend (blas.py: oneDNN's GNU OpenMP build, libxsmm, OpenBLAS set to one thread, or MKL); the
ones MKL would thread stay on MKL.

Both runtimes read their settings from the environment exactly once, when they are loaded, so
configure() must run before numpy, numba or MKL are imported.  If one of them is already loaded it
raises RuntimeError (a bug in the caller, not bad input): re-executing the interpreter behind the
caller's back would hide the ordering mistake instead of fixing it.

What configure() sets (plan.env) and why:
  NUMBA_THREADING_LAYER=omp, MKL_THREADING_LAYER=GNU   one runtime: libgomp
  OMP_NUM_THREADS, MKL_NUM_THREADS, NUMBA_NUM_THREADS  the same N everywhere
  OPENBLAS_NUM_THREADS=1      numpy's own BLAS (OpenBLAS in pip wheels) starts unbound pthreads that
                              would fight the spinning OpenMP workers; phi_rnn's GEMMs do not go
                              through numpy (the OpenBLAS backend is its own copy, set to one thread)
  MKL_DYNAMIC=FALSE           MKL uses the N asked for; by default it silently caps itself at one thread
                              per physical core (measured: 4 threads on 2 cores ran as 2), which would
                              falsify --threads-per-core > 1 and the scaling study's thread counts
  OMP_MAX_ACTIVE_LEVELS=1     nested parallel regions stay sequential (MKL inside prange)
  OMP_PLACES={c0},{c1},...    libgomp: one place per thread, in thread order, and
  OMP_PROC_BIND=close         thread i bound to place i, i.e. to plan.cpus[i]
  KMP_AFFINITY=granularity=fine,explicit,proclist=[c0,c1,...]  the same for Intel's libiomp5
  KMP_HW_SUBSET=[Ss,]Cc,Tt    only when the plan is exactly the first S sockets x C cores x T threads
  OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT=infinite, KMP_BLOCKTIME=infinite
                              workers spin instead of sleeping between the tiny per-timestep GEMMs:
                              waking a sleeping pool measured ~85 us per small GEMM.  When threads
                              outnumber CPUs (--oversubscribe) spinning starves the other threads,
                              so then PASSIVE / 0 / 0.
Variables that would contradict the plan (GOMP_CPU_AFFINITY, OMP_NESTED, and for policy `none` every
placement variable) are removed (plan.unset).

libgomp vs libiomp5: libgomp honours OMP_PLACES/OMP_PROC_BIND and ignores KMP_*; libiomp5 honours
both and lets KMP_AFFINITY win (it prints "OMP_PLACES: ignored because KMP_AFFINITY has been
defined" -- harmless, both describe the same placement).  Never load both runtimes in one process:
libgomp binds the initial thread to the first place when it loads, so libiomp5 then finds only that
CPU usable and stacks every thread on it.  verify() reports two loaded OpenMP runtimes as a mismatch.

Policies (T threads, K = --threads-per-core; when K is not given, the smallest K that fits T):
  compact   fill a core's hardware threads (up to K), then the next core; socket by socket,
            NUMA node by NUMA node.
  scatter   round-robin over sockets, then NUMA nodes, then cores; a core's second hardware thread
            is used only after every core has one.
  balanced  cores chosen as in scatter (spread evenly; when T > cores every core gets T//cores or
            one more), threads numbered core by core so a core's threads are adjacent
            (KMP_AFFINITY=balanced on Xeon Phi).
  none      thread counts only, no binding.
With --oversubscribe and T above the logical CPUs, thread i goes to the policy's order of all
CPUs at position i mod CPUs.

The main thread is OpenMP thread 0, so once the runtime starts it is pinned to plan.cpus[0], and
processes it starts inherit that mask: start children (e.g. one per benchmark point) from a process
that has not started OpenMP, or widen their affinity first.  verify() does the latter for the probe.

Topology comes from sysfs and /proc/cpuinfo alone (paths are parameters, for tests); hwloc is not
needed.  verify() checks three witnesses: native/build/affinity_probe (an OpenMP C program run
under the same env; optional: `make native`), a numba prange recording sched_getcpu() and
sched_getaffinity() per worker, and threadpoolctl's view of MKL (threads, layer) and of the OpenMP
runtimes loaded.  `python -m phi_rnn topo [--json]` prints topology, plan, env and verification.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from phi_rnn import native
from phi_rnn.errors import UsageError

POLICIES = ("compact", "scatter", "balanced", "none")
PROBE_PATH = native.affinity_probe_path()
PROBE_MISSING = "native probe not built: run `make native`"
XEON_PHI_MODELS = (87, 133)  # Knights Landing, Knights Mill (Intel family 6)
RUNTIME_LIBRARIES = ("libgomp", "libiomp5", "libmkl_")
CPU_LIST_LIMIT = 16  # CPUs shown in one-line descriptions


# ----------------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Cpu:
    id: int
    socket: int
    node: int
    core: tuple[int, ...]  # the core's online hardware threads, sorted: identifies the core
    thread: int  # rank of this CPU among its core's hardware threads


@dataclass
class Topology:
    cpus: list[Cpu]  # online CPUs, by id
    allowed: list[int]  # the CPUs this process may run on
    nodes: dict[int, list[int]]  # NUMA node -> CPUs (memory-only nodes, e.g. MCDRAM, map to [])
    caches: list[dict]  # one entry per distinct cache instance
    vendor: str = "unknown"
    model_name: str = "unknown"
    family: int | None = None
    model: int | None = None

    @property
    def xeon_phi(self) -> bool:
        return "Xeon Phi" in self.model_name or (
            self.vendor == "GenuineIntel" and self.family == 6 and self.model in XEON_PHI_MODELS
        )

    @property
    def sockets(self) -> list[int]:
        return sorted({cpu.socket for cpu in self.cpus})

    @property
    def cores(self) -> list[tuple[int, ...]]:
        return sorted({cpu.core for cpu in self.cpus})

    @property
    def threads_per_core(self) -> int:
        return max(len(core) for core in self.cores)

    def usable_cores(self) -> list[list[Cpu]]:
        """Cores with at least one allowed CPU, each as its allowed CPUs in hardware-thread order,
        ordered socket, NUMA node, then lowest CPU id: the compact order."""
        allowed = set(self.allowed)
        by_core: dict[tuple[int, ...], list[Cpu]] = {}
        for cpu in self.cpus:
            if cpu.id in allowed:
                by_core.setdefault(cpu.core, []).append(cpu)
        cores = [sorted(cpus, key=lambda c: c.thread) for cpus in by_core.values()]
        return sorted(cores, key=lambda c: (c[0].socket, c[0].node, c[0].core))

    def describe(self) -> str:
        sockets, cores, tpc = len(self.sockets), len(self.cores), self.threads_per_core
        return (f"{sockets} socket{'s' * (sockets != 1)}, {cores} core{'s' * (cores != 1)}, "
                f"{tpc} thread{'s' * (tpc != 1)}/core")

    def summary(self) -> str:
        phi = " [Xeon Phi]" if self.xeon_phi else ""
        nodes = "; ".join(f"node{n}: {format_cpu_list(cpus) or 'no CPUs'}" for n, cpus in self.nodes.items())
        caches = ", ".join(f"{name} {size} x{count}" for name, size, count in self.cache_summary())
        return (f"{self.model_name} ({self.vendor}){phi}: {self.describe()}; {len(self.cpus)} logical CPUs, "
                f"{len(self.allowed)} allowed ({format_cpu_list(self.allowed)}); NUMA {nodes}"
                + (f"; caches {caches}" if caches else ""))

    def cache_summary(self) -> list[tuple[str, str, int]]:
        counts: dict[tuple[str, str], int] = {}
        for cache in self.caches:
            counts[(cache["name"], cache["size"])] = counts.get((cache["name"], cache["size"]), 0) + 1
        return [(name, size, count) for (name, size), count in sorted(counts.items())]

    def to_dict(self) -> dict:
        return {
            "vendor": self.vendor, "model_name": self.model_name, "family": self.family,
            "model": self.model, "xeon_phi": self.xeon_phi, "sockets": len(self.sockets),
            "cores": len(self.cores), "threads_per_core": self.threads_per_core,
            "logical_cpus": len(self.cpus), "allowed_cpus": self.allowed,
            "numa_nodes": {str(n): cpus for n, cpus in self.nodes.items()},
            "caches": self.caches, "cpus": [vars(cpu) | {"core": list(cpu.core)} for cpu in self.cpus],
            "describe": self.describe(),
        }


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def format_cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (sorted, for people)."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_int(path: Path, default: int) -> int:
    text = read_text(path)
    return int(text) if text and text.lstrip("-").isdigit() else default


def read_cpuinfo(path: Path) -> dict:
    """Vendor, model name, family and model of the first processor in /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in (read_text(path) or "").splitlines():
        if not line.strip():
            break  # end of the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    family, model = fields.get("cpu family", ""), fields.get("model", "")
    return {"vendor": fields.get("vendor_id", "unknown"), "model_name": fields.get("model name", "unknown"),
            "family": int(family) if family.isdigit() else None, "model": int(model) if model.isdigit() else None}


def read_numa_nodes(sysfs: Path, online: list[int]) -> dict[int, list[int]]:
    nodes = {}
    for node_dir in (sysfs / "devices/system/node").glob("node[0-9]*"):
        cpulist = read_text(node_dir / "cpulist")
        if cpulist is not None:
            nodes[int(node_dir.name[4:])] = [c for c in parse_cpu_list(cpulist) if c in online]
    return dict(sorted(nodes.items())) or {0: list(online)}  # no NUMA info (VMs): one node


def read_caches(cpu_root: Path, online: list[int]) -> list[dict]:
    caches: dict[tuple, dict] = {}
    for cpu in online:
        for index in sorted((cpu_root / f"cpu{cpu}/cache").glob("index[0-9]*")):
            level, kind = read_text(index / "level"), read_text(index / "type")
            shared = parse_cpu_list(read_text(index / "shared_cpu_list") or str(cpu))
            if level is None or kind is None:
                continue
            name = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
            caches.setdefault((name, tuple(shared)), {"name": name, "size": read_text(index / "size") or "?",
                                                      "shared_cpus": shared})
    return sorted(caches.values(), key=lambda c: (c["name"], c["shared_cpus"]))


def read_topology(sysfs: str | Path = "/sys", cpuinfo: str | Path = "/proc/cpuinfo",
                  allowed: list[int] | None = None) -> Topology:
    """Topology from sysfs + cpuinfo; missing files (VMs, containers) fall back to one socket, one
    NUMA node and one core per CPU.  allowed defaults to every online CPU."""
    cpu_root = Path(sysfs) / "devices/system/cpu"
    online_text = read_text(cpu_root / "online")
    online = sorted(parse_cpu_list(online_text) if online_text else
                    [int(p.name[3:]) for p in cpu_root.glob("cpu[0-9]*")])
    if not online:
        raise UsageError(f"no CPUs found under {cpu_root}")
    nodes = read_numa_nodes(Path(sysfs), online)
    node_of = {cpu: node for node, cpus in nodes.items() for cpu in cpus}
    cpus = []
    for cpu in online:
        topo = cpu_root / f"cpu{cpu}/topology"
        siblings = parse_cpu_list(read_text(topo / "thread_siblings_list") or str(cpu))
        core = tuple(sorted(c for c in siblings if c in online) or [cpu])
        cpus.append(Cpu(id=cpu, socket=max(read_int(topo / "physical_package_id", 0), 0),
                        node=node_of.get(cpu, min(nodes)), core=core, thread=core.index(cpu)))
    allowed = sorted(set(online) if allowed is None else set(allowed) & set(online))
    return Topology(cpus=cpus, allowed=allowed, nodes=nodes, caches=read_caches(cpu_root, online),
                    **read_cpuinfo(Path(cpuinfo)))


# ------------------------------------------------------------------------------ ranks on a node


def node_cpus(cgroup_root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> list[int] | None:
    """The CPUs the batch system gave this job on this node: the cpuset of this process's cgroup
    (v2 cpuset.cpus.effective, v1 cpuset.effective_cpus), or None where there is none.  Not this
    process's affinity mask: an MPI launcher may have narrowed that to one core per rank."""
    for line in (read_text(Path(proc_cgroup)) or "").splitlines():
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            candidates = [Path(cgroup_root, relative, "cpuset.cpus.effective")]
        elif "cpuset" in controllers.split(","):
            candidates = [Path(cgroup_root, "cpuset", relative, "cpuset.effective_cpus"),
                          Path(cgroup_root, "cpuset", relative, "cpuset.cpus")]
        else:
            continue
        for candidate in candidates:
            text = read_text(candidate)
            if text:
                return parse_cpu_list(text)
    return None


def rank_topology(topology: Topology, local_rank: int, local_size: int, oversubscribe: bool = False) -> Topology:
    """The part of the node that node-local rank `local_rank` of `local_size` gets: the usable
    cores in compact order (socket, NUMA node, core) cut into local_size contiguous runs as even as
    possible, every hardware thread of a core going with it.  Ranks never share a core, and with
    as many ranks as sockets or NUMA domains each rank gets exactly one (hybrid MPI + OpenMP).
    More ranks than cores only with oversubscribe (tests): rank r then shares core r mod cores."""
    cores = topology.usable_cores()
    if local_size > len(cores):
        if not oversubscribe:
            raise UsageError(f"{local_size} MPI ranks on this node but only {len(cores)} cores "
                             f"(CPUs {format_cpu_list(topology.allowed)}): ranks must not share cores; "
                             f"add --oversubscribe to allow it")
        cores = [cores[local_rank % len(cores)]]
        local_rank, local_size = 0, 1
    start, stop = local_rank * len(cores) // local_size, (local_rank + 1) * len(cores) // local_size
    mine = sorted(cpu.id for core in cores[start:stop] for cpu in core)
    return Topology(cpus=topology.cpus, allowed=mine, nodes=topology.nodes, caches=topology.caches,
                    vendor=topology.vendor, model_name=topology.model_name, family=topology.family,
                    model=topology.model)


def rank_plans(topology: Topology, ranks_per_node: int, threads: int | None = None, policy: str = "compact",
               threads_per_core: int | None = None, oversubscribe: bool = False) -> list[Plan]:
    """The plan of every rank on one node (topo --ranks-per-node)."""
    return [make_plan(rank_topology(topology, rank, ranks_per_node, oversubscribe), threads, policy,
                      threads_per_core, oversubscribe) for rank in range(ranks_per_node)]


# ---------------------------------------------------------------------------------- placement


@dataclass
class Plan:
    threads: int
    policy: str
    cpus: list[int]  # CPU of OpenMP thread i; empty for policy none
    threads_per_core: int  # the K the placement used (given, or the smallest that fits)
    oversubscribed: bool  # more threads than allowed CPUs
    topology: Topology
    env: dict[str, str] = field(default_factory=dict)
    unset: list[str] = field(default_factory=list)
    launcher_mask: list[int] | None = None  # the affinity configure() found and replaced (MPI ranks)

    def describe(self) -> str:
        cpus = f"CPUs {short_list(self.cpus)}" if self.cpus else "not bound"
        per_core = f", {self.threads_per_core} threads/core" if self.threads_per_core > 1 and self.cpus else ""
        over = ", oversubscribed" if self.oversubscribed else ""
        launcher = (f", overriding the launcher's binding to CPUs {format_cpu_list(self.launcher_mask)}"
                    if self.launcher_mask is not None else "")
        return (f"placement: {self.threads} thread{'s' * (self.threads != 1)}, policy {self.policy}"
                f"{per_core}{over}, {cpus} ({self.topology.describe()}), MKL+numba on libgomp{launcher}")

    def to_dict(self) -> dict:
        return {"threads": self.threads, "policy": self.policy, "cpus": self.cpus,
                "threads_per_core": self.threads_per_core, "oversubscribed": self.oversubscribed,
                "unset": self.unset, "describe": self.describe()}


def short_list(values: list[int]) -> str:
    if len(values) <= CPU_LIST_LIMIT:
        return str(values)
    head = ", ".join(map(str, values[:CPU_LIST_LIMIT - 2]))
    return f"[{head}, ..., {values[-1]}] ({len(values)} in all)"


def round_robin(groups: list[list]) -> list:
    """[[a, b, c], [d, e]] -> [a, d, b, e, c]."""
    return [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)]


def scatter_core_order(cores: list[list[Cpu]]) -> list[list[Cpu]]:
    """Cores alternating over sockets, and within a socket over NUMA nodes."""
    def grouped(items, key):
        groups: dict[int, list] = {}
        for item in items:
            groups.setdefault(key(item), []).append(item)
        return [groups[k] for k in sorted(groups)]

    return round_robin([round_robin(grouped(socket, lambda core: core[0].node))
                        for socket in grouped(cores, lambda core: core[0].socket)])


def compact_order(cores: list[list[Cpu]], per_core: int) -> list[int]:
    return [cpu.id for core in cores for cpu in core[:per_core]]


def scatter_order(cores: list[list[Cpu]], per_core: int) -> list[int]:
    spread = scatter_core_order(cores)
    return [core[level].id for level in range(per_core) for core in spread if level < len(core)]


def balanced_order(cores: list[list[Cpu]], threads: int, per_core: int) -> list[int]:
    """Spread evenly over cores: one thread per core per round, cores in scatter order, skipping full
    ones; then number the threads core by core so a core's threads are adjacent."""
    spread = scatter_core_order(cores)
    count = {id(core): 0 for core in spread}
    left = threads
    while left:
        for core in spread:
            if left and count[id(core)] < min(per_core, len(core)):
                count[id(core)] += 1
                left -= 1
    return [cpu.id for core in cores for cpu in core[:count[id(core)]]]


def policy_order(policy: str, cores: list[list[Cpu]], threads: int, per_core: int) -> list[int]:
    if policy == "compact":
        return compact_order(cores, per_core)[:threads]
    if policy == "scatter":
        return scatter_order(cores, per_core)[:threads]
    return balanced_order(cores, threads, per_core)


def slots(cores: list[list[Cpu]], per_core: int) -> int:
    return sum(min(per_core, len(core)) for core in cores)


def validate(topology: Topology, threads: int, policy: str, threads_per_core: int | None,
             oversubscribe: bool) -> None:
    if policy not in POLICIES:
        raise UsageError(f"unknown --policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0:
        raise UsageError(f"--threads must be a positive integer, got {threads!r}")
    cpus = len(topology.allowed)
    if threads > cpus and not oversubscribe:
        raise UsageError(f"--threads {threads} is more than the {cpus} logical CPUs available "
                         f"(CPUs {format_cpu_list(topology.allowed)}); add --oversubscribe to allow it")
    if threads_per_core is not None:
        if isinstance(threads_per_core, bool) or not isinstance(threads_per_core, int) or threads_per_core <= 0:
            raise UsageError(f"--threads-per-core must be a positive integer, got {threads_per_core!r}")
        if threads_per_core > topology.threads_per_core:
            raise UsageError(f"--threads-per-core {threads_per_core} is more than the "
                             f"{topology.threads_per_core} hardware thread(s) per core of this machine")


def choose_threads_per_core(cores: list[list[Cpu]], threads: int, given: int | None, hardware: int) -> int:
    """The given K if T threads fit in it, else the smallest K that fits (when none was given)."""
    if given is not None:
        if threads > slots(cores, given):
            raise UsageError(f"--threads {threads} at {given} thread(s) per core does not fit: only "
                             f"{slots(cores, given)} such slots on {len(cores)} cores; raise --threads-per-core")
        return given
    return next(k for k in range(1, hardware + 1) if slots(cores, k) >= threads)


def make_plan(topology: Topology, threads: int | None = None, policy: str = "compact",
              threads_per_core: int | None = None, oversubscribe: bool = False) -> Plan:
    """THREADS + policy + threads-per-core -> the exact CPU of every thread, and the env to set.
    Pure: reads nothing, sets nothing."""
    cores = topology.usable_cores()
    threads = len(cores) if threads is None else threads
    validate(topology, threads, policy, threads_per_core, oversubscribe)
    hardware = topology.threads_per_core
    oversubscribed = threads > len(topology.allowed)
    if oversubscribed:
        per_core = hardware
        order = policy_order(policy if policy != "none" else "compact", cores, len(topology.allowed), hardware)
        cpus = [order[i % len(order)] for i in range(threads)]
    else:
        per_core = choose_threads_per_core(cores, threads, threads_per_core, hardware)
        cpus = policy_order(policy if policy != "none" else "compact", cores, threads, per_core)
    plan = Plan(threads=threads, policy=policy, cpus=[] if policy == "none" else cpus,
                threads_per_core=per_core, oversubscribed=oversubscribed, topology=topology)
    plan.env, plan.unset = runtime_env(plan)
    return plan


def hw_subset(plan: Plan) -> str | None:
    """KMP_HW_SUBSET for the plan when its CPUs are exactly the first S sockets x first C cores of
    each x first T hardware threads of each core (what KMP_HW_SUBSET can express), else None."""
    cores = plan.topology.usable_cores()
    used = set(plan.cpus)
    sockets = sorted({core[0].socket for core in cores})
    per_socket = {s: [core for core in cores if core[0].socket == s] for s in sockets}
    used_sockets = [s for s in sockets if any(cpu.id in used for core in per_socket[s] for cpu in core)]
    if not used or used_sockets != sockets[:len(used_sockets)]:
        return None
    core_count = sum(any(cpu.id in used for cpu in core) for core in per_socket[used_sockets[0]])
    thread_count = sum(cpu.id in used for cpu in cores[0])
    expected = {cpu.id for s in used_sockets for core in per_socket[s][:core_count] for cpu in core[:thread_count]}
    if expected != used:
        return None
    prefix = f"{len(used_sockets)}s," if len(sockets) > 1 else ""
    return f"{prefix}{core_count}c,{thread_count}t"


def runtime_env(plan: Plan) -> tuple[dict[str, str], list[str]]:
    """The variables to set and the ones to remove (see the module docstring)."""
    n = str(plan.threads)
    env = {"NUMBA_THREADING_LAYER": "omp", "MKL_THREADING_LAYER": "GNU",
           "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "NUMBA_NUM_THREADS": n,
           "MKL_DYNAMIC": "FALSE", "OPENBLAS_NUM_THREADS": "1", "OMP_MAX_ACTIVE_LEVELS": "1"}
    if plan.oversubscribed:
        env |= {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}
    else:
        env |= {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "infinite", "KMP_BLOCKTIME": "infinite"}
    unset = ["GOMP_CPU_AFFINITY", "OMP_NESTED"]
    if not plan.cpus:
        return env, unset + ["OMP_PLACES", "OMP_PROC_BIND", "KMP_AFFINITY", "KMP_HW_SUBSET"]
    env["OMP_PLACES"] = ",".join(f"{{{cpu}}}" for cpu in plan.cpus)
    env["OMP_PROC_BIND"] = "close"
    env["KMP_AFFINITY"] = f"granularity=fine,explicit,proclist=[{','.join(map(str, plan.cpus))}]"
    subset = hw_subset(plan)
    if subset:
        env["KMP_HW_SUBSET"] = subset
    else:
        unset.append("KMP_HW_SUBSET")
    return env, unset


# ------------------------------------------------------------------------------------ configure


def loaded_runtimes() -> list[str]:
    """numpy/numba modules and OpenMP/MKL libraries already in this process: they have read
    their environment already."""
    loaded = [name for name in ("numpy", "numba") if name in sys.modules]
    maps = read_text(Path("/proc/self/maps")) or ""
    libraries = {Path(line.split()[-1]).name for line in maps.splitlines() if "/" in line}
    loaded += sorted(lib for lib in libraries if lib.startswith(RUNTIME_LIBRARIES))
    return loaded


def configure(threads: int | None = None, policy: str = "compact", threads_per_core: int | None = None,
              oversubscribe: bool = False, *, topology: Topology | None = None) -> Plan:
    """Read the topology, make the plan, set os.environ.  Call before numpy/numba/MKL load.
    Bad values raise UsageError; a runtime already loaded raises RuntimeError."""
    if topology is None:
        topology = read_topology(allowed=sorted(os.sched_getaffinity(0)))
    plan = make_plan(topology, threads, policy, threads_per_core, oversubscribe)
    loaded = loaded_runtimes()
    if loaded:
        raise RuntimeError(f"phi_rnn.affinity.configure() must run before the runtimes load (they read "
                           f"their settings once, at load), but {', '.join(loaded)} already did")
    for name in plan.unset:
        os.environ.pop(name, None)
    os.environ.update(plan.env)
    mask = sorted(os.sched_getaffinity(0))
    if mask != plan.topology.allowed:
        # an MPI rank: its share of the node. Some launchers bind each rank to one core (Open MPI
        # for np <= 2), which libgomp would honour by stacking every thread there: replaced too
        os.sched_setaffinity(0, plan.topology.allowed)
        if not set(plan.topology.allowed) <= set(mask):
            plan.launcher_mask = mask
    return plan


def configure_rank(local_rank: int, local_size: int, threads: int | None = None, policy: str = "compact",
                   threads_per_core: int | None = None, oversubscribe: bool = False) -> Plan:
    """configure() for node-local MPI rank `local_rank` of `local_size`: its threads on its own
    share of the node's cores (rank_topology); one process (local_size 1) as configure()."""
    topology = None
    if local_size > 1:
        node = read_topology(allowed=node_cpus())
        topology = rank_topology(node, local_rank, local_size, oversubscribe)
    return configure(threads, policy, threads_per_core, oversubscribe, topology=topology)


# --------------------------------------------------------------------------------------- verify


@dataclass
class Verification:
    ok: bool
    mismatches: list[str]
    cpus: list[int]  # observed CPU of thread i (probe if it ran, else numba)
    source: str  # "probe" or "numba"
    numba: dict
    mkl: dict | None
    openmp_runtimes: list[str]
    probe: dict | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        note = f" ({'; '.join(self.notes)})" if self.notes else ""
        if not self.ok:
            return f"NOT verified: {'; '.join(self.mismatches)}{note}"
        mkl = f"MKL {self.mkl['num_threads']} threads ({self.mkl['threading_layer']})" if self.mkl else "MKL absent"
        return (f"verified: OpenMP threads on CPUs {short_list(self.cpus)} ({self.source}), numba "
                f"{self.numba['num_threads']} threads on {self.numba['threading_layer']}, {mkl}{note}")

    def to_dict(self) -> dict:
        return vars(self) | {"describe": self.describe()}


def placement_mismatches(label: str, plan: Plan, threads: list[dict]) -> list[str]:
    """Compare observed threads ({'thread', 'cpu', 'allowed'}) with the plan."""
    problems = []
    if len(threads) != plan.threads:
        problems.append(f"{label}: {len(threads)} threads ran, the plan has {plan.threads}")
    allowed = set(plan.topology.allowed)
    for seen in sorted(threads, key=lambda t: t["thread"]):
        i, cpu, mask = seen["thread"], seen["cpu"], sorted(seen["allowed"])
        if not plan.cpus:
            if cpu not in allowed:
                problems.append(f"{label}: thread {i} ran on CPU {cpu}, outside the allowed CPUs")
        elif i >= len(plan.cpus):
            problems.append(f"{label}: thread {i} is beyond the plan's {plan.threads} threads")
        elif mask != [plan.cpus[i]] or cpu != plan.cpus[i]:
            problems.append(f"{label}: thread {i} on CPU {cpu} allowed {format_cpu_list(mask)}, "
                            f"plan pins it to CPU {plan.cpus[i]}")
    return problems


def run_probe(plan: Plan, probe: Path) -> dict:
    """Run the native probe under the configured env; its mask starts from all allowed CPUs
    (this thread may already be pinned to plan.cpus[0], and children inherit that).  The probe
    only reports placement, so it waits passively instead of spinning against our own workers."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="0", KMP_BLOCKTIME="0")
    own_mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, plan.topology.allowed)
    try:
        done = subprocess.run([str(probe)], check=False, env=env, capture_output=True, text=True, timeout=60)
    finally:
        os.sched_setaffinity(0, own_mask)
    if done.returncode != 0:
        raise RuntimeError(f"exit status {done.returncode}: {done.stderr.strip()[:200]}")
    return json.loads(done.stdout)


def numba_thread_placement(threads: int) -> list[dict]:
    """Run a numba prange where each worker records sched_getcpu() and sched_getaffinity()."""
    import numba
    import numpy as np
    from numba import types

    sched_getcpu = types.ExternalFunction("sched_getcpu", types.int32())
    sched_getaffinity = types.ExternalFunction("sched_getaffinity", types.int32(types.int32, types.intp, types.intp))
    words = 128  # 8192 CPUs, as in the native probe

    @numba.njit(parallel=True)
    def record(n):
        cpus = np.full(n, -1, np.int32)
        masks = np.zeros((n, words), np.uint64)
        for _i in numba.prange(n * 64):  # static schedule: every worker gets a chunk
            t = numba.get_thread_id()
            cpus[t] = sched_getcpu()
            sched_getaffinity(0, words * 8, masks[t].ctypes.data)
        return cpus, masks

    cpus, masks = record(threads)
    return [{"thread": t, "cpu": int(cpus[t]),
             "allowed": [w * 64 + b for w in range(words) for b in range(64) if int(masks[t, w]) >> b & 1]}
            for t in range(threads) if cpus[t] >= 0]


def load_mkl() -> str | None:
    """Load libmkl_rt if nothing has yet (threadpoolctl only sees loaded libraries)."""
    path = native.mkl_rt_path()  # the library blas.py loads
    try:
        ctypes.CDLL(path)
        return path
    except (OSError, TypeError):  # TypeError: none found
        return None


def runtime_mismatches(plan: Plan, numba_info: dict, mkl: dict | None, openmp: list[str]) -> list[str]:
    """What differs from the plan in the runtimes' own accounts; openmp: the OpenMP runtime
    libraries loaded."""
    problems = []
    if numba_info["threading_layer"] != "omp":
        problems.append(f"numba threading layer is {numba_info['threading_layer']!r}, expected 'omp'")
    if numba_info["num_threads"] != plan.threads:
        problems.append(f"numba runs {numba_info['num_threads']} threads, the plan has {plan.threads}")
    if mkl is None:
        problems.append("MKL (libmkl_rt) not found")
    else:
        if mkl["num_threads"] != plan.threads:
            problems.append(f"MKL runs {mkl['num_threads']} threads, the plan has {plan.threads}")
        if mkl["threading_layer"] != "gnu":
            problems.append(f"MKL threading layer is {mkl['threading_layer']!r}, expected 'gnu'")
    if len(openmp) != 1:
        problems.append(f"{len(openmp)} OpenMP runtimes loaded ({', '.join(openmp) or 'none'}), expected one")
    return problems


def verify(plan: Plan, probe: Path | str = PROBE_PATH) -> Verification:
    """Check, after the runtimes started, that threads run where the plan says: the native probe
    (same env), numba's own workers, numba's layer and thread count, MKL's count and layer."""
    import numba
    from threadpoolctl import threadpool_info

    numba_threads = numba_thread_placement(plan.threads)
    numba_info = {"threading_layer": numba.threading_layer(), "config_layer": numba.config.THREADING_LAYER,
                  "num_threads": numba.get_num_threads(), "cpus": [t["cpu"] for t in numba_threads]}
    mismatches = placement_mismatches("numba", plan, numba_threads)
    notes, probe_report = [], None
    if Path(probe).is_file():
        try:
            probe_report = run_probe(plan, Path(probe))
            mismatches = placement_mismatches("probe", plan, probe_report["threads"]) + mismatches
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as error:
            mismatches.insert(0, f"native probe failed: {error}")
    else:
        notes.append(PROBE_MISSING)
    if not any(i["internal_api"] == "mkl" for i in threadpool_info()):
        load_mkl()
    # asking MKL for its threading layer loads the OpenMP runtime MKL picks (one in its own
    # directory before the process's: two runtimes, two thread pools); the second look sees it
    threadpool_info()
    pools = threadpool_info()
    mkl = next(({"num_threads": i["num_threads"], "threading_layer": i.get("threading_layer"),
                 "filepath": i["filepath"]} for i in pools if i["internal_api"] == "mkl"), None)
    openmp_pools = [i for i in pools if i["user_api"] == "openmp"]
    openmp = [i["prefix"] for i in openmp_pools]
    mismatches += runtime_mismatches(plan, numba_info, mkl, [i["filepath"] for i in openmp_pools])
    if probe_report is not None:
        cpus, source = [t["cpu"] for t in sorted(probe_report["threads"], key=lambda t: t["thread"])], "probe"
    else:
        cpus, source = numba_info["cpus"], "numba"
    return Verification(ok=not mismatches, mismatches=mismatches, cpus=cpus, source=source, numba=numba_info,
                        mkl=mkl, openmp_runtimes=openmp, probe=probe_report, notes=notes)


# ------------------------------------------------------------------------------- shared flags


def add_thread_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="OpenMP threads for numba and MKL (default: all physical cores)")
    parser.add_argument("--policy", choices=POLICIES, default="compact",
                        help="thread placement: compact (fill cores), scatter (spread over sockets/NUMA/cores), "
                             "balanced (spread, a core's threads adjacent), none (no binding); default compact")
    parser.add_argument("--threads-per-core", "--threads_per_core", dest="threads_per_core", type=int,
                        default=None, help="hardware threads to use per core (default 1, more if --threads needs)")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="allow more threads than logical CPUs (threads then sleep instead of spinning)")
