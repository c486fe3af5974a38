"""bench.scale, the scaling study: the model fit, point enumeration, --point/--collect, resume, failures.

End-to-end tests run the real bench/speed.py on the `tiny` config with a few iterations.
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--configs", "tiny", "--iters", "3", "--warmup", "1"]
STUDY = ["--threads", "1,2", "--scaling", "strong,weak", "--strategies", "batch", *TINY]
STUDY_KEYS = [f"{scaling}-tiny-lstm-batch-compact-t00{p}"
              for scaling in ("strong", "weak") for p in (1, 2)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


sys.path.insert(0, str(ROOT))
from bench.scale import machine as scale_machine  # noqa: E402
from bench.scale import model as scale_model  # noqa: E402
from bench.scale import points as scale_points  # noqa: E402
from bench.scale import rounds as scale_rounds  # noqa: E402
from bench.scale import run as scale_run  # noqa: E402


def run_scale(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "bench.scale", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"bench.scale {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def point_files(out):
    return scale_run.json_files(out / "points")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny real study shared by the tests that only read or copy it."""
    out = tmp_path_factory.mktemp("study")
    proc = run_scale(*STUDY, "--out", out)
    return out, proc


def copy_study(study, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(study[0], out)
    return out


# ---------------------------------------------------------------- the model

def measured_row(batch, threads=1, strategy="batch", scaling="strong", block=1.0, reduce=0.1,
                 optimizer=0.05, rest=0.2, median=None, parts=None):
    """A collected row as scale_collect makes it from a profiled point (layers 2, seq 50)."""
    profile = {"layer_forward": block / 2, "layer_backward": block / 2, "reduce_parts": reduce,
               "rmsprop_step": optimizer}
    mean = block + reduce + optimizer + rest
    return {"status": "ok", "scaling": scaling, "config": f"2x128-b{batch}", "model": "lstm",
            "strategy": strategy, "blas": "", "policy": "compact", "threads": threads,
            "num_layers": 2, "rnn_size": 128, "seq_length": 50, "vocab": 65,
            "batch_size": batch, "median_ms": median or mean, "mean_ms": mean,
            "profile": profile, "parts": parts, "gflop_per_iter": 3.0, "chars_per_s": 1.0}


def contention(block_rows, alone_ms, k):
    return {"contention": {"block_rows": block_rows, "alone_ms": alone_ms, "together_ms": k * alone_ms,
                           "contention": k}}


def test_model_adds_the_measured_parts_by_its_formula():
    block_ms = {1: 0.1, 2: 0.15, 25: 1.2, 50: 2.0}  # R(b), one core
    rows = [measured_row(b, block=ms, rest=0.2 + 0.004 * b) for b, ms in block_ms.items()]
    # at 2 threads the blocks' GEMMs (0.9 of R(25) = 1.2 ms) ran 1.2x slower together
    rows.append(measured_row(50, threads=2, block=1.5, parts=contention(25, 0.9 * 1.2, 1.2)))
    region = {("compact", 2): 0.003, ("compact", 4): 0.004}
    model = scale_model.build_models(rows, region)[scale_points.series_of(rows[-1])]
    regions = scale_model.regions_per_iteration(2)
    assert regions == 6 + 8 + 1
    rest = 0.2 + 0.004 * 50  # Rest(B) is linear in B over the block series
    for p, rows_per_block, cost in ((2, 25, 0.003), (4, 13, 0.004)):
        r_b = 0.15 + (1.2 - 0.15) * (rows_per_block - 2) / 23
        slowed = r_b * (1 + 0.2 * 0.9)  # k held at the largest count measured (2)
        expected = slowed + 0.1 * (p + 1) / (2 * p) + 0.05 / p + rest + regions * cost
        assert model.time_ms(p) == pytest.approx(expected, rel=1e-9)
    # more threads than rows: 50 one-row blocks, 14 threads idle; c(64) from a + b log2(p)
    cost_64 = 0.003 + (0.004 - 0.003) * (6 - 1)
    assert model.time_ms(64) == pytest.approx(
        0.1 * 1.18 + 0.1 * 51 / 128 + 0.05 / 64 + rest + regions * cost_64, rel=1e-9)
    assert model.idle_threads(64) == 14 and model.idle_threads(50) == 0
    assert scale_model.validate(rows, {}) is None  # nothing modelled, no error claimed


def test_contention_is_interpolated_in_log_threads_and_held_beyond():
    c = scale_model.Contention({4: (1.3, 0.8), 16: (1.5, 0.9)})
    assert c(1) == (1.0, 0.0) and c(4) == (1.3, 0.8)
    assert c(2) == (pytest.approx(1.15), 0.8) and c(8) == (pytest.approx(1.4), 0.9)
    assert c(64) == (1.5, 0.9)
    assert c.block_ms(16, 10.0) == pytest.approx(10.0 * (1 + 0.5 * 0.9))


def test_gemm_time_from_measured_threaded_speedups_then_amdahl():
    def gemm_parts(threaded_ms, one_thread_ms=9.9):  # the one-thread run of a p-thread process: unused
        return {"gemm": {"one_thread_ms": one_thread_ms, "threaded_ms": threaded_ms,
                         "speedup": one_thread_ms / threaded_ms}}
    rows = [measured_row(b, block=0.1 * b ** 0.8) for b in (1, 2, 4, 50)]
    # the gemm series: 4 ms in all at one thread, 3 ms of it in GEMMs; threaded 1.6x at 2, 2.5x at 4
    rows += [measured_row(50, strategy="gemm", median=4.0, parts=gemm_parts(3.0, 3.0)),
             measured_row(50, threads=2, strategy="gemm", parts=gemm_parts(3.0 / 1.6)),
             measured_row(50, threads=4, strategy="gemm", parts=gemm_parts(3.0 / 2.5))]
    models = scale_model.build_models(rows, {("compact", 2): 0.002, ("compact", 4): 0.003})
    batch = models[scale_points.series_of(rows[3])]
    gemm = models[scale_points.series_of(rows[4])]
    assert gemm.time_ms(1) == pytest.approx(4.0)
    assert gemm.time_ms(2) == pytest.approx(1.0 + 3.0 / 1.6)
    # Amdahl through (2, 1.6), (4, 2.5): 1/s - 1/p = f (1 - 1/p), least squares
    x, y = [0.5, 0.75], [1 / 1.6 - 0.5, 1 / 2.5 - 0.25]
    f = (x[0] * y[0] + x[1] * y[1]) / (x[0] ** 2 + x[1] ** 2)
    assert gemm.time_ms(64) == pytest.approx(1.0 + 3.0 * (f + (1 - f) / 64))
    assert batch.time_ms(64, "gemm") == pytest.approx(gemm.time_ms(64))  # the sibling's parts
    # hybrid: 25 blocks of 2 rows, teams of 2 threads splitting each block's products by columns
    p, c = 64, scale_model.RegionCost({2: 0.002, 4: 0.003})
    two_row_teams = 0.1 * 2 ** 0.8 / 2 + 3 * 50 * 2 * c(2) + 0.1 * 26 / (2 * p) + 0.05 / p \
        + batch.blocks.rest_ms(50) + 15 * c(p)
    assert batch.time_ms(p, "batch") == pytest.approx(
        0.1 + 0.1 * 51 / (2 * p) + 0.05 / p + batch.blocks.rest_ms(50) + 15 * c(p))
    assert batch.time_ms(p, "hybrid") <= min(two_row_teams, batch.time_ms(p, "batch")) + 1e-12
    # weak scaling: the GEMMs of twice the batch at 2 threads in 4.5 ms, 1 ms outside them per batch
    weak = [measured_row(8, scaling="weak", strategy="gemm", median=4.0, parts=gemm_parts(3.0, 3.0)),
            measured_row(16, threads=2, scaling="weak", strategy="gemm", parts=gemm_parts(4.5))]
    weak[1]["config"] = weak[0]["config"]  # one series: the config's batch of 8 per thread
    model = scale_model.build_models(rows[:4] + weak, {})[scale_points.series_of(weak[1])]
    assert model.gemm.speedup(2) == pytest.approx(2 * 3.0 / 4.5)
    assert model.time_ms(2) == pytest.approx(2 * 1.0 + 4.5)
    # a gemm series measured without its parts gets no model; the batch series no gemm time
    for row in rows[4:]:
        row["parts"] = None
    models = scale_model.build_models(rows, {})
    assert scale_points.series_of(rows[4]) not in models
    assert models[scale_points.series_of(rows[3])].time_ms(64, "gemm") is None


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 3])
def test_parts_multiply_the_iterations_gemms(model, layers):
    from bench.scale import parts as scale_parts
    from phi_rnn.model import gemm_flops
    products = scale_parts.iteration_products(model, 65, 32, layers, 5, 7)
    flops = sum(2 * calls * m * n * k for calls, _, m, n, k, _ in products)
    assert flops == gemm_flops(model, 65, 32, layers, 5, 7)


def test_parts_blocks_each_compute_their_own_products():
    """Blocks 0 and 1 of 3 run every call of each product on their own operands (a per-step
    product's one hot A, and its C per step when it adds to it); block 2 is left alone."""
    from bench.scale import parts as scale_parts
    products = ((3, False, 4, 12, 8, 1.0), (3, False, 4, 8, 12, 0.0), (1, True, 8, 12, 20, 0.0))
    operands = scale_parts._operands(products, 3, np.random.default_rng(1))
    expected = [[c.copy() for _, _, c in block] for block in operands]
    for block in range(3):
        for j, ((calls, trans_a, *_, beta), (a, b, _), c) in enumerate(zip(products, operands[block], expected[block])):
            assert a.shape[0] == 1 and c.shape[0] == (calls if beta else 1)
            assert np.shares_memory(b, operands[0][j][1])  # every block multiplies by the same weights
            for i in range(calls if block < 2 else 0):
                op_a = a[0].T if trans_a else a[0]
                c[i % c.shape[0]] = op_a @ b + beta * c[i % c.shape[0]]
    table, betas = scale_parts._tables(products)[False]
    scale_parts._run_blocks(operands, table, betas, 2)
    for block, want in zip(operands, expected):
        for (_, _, c), c_want in zip(block, want):
            np.testing.assert_allclose(c, c_want, rtol=1e-5, atol=1e-4)


def test_rows_without_a_profile_get_no_model():
    rows = [measured_row(50), measured_row(50, threads=2)]
    rows[0]["profile"] = None
    assert scale_model.build_models(rows, {}) == {}


# ---------------------------------------------------------------- enumeration

def test_point_enumeration_is_deterministic_and_complete():
    args = ["--threads", "2,1,4", "--configs", "char-rnn,3x512-b128,2x64-b8-s16",
            "--strategies", "batch,gemm", "--policies", "compact,scatter",
            "--scaling", "strong,weak", "--list"]
    first, second = run_scale(*args).stdout, run_scale(*args).stdout
    assert first == second
    lines = first.splitlines()
    assert len(lines) == 2 * 3 * 2 * 2 * 3 == int(run_scale(*args[:-1], "--count").stdout)
    assert [int(line.split("\t")[0]) for line in lines] == list(range(len(lines)))
    keys = [line.split("\t")[1] for line in lines]
    assert len(set(keys)) == len(keys)
    assert keys[:3] == [f"strong-char-rnn-lstm-batch-compact-t00{p}" for p in (1, 2, 4)]
    weak_big = [line for line in lines if "weak-3x512-b128" in line and "t004" in line]
    assert weak_big and all(line.endswith("batch 512") for line in weak_big)


def test_default_threads_are_powers_of_two_plus_all_cores():
    assert scale_points.default_threads(68) == [1, 2, 4, 8, 16, 32, 64, 68]
    assert scale_points.default_threads(2) == [1, 2]
    assert scale_points.parse_config("3x512-b128") == scale_points.Config("3x512-b128", 3, 512, 128, 100)
    assert scale_points.parse_config("2x256-s100") == scale_points.Config("2x256-s100", 2, 256, 50, 100)


def test_bad_input_is_one_line_and_status_2():
    proc = run_scale("--configs", "nope", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    proc = run_scale(*STUDY, "--point", "4", check=False)
    assert proc.returncode == 2 and "points 0..3" in proc.stderr


# ---------------------------------------------------------------- end to end

def test_full_tiny_study_writes_every_output(study):
    out, proc = study
    assert "4 points: 4 run, 0 already done, 0 failed" in proc.stdout
    assert [p.stem for p in point_files(out)] == STUDY_KEYS
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for name in ("speedup.png", "efficiency.png", "gflops.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    from phi_rnn import gemm_choice
    assert all(r["gemm"].startswith(gemm_choice.default_backend()) for r in rows)  # each point names its GEMMs
    machine = json.loads((out / "machine.json").read_text())
    assert machine["machine"]["cores"] >= 1 and "numba" in machine["versions"]
    assert machine["gemm"].startswith(gemm_choice.default_backend())
    md = (out / "results.md").read_text()
    assert "## Machine" in md and "## Model" in md
    assert "The model reproduces" in md and "of 4 measured points within 15%" in md
    for p in scale_model.EXTRAPOLATE_TO:
        assert f"| {p} |" in md


def test_collect_merges_point_files_with_correct_arithmetic(study, tmp_path):
    out = tmp_path / "collected"
    for sub in ("points", "regions"):  # what separate array jobs leave
        shutil.copytree(study[0] / sub, out / sub)
    run_scale("--collect", out)
    records = [json.loads(p.read_text()) for p in point_files(out)]

    def ms_per_char(record):
        return record["result"]["phi_rnn"]["median_ms"] / (
            record["batch_size"] * record["point"]["seq_length"])

    base = {r["point"]["scaling"]: r for r in records if r["point"]["threads"] == 1}
    expected = {scale_points.Point(**r["point"]).key:
                ms_per_char(base[r["point"]["scaling"]]) / ms_per_char(r) for r in records}
    weak_two = next(r for r in records if r["point"]["scaling"] == "weak"
                    and r["point"]["threads"] == 2)
    assert weak_two["batch_size"] == 2 * base["weak"]["batch_size"]  # p x the work
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records) == 4
    for row in rows:
        assert float(row["speedup"]) == pytest.approx(expected[row["key"]], rel=1e-9)
        assert float(row["efficiency"]) == pytest.approx(
            expected[row["key"]] / int(row["threads"]), rel=1e-9)
        assert float(row["median_ms"]) == pytest.approx(
            next(r for r in records if scale_points.Point(**r["point"]).key == row["key"])
            ["result"]["phi_rnn"]["median_ms"])
    results = json.loads((out / "results.json").read_text())
    assert len(results["points"]) == 4 and len(results["models"]) == 2
    for row, point in zip(results["points"], rows):
        # every measured point carries the model's time and its error against the median
        assert row["model_error"] == pytest.approx(row["model_ms"] / row["median_ms"] - 1)
        assert float(point["model_ms"]) == pytest.approx(row["model_ms"])
    for model in results["models"]:
        assert model["modelled"] and [x["threads"] for x in model["extrapolated"]] == [
            16, 64, 68, 128]
        at_64 = model["extrapolated"][1]
        if model["scaling"] == "strong":  # tiny's batch of 4: 60 of 64 threads idle
            assert at_64["idle_threads"] == 60 and at_64["batch_size"] == 4
            assert set(at_64["by_strategy"]) == {"batch", "gemm", "hybrid"}
            assert at_64["by_strategy"]["hybrid"] <= at_64["by_strategy"]["batch"] + 1e-12
        else:
            assert at_64["idle_threads"] == 0 and at_64["batch_size"] == 256
    assert (out / "speedup.png").read_bytes().startswith(PNG_SIGNATURE)


def test_point_k_runs_exactly_that_point(tmp_path):
    args = ["--threads", "1,2", "--strategies", "batch,gemm", *TINY]
    keys = [line.split("\t")[1] for line in run_scale(*args, "--list").stdout.splitlines()]
    run_scale(*args, "--out", tmp_path, "--point", 2)
    assert [p.stem for p in point_files(tmp_path)] == [keys[2]]
    record = json.loads(point_files(tmp_path)[0].read_text())
    assert record["result"]["threads"] == 1 and record["result"]["strategy"] == "gemm"
    assert not (tmp_path / "results.csv").exists()  # reports are --collect's job


def test_resume_runs_only_the_missing_point(study, tmp_path):
    out = copy_study(study, tmp_path)
    missing = out / "points" / "weak-tiny-lstm-batch-compact-t002.json"
    missing.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in point_files(out)}
    proc = run_scale(*STUDY, "--out", out)
    assert "4 points: 1 run, 3 already done, 0 failed" in proc.stdout
    assert missing.exists()
    assert {p.name: p.stat().st_mtime_ns for p in point_files(out) if p != missing} == before


def processes_tagged(tag):
    """Live processes whose environment holds tag: speed.py and its worker inherit it."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if tag.encode() in environ.read_bytes():
                found.append(environ.parent.name)
        except OSError:  # gone, or not ours
            continue
    return found


def wait_until_gone(tag, seconds=60):
    """The tagged processes, after giving SIGKILL up to `seconds` to take effect on a busy
    machine (a killed process lingers until it is next scheduled)."""
    deadline = time.monotonic() + seconds
    while processes_tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    return processes_tagged(tag)


def tagged_env(tmp_path):
    tag = f"PHI_SCALE_TEST={tmp_path.name}-{os.getpid()}"
    return tag, {**os.environ, tag.split("=")[0]: tag.split("=")[1]}


def test_point_killed_midway_leaves_no_result_and_is_rerun(tmp_path):
    args = ["--threads", "1,2", "--strategies", "batch", *TINY]  # 2 points
    tag, env = tagged_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "bench.scale", *args, "--out", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 600  # topo, region costs and a point on a loaded machine
    while not point_files(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # what a PBS walltime kill sends, mid second point
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert wait_until_gone(tag) == []  # speed.py and its worker died with the study
    finished = {p.name: p.stat().st_mtime_ns for p in point_files(tmp_path)}
    assert len(finished) == 1
    assert [p.name for p in (tmp_path / "points").iterdir()] == list(finished)  # no temp files
    rerun = run_scale(*args, "--out", tmp_path)
    assert "2 points: 1 run, 1 already done, 0 failed" in rerun.stdout
    assert {p.name: p.stat().st_mtime_ns for p in point_files(tmp_path)
            if p.name in finished} == finished


def test_timed_out_point_is_killed_with_its_worker(tmp_path):
    tag, env = tagged_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--threads", "1", "--strategies", "batch",
                           *TINY, "--out", str(tmp_path), "--timeout", "1.5"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1 and "1 failed" in proc.stdout
    assert wait_until_gone(tag) == []
    record = json.loads(next((tmp_path / "failed").glob("*.json")).read_text())
    assert record["error"] == "timed out after 1.5 s" and record["returncode"] is None
    assert point_files(tmp_path) == []


def test_failing_point_is_recorded_and_the_study_goes_on(study, tmp_path):
    out = copy_study(study, tmp_path)
    (out / "points" / "weak-tiny-lstm-batch-compact-t002.json").unlink()
    # more threads than this process may use: speed.py refuses with status 2 and one line
    too_many = len(os.sched_getaffinity(0)) + 1
    args = ["--threads", f"1,2,{too_many}", "--scaling", "strong,weak", "--strategies", "batch",
            *TINY, "--out", out]
    proc = run_scale(*args, check=False)
    assert proc.returncode == 1
    assert "6 points: 3 run, 3 already done, 2 failed" in proc.stdout
    assert (out / "points" / "weak-tiny-lstm-batch-compact-t002.json").exists()  # after a failure
    failed = sorted(p.stem for p in (out / "failed").glob("*.json"))
    assert failed == [f"{s}-tiny-lstm-batch-compact-t{too_many:03d}" for s in ("strong", "weak")]
    error = json.loads((out / "failed" / f"{failed[0]}.json").read_text())["error"]
    assert error.startswith("speed.py: error: --threads") and "\n" not in error
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["status"] for r in rows) == ["failed"] * 2 + ["ok"] * 4
    assert all(r["error"] == error for r in rows if r["status"] == "failed")
    md = (out / "results.md").read_text()
    assert "## Failed points" in md and error in md


# ---------------------------------------------------------------- one machine per study

def test_default_output_is_this_machines_and_machine_json_describes_it(study):
    out = Path(run_scale("--print-out").stdout.strip())
    machine = json.loads((study[0] / "machine.json").read_text())["machine"]
    assert out.name == f"scale-{scale_machine.slug(machine)}"
    assert f"-{machine['cores']}c-{machine['isa']}" in out.name
    assert machine["isa"] == scale_machine.vector_isa(scale_machine.cpu_flags())
    assert machine["caches"] and machine["numa"]
    topo = json.loads((study[0] / "machine.json").read_text())["topo"]
    assert topo.startswith("topology: ") and "verified" in topo


def test_committed_study_is_not_resumed_on_another_machine(tmp_path):
    """results/scale-amd-epyc-2c-avx512 was measured on the 2-core AVX-512 VM; a 2-core AVX2 VM with the same
    CPU name is another machine."""
    recorded = json.loads((ROOT / "results" / "scale-amd-epyc-2c-avx512" / "machine.json").read_text())
    avx2_vm = {**recorded["machine"], "isa": "avx2"}
    assert scale_machine.identity(avx2_vm) != scale_machine.identity(recorded["machine"])
    assert scale_machine.slug(avx2_vm) != scale_machine.slug(recorded["machine"])


def test_resume_refuses_or_sets_aside_another_machines_points(study, tmp_path):
    out = copy_study(study, tmp_path)
    machine_json = out / "machine.json"
    recorded = json.loads(machine_json.read_text())
    recorded["machine"].update(cpu="Intel(R) Xeon Phi(TM) CPU 7250 @ 1.40GHz", cores=68)
    machine_json.write_text(json.dumps(recorded))
    theirs = {p.name: p.read_bytes() for p in point_files(out)}
    proc = run_scale(*STUDY, "--out", out, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "Xeon Phi" in proc.stderr and "--set-aside" in proc.stderr
    assert {p.name: p.read_bytes() for p in point_files(out)} == theirs  # untouched
    proc = run_scale(*STUDY, "--out", out, "--set-aside", "--no-report")
    assert "4 points: 4 run, 0 already done, 0 failed" in proc.stdout
    aside = out / "set-aside-intel-xeon-phi-cpu-7250-1-40ghz-68c-avx512"
    assert {p.name: p.read_bytes() for p in point_files(aside)} == theirs
    assert json.loads(machine_json.read_text())["machine"]["cores"] == study_cores(study)


def study_cores(study):
    return json.loads((study[0] / "machine.json").read_text())["machine"]["cores"]


def test_rounds_merge_to_the_median_rounds_real_point(study, tmp_path):
    """Three rounds of one study: every merged point is the file of the round whose median is
    the median (not an average), with all rounds' medians; each round validated on its own."""
    out = tmp_path / "rounded"
    scale = {"r1": 1.0, "r2": 3.0, "r3": 2.0}
    for name, factor in scale.items():
        round_dir = out / "rounds" / name
        shutil.copytree(study[0], round_dir)
        for path in point_files(round_dir):
            record = json.loads(path.read_text())
            record["result"]["phi_rnn"]["median_ms"] *= factor
            record["result"]["phi_rnn"]["ms"] = [t * factor for t in record["result"]["phi_rnn"]["ms"]]
            path.write_text(json.dumps(record))
    merged, rounds = scale_rounds.merge(out)
    assert (merged, rounds) == (len(STUDY_KEYS), 3)
    for key in STUDY_KEYS:
        chosen = json.loads((out / "points" / f"{key}.json").read_text())
        r2 = json.loads((out / "rounds" / "r2" / "points" / f"{key}.json").read_text())
        r3 = json.loads((out / "rounds" / "r3" / "points" / f"{key}.json").read_text())
        assert chosen["result"] == r3["result"]  # factor 2: the middle of 1, 2, 3
        assert chosen["round_medians_ms"] == [r["result"]["phi_rnn"]["median_ms"] for r in
                                              (json.loads((out / "rounds" / n / "points" / f"{key}.json").read_text())
                                               for n in ("r1", "r2", "r3"))]
        assert r2["result"]["phi_rnn"]["median_ms"] > chosen["result"]["phi_rnn"]["median_ms"]
    errors = scale_rounds.validate_rounds(out)
    assert set(errors) == {k for k in STUDY_KEYS}  # tiny's profiled points all get a model
    assert all(len(e) == 3 for e in errors.values())
    assert "median" in (out / "rounds" / "validation.md").read_text()
    assert not list((out / "rounds" / "r1").glob("results.*"))  # one set of reports: OUT's
    run_scale("--collect", out)
    assert len(list(csv.DictReader(open(out / "results.csv")))) == len(STUDY_KEYS)


def test_blas_is_a_dimension_of_its_own():
    lines = run_scale("--threads", "1", "--configs", "tiny", "--strategies", "batch",
                      "--blas", "libxsmm,mkl", "--list").stdout.splitlines()
    assert [line.split("\t")[1] for line in lines] == [
        "strong-tiny-lstm-batch-libxsmm-compact-t001", "strong-tiny-lstm-batch-mkl-compact-t001"]
    point = scale_points.Point(0, "strong", "tiny", 1, 16, 4, 8, 65, "lstm", "batch", "compact", 1,
                               blas="mkl")
    assert point.speed_args(3, 1)[-2:] == ["--blas", "mkl"]


# ---------------------------------------------------------------- MPI ranks

MPIEXEC = Path(sys.executable).parent / "mpiexec"


def test_ranks_are_a_dimension_and_one_rank_keeps_the_old_keys():
    args = ["--threads", "1,2", "--configs", "tiny", "--strategies", "batch", "--scaling", "weak"]
    plain = run_scale(*args, "--list").stdout
    assert run_scale(*args, "--ranks", "1", "--list").stdout == plain  # old studies resume as they were
    lines = run_scale(*args, "--ranks", "2,1", "--list").stdout.splitlines()
    assert [line.split("\t")[1:] for line in lines] == [
        ["weak-tiny-lstm-batch-compact-t001", "batch 4"], ["weak-tiny-lstm-batch-compact-t002", "batch 8"],
        ["weak-tiny-lstm-batch-compact-r002-t001", "batch 8"],
        ["weak-tiny-lstm-batch-compact-r002-t002", "batch 16"]]  # every thread of every rank: 4 rows
    old = {"index": 0, "scaling": "strong", "config": "tiny", "num_layers": 1, "rnn_size": 16,
           "base_batch": 4, "seq_length": 8, "vocab": 65, "model": "lstm", "strategy": "batch",
           "policy": "compact", "threads": 2}  # the point of a file written before ranks existed
    assert scale_points.Point(**old).key == "strong-tiny-lstm-batch-compact-t002"
    assert scale_points.Point(**old).command(3, 1)[0] == "speed.py"


def test_a_two_rank_point_runs_under_mpiexec_and_records_the_allreduce(tmp_path):
    if not MPIEXEC.exists():
        message = f"no mpiexec next to {sys.executable} (the [mpi] extra)"
        if os.environ.get("PHI_RNN_REQUIRE_MPI"):
            pytest.fail(message)
        pytest.skip(message)
    args = ["--threads", "1", "--ranks", "1,2", "--strategies", "batch", "--scaling", "strong,weak", *TINY]
    proc = run_scale(*args, "--out", tmp_path)
    assert "4 points: 4 run, 0 already done, 0 failed" in proc.stdout
    records = {p.stem: json.loads(p.read_text()) for p in point_files(tmp_path)}
    two = records["strong-tiny-lstm-batch-compact-r002-t001"]
    assert two["point"]["ranks"] == 2 and two["batch_size"] == 4
    assert two["command"][:2] == ["python", "bench/mpi_speed.py"]
    assert two["command"][two["command"].index("--ranks") + 1] == "2"
    mpi = two["result"]["mpi"]
    assert mpi["library"].startswith("MPICH") and 0 < mpi["allreduce_share"] < 1
    assert mpi["allreduce_ms"] == pytest.approx(mpi["allreduce_share"] * two["result"]["phi_rnn"]["median_ms"])
    assert records["weak-tiny-lstm-batch-compact-r002-t001"]["batch_size"] == 8  # 4 per rank
    assert "mpi" not in records["strong-tiny-lstm-batch-compact-t001"]["result"]
    with open(tmp_path / "results.csv") as handle:
        rows = {r["key"]: r for r in csv.DictReader(handle)}

    def ms_per_char(record):
        return record["result"]["phi_rnn"]["median_ms"] / (record["batch_size"] * record["point"]["seq_length"])

    for scaling in ("strong", "weak"):
        base, ranks = (records[f"{scaling}-tiny-lstm-batch-compact-{t}"] for t in ("t001", "r002-t001"))
        row = rows[f"{scaling}-tiny-lstm-batch-compact-r002-t001"]
        assert (row["ranks"], row["threads"], row["cores"]) == ("2", "1", "2")
        speedup = ms_per_char(base) / ms_per_char(ranks)  # over the 1-rank 1-thread point
        assert float(row["speedup"]) == pytest.approx(speedup, rel=1e-9)
        assert float(row["efficiency"]) == pytest.approx(speedup / 2, rel=1e-9)
        assert float(row["allreduce_share"]) == pytest.approx(ranks["result"]["mpi"]["allreduce_share"])
        assert rows[f"{scaling}-tiny-lstm-batch-compact-t001"]["allreduce_share"] == ""
    md = (tmp_path / "results.md").read_text()
    share = 100 * float(rows["strong-tiny-lstm-batch-compact-r002-t001"]["allreduce_share"])
    assert "| strong | tiny | lstm | batch |  | compact | 2 | 1 | 4 |" in md and f"| {share:.1f}% |" in md
    assert (tmp_path / "speedup.png").read_bytes().startswith(PNG_SIGNATURE)


# ---------------------------------------------------------------- precision (fp32, bf16)

from phi_rnn import bf16  # noqa: E402  (conftest started the runtimes in this process already)

needs_bf16 = pytest.mark.skipif(not bf16.native_features(), reason=bf16.refusal())
# hides this CPU's native bfloat16 from phi_rnn (phi_rnn/bf16.py): the refusal, on any CPU
NO_BF16_ENV = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
BF16_STUDY = ["--threads", "1", "--strategies", "batch", "--precisions", "fp32,bf16", *TINY]
FP32_KEY, BF16_KEY = "strong-tiny-lstm-batch-compact-t001", "strong-tiny-lstm-batch-compact-bf16-t001"


def test_precision_is_a_dimension_and_fp32_keeps_the_old_keys():
    args = ["--threads", "1,2", "--configs", "tiny", "--strategies", "batch"]
    plain = run_scale(*args, "--list").stdout
    assert run_scale(*args, "--precisions", "fp32", "--list").stdout == plain  # old studies resume as they were
    lines = run_scale(*args, "--precisions", "fp32,bf16", "--list").stdout.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [
        ["0", "strong-tiny-lstm-batch-compact-t001"], ["1", "strong-tiny-lstm-batch-compact-t002"],
        ["2", "strong-tiny-lstm-batch-compact-bf16-t001"], ["3", "strong-tiny-lstm-batch-compact-bf16-t002"]]
    point = scale_points.Point(0, "strong", "tiny", 1, 16, 4, 8, 65, "lstm", "batch", "compact", 1)
    assert "--parts" in point.speed_args(3, 1) and "--precision" not in point.speed_args(3, 1)
    args = scale_points.Point(**{**point.__dict__, "precision": "bf16"}).speed_args(3, 1)
    assert args[args.index("--precision") + 1] == "bf16" and "--parts" not in args  # parts are float32's


def test_bad_precisions_are_one_line_and_status_2():
    for args, message in ((["--precisions", "fp16"], "invalid choice 'fp16'"),
                          (["--precisions", ","], "empty list"),
                          (["--precisions", "fp32,bf16", "--ranks", "1,2"], "mpi_speed.py has no bfloat16")):
        proc = run_scale("--configs", "tiny", *args, "--list", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_model_leaves_bf16_rows_out_and_models_fp32_as_before():
    rows = [measured_row(b, block=ms) for b, ms in {1: 0.1, 25: 1.2, 50: 2.0}.items()]
    rows.append(measured_row(50, threads=2, block=1.5, parts=contention(25, 1.0, 1.2)))
    # bf16 rows of the same shape, faster: mixed into the block series they would change R(b)
    twins = [dict(r, precision="bf16", median_ms=r["median_ms"] / 2, mean_ms=r["mean_ms"] / 2) for r in rows]
    alone = scale_model.build_models(rows, {("compact", 2): 0.003})
    together = scale_model.build_models(rows + twins, {("compact", 2): 0.003})
    assert set(together) == set(alone) and all(s[-1] == "fp32" for s in together)  # no bf16 series
    series = scale_points.series_of(rows[-1])
    assert [together[series].time_ms(p) for p in (2, 16)] == [alone[series].time_ms(p) for p in (2, 16)]
    scale_model.validate(rows + twins, together)
    assert all(r["model_ms"] is None for r in twins) and all(r["model_ms"] is not None for r in rows)


def test_fp32_study_recollects_byte_for_byte(tmp_path):
    """The committed study (float32 only) collects to the very files committed: the precision
    dimension adds no column, field or line to a study without bf16 points."""
    committed = ROOT / "results" / "scale-amd-epyc-2c-avx512"
    out = tmp_path / "study"
    for sub in ("points", "regions"):
        shutil.copytree(committed / sub, out / sub)
    shutil.copy(committed / "machine.json", out / "machine.json")
    run_scale("--collect", out)
    for name in ("results.csv", "results.json", "results.md", "machine.json"):
        assert (out / name).read_bytes() == (committed / name).read_bytes(), name


@needs_bf16
def test_a_bf16_point_is_measured_and_reported_without_a_model(tmp_path):
    proc = run_scale(*BF16_STUDY, "--out", tmp_path)
    assert "2 points: 2 run, 0 already done, 0 failed" in proc.stdout
    records = {p.stem: json.loads(p.read_text()) for p in point_files(tmp_path)}
    assert set(records) == {FP32_KEY, BF16_KEY}
    mine = records[BF16_KEY]
    assert mine["command"][mine["command"].index("--precision") + 1] == "bf16"
    assert mine["result"]["precision"] == "bf16" and mine["result"]["bf16_peak_gflops"] > 0
    with open(tmp_path / "results.csv") as handle:
        rows = {r["key"]: r for r in csv.DictReader(handle)}
    assert (rows[FP32_KEY]["precision"], rows[BF16_KEY]["precision"]) == ("fp32", "bf16")
    assert rows[FP32_KEY]["model_ms"] != "" and rows[BF16_KEY]["model_ms"] == rows[BF16_KEY]["model_error"] == ""
    assert float(rows[BF16_KEY]["bf16_peak_gflops"]) == pytest.approx(mine["result"]["bf16_peak_gflops"])
    results = json.loads((tmp_path / "results.json").read_text())
    entry = next(m for m in results["models"] if m["precision"] == "bf16")
    assert not entry["modelled"] and entry["extrapolated"] == [] and "float32" in entry["note"]
    md = (tmp_path / "results.md").read_text()
    bf16_row = next(line for line in md.splitlines() if line.startswith("| strong | tiny |") and "| bf16 |" in line)
    assert bf16_row.endswith("|  |  |  |  |")  # part, model ms, error, allreduce: none
    ratio = float(rows[BF16_KEY]["median_ms"]) / float(rows[FP32_KEY]["median_ms"])
    assert "## bfloat16 against float32" in md and f"| {ratio:.2f} |" in md
    assert "(no model: its parts are float32's" in md


def test_bf16_points_are_left_out_where_the_cpu_lacks_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.scale", *BF16_STUDY, "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=NO_BF16_ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"1 bf16 points left out: {bf16.refusal().split(' (')[0]}" in proc.stderr
    assert "2 points: 1 run, 0 already done, 0 failed, 1 left out" in proc.stdout
    assert [p.stem for p in point_files(tmp_path)] == [FP32_KEY] and not (tmp_path / "failed").exists()
    with open(tmp_path / "results.csv") as handle:
        assert "precision" not in next(csv.reader(handle))  # a float32 study's columns
    proc = subprocess.run([sys.executable, "-m", "bench.scale", *BF16_STUDY, "--out", str(tmp_path), "--point", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=NO_BF16_ENV)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and BF16_KEY in lines[0] and "native bfloat16" in lines[0]
