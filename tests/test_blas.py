"""The float32 GEMM backends (phi_rnn/blas.py) and the choice between them (gemm_choice.py):
OpenBLAS or oneDNN on the products MKL would run on one thread, MKL keeping the threaded
ones; oneDNN never starting threads of its own; the choice measured on first use, not on
import, once per machine and kept; a missing library a one-line usage error."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from phi_rnn import blas, gemm_choice
from phi_rnn import kernels as K

rng = np.random.default_rng(7)


SMALL_GEMM_DEPENDENCIES = ("openblas", "onednn")  # installed with phi_rnn: never skipped


@pytest.fixture(params=SMALL_GEMM_DEPENDENCIES)
def on_dependency(request):
    """Each small-GEMM library that comes with the install, in turn."""
    if request.param not in blas.available():
        pytest.fail(blas.MISSING[request.param])
    with blas.using(request.param):
        yield request.param
    blas.count_calls(False)


def _products_on_this_thread():
    """Each product of MEASURED_PRODUCTS through the kernels' GEMM, checked against numpy;
    the (small-GEMM, MKL) calls of each."""
    counted = []
    for _, trans_a, m, n, k, _ in gemm_choice.MEASURED_PRODUCTS:
        a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = np.full((m, n), np.nan, np.float32)  # beta 0: c is not read
        blas.count_calls(True)
        K.gemm(trans_a, False, 1.0, a, b, 0.0, c)
        counted.append(blas.calls())
        expect = (a.T if trans_a else a).astype(np.float64) @ b
        np.testing.assert_allclose(c, expect, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    return counted


def test_the_one_thread_products_go_to_the_library_and_match_numpy(on_dependency):
    """The per-thread products of a char-rnn step, with MKL and OpenMP set to one thread (as
    in a one-thread run), go to the chosen library."""
    with blas.one_thread():
        assert _products_on_this_thread() == [(1, 0)] * len(gemm_choice.MEASURED_PRODUCTS)


def test_mkl_keeps_the_products_it_would_thread(on_dependency):
    """With MKL free to thread (2 threads here) every product stays on MKL."""
    if blas._mkl.MKL_Get_Max_Threads() < 2:
        pytest.skip("one CPU: MKL runs every product on one thread")
    previous = blas._mkl.MKL_Set_Num_Threads_Local(2)
    try:
        assert _products_on_this_thread() == [(0, 1)] * len(gemm_choice.MEASURED_PRODUCTS)
    finally:
        blas._mkl.MKL_Set_Num_Threads_Local(previous)


def test_onednn_outside_a_parallel_region_with_openmp_threads_to_spare_is_left_to_mkl():
    """oneDNN there would run on omp_get_max_threads() threads of its own: with MKL on one
    thread but OpenMP's count at 2 (a 2-thread run's main thread), MKL runs the products."""
    if "onednn" not in blas.available():
        pytest.fail(blas.ONEDNN_MISSING)
    if blas._gomp.omp_get_max_threads() < 2:
        pytest.skip("one CPU: OpenMP runs one thread")
    previous = blas._mkl.MKL_Set_Num_Threads_Local(1)
    try:
        with blas.using("onednn"):
            assert _products_on_this_thread() == [(0, 1)] * len(gemm_choice.MEASURED_PRODUCTS)
    finally:
        blas._mkl.MKL_Set_Num_Threads_Local(previous)
        blas.count_calls(False)


def _threads():
    return len(os.listdir("/proc/self/task"))


def test_the_library_in_the_parallel_blocks_matches_mkl_runs_every_product_and_starts_no_thread(on_dependency):
    """A char-rnn sized LSTM iteration with the batch strategy (numba's workers, MKL on one
    thread in each): on the library every float32 GEMM of the forward and backward runs
    there, without one thread more in the process; loss and gradients agree with MKL's to
    float32 accuracy."""
    from phi_rnn.model import Network
    r = np.random.default_rng(1)
    net = Network("lstm", 65, 128, 2, strategy="batch")
    net.init_params(r)
    x = r.integers(0, 65, (50, 50)).astype(np.int32)
    y = r.integers(0, 65, (50, 50)).astype(np.int32)
    results, threads = {}, {}
    for name in ("mkl", on_dependency):  # MKL first: numba's and MKL's threads are up before
        with blas.using(name):
            blas.count_calls(True)
            loss = net.forward(x, y, net.zero_state(50))
            net.backward(x, False)
            blas.count_calls(False)
            results[name] = loss, net.grads.data.copy(), blas.calls()
            threads[name] = _threads()
    on_library, on_mkl = results[on_dependency][2]
    assert on_mkl == 0 and on_library >= 2 * 2 * 99  # per block and layer: 50 + 49 recurrent products
    assert results["mkl"][2] == (0, on_library)
    assert threads[on_dependency] == threads["mkl"]
    (loss_o, grads_o, _), (loss_m, grads_m, _) = results[on_dependency], results["mkl"]
    assert abs(loss_o - loss_m) < 1e-5 * abs(loss_m)
    np.testing.assert_allclose(grads_o, grads_m, rtol=1e-3, atol=1e-5 * np.abs(grads_m).max())


def _libraries_found_with(tmp_path, variable, library_name, c_source):
    """blas.available() in a fresh process whose `variable` names a library built from
    c_source; returns (the backends found, its stderr)."""
    source = tmp_path / "library.c"
    source.write_text(c_source)
    library = tmp_path / library_name
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    code = "from phi_rnn import blas; print(','.join(blas.available()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **{variable: str(library)}))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(","), result.stderr.strip()


def test_a_onednn_build_on_another_threading_runtime_is_named_and_left_out(tmp_path):
    """oneDNN's TBB build (the `onednn` wheel) would start TBB threads inside numba's
    workers: only the GNU OpenMP build is used."""
    found, stderr = _libraries_found_with(
        tmp_path, "PHI_RNN_ONEDNN", "libdnnl.so.3",
        "typedef struct { int major, minor, patch; const char *hash; unsigned cpu_runtime, "
        "gpu_runtime; } version_t;\nstatic const version_t v = {3, 9, 0, \"x\", 4, 0};\n"
        "const version_t *dnnl_version(void) { return &v; }\n")
    assert "onednn" not in found
    assert stderr == (f"phi_rnn: warning: {tmp_path / 'libdnnl.so.3'} is not oneDNN's GNU OpenMP build "
                      "(onednn-cpu-gomp); oneDNN not used")


def _rates(**per_library):
    return {name: {"step": step, "sequence": sequence} for name, (step, sequence) in per_library.items()}


def test_choose_takes_the_fastest_per_kind_of_product_and_keeps_mkl_on_a_tie():
    assert gemm_choice.choose(_rates(mkl=(80, 80), openblas=(95, 95), libxsmm=(110, 100))) == "libxsmm"
    assert gemm_choice.choose(_rates(mkl=(80, 80), openblas=(95, 90))) == "openblas"
    assert gemm_choice.choose(_rates(mkl=(100, 100), openblas=(103, 104), libxsmm=(90, 90))) == "mkl"  # within MARGIN
    assert gemm_choice.choose(_rates(mkl=(100, 100), openblas=(60, 60))) == "mkl"
    # libxsmm's AVX2 kernels: fastest per step, half OpenBLAS's rate on the weight gradients
    assert gemm_choice.choose(_rates(mkl=(69, 74), openblas=(70, 81), libxsmm=(76, 61))) == "libxsmm+openblas"
    assert gemm_choice.choose(_rates(mkl=(80, 90), libxsmm=(110, 60))) == "libxsmm+mkl"
    # without libxsmm on an AMD CPU: oneDNN's JIT kernels ahead of OpenBLAS and MKL on both kinds
    assert gemm_choice.choose(_rates(mkl=(63, 64), openblas=(69, 76), onednn=(89, 90))) == "onednn"
    assert gemm_choice.choose(_rates(mkl=(63, 64), openblas=(69, 96), onednn=(89, 90))) == "onednn+openblas"


def test_a_pair_runs_the_per_step_products_on_the_first_library_and_the_rest_on_the_second():
    if "libxsmm" not in blas.available():
        pytest.skip(blas.SMALL_GEMM_MISSING)
    previous = blas._mkl.MKL_Set_Num_Threads_Local(1)
    try:
        with blas.using("libxsmm+openblas"):
            for _, trans_a, m, n, k, _ in gemm_choice.MEASURED_PRODUCTS:
                a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
                b = rng.standard_normal((k, n)).astype(np.float32)
                c = np.empty((m, n), np.float32)
                blas.count_calls(True)
                K.gemm(trans_a, False, 1.0, a, b, 0.0, c)
                blas.count_calls(False)
                step = m < blas.STEP_ROWS and not trans_a
                expected = {"libxsmm": int(step), "openblas": int(not step), "mkl": 0, "onednn": 0}
                assert blas.calls_per_library() == expected, (m, n, k, trans_a)
                np.testing.assert_allclose(c, (a.T if trans_a else a).astype(np.float64) @ b, rtol=1e-4,
                                           atol=1e-4 * np.sqrt(k))
    finally:
        blas._mkl.MKL_Set_Num_Threads_Local(previous)


def test_a_backend_that_is_not_one_is_refused():
    for name in ("blis", "libxsmm+openblas+mkl", "openblas+"):
        with pytest.raises(ValueError, match="unknown GEMM backend"):
            blas.set_backend(name)


def test_measured_rates_are_positive_and_leave_the_backend_and_thread_counts_as_they_were(on_dependency):
    counts = blas._mkl.MKL_Get_Max_Threads(), blas._gomp.omp_get_max_threads()
    rates = gemm_choice.measure_rates((on_dependency, "mkl"), rounds=1)
    assert set(rates) == {on_dependency, "mkl"}
    assert all(set(r) == {"step", "sequence"} and min(r.values()) > 0 for r in rates.values())
    assert blas.backend() == on_dependency
    assert (blas._mkl.MKL_Get_Max_Threads(), blas._gomp.omp_get_max_threads()) == counts


def test_the_measurement_runs_each_step_on_its_own_operands_with_the_weights_shared(on_dependency):
    """As in an iteration: a product's calls (a recurrence's steps) each run on their own A
    and C (slices of one array, so they come from L2/L3, not hot from the call before) with
    one B, and with the kernels' beta. Each call's C must come out as its own A[i] B + beta
    C0[i]: a measurement back on a single hot operand set leaves the other steps' C as they were."""
    operands = gemm_choice.measurement_operands(gemm_choice.MEASURED_PRODUCTS, np.random.default_rng(3))
    before = [c.copy() for _, _, c in operands]
    with blas.one_thread():
        blas.count_calls(True)
        gemm_choice.run_products(gemm_choice.MEASURED_PRODUCTS, operands)
        blas.count_calls(False)
    assert blas.calls_per_library()[on_dependency] == sum(p[0] for p in gemm_choice.MEASURED_PRODUCTS)
    for (calls, trans_a, m, n, k, beta), (a, b, c), c0 in zip(gemm_choice.MEASURED_PRODUCTS, operands, before):
        assert a.shape == ((calls, k, m) if trans_a else (calls, m, k)) and b.shape == (k, n)
        assert c.shape == (calls, m, n) and len({a[i].ctypes.data for i in range(calls)}) == calls
        product = np.einsum("skm,kn->smn" if trans_a else "smk,kn->smn", a.astype(np.float64), b)
        np.testing.assert_allclose(c, product + beta * c0, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    recurrent = [p for p in gemm_choice.MEASURED_PRODUCTS if p[0] > 1]
    assert recurrent and all(not t and m < blas.STEP_ROWS for _, t, m, _, _, _ in recurrent)


DEFAULT_REPORT = ("from phi_rnn import blas, gemm_choice; import json; gemm_choice.use_default(); "
                  "print(json.dumps([blas.backend(), gemm_choice.default_backend(), blas.describe_backend(), "
                  "str(gemm_choice.cache_path())]))")


def _default_in_a_fresh_process(cache_home, **env):
    """[backend, default, description, cache file] of a process that sets the default; its stderr."""
    result = subprocess.run([sys.executable, "-c", DEFAULT_REPORT], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, XDG_CACHE_HOME=str(cache_home), **env))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def _files_under(*directories):
    return sorted(str(path) for directory in directories for path in directory.rglob("*") if path.is_file())


def test_importing_blas_measures_nothing(tmp_path):
    """Loading the libraries is one job, measuring them another: a process that only imports
    blas (export, plot, a script) runs the products on MKL and writes no choice."""
    cache, temp = tmp_path / "cache", tmp_path / "tmp"
    cache.mkdir()
    temp.mkdir()
    code = "from phi_rnn import blas; print(blas.backend(), blas._choice.value)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, XDG_CACHE_HOME=str(cache), TMPDIR=str(temp)))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.split() == ["mkl", "0"]
    assert _files_under(cache, temp) == []


def test_the_default_is_measured_once_per_machine_and_kept(tmp_path):
    """The first process measures and keeps the rates per machine (CPU, vector width,
    libraries); the next takes the choice from the file (here edited to make MKL the
    fastest), so every run on a machine uses the same library."""
    (backend, default, described, path), _ = _default_in_a_fresh_process(tmp_path)
    assert path == str(tmp_path / "phi_rnn" / "gemm_backend.json")
    kept = json.loads(open(path).read())
    (key, entry), = kept.items()
    assert set(entry["rates"]) == set(blas.available()) and key.endswith(
        ", ".join(f"{n} {blas.library_version(n)}" for n in blas.available()))
    assert backend == default == gemm_choice.choose(entry["rates"])
    assert described.startswith(default) and "fastest here" in described
    entry["rates"] = {name: {"step": 1.0, "sequence": 1.0} for name in entry["rates"]}
    entry["rates"]["mkl"] = {"step": 2.0, "sequence": 3.0}
    with open(path, "w") as f:
        json.dump(kept, f)
    (backend, _, described, _), _ = _default_in_a_fresh_process(tmp_path)
    assert backend == "mkl" and "mkl 2.0/3.0" in described


def test_a_choice_kept_by_an_older_measurement_is_measured_again(tmp_path):
    """An entry under a key without this measurement's version (one hot operand set per
    product, as before rates v2) is not trusted: the rates are measured again and kept
    beside it."""
    (_, _, _, path), _ = _default_in_a_fresh_process(tmp_path)
    (key, entry), = json.loads(open(path).read()).items()
    assert key.startswith(gemm_choice.MEASUREMENT + "; ")
    older = key[len(gemm_choice.MEASUREMENT) + 2:]
    entry["rates"] = {name: {"step": 1.0, "sequence": 1.0} for name in entry["rates"]}
    entry["rates"]["mkl"] = {"step": 2.0, "sequence": 3.0}
    with open(path, "w") as f:
        json.dump({older: entry}, f)
    (backend, _, described, _), _ = _default_in_a_fresh_process(tmp_path)
    kept = json.loads(open(path).read())
    assert set(kept) == {older, key} and kept[older] == entry
    assert "mkl 2.0/3.0" not in described and backend == gemm_choice.choose(kept[key]["rates"])


def test_an_unwritable_cache_home_falls_back_to_a_private_temporary_directory(tmp_path):
    """XDG_CACHE_HOME that cannot be written (here a file): the choice is kept in
    $TMPDIR/phi_rnn-<uid>, made 0700, without a word."""
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    temp = tmp_path / "tmp"
    temp.mkdir()
    (backend, default, _, path), stderr = _default_in_a_fresh_process(blocked, TMPDIR=str(temp))
    private = temp / f"phi_rnn-{os.getuid()}"
    assert path == str(private / "gemm_backend.json") and os.path.exists(path) and stderr == ""
    assert os.stat(private).st_mode & 0o777 == 0o700
    assert backend == default and set(default.split("+")) <= set(blas.available())


def test_with_no_cache_directory_the_choice_is_measured_used_and_not_kept_in_one_line(tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    temp = tmp_path / "tmp"
    temp.mkdir()
    (temp / f"phi_rnn-{os.getuid()}").write_text("")  # not a directory: refused
    (backend, default, _, path), stderr = _default_in_a_fresh_process(blocked, TMPDIR=str(temp))
    assert path == "None" and _files_under(temp) == [str(temp / f"phi_rnn-{os.getuid()}")]
    # the measured default may be a pair (per-step + whole-sequence libraries)
    assert backend == default and set(default.split("+")) <= set(blas.available())
    assert stderr.startswith("phi_rnn: warning: no writable cache directory") and stderr.count("\n") == 1
    assert stderr.rstrip().endswith("the GEMM backend is measured for this run only")


def test_vector_width_names_an_emulated_cpu(monkeypatch):
    monkeypatch.delenv("NUMBA_CPU_NAME", raising=False)
    native = blas.vector_width()
    assert native in ("AVX-512", "AVX2", "SSE")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert blas.vector_width() == f"{native} (capped: MKL_ENABLE_INSTRUCTIONS=AVX2)"


SPEED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "speed.py")


@pytest.mark.parametrize("library, variable", [("openblas", "PHI_RNN_OPENBLAS"), ("onednn", "PHI_RNN_ONEDNN")])
def test_speed_blas_library_without_it_is_one_line_exit_2(tmp_path, library, variable):
    env = dict(os.environ, **{variable: str(tmp_path / "no-library.so")})
    result = subprocess.run([sys.executable, SPEED, "--no-torch", "--blas", library, "--threads", "1"],
                            capture_output=True, text=True, timeout=300, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == f"speed.py: error: --blas {library}: {blas.MISSING[library]}"


BACKENDS_BENCH = os.path.join(os.path.dirname(SPEED), "backends.py")


def test_backends_bench_runs_each_backend_and_rejects_an_unknown_one():
    tiny = ["--rnn_size", "16", "--batch_size", "8", "--seq_length", "6", "--vocab", "10", "--iters", "3",
            "--warmup", "1"]
    result = subprocess.run([sys.executable, BACKENDS_BENCH, "--no-torch", "--rounds", "1",
                             "--backends", "onednn,openblas,mkl", *tiny], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "[openblas: openblas " in lines["openblas"] and "[mkl " in lines["mkl"]
    assert "[onednn: onednn " in lines["onednn"]
    assert "vectors " in result.stdout and "/ floor" in lines["openblas"]
    result = subprocess.run([sys.executable, BACKENDS_BENCH, "--shapes", "--rounds", "1", "--backends",
                             "openblas,mkl", *tiny], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if " x " in line and "M x N" not in line]
    assert len(rows) == 8 and all(float(row[-1]) > 0 and float(row[-2]) > 0 for row in rows)
    assert "8 x 64 x 16" in result.stdout  # a per-step forward product: 8 rows, G = 64, H = 16
    result = subprocess.run([sys.executable, BACKENDS_BENCH, "--cpu-time", "--rounds", "1", "--backends",
                             "openblas,mkl", *tiny], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    timed = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines() if "/ floor" in line}
    assert set(timed) == {"openblas", "mkl"} and min(timed.values()) > 0
    result = subprocess.run([sys.executable, BACKENDS_BENCH, "--backends", "blis"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "backends.py: error: --backends blis unknown"
    result = subprocess.run([sys.executable, BACKENDS_BENCH, "--no-torch", "--bogus"], capture_output=True,
                            text=True, timeout=60)  # speed.py's flags pass through; no other
    assert result.returncode == 2 and result.stderr.strip() == "backends.py: error: unrecognized arguments: --bogus"


def test_processes_starting_together_measure_once(tmp_path):
    """Two processes on a machine with no kept choice (as MPI ranks starting together): one
    measures while the other waits for its answer, so both run the same library."""
    code = ("from phi_rnn import blas, gemm_choice; import json; gemm_choice.use_default(); "
            "print(json.dumps([blas.backend(), blas.describe_backend()]))")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    answers = [json.loads(run.communicate(timeout=300)[0]) for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert answers[0] == answers[1]  # the same backend, the same measured rates and time


def test_a_small_gemm_built_from_an_older_source_is_named_and_left_out(tmp_path):
    found, stderr = _libraries_found_with(tmp_path, "PHI_RNN_SMALL_GEMM", "libsmall_gemm.so",
                                          "int phi_gemm_init(void) { return 0; }\n")  # the previous entry point
    assert "libxsmm" not in found
    assert stderr == (f"phi_rnn: warning: {tmp_path / 'libsmall_gemm.so'} is an older build: run `make native`; "
                      "libxsmm not used")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(512, 128), (65, 512), (1, 7), (3, 1)])
def test_transpose_into_is_numpys_transpose(dtype, shape):
    a = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)
    out = np.full(shape[::-1], np.nan, dtype)
    blas.transpose_into(a, out)
    np.testing.assert_array_equal(out, a.T)


def test_transpose_into_refuses_a_wrong_shape_or_type_or_a_strided_array():
    a = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError):
        blas.transpose_into(a, np.zeros((4, 6), np.float32))
    with pytest.raises(ValueError):
        blas.transpose_into(a, np.zeros((6, 4), np.float64))
    with pytest.raises(ValueError):
        blas.transpose_into(a[:, ::2], np.zeros((3, 4), np.float32))
