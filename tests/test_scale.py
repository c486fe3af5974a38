"""bench/scale.py: the model fit, point enumeration, --point/--collect, resume, failures.

End-to-end tests run the real bench/speed.py on the `tiny` config with a few iterations.
"""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCALE = BENCH / "scale.py"
TINY = ["--configs", "tiny", "--iters", "3", "--warmup", "1"]
STUDY = ["--threads", "1,2", "--scaling", "strong,weak", "--strategies", "batch", *TINY]
STUDY_KEYS = [f"{scaling}-tiny-lstm-batch-compact-t00{p}"
              for scaling in ("strong", "weak") for p in (1, 2)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


sys.path.insert(0, str(BENCH))
import scale_fit  # noqa: E402
import scale_machine  # noqa: E402
import scale_points  # noqa: E402


def run_scale(*args, check=True):
    proc = subprocess.run([sys.executable, str(SCALE), *map(str, args)],
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"scale.py {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def point_files(out):
    return sorted((out / "points").glob("*.json"))


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


# ---------------------------------------------------------------- model fit

def amdahl_speedups(serial, threads, overhead=0.0):
    return [1 / (serial + (1 - serial) / p + overhead * math.log2(p)) for p in threads]


def test_amdahl_fit_recovers_serial_fraction_and_extrapolates_by_the_formula():
    threads = [1, 2, 4, 8, 16]
    fit = scale_fit.best_fit(threads, amdahl_speedups(0.07, threads))
    assert fit.name == scale_fit.AMDAHL
    assert fit.serial_fraction == pytest.approx(0.07, abs=1e-9)
    assert fit.rms_rel_error < 1e-9 and not fit.underdetermined
    for p in scale_fit.EXTRAPOLATE_TO:
        assert fit.speedup(p) == pytest.approx(1 / (0.07 + 0.93 / p), rel=1e-9)


def test_amdahl_fit_is_least_squares_under_noise():
    threads = [1, 2, 4, 8, 16, 32]
    noisy = [s * (1 + e) for s, e in
             zip(amdahl_speedups(0.1, threads), [0, 0.03, -0.02, 0.04, -0.03, 0.02])]
    fit = scale_fit.fit_amdahl(threads, noisy)
    assert fit.serial_fraction == pytest.approx(0.1, abs=0.02)

    def rms_rel_error(serial):  # the objective, written out independently
        errors = [(serial + (1 - serial) / p - 1 / s) * s for p, s in zip(threads, noisy)]
        return math.sqrt(sum(e * e for e in errors[1:]) / (len(threads) - 1))

    assert fit.rms_rel_error == pytest.approx(rms_rel_error(fit.serial_fraction))
    assert fit.rms_rel_error < rms_rel_error(fit.serial_fraction - 0.005)
    assert fit.rms_rel_error < rms_rel_error(fit.serial_fraction + 0.005)


def test_overhead_model_is_chosen_when_the_data_has_an_overhead():
    threads = [1, 2, 4, 8, 16, 32]
    fit = scale_fit.best_fit(threads, amdahl_speedups(0.05, threads, overhead=0.01))
    assert fit.name == scale_fit.AMDAHL_OVERHEAD
    assert fit.serial_fraction == pytest.approx(0.05, abs=1e-9)
    assert fit.overhead == pytest.approx(0.01, abs=1e-9)
    assert fit.speedup(272) == pytest.approx(1 / (0.05 + 0.95 / 272 + 0.01 * math.log2(272)))


def test_two_points_give_an_exact_but_underdetermined_fit():
    fit = scale_fit.fit_amdahl([1, 2], [1.0, 1.6])
    assert fit.underdetermined and fit.points == 1
    assert fit.speedup(2) == pytest.approx(1.6)  # 1/1.6 = s + (1-s)/2 -> s = 0.25
    assert fit.serial_fraction == pytest.approx(0.25)
    assert scale_fit.fit_amdahl([1], [1.0]) is None


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
    from phi_rnn import blas
    assert all(r["gemm"].startswith(blas.default_backend()) for r in rows)  # each point names its GEMMs
    machine = json.loads((out / "machine.json").read_text())
    assert machine["machine"]["cores"] >= 1 and "numba" in machine["versions"]
    assert machine["gemm"].startswith(blas.default_backend())
    md = (out / "results.md").read_text()
    assert "## Machine" in md and "model (Amdahl fit" in md and "underdetermined" in md
    for p in scale_fit.EXTRAPOLATE_TO:
        assert f"| {p} |" in md


def test_collect_merges_point_files_with_correct_arithmetic(study, tmp_path):
    out = tmp_path / "collected"
    shutil.copytree(study[0] / "points", out / "points")  # what separate array jobs leave
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
    for model in results["models"]:
        two = next(r for r in rows if r["scaling"] == model["scaling"] and r["threads"] == "2")
        fit = scale_fit.Fit(**model["fit"])
        # one point beyond 1 thread: 1/S = s + (1-s)/2 exactly, s bounded to [0, 1]
        serial = min(max(2 / float(two["speedup"]) - 1, 0.0), 1.0)
        assert fit.serial_fraction == pytest.approx(serial, abs=1e-9)
        at_272 = model["extrapolated"][-1]
        assert at_272["threads"] == 272
        assert at_272["speedup"] == pytest.approx(fit.speedup(272))
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


def wait_until_gone(tag, seconds=10):
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
    proc = subprocess.Popen([sys.executable, str(SCALE), *args, "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
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
    proc = subprocess.run([sys.executable, str(SCALE), "--threads", "1", "--strategies", "batch",
                           *TINY, "--out", str(tmp_path), "--timeout", "1.5"],
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
    """results/scale-vm was measured on the 2-core AVX-512 VM; a 2-core AVX2 VM with the same
    CPU name is another machine."""
    recorded = json.loads((BENCH.parent / "results" / "scale-vm" / "machine.json").read_text())
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


def test_blas_is_a_dimension_of_its_own():
    lines = run_scale("--threads", "1", "--configs", "tiny", "--strategies", "batch",
                      "--blas", "libxsmm,mkl", "--list").stdout.splitlines()
    assert [line.split("\t")[1] for line in lines] == [
        "strong-tiny-lstm-batch-libxsmm-compact-t001", "strong-tiny-lstm-batch-mkl-compact-t001"]
    point = scale_points.Point(0, "strong", "tiny", 1, 16, 4, 8, 65, "lstm", "batch", "compact", 1,
                               blas="mkl")
    assert point.speed_args(3, 1)[-2:] == ["--blas", "mkl"]
