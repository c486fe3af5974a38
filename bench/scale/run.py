"""Running the scaling study's points: each one bench/speed.py (bench/mpi_speed.py under
mpiexec for more than one rank) in a fresh process group, its result one JSON file under
OUT/points/ (OUT/failed/ when it fails)."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from phi_rnn.files import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench"
ENV_PREFIXES = ("OMP_", "KMP_", "MKL_", "NUMBA_")
INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def write_atomic(path, text):
    """A killed writer or a crash never leaves a half-written file behind (files.atomic_write:
    temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def relevant_env():
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_point(point, out, iters, warmup, timeout=None):
    """Run one point in a fresh process; write points/<key>.json and return None, or write
    failed/<key>.json and return the one-line reason."""
    script, arguments = point.command(iters, warmup)
    command = [sys.executable, str(BENCH / script)] + arguments
    # recorded as it would be typed in the project directory: results carry no local paths
    typed = ["python", f"bench/{script}"] + arguments
    record = {"point": asdict(point), "batch_size": point.batch_size, "command": typed,
              "env": relevant_env(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    start = time.perf_counter()
    returncode, stdout, stderr = run_process_group(command, timeout)
    record["wall_s"] = round(time.perf_counter() - start, 3)
    record["stderr_tail"] = stderr[-2000:]
    result, error = parse_speed_output(returncode, stdout, stderr, script)
    failed_path = out / "failed" / f"{point.key}.json"
    if error:
        record.update(returncode=returncode, error=error)
        write_json_atomic(failed_path, record)
        return error
    record["result"] = result
    write_json_atomic(out / "points" / f"{point.key}.json", record)
    failed_path.unlink(missing_ok=True)  # an earlier failure of this point is superseded
    return None


def _unblock_interrupts():  # in the child, before exec: speed.py gets the usual signal mask
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)


def run_process_group(command, timeout):
    """(returncode or None on timeout, stdout, stderr). speed.py measures in a worker process
    of its own, so a timeout or an interrupt kills the whole process group: an orphaned
    worker would go on computing and disturb the next point's timings. Interrupts are held
    while the child starts: delivered inside Popen, one would leave it running unkilled."""
    signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO_ROOT, start_new_session=True, preexec_fn=_unblock_interrupts)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)  # a held signal fires here
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr + f"\ntimed out after {timeout} s"
    except BaseException:  # Ctrl-C, or SIGTERM turned into KeyboardInterrupt
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def parse_speed_output(returncode, stdout, stderr, script="speed.py"):
    """(result, None) for a usable run of speed.py (or mpi_speed.py), else (None, one-line reason)."""
    if returncode != 0:
        return None, last_line(stderr) or f"{script} exited with status {returncode}"
    try:
        result = json.loads(stdout)
        float(result["phi_rnn"]["median_ms"])
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"{script} printed no usable JSON ({type(exc).__name__}: {exc})"
    return result, None


def measure_regions(points, out, timeout=None):
    """bench.scale.barrier once per (policy, threads) of points without OUT/regions/ file: the
    fork/join cost the model charges per parallel region. A failure is reported, not fatal."""
    for policy, threads in dict.fromkeys((p.policy, p.threads) for p in points):
        path = out / "regions" / f"{policy}-t{threads:03d}.json"
        if path.exists():
            continue
        command = [sys.executable, "-m", "bench.scale.barrier", "--threads", str(threads),
                   "--policy", policy]
        returncode, stdout, stderr = run_process_group(command, timeout)
        try:
            record = json.loads(stdout)
        except ValueError:
            print(f"region cost at {threads} threads ({policy}) not measured: "
                  f"{last_line(stderr) or returncode}", file=sys.stderr)
            continue
        write_json_atomic(path, record)


def json_files(directory):
    """The finished JSON files of directory, sorted: not the temporary files (".tmp-...")
    that a write in progress, here or in another job of the array, has there."""
    return sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))


def is_done(point, out):
    return (out / "points" / f"{point.key}.json").exists()


def bf16_refusal():
    """None where this CPU runs bfloat16 natively, else why not (phi_rnn.bf16's one line),
    asked of a fresh process: this one loads no runtime that its points would inherit."""
    from bench.side_by_side import bf16_support
    return bf16_support()["refusal"]


def run_study(points, out, iters, warmup, timeout):
    """Run every point without a result file; returns (ran, skipped, failed keys, left out).
    bf16 points on a CPU without native bfloat16 are left out (one line says why)."""
    pending = [p for p in points if not is_done(p, out)]
    refusal = bf16_refusal() if any(p.precision == "bf16" for p in pending) else None
    left_out = [p for p in pending if p.precision == "bf16"] if refusal else []
    if left_out:
        print(f"{len(left_out)} bf16 points left out: {refusal}", file=sys.stderr)
        pending = [p for p in pending if p not in left_out]
        points = [p for p in points if p not in left_out]
    measure_regions(points, out, timeout)
    skipped = len(points) - len(pending)
    failed = []
    with tqdm(pending, unit="point", desc="scale", file=sys.stderr) as bar:
        for point in bar:
            bar.set_postfix_str(point.key)
            error = run_point(point, out, iters, warmup, timeout)
            if error:
                failed.append(point.key)
                bar.write(f"failed: {point.key}: {error}")
    return len(pending), skipped, failed, len(left_out)
