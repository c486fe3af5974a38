"""`python -m phi_rnn submit`: rendered scripts, bad input, chain links, real jobs on Slurm,
native and through its PBS wrappers.

The scheduler tests need the private Slurm of tests/slurm_cluster.py (packages from
.ci/system-install.sh, root); they skip loudly without it.  Their jobs are submitted
together by one fixture and run side by side; each test then waits for its own.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

TINY_MODEL = ["--rnn_size", "16", "--num_layers", "1", "--batch_size", "10",
              "--seq_length", "20"]
JOB_TIMEOUT_S = 150


def submit(*argv, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "phi_rnn", "submit", *argv], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


def directives(script, prefix="#PBS "):
    return [line[len(prefix):] for line in script.splitlines() if line.startswith(prefix)]


def sbatch_directives(script):
    return directives(script, "#SBATCH ")


def exec_line(script):
    (line,) = [line for line in script.splitlines() if line.startswith("exec ")]
    return line


def assert_valid_bash(script, tmp_path):
    path = tmp_path / "job.pbs"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


# --- rendering (no scheduler) -------------------------------------------------------


def test_torque_script_for_training(tmp_path):
    result = submit("--ppn", "64", "--walltime", "2:00:00", "--dry-run", "--",
                    "train", "--data_dir", "data/my text", "--max_iters", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    assert directives(script) == ["-N phi-train", "-q manycore", "-l nodes=1:ppn=64",
                                  "-l walltime=02:00:00", "-j oe"]
    assert f"SUBMIT_DIR={tmp_path}\n" in script and 'cd -- "${PBS_O_WORKDIR:-$SUBMIT_DIR}"' in script
    assert "source " in script and ".venv/bin/activate" in script
    assert "${PBS_JOBID" in script and "/proc/cpuinfo" in script
    assert exec_line(script) == ("exec python -m phi_rnn train --threads 64 "
                                 "--data_dir 'data/my text' --max_iters 5")
    assert "# submit: qsub -j oe phi-train" in script
    assert_valid_bash(script, tmp_path)


def test_pbspro_array_script_for_scaling(tmp_path):
    result = submit("--flavor", "pbspro", "--ncpus", "68", "--walltime", "45:00",
                    "--array", "0-3", "--account", "proj7", "--mail", "me@example.org",
                    "--output", "logs/scale.log", "--pbs-line", "-l place=excl", "--dry-run",
                    "--", "scale", "--out", "results/s", "--configs", "tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert directives(script) == [
        "-N phi-scale", "-q manycore", "-l select=1:ncpus=68:mpiprocs=1",
        "-l walltime=00:45:00", "-A proj7", "-M me@example.org", "-m ae",
        f"-o {tmp_path}/logs/scale.log", "-j oe", "-J 0-3", "-l place=excl"]
    assert 'IDX="${PBS_ARRAYID:-${PBS_ARRAY_INDEX:-$SLURM_ARRAY_TASK_ID}}"' in script
    assert re.fullmatch(r'exec python \S+/bench/scale --point "\$IDX" '
                        r"--out results/s --configs tiny", exec_line(script))
    assert f"qsub -o {tmp_path}/logs/scale.log -j oe -J 0-3 phi-scale" in script
    assert_valid_bash(script, tmp_path)


SLURM_RESOURCES = "--nodes=4 --ntasks-per-node=4 --cpus-per-task=16"


@pytest.mark.parametrize("flavor, launcher, resources, mpiexec", [
    ("torque", "hydra", "-l nodes=4:ppn=64",
     "mpiexec -n 16 -ppn 4 -genv OMP_NUM_THREADS 16 -genv I_MPI_PIN_DOMAIN omp"),
    ("pbspro", "openmpi", "-l select=4:ncpus=64:mpiprocs=4:ompthreads=16",
     "mpiexec -n 16 --map-by ppr:4:node:pe=16 -x OMP_NUM_THREADS=16"),
    ("slurm", "srun-pmi2", SLURM_RESOURCES,
     "srun --mpi=pmi2 --nodes=4 --ntasks=16 --ntasks-per-node=4 --cpus-per-task=16 "
     "--export=ALL,OMP_NUM_THREADS=16"),
    ("slurm", "srun-pmix", SLURM_RESOURCES,
     "srun --mpi=pmix --nodes=4 --ntasks=16 --ntasks-per-node=4 --cpus-per-task=16 "
     "--export=ALL,OMP_NUM_THREADS=16"),
    ("slurm", "hydra", SLURM_RESOURCES,
     "mpiexec -n 16 -ppn 4 -genv OMP_NUM_THREADS 16 -genv I_MPI_PIN_DOMAIN omp"),
])
def test_mpi_training_script(tmp_path, flavor, launcher, resources, mpiexec):
    """4 nodes x 4 ranks x 16 threads: the resources in the scheduler's dialect, the launcher
    in its own, the thread count exported to every rank and passed to train."""
    result = submit("--flavor", flavor, "--nodes", "4", "--ppn", "64", "--ranks-per-node", "4", "--mpi",
                    launcher, "--walltime", "4:00:00", "--dry-run", "--", "train", "--rnn_size", "512",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    if flavor == "slurm":
        assert " ".join(sbatch_directives(result.stdout)[2:5]) == resources
    else:
        assert directives(result.stdout)[2] == resources
    assert exec_line(result.stdout) == f"exec {mpiexec} python -m phi_rnn train --threads 16 --rnn_size 512"
    assert_valid_bash(result.stdout, tmp_path)


def test_slurm_script_for_training(tmp_path):
    result = submit("--scheduler", "slurm", "--ppn", "64", "--walltime", "2:00:00", "--dry-run",
                    "--", "train", "--data_dir", "data/my text", "--max_iters", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    assert sbatch_directives(script) == [
        "--job-name=phi-train", "--partition=manycore", "--nodes=1", "--ntasks-per-node=1",
        "--cpus-per-task=64", "--time=02:00:00", "--output=phi-train.o%j"]
    assert directives(script) == []
    assert f"SUBMIT_DIR={tmp_path}\n" in script and 'cd -- "${SLURM_SUBMIT_DIR:-$SUBMIT_DIR}"' in script
    assert "${SLURM_JOB_ID:-?}" in script and "PBS_" not in script
    assert exec_line(script) == ("exec python -m phi_rnn train --threads 64 "
                                 "--data_dir 'data/my text' --max_iters 5")
    assert "# submit: sbatch --parsable phi-train" in script
    assert_valid_bash(script, tmp_path)


def test_slurm_array_script_with_every_option(tmp_path):
    result = submit("--scheduler", "slurm", "--partition", "long", "--ppn", "68", "--time", "45:00",
                    "--array", "0-14:2%4", "--account", "proj7", "--mail", "me@example.org",
                    "--mail-events", "abe", "--error", "logs/scale.err", "--name", "sweep",
                    "--sbatch-line", "#SBATCH --exclusive", "--directive=--mem=8G", "--dry-run",
                    "--", "scale", "--out", "results/s", "--configs", "tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert sbatch_directives(script) == [
        "--job-name=sweep", "--partition=long", "--nodes=1", "--ntasks-per-node=1",
        "--cpus-per-task=68", "--time=00:45:00", "--account=proj7", "--mail-user=me@example.org",
        "--mail-type=FAIL,BEGIN,END", "--output=sweep.o%A.%a", f"--error={tmp_path}/logs/scale.err",
        "--array=0-14:2%4", "--exclusive", "--mem=8G"]
    assert 'IDX="$SLURM_ARRAY_TASK_ID"' in script
    assert re.fullmatch(r'exec python \S+/bench/scale --point "\$IDX" '
                        r"--out results/s --configs tiny", exec_line(script))
    assert "# submit: sbatch --parsable sweep" in script
    assert_valid_bash(script, tmp_path)


@pytest.mark.parametrize("scheduler, dependency", [
    ("slurm", "sbatch --parsable --dependency=afterany:JOB phi-train"),
    ("torque", "qsub -j oe -W depend=afterany:JOB phi-train"),
])
def test_chain_script(tmp_path, scheduler, dependency):
    """--chain: every job runs phi_rnn.chain with its link number, the record in the
    checkpoint directory and the SIGTERM --stop-before seconds ahead of the walltime."""
    result = submit("--scheduler", scheduler, "--ppn", "8", "--walltime", "1:00:00", "--chain", "5",
                    "--stop-before", "600", "--dry-run", "--", "train", "--checkpoint_dir", "runs/a b",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"exec python -m phi_rnn\.chain --link 1 --links 5 --record "
                         r"'(\S+/runs/a b/chain-\d{8}-\d{6}\.log)' --stop-after 3000 --cancel (\w+) -- "
                         r"python -m phi_rnn train --threads 8 --checkpoint_dir 'runs/a b'",
                         exec_line(result.stdout))
    assert match, exec_line(result.stdout)
    assert Path(match.group(1)).parent == tmp_path / "runs" / "a b"
    assert match.group(2) == ("scancel" if scheduler == "slurm" else "qdel")
    assert ", link 1 of a chain of 5 on " in result.stdout
    assert f"# links 2-5: {dependency}" in result.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    assert_valid_bash(result.stdout, tmp_path)


@pytest.mark.parametrize("walltime, rendered", [("90", "00:01:30"), ("5:00", "00:05:00"),
                                                ("100:00:00", "100:00:00")])
def test_walltime_forms(tmp_path, walltime, rendered):
    result = submit("--ppn", "2", "--walltime", walltime, "--dry-run", "--", "train",
                    cwd=tmp_path)
    assert f"-l walltime={rendered}" in directives(result.stdout)


def test_train_options_threads_policy_resume_and_torque_array(tmp_path):
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "latest").write_text("lm_lstm_epoch1.00_2.0000.npz\n")
    train = submit("--ppn", "64", "--threads", "128", "--policy", "scatter", "--resume",
                   "--dry-run", "--", "train", "--checkpoint_dir", "cv", cwd=tmp_path)
    assert exec_line(train.stdout) == ("exec python -m phi_rnn train --threads 128 "
                                       "--policy scatter --checkpoint_dir cv --resume latest")
    scale = submit("--ppn", "4", "--array", "0-7%2", "--dry-run", "--", "scale", "--out", "r",
                   cwd=tmp_path)
    assert "-t 0-7%2" in directives(scale.stdout)


def test_conda_environment_and_separate_error_file(tmp_path):
    result = submit("--ppn", "8", "--conda-env", "phi", "--output", "o.log", "--error", "e.log",
                    "--dry-run", "--", "train", cwd=tmp_path)
    script = result.stdout
    assert 'eval "$(conda shell.bash hook)"' in script and "conda activate phi" in script
    assert ".venv" not in script
    assert directives(script)[-2:] == [f"-o {tmp_path}/o.log", f"-e {tmp_path}/e.log"]
    assert f"qsub -o {tmp_path}/o.log -e {tmp_path}/e.log phi-train" in script


HOSTILE_NAMES = ["sd $(touch pwned1)", "a`touch pwned2`b", "q'\"; touch pwned3; #", "$(touch pwned4",
                 "${HOME}", "with space", "new\nline; touch pwned5", "back\\slash \\\"; touch pwned6 \\"]


def run_rendered(script, tmp_path, env):
    """Runs a rendered script with bash (its job command must be harmless) from tmp_path."""
    path = tmp_path / "job.sh"
    path.write_text(script)
    return subprocess.run(["bash", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=env)


# Values that pass the directive checks (one word: no spaces, quotes, backslashes or '#')
# but are shell syntax: inert in a directive, which bash reads as a comment and sbatch and
# qsub parse without a shell.
HOSTILE_OPTIONS = {
    "torque": ["--account", "acct;touch>pwned9", "--mail", "m`touch>pwned10`@x",
               "--pbs-line", "-l x=$(touch>pwned11)"],
    "slurm": ["--account", "acct;touch>pwned9", "--mail", "m`touch>pwned10`@x",
              "--directive=--comment=$(touch>pwned11)", "--chain", "3", "--stop-before", "60"],
}


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("scheduler, scheduler_sets_workdir",  # Slurm always sets it
                         [("torque", False), ("torque", True), ("slurm", True)])
def test_rendered_script_is_inert_to_hostile_directory_and_argument_values(
        tmp_path, name, scheduler_sets_workdir, scheduler):
    """A submit directory, a venv path, option values and job arguments holding shell
    syntax: the rendered script, run by bash with and without the scheduler's submit
    directory variable, changes into the directory, activates the venv, passes the
    arguments on verbatim and executes nothing of them. The Slurm case is a --chain job:
    its record lies in the hostile directory and the chain module starts train."""
    here = tmp_path / "outside"
    here.mkdir()
    hostile = tmp_path / name
    hostile.mkdir()
    venv = tmp_path / ("venv " + name)
    venv.mkdir()
    (venv / "bin").symlink_to(Path(sys.prefix) / "bin")  # the real venv behind a hostile path
    result = submit("--scheduler", scheduler, "--ppn", "1", "--walltime", "10:00", "--venv", str(venv),
                    "--output", str(here / "o;touch>pwned7`touch>pwned8`.log"),
                    *HOSTILE_OPTIONS[scheduler], "--dry-run",
                    "--", "train", "--savefile", name, "--help", cwd=hostile)
    assert result.returncode == 0, result.stderr
    workdir_variable = "SLURM_SUBMIT_DIR" if scheduler == "slurm" else "PBS_O_WORKDIR"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PBS_O_WORKDIR", "SLURM_SUBMIT_DIR", "VIRTUAL_ENV")}
    if scheduler_sets_workdir:
        env[workdir_variable] = str(hostile)
    job = run_rendered(result.stdout, here, env)
    assert job.returncode == 0, job.stdout + job.stderr
    assert f"dir: {hostile}\n" in job.stdout
    assert "usage: phi_rnn train" in job.stdout  # python ran, from the venv
    assert "python -m phi_rnn train --threads 1 --savefile " in job.stdout
    if scheduler == "slurm":
        (record,) = (hostile / "cv").glob("chain-*.log")
        assert "training finished (exit 0)" in record.read_text()
    created = list(tmp_path.rglob("pwned*"))
    assert created == [], created


def test_default_environment_is_the_one_running_submit(tmp_path):
    """Whoever installed phi_rnn into their own environment: submit activates that one."""
    result = submit("--ppn", "1", "--dry-run", "--", "train", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"source {Path(sys.prefix) / 'bin' / 'activate'}" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--walltime", "1:61", "--", "train"], "invalid --walltime '1:61'"),
    (["--walltime", "two hours", "--", "train"], "invalid --walltime"),
    (["--walltime", "0", "--", "train"], "invalid --walltime"),
    (["--name", "1st-run", "--", "train"], "invalid job name '1st-run'"),
    (["--name", "a-much-too-long-name", "--", "train"], "at most 15 characters"),
    (["--"], "after '--'"),
    (["--", "evaluate"], "after '--'"),
    (["--array", "0-1", "--", "train"], "--array runs scale points"),
    (["--array", "0-1", "--", "scale"], "needs '--out DIR'"),
    (["--flavor", "pbspro", "--array", "0,1", "--", "scale", "--out", "r"], "invalid --array"),
    (["--nodes", "2", "--", "scale", "--out", "r"], "MPI ranks run train"),
    (["--ranks-per-node", "0", "--", "train"], "both must be positive"),
    (["--ranks-per-node", "3", "--", "train"], "need at least one thread per rank"),
    (["--nodes", "2", "--mpi", "lam", "--", "train"], "invalid choice: 'lam'"),
    (["--resume", "--", "train", "--checkpoint_dir", "fresh"], "no checkpoint to resume"),
    (["--qsub", "/nonexistent/qsub", "--", "train"], "qsub not found"),
    (["--scheduler", "slurm", "--sbatch", "/nonexistent/sbatch", "--", "train"], "sbatch not found"),
    (["--scheduler", "slurm", "--ranks-per-node", "3", "--", "train"], "no multiple of --ranks-per-node 3"),
    (["--scheduler", "slurm", "--array", "0-3,x", "--", "scale", "--out", "r"], "invalid --array"),
    (["--scheduler", "slurm", "--account", "a b", "--", "train"], "invalid --account 'a b'"),
    (["--scheduler", "slurm", "--output", "o'x", "--", "train"], "invalid --output"),
    (["--scheduler", "slurm", "--directive=exclusive", "--", "train"], "invalid --directive"),
    (["--nodes", "2", "--mpi", "srun-pmi2", "--", "train"], "use it with --scheduler slurm"),
    (["--chain", "3", "--", "train"], "--chain needs --walltime"),
    (["--chain", "0", "--walltime", "10:00", "--", "train"], "at least one job"),
    (["--chain", "3", "--walltime", "5:00", "--", "train"], "--stop-before 300: give a number"),
    (["--chain", "3", "--walltime", "10:00", "--stop-before", "0", "--", "train"], "--stop-before 0"),
    (["--chain", "3", "--walltime", "10:00", "--", "train", "--resume", "latest"], "leave out --resume"),
    (["--stop-before", "60", "--", "train"], "applies to the jobs of a --chain"),
    (["--chain", "3", "--walltime", "10:00", "--", "scale"], "apply to train"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, message):
    result = submit("--ppn", "2", *argv, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stdout == ""


def test_missing_qsub_suggests_dry_run(tmp_path):
    result = submit("--ppn", "2", "--qsub", "no-such-qsub", "--", "train", cwd=tmp_path)
    assert result.returncode == 2 and "--dry-run" in result.stderr


# --- a link of a chain (phi_rnn.chain), without a scheduler ---------------------------

# Stands in for train where the chain's decisions are tested (the real one runs in the
# chained Slurm test below): on SIGTERM it writes a checkpoint, points `latest` at it and
# exits 143 ("checkpoint"), or exits 143 without one ("no-checkpoint"); a number: it
# exits with that status at once.
STAND_IN_TRAIN = """
import pathlib, signal, sys, time
mode, directory = sys.argv[1], pathlib.Path(sys.argv[2])
print("train arguments:", *sys.argv[3:], flush=True)
if mode.isdigit():
    sys.exit(int(mode))
def stop(signum, frame):
    if mode == "checkpoint":
        name = f"ck{time.time_ns()}.npz"
        (directory / name).write_text("weights")
        (directory / "latest").write_text(name + "\\n")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
time.sleep(60)
"""


def run_link(tmp_path, mode, link, links, cancel=None, earlier=""):
    """Runs link `link` of a chain of `links` jobs 12, 13, ... with the stand-in train and a
    SIGTERM 1 s after the start; the cancel program writes the ids it gets to cancelled.
    `earlier`: record lines of the links before."""
    checkpoint_dir = tmp_path / "cv"
    record = checkpoint_dir / "chain-20260101-000000.log"
    if not record.exists():
        checkpoint_dir.mkdir(exist_ok=True)
        record.write_text("chain of at most 3 jobs\njobs: " + " ".join(str(11 + k) for k in range(1, links + 1))
                          + "\n" + earlier)
    (tmp_path / "train.py").write_text(STAND_IN_TRAIN)
    if cancel is None:
        cancel = tmp_path / "cancel"
        cancel.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/cancelled\n')
        cancel.chmod(0o755)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "phi_rnn.chain", "--link", str(link), "--links", str(links),
                             "--record", str(record), "--stop-after", "1", "--cancel", str(cancel), "--",
                             sys.executable, str(tmp_path / "train.py"), mode, str(checkpoint_dir)],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, SLURM_JOB_ID=str(11 + link)))
    return result, record.read_text(), time.monotonic() - started


def test_chain_link_stops_training_before_the_walltime_and_hands_on(tmp_path):
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "ck0.npz").write_text("weights")
    (tmp_path / "cv" / "latest").write_text("ck0.npz\n")
    result, record, seconds = run_link(tmp_path, "checkpoint", 2, 3)
    assert result.returncode == 143, result.stdout + result.stderr
    assert seconds < 30
    assert "train arguments: --resume latest" in result.stdout
    assert f"link 2 of 3 (job 13) on {os.uname().nodename} at " in record
    assert f"resuming from {tmp_path}/cv/ck0.npz" in record
    assert ("stopped by the chain's SIGTERM before the walltime, after its checkpoint (exit 143); "
            "link 3 continues") in record
    assert "ended:" not in record and not (tmp_path / "cancelled").exists()
    assert "chain: link 2 of 3 (job 13) at " in result.stdout  # the record, in the job's output


NO_CHECKPOINT_BEFORE = "link 1 of 3 (job 12) at 2026-01-01: stopped by SIGTERM, without a new checkpoint (exit 143)\n"


def test_chain_link_without_a_checkpoint_lets_the_next_one_try_again(tmp_path):
    """Training stopped before it had started (a slow start): one more try."""
    result, record, _ = run_link(tmp_path, "no-checkpoint", 1, 3)
    assert result.returncode == 143, result.stdout + result.stderr
    assert ("stopped by the chain's SIGTERM before the walltime, without a new checkpoint (exit 143); "
            "link 2 tries again") in record
    assert "ended:" not in record and not (tmp_path / "cancelled").exists()


@pytest.mark.parametrize("mode, link, status, says, cancelled, earlier", [
    ("0", 1, 0, "training finished (exit 0)", "13 14", ""),
    ("3", 1, 3, "training failed (exit 3)", "13 14", ""),
    ("no-checkpoint", 2, 143, "without a new checkpoint (exit 143), as the link before: the job leaves no "
     "time to train", "14", NO_CHECKPOINT_BEFORE),
    ("checkpoint", 3, 143, "after its checkpoint (exit 143), the last link: training is not finished", None, ""),
])
def test_chain_link_ends_the_chain_and_cancels_the_later_links(tmp_path, mode, link, status, says, cancelled,
                                                              earlier):
    """Training done, failed, stopped twice in a row without progress, or stopped on the
    last link: the chain ends, the later links are cancelled, and a later link that runs
    all the same finds the end in the record and does nothing."""
    result, record, _ = run_link(tmp_path, mode, link, 3, earlier=earlier)
    assert result.returncode == status, result.stdout + result.stderr
    assert "train arguments:\n" in result.stdout  # no checkpoint yet: no --resume
    assert says in record
    assert f"ended: link {link} of 3 (job {11 + link}) exited {status}" in record
    if cancelled:
        assert (tmp_path / "cancelled").read_text() == cancelled + "\n"
        assert f"cancelled the later links: jobs {cancelled}" in record
        later, _, _ = run_link(tmp_path, "0", link + 1, 3)
        assert later.returncode == 0
        assert "nothing to do, the chain has ended" in later.stdout
        assert "train arguments" not in later.stdout
    else:
        assert not (tmp_path / "cancelled").exists()


def test_chain_link_that_cannot_cancel_says_so(tmp_path):
    result, record, _ = run_link(tmp_path, "3", 1, 3, cancel="/nonexistent/scancel")
    assert result.returncode == 3
    assert "could not cancel jobs 13 14" in record and "they will exit at once" in record


# --- against the scheduler ----------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The submit directory: a small corpus; job outputs land here."""
    root = tmp_path_factory.mktemp("submit")
    (root / "data").mkdir()
    words = "the quick brown fox jumps over a lazy dog while my kingdom waits for a horse"
    lines = [" ".join(words.split()[i % 7:]) + "." for i in range(400)]
    (root / "data" / "input.txt").write_text("\n".join(lines) + "\n")
    return root


def submit_for_real(cluster, workdir, *argv):
    result = submit(*argv, cwd=workdir, env=cluster.env)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"job (\S+)", result.stdout).group(1)
    output = Path(re.search(r"output: (.+)", result.stdout).group(1))
    return job_id, output


def train_args(checkpoint_dir, max_iters, *more):
    # one thread each: side-by-side jobs on a 2-core machine, no spinning OpenMP contention
    return ["--threads", "1", "--", "train", "--data_dir", "data",
            "--checkpoint_dir", checkpoint_dir, "--max_iters", str(max_iters), *TINY_MODEL, *more]


CHAIN_MODEL = ["--threads", "1", "--policy", "none"], [
    "--data_dir", "data", "--rnn_size", "64", "--num_layers", "2", "--batch_size", "10",
    "--seq_length", "50", "--max_epochs", "1000000", "--eval_val_every", "500"]
CHAIN_LINK_S = 20  # --walltime 1:00 --stop-before 40: Slurm's shortest walltime is a minute
HOSTILE_DIRECTORY = "x $(touch pwned1) `touch pwned2` q'\"; touch pwned3; #"


def chain_iterations(workdir, seconds):
    """How many iterations of the chain's model take `seconds` here and now, from the
    time/batch that training prints."""
    threads, model = CHAIN_MODEL
    result = subprocess.run([sys.executable, "-m", "phi_rnn", "train", *threads, *model,
                             "--checkpoint_dir", "cv-calibrate", "--max_iters", "120", "--print_every", "10"],
                            cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    per_iteration = sorted(float(t) for t in re.findall(r"time/batch = ([0-9.]+)s", result.stdout))
    return int(seconds / per_iteration[len(per_iteration) // 2])


def submit_chain(cluster, workdir, *argv):
    """Submits a chain; returns its job ids and its record."""
    result = submit(*argv, cwd=workdir, env=cluster.env)
    assert result.returncode == 0, result.stderr
    job_ids = re.search(r"jobs ([\d ]+), each after the previous", result.stdout).group(1).split()
    return job_ids, Path(re.search(r"record: (.+)", result.stdout).group(1))


@pytest.fixture(scope="module")
def jobs(slurm_cluster, workdir):  # noqa: F811
    """Submits the independent jobs at once so that they run side by side."""
    hostile = workdir / HOSTILE_DIRECTORY
    hostile.mkdir()
    submitted = {
        "train": submit_for_real(slurm_cluster, workdir, "--ppn", "2", "--walltime", "5:00",
                                 "--name", "phi-ok", *train_args("cv-ok", 30,
                                                                 "--eval_val_every", "10")),
        # Runs until the 1-minute walltime kills it; the checkpoint on SIGTERM is the point.
        "walltime": submit_for_real(slurm_cluster, workdir, "--ppn", "2", "--walltime",
                                    "00:01:00", "--name", "phi-wall",
                                    *train_args("cv-wall", 10**9, "--max_epochs", "1000000",
                                                "--eval_val_every", "1000000",
                                                "--print_every", "200")),
        "mpi": submit_for_real(slurm_cluster, workdir, "--ppn", "2", "--ranks-per-node", "2", "--walltime", "5:00",
                               "--name", "phi-mpi", *train_args("cv-mpi", 20, "--eval_val_every", "10")),
        "array": submit_for_real(slurm_cluster, workdir, "--ppn", "2", "--walltime", "5:00",
                                 "--array", "0-1", "--name", "phi-array", "--", "scale",
                                 "--out", "scale-out", "--threads", "1,2", "--configs",
                                 "tiny", "--strategies", "batch", "--quick"),
        "slurm-train": submit_for_real(slurm_cluster, workdir, "--scheduler", "slurm", "--ppn", "2",
                                       "--walltime", "5:00", "--name", "phi-slurm",
                                       *train_args("cv-slurm", 30, "--eval_val_every", "10")),
        "slurm-array": submit_for_real(slurm_cluster, workdir, "--scheduler", "slurm", "--ppn", "1",
                                       "--walltime", "5:00", "--array", "0-1", "--name", "phi-sarray",
                                       "--", "scale", "--out", "scale-slurm", "--threads", "1,2",
                                       "--configs", "tiny", "--strategies", "batch", "--quick"),
        "hostile": submit_for_real(slurm_cluster, hostile, "--scheduler", "slurm", "--ppn", "1",
                                   "--walltime", "5:00", "--name", "phi-hostile",
                                   *HOSTILE_OPTIONS["slurm"][:5],
                                   "--", "train", "--savefile", HOSTILE_DIRECTORY, "--help"),
        # A PBS chain (Torque through Slurm's qsub): training ends in link 1, link 2 is cancelled.
        "pbs-chain": submit_chain(slurm_cluster, workdir, "--ppn", "1", "--walltime", "10:00", "--chain", "2",
                                  "--name", "phi-pchain", *train_args("cv-pchain", 20)),
        # Link 1 diverges (exit 3): the chain ends there.
        "failing-chain": submit_chain(slurm_cluster, workdir, "--scheduler", "slurm", "--ppn", "1",
                                      "--walltime", "10:00", "--chain", "3",
                                      "--name", "phi-fail", *train_args("cv-fail", 1000, "--learning_rate", "1e6")),
    }
    return submitted


@pytest.fixture(scope="module")
def long_jobs(slurm_cluster, workdir):  # noqa: F811
    """The jobs that need a minute or more of training, submitted when the tests of the
    others are done: on a small machine, jobs that start at once start slowly."""
    submitted = {
        # 2 ranks started by srun, stopped by the chain's SIGTERM, which Slurm passes on.
        "slurm-mpi": submit_chain(slurm_cluster, workdir, "--scheduler", "slurm", "--ppn", "2",
                                  "--ranks-per-node", "2", "--walltime", "1:00", "--stop-before", "15",
                                  "--chain", "1", "--name", "phi-srun",
                                  *train_args("cv-srun", 10**9, "--max_epochs", "1000000",
                                              "--eval_val_every", "1000000", "--print_every", "1000")),
    }
    # A chain of 1-minute jobs, each stopped 40 s before its walltime, training for about
    # 3.5 links' time (each link also spends seconds starting up): at least 3 links. The
    # reference trains as long in one go, meanwhile. Calibrated once the 2-rank job is over:
    # timed beside it, training ran at half its speed and the chain finished in 2 links; a
    # chain slower than its calibration only takes more links (up to --chain 20).
    wait_until_done(slurm_cluster, "phi-srun", timeout=300)
    iterations = chain_iterations(workdir, 3.5 * CHAIN_LINK_S)
    threads, model = CHAIN_MODEL
    submitted["chain"] = submit_chain(
        slurm_cluster, workdir, "--scheduler", "slurm", "--ppn", "1", *threads, "--walltime", "1:00",
        "--stop-before", str(60 - CHAIN_LINK_S), "--chain", "20", "--name", "phi-chain", "--", "train", *model,
        "--checkpoint_dir", "cv-chain", "--max_iters", str(iterations), "--print_every", "100")
    with open(workdir / "reference.log", "w") as log:
        submitted["reference"] = subprocess.Popen(
            [sys.executable, "-m", "phi_rnn", "train", *threads, *model, "--checkpoint_dir", "cv-reference",
             "--max_iters", str(iterations), "--print_every", "100"],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    yield submitted
    if submitted["reference"].poll() is None:
        submitted["reference"].kill()
        submitted["reference"].wait()


def job_states(cluster, name):
    """PBS states (Q, R, C...) of the jobs and array tasks named `name`, from qstat."""
    listing = subprocess.run(["qstat"], env=cluster.env, capture_output=True, text=True,
                             check=True).stdout
    rows = [line.split() for line in listing.splitlines()[2:]]
    return [row[4] for row in rows if len(row) >= 5 and row[1] == name]


def still_completing(cluster, name):
    """Slurm's qstat says C as soon as a job ends, while its processes may still be handling
    SIGTERM (state COMPLETING); squeue lists such a job until its processes are gone."""
    listing = subprocess.run(["squeue", "--noheader", "--name", name, "--format", "%T"],
                             env=cluster.env, capture_output=True, text=True, check=True).stdout
    return bool(listing.split())


def wait_until_done(cluster, name, timeout=JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(cluster, name)
        if states and all(state == "C" for state in states) and not still_completing(cluster, name):
            return
        time.sleep(2)
    pytest.fail(f"job {name} not done after {timeout} s: states {job_states(cluster, name)}")


def checkpoints(directory):
    return sorted(Path(directory).glob("lm_lstm_epoch*.npz"))


def checkpoint_iteration(path):
    meta = json.loads(str(np.load(path)["meta"]))
    return meta["iteration"]


def test_training_job_leaves_checkpoint_and_log(slurm_cluster, workdir, jobs):  # noqa: F811
    job_id, output = jobs["train"]
    assert re.fullmatch(r"\d+", job_id)  # Slurm ids have no .server suffix
    assert output == workdir / f"phi-ok.o{job_id}"
    wait_until_done(slurm_cluster, "phi-ok")
    log = output.read_text()
    assert f"phi_rnn job {job_id} on " in log and "cpu: " in log
    assert "Traceback" not in log, log
    assert checkpoints(workdir / "cv-ok"), log
    assert (workdir / "cv-ok" / "latest").exists()


def test_mpi_training_job_leaves_checkpoint(slurm_cluster, workdir, jobs):  # noqa: F811
    """2 ranks through mpiexec in the job: rank 0 prints and writes the checkpoints."""
    _, output = jobs["mpi"]
    wait_until_done(slurm_cluster, "phi-mpi")
    log = output.read_text()
    assert "Traceback" not in log, log
    assert "MPI: MPICH" in log and "rank 1: " in log, log
    assert [line.startswith("20/") for line in log.splitlines()].count(True) == 1, log
    assert [checkpoint_iteration(path) for path in checkpoints(workdir / "cv-mpi")] == [10, 20], log


def test_walltime_kill_checkpoints_and_resubmission_resumes(slurm_cluster, workdir, jobs):  # noqa: F811
    _, output = jobs["walltime"]
    wait_until_done(slurm_cluster, "phi-wall", timeout=JOB_TIMEOUT_S)
    log = output.read_text()
    assert "Traceback" not in log, log
    saved = checkpoints(workdir / "cv-wall")
    assert saved, f"no checkpoint after the walltime kill:\n{log}"
    killed_at = max(checkpoint_iteration(path) for path in saved)
    assert killed_at > 0

    _, resumed_output = submit_for_real(
        slurm_cluster, workdir, "--ppn", "2", "--walltime", "5:00", "--name", "phi-resume",
        "--resume", *train_args("cv-wall", killed_at + 10, "--print_every", "1"))
    wait_until_done(slurm_cluster, "phi-resume")
    resumed_log = resumed_output.read_text()
    assert "Traceback" not in resumed_log, resumed_log
    assert re.search(rf"resum\w* .*iteration {killed_at}\b", resumed_log), resumed_log


def test_scaling_array_runs_and_collects(slurm_cluster, workdir, jobs):  # noqa: F811
    job_id, output = jobs["array"]
    assert "one per array index" in str(output)
    wait_until_done(slurm_cluster, "phi-array")
    for index in (0, 1):
        log = (workdir / f"phi-array.o{job_id}.{index}").read_text()
        assert f"array index {index} on " in log
    collect = subprocess.run([sys.executable, "-m", "bench.scale", "--collect",
                              str(workdir / "scale-out")],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, timeout=120)
    assert collect.returncode == 0, collect.stderr
    assert "collected 2 finished" in collect.stdout, collect.stdout
    assert (workdir / "scale-out" / "results.csv").exists()


@pytest.mark.parametrize("scheduler", ["torque", "slurm"])
def test_unknown_queue_shows_the_scheduler_message(slurm_cluster, workdir, scheduler):  # noqa: F811
    result = submit("--scheduler", scheduler, "--ppn", "2", "--queue", "nosuchqueue", "--", "train",
                    cwd=workdir, env=slurm_cluster.env)
    assert result.returncode == 2
    assert ("sbatch" if scheduler == "slurm" else "qsub") + " rejected the job" in result.stderr
    assert "invalid partition" in result.stderr.lower()
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_slurm_training_job_leaves_checkpoint_and_log(slurm_cluster, workdir, jobs):  # noqa: F811
    job_id, output = jobs["slurm-train"]
    assert output == workdir / f"phi-slurm.o{job_id}"
    wait_until_done(slurm_cluster, "phi-slurm")
    log = output.read_text()
    assert f"phi_rnn job {job_id} on " in log and "cpu: " in log
    assert "Traceback" not in log, log
    assert [checkpoint_iteration(path) for path in checkpoints(workdir / "cv-slurm")] == [10, 20, 30], log


def test_slurm_scaling_array_runs_and_collects(slurm_cluster, workdir, jobs):  # noqa: F811
    job_id, output = jobs["slurm-array"]
    assert str(output) == f"{workdir}/phi-sarray.o{job_id}.<index> (one per array index)"
    wait_until_done(slurm_cluster, "phi-sarray")
    for index in (0, 1):
        log = (workdir / f"phi-sarray.o{job_id}.{index}").read_text()
        assert f"array index {index} on " in log and "Traceback" not in log, log
    collect = subprocess.run([sys.executable, "-m", "bench.scale", "--collect", str(workdir / "scale-slurm")],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, timeout=120)
    assert collect.returncode == 0, collect.stderr
    assert "collected 2 finished" in collect.stdout, collect.stdout


def test_slurm_job_is_inert_to_hostile_values(slurm_cluster, workdir, jobs):  # noqa: F811
    """Submitted for real from a directory named with shell syntax, with such values in
    the options and the arguments: the job runs there and nothing of them is executed."""
    _, output = jobs["hostile"]
    wait_until_done(slurm_cluster, "phi-hostile")
    log = output.read_text()
    assert f"dir: {workdir / HOSTILE_DIRECTORY}\n" in log, log
    assert "usage: phi_rnn train" in log, log
    assert list(workdir.rglob("pwned*")) == []


def chain_outputs(workdir, name, job_ids):
    """The outputs of the chain's jobs that ran, in link order."""
    return [(workdir / f"{name}.o{job_id}").read_text() for job_id in job_ids
            if (workdir / f"{name}.o{job_id}").exists()]


def slurm_states(cluster, job_ids):
    listing = subprocess.run(["squeue", "--noheader", "--states", "all", "--jobs", ",".join(job_ids),
                              "--format", "%i %T"], env=cluster.env, capture_output=True, text=True,
                             check=True).stdout
    return dict(line.split() for line in listing.splitlines())


def test_chained_run_ends_with_the_weights_of_one_uninterrupted_run(
        slurm_cluster, workdir, long_jobs):  # noqa: F811
    """Jobs of a minute, each stopped 20 s after its start: the chain resumes link after link
    until training ends, cancels the links it did not need, and its final checkpoint holds
    the same bits as one run of the same iterations."""
    job_ids, record = long_jobs["chain"]
    wait_until_done(slurm_cluster, "phi-chain", timeout=600)
    outputs = chain_outputs(workdir, "phi-chain", job_ids)
    text = record.read_text()
    assert "training finished (exit 0)" in text, text + "\n".join(outputs)
    links = len(outputs)
    # a link may also find the machine so busy that train had not started: the next tries again
    progressed = text.count("after its checkpoint (exit 143); link")
    assert progressed + text.count("without a new checkpoint (exit 143); link") == links - 1, text
    assert progressed >= 2, text
    for link, output in enumerate(outputs, 1):
        assert f"link {link} of a chain of 20 on " in output and "Traceback" not in output, output
        if link > 1:
            assert re.search(rf"chain: link {link} of 20 \(job {job_ids[link - 1]}\) on .*: resuming from "
                             rf"{workdir}/cv-chain/lm_lstm_epoch[\d.]+_interrupted\.npz", output), output
    states = slurm_states(slurm_cluster, job_ids)
    assert [states[job_id] for job_id in job_ids[links:]] == ["CANCELLED"] * (20 - links), states

    reference = long_jobs["reference"]
    assert reference.wait(timeout=600) == 0, (workdir / "reference.log").read_text()
    chained = np.load(workdir / "cv-chain" / (workdir / "cv-chain" / "latest").read_text().strip())
    single = np.load(workdir / "cv-reference" / (workdir / "cv-reference" / "latest").read_text().strip())
    assert sorted(chained.files) == sorted(single.files)
    for name in chained.files:
        if name != "meta":
            assert np.array_equal(chained[name], single[name]), name
    assert json.loads(str(chained["meta"]))["iteration"] == json.loads(str(single["meta"]))["iteration"]


def test_chain_ends_on_a_training_error(slurm_cluster, workdir, jobs):  # noqa: F811
    job_ids, record = jobs["failing-chain"]
    wait_until_done(slurm_cluster, "phi-fail")
    text = record.read_text()
    assert "link 1 of 3" in text and "training failed (exit 3)" in text, text
    assert f"ended: link 1 of 3 (job {job_ids[0]}) exited 3" in text
    assert f"cancelled the later links: jobs {job_ids[1]} {job_ids[2]}" in text, text
    output = (workdir / f"phi-fail.o{job_ids[0]}").read_text()
    assert "loss is exploding" in output and "chain: ended: link 1" in output, output
    assert slurm_states(slurm_cluster, job_ids) == {
        job_ids[0]: "FAILED", job_ids[1]: "CANCELLED", job_ids[2]: "CANCELLED"}


def test_pbs_chain_ends_when_training_does(slurm_cluster, workdir, jobs):  # noqa: F811
    """qsub -W depend=afterany:JOB holds link 2 back; link 1 finishes training and qdel
    cancels link 2 before it starts."""
    job_ids, record = jobs["pbs-chain"]
    wait_until_done(slurm_cluster, "phi-pchain")
    text = record.read_text()
    assert "link 1 of 2" in text and "training finished (exit 0)" in text, text
    assert f"cancelled the later links: jobs {job_ids[1]}" in text, text
    assert "link 1 of a chain of 2 on " in (workdir / f"phi-pchain.o{job_ids[0]}").read_text()
    assert slurm_states(slurm_cluster, job_ids) == {job_ids[0]: "COMPLETED", job_ids[1]: "CANCELLED"}
    assert not (workdir / f"phi-pchain.o{job_ids[1]}").exists()


def test_slurm_mpi_ranks_started_by_srun_checkpoint_on_the_chains_sigterm(
        slurm_cluster, workdir, long_jobs):  # noqa: F811
    """2 ranks through srun --mpi=pmi2 and the mpich wheel, in a chain of one job that
    cannot finish: its SIGTERM reaches both ranks through Slurm (srun itself would end the
    step), rank 0 writes the checkpoint and both exit 143."""
    (job_id,), record = long_jobs["slurm-mpi"]
    wait_until_done(slurm_cluster, "phi-srun")
    text = record.read_text()
    log = (workdir / f"phi-srun.o{job_id}").read_text()
    assert "run: python -m phi_rnn.chain " in log and " -- srun --mpi=pmi2 " in log, log
    assert "MPI: MPICH" in log and "rank 1: " in log and "Traceback" not in log, log
    assert re.search(r"SIGTERM received: saved checkpoint cv-srun/lm_lstm_epoch[\d.]+_interrupted\.npz", log), log
    assert "tasks 0-1: Exited with exit code 143" in log, log
    assert ("stopped by the chain's SIGTERM before the walltime, after its checkpoint (exit 143), "
            "the last link: training is not finished") in text, text
