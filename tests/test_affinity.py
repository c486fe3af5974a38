"""Affinity controller: topology parsing and placement on fake sysfs trees (this 2-core VM, a
2-socket hyper-threaded Xeon, a Xeon Phi 7250), input errors, and -- on this machine, in fresh
processes -- that the threads really run where the plan says (native probe, numba, MKL)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phi_rnn import affinity
from phi_rnn.affinity import format_cpu_list, make_plan, read_topology
from phi_rnn.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def cpu_list(cpus) -> str:
    return ",".join(map(str, cpus))


def fake_machine(root: Path, sockets: int, cores: int, threads: int, model_name: str, family: int,
                 model: int, vendor: str = "GenuineIntel", memory_only_node: bool = False):
    """Write a sysfs tree + cpuinfo with Linux numbering: cpu = t*sockets*cores + s*cores + c.
    One NUMA node per socket (plus a CPU-less MCDRAM-like node if asked); per-core L1d/L2,
    per-socket L3.  Returns (sysfs root, cpuinfo path)."""
    sysfs, per_thread = root / "sys", sockets * cores
    cpu_root = sysfs / "devices/system/cpu"
    write(cpu_root / "online", f"0-{per_thread * threads - 1}")
    for s in range(sockets):
        socket_cpus = [t * per_thread + s * cores + c for t in range(threads) for c in range(cores)]
        write(sysfs / f"devices/system/node/node{s}/cpulist", cpu_list(sorted(socket_cpus)))
        for c in range(cores):
            siblings = [t * per_thread + s * cores + c for t in range(threads)]
            for cpu in siblings:
                topo = cpu_root / f"cpu{cpu}/topology"
                write(topo / "physical_package_id", str(s))
                write(topo / "core_id", str(c))
                write(topo / "thread_siblings_list", cpu_list(siblings))
                for index, (level, kind, size, shared) in enumerate(
                        [(1, "Data", "32K", siblings), (2, "Unified", "1024K", siblings),
                         (3, "Unified", "32768K", sorted(socket_cpus))]):
                    cache = cpu_root / f"cpu{cpu}/cache/index{index}"
                    for name, value in [("level", level), ("type", kind), ("size", size),
                                        ("shared_cpu_list", cpu_list(shared))]:
                        write(cache / name, str(value))
    if memory_only_node:
        write(sysfs / f"devices/system/node/node{sockets}/cpulist", "")
    cpuinfo = root / "cpuinfo"
    write(cpuinfo, f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                   f"model name\t: {model_name}\n\nprocessor\t: 1\nvendor_id\t: {vendor}\n")
    return sysfs, cpuinfo


# Module-scoped: the Xeon Phi tree is thousands of files; placement never writes to a topology.
@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vm")
    return read_topology(*fake_machine(root, 1, 2, 1, "AMD EPYC", 25, 17, vendor="AuthenticAMD"))


@pytest.fixture(scope="module")
def xeon(tmp_path_factory):
    root = tmp_path_factory.mktemp("xeon")
    return read_topology(*fake_machine(root, 2, 16, 2, "Intel(R) Xeon(R) CPU E5-2683 v4 @ 2.10GHz", 6, 79))


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    return read_topology(*fake_machine(root, 1, 68, 4, "Intel(R) Xeon Phi(TM) CPU 7250 @ 1.40GHz", 6, 87,
                                       memory_only_node=True))


# ------------------------------------------------------------------------------------ topology


def test_topology_of_the_three_machines(vm, xeon, phi):
    assert (len(vm.sockets), len(vm.cores), vm.threads_per_core, len(vm.cpus)) == (1, 2, 1, 2)
    assert vm.describe() == "1 socket, 2 cores, 1 thread/core"
    assert vm.vendor == "AuthenticAMD" and not vm.xeon_phi
    assert vm.nodes == {0: [0, 1]}
    assert xeon.describe() == "2 sockets, 32 cores, 2 threads/core" and not xeon.xeon_phi
    assert xeon.nodes[1] == list(range(16, 32)) + list(range(48, 64))
    cpu33 = xeon.cpus[33]
    assert (cpu33.socket, cpu33.node, cpu33.core, cpu33.thread) == (0, 0, (1, 33), 1)
    assert phi.describe() == "1 socket, 68 cores, 4 threads/core" and phi.xeon_phi
    assert phi.nodes[1] == []  # MCDRAM: memory, no CPUs
    assert phi.cpus[205].core == (1, 69, 137, 205) and phi.cpus[205].thread == 3
    assert ("L3", "32768K", 2) in xeon.cache_summary() and ("L1d", "32K", 68) in phi.cache_summary()


def test_xeon_phi_recognised_by_family_and_model(tmp_path):
    knm = read_topology(*fake_machine(tmp_path, 1, 2, 1, "Genuine Intel(R) CPU 0000", 6, 133))
    assert knm.xeon_phi


def test_missing_sysfs_files_fall_back_to_one_core_per_cpu(tmp_path):
    cpu_root = tmp_path / "sys/devices/system/cpu"
    for cpu in range(3):
        (cpu_root / f"cpu{cpu}").mkdir(parents=True)
    topo = read_topology(tmp_path / "sys", tmp_path / "no-cpuinfo")
    assert topo.describe() == "1 socket, 3 cores, 1 thread/core"
    assert topo.nodes == {0: [0, 1, 2]} and topo.caches == [] and topo.model_name == "unknown"
    assert make_plan(topo, 3, "scatter").cpus == [0, 1, 2]


def test_cpu_list_round_trip():
    assert affinity.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert affinity.format_cpu_list([11, 0, 1, 2, 10, 8]) == "0-2,8,10-11"


# ----------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("policy", ["compact", "scatter", "balanced"])
def test_vm_every_policy_uses_both_cores(vm, policy):
    plan = make_plan(vm, None, policy)
    assert plan.threads == 2 and plan.cpus == [0, 1]
    assert plan.env["OMP_PLACES"] == "{0},{1}" and plan.env["OMP_PROC_BIND"] == "close"
    assert plan.env["KMP_AFFINITY"] == "granularity=fine,explicit,proclist=[0,1]"
    assert plan.env["KMP_HW_SUBSET"] == "2c,1t"
    assert plan.describe() == (f"placement: 2 threads, policy {policy}, CPUs [0, 1] "
                               "(1 socket, 2 cores, 1 thread/core), MKL+numba on libgomp")


def test_vm_policy_none_sets_counts_and_unbinds(vm):
    plan = make_plan(vm, 2, "none")
    assert plan.cpus == []
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        assert plan.env[name] == "2"
    assert not {"OMP_PLACES", "OMP_PROC_BIND", "KMP_AFFINITY", "KMP_HW_SUBSET"} & plan.env.keys()
    assert {"OMP_PLACES", "OMP_PROC_BIND", "KMP_AFFINITY", "GOMP_CPU_AFFINITY"} <= set(plan.unset)


def test_common_env(vm):
    env = make_plan(vm, 1, "compact").env
    assert env["NUMBA_THREADING_LAYER"] == "omp" and env["MKL_THREADING_LAYER"] == "GNU"
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["GOMP_SPINCOUNT"] == "infinite"
    assert env["KMP_BLOCKTIME"] == "infinite" and env["OMP_MAX_ACTIVE_LEVELS"] == "1"
    assert env["MKL_DYNAMIC"] == "FALSE" and env["OMP_PLACES"] == "{0}"


XEON_CASES = [
    ("compact", 4, 2, [0, 32, 1, 33], "1s,2c,2t"),
    ("compact", 4, None, [0, 1, 2, 3], "1s,4c,1t"),
    ("compact", 20, 1, list(range(20)), None),  # 16 cores of socket 0, then 4 of socket 1
    ("compact", 40, None, [c + t * 32 for c in range(16) for t in (0, 1)]  # needs 2 threads/core
     + [c + t * 32 for c in range(16, 20) for t in (0, 1)], None),
    ("scatter", 4, None, [0, 16, 1, 17], "2s,2c,1t"),
    ("scatter", 4, 2, [0, 16, 1, 17], "2s,2c,1t"),  # second threads only once every core has one
    ("scatter", 34, 2, [c + s * 16 for c in range(16) for s in (0, 1)] + [32, 48], None),
    ("balanced", 4, None, [0, 1, 16, 17], "2s,2c,1t"),
    ("balanced", 36, None, [0, 32, 1, 33] + list(range(2, 16)) + [16, 48, 17, 49] + list(range(18, 32)), None),
    ("compact", 64, None, [c + t * 32 for c in range(32) for t in (0, 1)], "2s,16c,2t"),
]


@pytest.mark.parametrize("policy, threads, tpc, cpus, subset", XEON_CASES)
def test_xeon_placements(xeon, policy, threads, tpc, cpus, subset):
    plan = make_plan(xeon, threads, policy, tpc)
    assert plan.cpus == cpus
    assert len(set(plan.cpus)) == threads
    assert plan.env["OMP_PLACES"] == ",".join(f"{{{c}}}" for c in cpus)
    assert plan.env["KMP_AFFINITY"] == f"granularity=fine,explicit,proclist=[{','.join(map(str, cpus))}]"
    assert plan.env.get("KMP_HW_SUBSET") == subset
    assert plan.env["OMP_NUM_THREADS"] == plan.env["MKL_NUM_THREADS"] == str(threads)


def test_xeon_default_is_one_thread_per_physical_core(xeon):
    plan = make_plan(xeon)
    assert plan.threads == 32 and plan.cpus == list(range(32)) and plan.threads_per_core == 1


PHI_CASES = [
    ("compact", 4, 4, [0, 68, 136, 204], "1c,4t"),
    ("compact", 8, 2, [0, 68, 1, 69, 2, 70, 3, 71], "4c,2t"),
    ("compact", 64, None, list(range(64)), "64c,1t"),
    ("compact", 272, None, [c + t * 68 for c in range(68) for t in range(4)], "68c,4t"),
    ("scatter", 4, None, [0, 1, 2, 3], "4c,1t"),
    ("scatter", 70, 2, list(range(68)) + [68, 69], None),
    ("balanced", 70, None, [0, 68, 1, 69] + list(range(2, 68)), None),
    ("balanced", 136, None, [c + t * 68 for c in range(68) for t in range(2)], "68c,2t"),
]


@pytest.mark.parametrize("policy, threads, tpc, cpus, subset", PHI_CASES)
def test_phi_placements(phi, policy, threads, tpc, cpus, subset):
    plan = make_plan(phi, threads, policy, tpc)
    assert plan.cpus == cpus
    assert plan.env.get("KMP_HW_SUBSET") == subset
    assert plan.env["OMP_PLACES"].split(",")[:2] == [f"{{{c}}}" for c in cpus[:2]]


def test_phi_default_threads_and_description(phi):
    plan = make_plan(phi)
    assert plan.threads == 68
    assert plan.describe() == ("placement: 68 threads, policy compact, CPUs [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, "
                               "11, 12, 13, ..., 67] (68 in all) (1 socket, 68 cores, 4 threads/core), "
                               "MKL+numba on libgomp")


def test_placement_respects_the_allowed_cpus(tmp_path):
    # a PBS cpuset / taskset giving this process socket 1 only
    xeon = read_topology(*fake_machine(tmp_path, 2, 16, 2, "Intel(R) Xeon(R)", 6, 79),
                         allowed=list(range(16, 32)) + list(range(48, 64)))
    assert make_plan(xeon).cpus == list(range(16, 32))
    assert make_plan(xeon, 4, "compact", 2).cpus == [16, 48, 17, 49]
    with pytest.raises(UsageError, match="33 is more than the 32 logical CPUs"):
        make_plan(xeon, 33)


def test_oversubscription_cycles_the_policy_order_and_sleeps(vm):
    plan = make_plan(vm, 5, "compact", oversubscribe=True)
    assert plan.oversubscribed and plan.cpus == [0, 1, 0, 1, 0]
    assert plan.env["OMP_WAIT_POLICY"] == "PASSIVE" and plan.env["KMP_BLOCKTIME"] == "0"
    assert "oversubscribed" in plan.describe()
    assert not make_plan(vm, 2, oversubscribe=True).oversubscribed


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0}, "--threads must be a positive integer, got 0"),
    ({"threads": -1}, "--threads must be a positive integer, got -1"),
    ({"threads": 3}, "--threads 3 is more than the 2 logical CPUs available (CPUs 0-1); add --oversubscribe"),
    ({"policy": "sideways"}, "unknown --policy 'sideways': choose one of compact, scatter, balanced, none"),
    ({"threads_per_core": 2}, "--threads-per-core 2 is more than the 1 hardware thread(s) per core"),
    ({"threads_per_core": 0}, "--threads-per-core must be a positive integer, got 0"),
])
def test_bad_input_is_one_line_usage_error(vm, kwargs, message):
    with pytest.raises(UsageError) as error:
        make_plan(vm, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_threads_that_do_not_fit_the_given_threads_per_core(xeon, phi):
    with pytest.raises(UsageError, match="--threads 40 at 1 thread.* only 32 such slots on 32 cores"):
        make_plan(xeon, 40, "compact", 1)
    with pytest.raises(UsageError, match="--threads-per-core 5 is more than the 4 hardware"):
        make_plan(phi, 4, "compact", 5)


def test_configure_validates_before_touching_the_environment(monkeypatch, vm):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with pytest.raises(UsageError):
        affinity.configure(0, topology=vm)
    assert os.environ["OMP_NUM_THREADS"] == "7"


# -------------------------------------------------------------------------- verification logic


def test_placement_mismatches_are_reported(vm):
    plan = make_plan(vm, 2, "compact")
    good = [{"thread": 0, "cpu": 0, "allowed": [0]}, {"thread": 1, "cpu": 1, "allowed": [1]}]
    assert affinity.placement_mismatches("probe", plan, good) == []
    swapped = [{"thread": 0, "cpu": 1, "allowed": [1]}, {"thread": 1, "cpu": 1, "allowed": [0, 1]}]
    assert affinity.placement_mismatches("probe", plan, swapped) == [
        "probe: thread 0 on CPU 1 allowed 1, plan pins it to CPU 0",
        "probe: thread 1 on CPU 1 allowed 0-1, plan pins it to CPU 1"]
    assert affinity.placement_mismatches("numba", plan, good[:1]) == ["numba: 1 threads ran, the plan has 2"]
    unbound = make_plan(vm, 2, "none")
    assert affinity.placement_mismatches("probe", unbound, swapped) == []


def test_runtime_mismatches_are_reported(vm):
    plan = make_plan(vm, 2, "compact")
    numba_ok = {"threading_layer": "omp", "num_threads": 2}
    mkl_ok = {"num_threads": 2, "threading_layer": "gnu"}
    assert affinity.runtime_mismatches(plan, numba_ok, mkl_ok, ["libgomp"]) == []
    assert affinity.runtime_mismatches(plan, {"threading_layer": "workqueue", "num_threads": 1},
                                       {"num_threads": 1, "threading_layer": "intel"},
                                       ["libgomp", "libiomp"]) == [
        "numba threading layer is 'workqueue', expected 'omp'",
        "numba runs 1 threads, the plan has 2",
        "MKL runs 1 threads, the plan has 2",
        "MKL threading layer is 'intel', expected 'gnu'",
        "2 OpenMP runtimes loaded (libgomp, libiomp), expected one"]
    assert affinity.runtime_mismatches(plan, numba_ok, None, ["libgomp"]) == ["MKL (libmkl_rt) not found"]


# ------------------------------------------------------------------------------ MPI ranks on a node


def test_one_rank_per_socket_on_a_two_socket_xeon(xeon):
    plans = affinity.rank_plans(xeon, 2)
    for socket, plan in enumerate(plans):
        assert {xeon.cpus[c].socket for c in plan.topology.allowed} == {socket}
        assert len(plan.topology.allowed) == 32  # 16 cores x 2 hardware threads
        assert plan.threads == 16 and len(set(plan.cpus)) == 16  # default: one thread per core
        assert {xeon.cpus[c].core for c in plan.cpus} == {xeon.cpus[c].core for c in plan.topology.allowed}
    assert not set(plans[0].topology.allowed) & set(plans[1].topology.allowed)


def test_ranks_on_a_xeon_phi_get_disjoint_contiguous_cores(phi):
    plans = affinity.rank_plans(phi, 4, threads=34, threads_per_core=2)
    cores = [sorted({phi.cpus[c].core for c in plan.topology.allowed}) for plan in plans]
    assert [len(c) for c in cores] == [17] * 4  # quadrant / SNC-4: a quarter of the 68 cores each
    assert sum(cores, []) == sorted(set(sum(cores, [])))  # disjoint
    for plan, own in zip(plans, cores):
        assert {phi.cpus[c].core for c in plan.cpus} == set(own)  # 2 threads on each of its 17 cores
        assert plan.env["OMP_NUM_THREADS"] == "34"
    uneven = affinity.rank_plans(phi, 3)
    assert [p.threads for p in uneven] == [22, 23, 23]


def test_more_ranks_than_cores_is_refused_unless_oversubscribed(vm):
    with pytest.raises(UsageError, match="3 MPI ranks on this node but only 2 cores"):
        affinity.rank_topology(vm, 0, 3)
    shared = [affinity.rank_topology(vm, r, 4, oversubscribe=True).allowed for r in range(4)]
    assert shared == [[0], [1], [0], [1]]


def test_node_cpus_come_from_the_cgroup_not_the_launchers_mask(tmp_path):
    v2 = tmp_path / "v2"
    write(v2 / "job/step/cpuset.cpus.effective", "4-7,12")
    write(tmp_path / "cgroup2", "0::/job/step")
    assert affinity.node_cpus(v2, tmp_path / "cgroup2") == [4, 5, 6, 7, 12]
    v1 = tmp_path / "v1"
    write(v1 / "cpuset/slurm/job_1/cpuset.effective_cpus", "0-3")
    write(tmp_path / "cgroup1", "9:memory:/slurm/job_1\n3:cpuset,cpuacct:/slurm/job_1")
    assert affinity.node_cpus(v1, tmp_path / "cgroup1") == [0, 1, 2, 3]
    write(tmp_path / "none", "4:memory:/x")
    assert affinity.node_cpus(v1, tmp_path / "none") is None


# ------------------------------------------------------------------------- on this real machine


@pytest.fixture(scope="module")
def probe():
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: cannot build native/affinity_probe")
    subprocess.run(["make", "-s", "-C", str(REPO / "native")], check=True)
    return REPO / "native/build/affinity_probe"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter: the runtimes must load after configure()."""
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


TOPO = "import sys\nfrom phi_rnn.cli import main\nsys.exit(main(['topo', *sys.argv[1:]]))"

needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 allowed CPUs")


@needs_two_cpus
@pytest.mark.parametrize("policy", ["compact", "scatter"])
def test_threads_run_where_the_plan_says(probe, policy):
    done = run_python(TOPO, "--threads", "2", "--policy", policy, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    plan, verification = report["plan"], report["verification"]
    assert len(plan["cpus"]) == 2 and len(set(plan["cpus"])) == 2
    assert verification["ok"] and verification["mismatches"] == []
    assert verification["source"] == "probe"
    probe_threads = verification["probe"]["threads"]
    assert [t["cpu"] for t in probe_threads] == plan["cpus"]
    assert [t["allowed"] for t in probe_threads] == [[cpu] for cpu in plan["cpus"]]
    assert "libgomp" in verification["probe"]["runtime"]
    assert verification["numba"] == {"threading_layer": "omp", "config_layer": "omp", "num_threads": 2,
                                     "cpus": plan["cpus"]}
    assert verification["mkl"]["num_threads"] == 2 and verification["mkl"]["threading_layer"] == "gnu"
    assert verification["openmp_runtimes"] == ["libgomp"]
    assert report["env"]["OMP_PLACES"] == ",".join(f"{{{c}}}" for c in plan["cpus"])


@needs_two_cpus
def test_wrong_placement_is_caught_and_missing_probe_is_said(probe):
    code = ("import os, json\nfrom phi_rnn import affinity\nplan = affinity.configure(2, 'compact')\n"
            "os.environ['OMP_PLACES'] = '{%d},{%d}' % tuple(reversed(plan.cpus))  # sabotage\n"
            "import numba\nbad = affinity.verify(plan)\nno_probe = affinity.verify(plan, probe='/nonexistent')\n"
            "print(json.dumps([bad.to_dict(), no_probe.to_dict()]))")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    bad, no_probe = json.loads(done.stdout)
    assert not bad["ok"] and bad["describe"].startswith("NOT verified: probe: thread 0 on CPU")
    assert any(m.startswith("numba: thread 1 on CPU") for m in bad["mismatches"])
    assert no_probe["notes"] == ["native probe not built: run `make native`"]
    assert no_probe["source"] == "numba" and "native probe not built" in no_probe["describe"]


def test_configure_after_the_runtimes_loaded_is_refused():
    done = run_python("import numba\nfrom phi_rnn import affinity\naffinity.configure(1)")
    assert done.returncode != 0
    assert "RuntimeError: phi_rnn.affinity.configure() must run before the runtimes load" in done.stderr
    assert "numba" in done.stderr.splitlines()[-1]



# ------------------------------------------------------------------ more threads than batch rows

def test_idle_threads_are_named_on_a_xeon_phi(phi):
    """64 threads on a Xeon Phi 7250 with char-rnn's batch of 50: threads 50-63 get no rows."""
    from phi_rnn.train import idle_threads_note
    plan = make_plan(phi, 64, "compact")
    note = idle_threads_note(plan.threads, 50, "batch", plan.cpus)
    assert plan.cpus[50:] == list(range(50, 64))  # one thread per core, compact
    assert "threads 50-63 (CPUs 50-63) get no rows" in note and "14 of 64 idle" in note
    assert "--batch_size 64" in note and "--threads 50" in note and "\n" not in note
    assert "the batch strategy runs" in note and "--strategy gemm is slower" in note  # the decision
    assert idle_threads_note(plan.threads, 64, "batch", plan.cpus) is None
    assert idle_threads_note(plan.threads, 50, "gemm", plan.cpus) is None  # gemm uses them all


def test_idle_threads_follow_the_placement_on_two_sockets(xeon):
    """Scatter on the 2-socket Xeon alternates sockets: the idle threads 8-11 sit on both."""
    from phi_rnn.train import idle_threads_note
    plan = make_plan(xeon, 12, "scatter")
    idle = plan.cpus[8:12]
    assert {xeon.cpus[c].socket for c in idle} == {0, 1}
    note = idle_threads_note(plan.threads, 8, "batch", plan.cpus)
    assert f"threads 8-11 (CPUs {format_cpu_list(idle)})" in note and "4 of 12 idle" in note
    assert idle_threads_note(plan.threads, 8, "batch", []).startswith("note: 12 threads")


MPIEXEC = Path(sys.executable).parent / "mpiexec"


@needs_two_cpus
@pytest.mark.skipif(not MPIEXEC.exists() and not os.environ.get("PHI_RNN_REQUIRE_MPI"),
                    reason="no mpiexec: the [mpi] extra is not installed (CI requires it)")
def test_each_rank_overrides_a_launcher_binding_and_verifies(probe):
    """Both ranks started bound to CPU 0 (as launchers that bind ranks to one core do): each
    takes its own core of the node instead, and verifies its threads there."""
    done = subprocess.run([str(MPIEXEC), "-n", "2", "taskset", "-c", "0", sys.executable, "-m", "phi_rnn",
                           "topo", "--threads", "1"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [line for line in done.stdout.splitlines() if line.startswith("rank ")]
    assert len(ranks) == 2
    for rank, line in enumerate(ranks):
        assert f"CPUs [{rank}]" in line and "; verified: OpenMP threads on CPUs [" + str(rank) + "]" in line, line
    assert "overriding the launcher's binding to CPUs 0" in ranks[1]


def test_topo_shows_the_plan_of_each_rank_on_the_node():
    done = run_python(TOPO, "--ranks-per-node", "2", "--json")
    assert done.returncode == 0, done.stderr
    ranks = json.loads(done.stdout)["ranks"]
    cpus = sorted(affinity.node_cpus() or read_topology().allowed)
    assert sorted(sum((r["cpus"] for r in ranks), [])) == cpus
    assert not set(ranks[0]["cpus"]) & set(ranks[1]["cpus"])
