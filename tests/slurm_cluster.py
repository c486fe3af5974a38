"""A private single-node Slurm scheduler with its PBS wrappers, for testing `phi_rnn submit`.

Slurm scripts go to it natively (sbatch, srun, scancel); PBS scripts through Slurm's PBS
wrappers (qsub, qstat, qdel from slurm-wlm-torque), since Debian has no PBS server.  `.ci/system-install.sh` installs the
packages; this module installs nothing.  It writes a private slurm.conf, munge key and
spool/state/log dirs under one temp dir, starts munged (as user munge), slurmctld and
slurmd in the foreground so that their pids are ours, waits until the node is idle, and
stops exactly those pids at the end.  Clients find it through SLURM_CONF.

The node presents 64 CPUs on any machine (SlurmdParameters=config_overrides) in the
default partition `manycore`; select/cons_tres + CR_CPU lets small jobs run side by side.
KillWait=10 and OverTimeLimit=0 make walltime kills quick: SIGTERM at the limit (Slurm's
granularity is minutes), SIGKILL 10 s later.

Use the session fixture `slurm_cluster` (import it into the test module).  When the
packages are missing or we are not root it skips the tests, loudly (a warning in the
summary too), or fails them when PHI_RNN_REQUIRE_SCHEDULER is set, as CI does.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pytest

NODE_NAME = "phinode"
PARTITION = "manycore"
NODE_CPUS = 64
KILL_WAIT_S = 10
REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "scancel", "sbatch",
                     "srun", "qsub", "qstat", "qdel")
PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib/aarch64-linux-gnu/slurm-wlm",
               "/usr/lib64/slurm", "/usr/lib/slurm")
STARTUP_TIMEOUT_S = 60
SKIP_BANNER = "SCHEDULER TESTS SKIPPED (they must run in CI): "
# Set in CI (.ci/run): a missing scheduler is then a failure, not a skip.
REQUIRE_VARIABLE = "PHI_RNN_REQUIRE_SCHEDULER"


def missing_prerequisite():
    """Why a private Slurm cannot start here, or None when it can."""
    if os.geteuid() != 0:
        return "not root: slurmd must run jobs as root here"
    missing = [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]
    if missing:
        return f"missing {' '.join(missing)}: run .ci/system-install.sh (as root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user: run .ci/system-install.sh (as root)"
    return None


def free_tcp_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_spank_pbs():
    for directory in PLUGIN_DIRS:
        path = Path(directory, "spank_pbs.so")
        if path.exists():
            return path
    return None


def slurm_conf_text(root, ctld_port, slurmd_port, munge_socket):
    host = socket.gethostname().split(".")[0]
    return f"""\
ClusterName=phitest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
EnforcePartLimits=ALL
KillWait={KILL_WAIT_S}
OverTimeLimit=0
MinJobAge=600
SlurmdParameters=config_overrides
NodeName={NODE_NAME} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """One private slurmctld + slurmd + munged; `env` points clients (qsub, sinfo) at it."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="phi-rnn-slurm-"))
        self.root.chmod(0o755)  # munged runs as user munge and must reach its dir
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons = []  # (name, Popen), stopped in reverse order

    def start(self):
        munge_socket = self.write_munge_files()
        self.write_slurm_files(munge_socket)
        self.spawn("munged", ["munged", "--foreground", f"--socket={munge_socket}",
                              f"--key-file={self.root}/munge/munge.key",
                              f"--pid-file={self.root}/munge/munged.pid",
                              f"--log-file={self.root}/munge/munged.log",
                              f"--seed-file={self.root}/munge/munged.seed"],
                   user="munge")
        self.wait_for(lambda: Path(munge_socket).exists(), "munged socket")
        self.spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self.spawn("slurmd", ["slurmd", "-D", "-N", NODE_NAME, "-f", str(self.conf)])
        self.wait_for(self.node_is_idle, f"node {NODE_NAME} idle in sinfo")

    def write_munge_files(self):
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)  # clients reach the socket inside
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        return str(munge_dir / "munge.socket")

    def write_slurm_files(self, munge_socket):
        for sub in ("etc", "state", "spool", "run", "log"):
            (self.root / sub).mkdir()
        self.conf.write_text(slurm_conf_text(self.root, free_tcp_port(), free_tcp_port(),
                                             munge_socket))
        spank_pbs = find_spank_pbs()  # sets PBS_JOBID, PBS_O_WORKDIR, PBS_ARRAY_INDEX...
        (self.root / "etc" / "plugstack.conf").write_text(
            f"optional {spank_pbs}\n" if spank_pbs else "")

    def spawn(self, name, argv, user=None):
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                   user=user, start_new_session=True)
        log.close()
        self.daemons.append((name, process))

    def wait_for(self, condition, what):
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, process in self.daemons:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {process.returncode} "
                                       f"while waiting for {what}\n{self.log_tails()}")
            if condition():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {STARTUP_TIMEOUT_S} s waiting for {what}\n"
                           f"{self.log_tails()}")

    def node_is_idle(self):
        result = subprocess.run(["sinfo", "-h", "-n", NODE_NAME, "-o", "%t"], env=self.env,
                                capture_output=True, text=True)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def log_tails(self, lines=15):
        tails = []
        for path in sorted((self.root / "log").iterdir()) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                tails.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(tails)

    def stop(self):
        if any(name == "slurmctld" for name, _ in self.daemons):
            self.cancel_all_jobs()
        for _, process in reversed(self.daemons):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.daemons.clear()
        shutil.rmtree(self.root, ignore_errors=True)


    def cancel_all_jobs(self):
        """Jobs run under slurmstepd, outside our process tree: end them through Slurm."""
        subprocess.run(["scancel", "--full", "--partition", PARTITION], env=self.env,
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + KILL_WAIT_S + 20
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T"], env=self.env,
                                   capture_output=True, text=True, timeout=30)
            if not {"RUNNING", "COMPLETING", "PENDING"} & set(queue.stdout.split()):
                return
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = missing_prerequisite()
    if reason and os.environ.get(REQUIRE_VARIABLE):
        pytest.fail(f"{REQUIRE_VARIABLE} is set but the scheduler cannot start: {reason}")
    if reason:
        warnings.warn(SKIP_BANNER + reason, stacklevel=2)  # shown even without -rs
        pytest.skip(SKIP_BANNER + reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
