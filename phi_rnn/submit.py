"""`python -m phi_rnn submit`: render a Slurm or PBS job script for a phi_rnn run and submit it.

Usage (options before `--`, the phi_rnn command to run in the job after it):

    python -m phi_rnn submit --scheduler slurm --ppn 64 --walltime 2:00:00 -- train --data_dir data/tinyshakespeare
    python -m phi_rnn submit --ppn 64 --walltime 2:00:00 -- train ...             # Torque (the default)
    python -m phi_rnn submit --scheduler pbspro --ncpus 68 --walltime 30:00 --resume -- train ...
    python -m phi_rnn submit --scheduler slurm --ppn 64 --walltime 24:00:00 --chain 20 -- train ...
    python -m phi_rnn submit --ppn 64 --array 0-7 -- scale --out results/scale64
    python -m phi_rnn submit --nodes 4 --ppn 64 --ranks-per-node 4 --walltime 4:00:00 -- train ...
    python -m phi_rnn submit --dry-run ...          # print the script and the submit command

The job script carries the scheduler's directives: `#SBATCH` for Slurm (--job-name,
--partition, --nodes, --ntasks-per-node, --cpus-per-task, --time, --account, --mail-user,
--mail-type, --output, --error, --array) or `#PBS` (name, queue, nodes=X:ppn=Y for Torque or
select=X:ncpus=Y:mpiprocs=K:ompthreads=T for PBS Pro, walltime, account, mail, output paths,
array range). It changes to the submit directory, activates the environment (by default
the one running `submit`: its venv, its conda environment, or its interpreter's directory
put first on PATH; --venv PATH or --conda-env NAME otherwise), logs the node (host, CPU
model, job id, array index, date, directory) and then `exec`s the phi_rnn command, so that
the scheduler's signals reach Python itself rather than a waiting shell. Every value from
the command line or the submit directory reaches the script as one single-quoted shell
word (or a checked directive: one word without spaces, quotes, backslashes or `#`):
nothing in it is ever expanded or run.

- `train`: `python -m phi_rnn train --threads T [--policy P] ARGS`; T defaults to the
  cores requested (--ppn / --ncpus) over the ranks per node.  With --nodes N > 1 or
  --ranks-per-node K > 1 it runs as N x K MPI ranks (data-parallel, phi_rnn.distributed),
  started by `mpiexec -n NK -ppn K -genv OMP_NUM_THREADS T ...` (--mpi hydra: MPICH,
  Intel MPI), `mpiexec -n NK --map-by ppr:K:node:pe=T -x OMP_NUM_THREADS=T ...` (--mpi
  openmpi), both reading the job's nodes from the scheduler, or on Slurm `srun
  --mpi=pmi2 ...` (--mpi srun-pmi2, Slurm's default here: MPICH, the mpich wheel) or
  `srun --mpi=pmix` (--mpi srun-pmix: Open MPI, most site MPIs built for Slurm). The
  launcher forwards a SIGTERM to the ranks.
- `scale` with --array: `python bench/scale --point "$IDX" ARGS` (ARGS must hold
  --out DIR; merge the points afterwards with `python -m bench.scale --collect DIR`);
  without --array the whole study runs in one job.

Walltime: at the limit the scheduler sends SIGTERM (then SIGKILL after a grace period:
Slurm KillWait, Torque and PBS Pro kill_delay). Training answers SIGTERM by writing a
checkpoint and exiting 143.  `--resume` adds `--resume latest` to the train command, which
continues from the checkpoint directory's `latest` pointer (checked before submitting: a
job with nothing to resume would fail).

A run longer than any walltime: `--chain N` submits N jobs at once, each starting when the
previous one has ended (Slurm `--dependency=afterany:JOB`, PBS `-W depend=afterany:JOB`),
each running phi_rnn.chain in place of train: it resumes from `latest` when there is one,
stops training with SIGTERM --stop-before seconds (default 300) before the walltime, timed
from the job's start, so that the checkpoint is written before the kill rather than during
its grace period (Slurm's `--signal` is checked only every 30 s and may come a minute early;
PBS has none), and writes what happened to the chain's record,
`<checkpoint_dir>/chain-<date>-<time>.log`. Training that stops there
(exit 143, a new checkpoint) is continued by the next job; training that finishes (exit 0)
or fails (any other exit) ends the chain, and the remaining jobs are cancelled (or exit at
once, finding the end in the record). Resume is exact, so the chain's final checkpoint is
the one a single job of unlimited walltime would have written.

Output goes to `<name>.o<job number>` in the submit directory (arrays: one per index),
stdout and stderr joined, unless --output / --error say otherwise; their directories are
created before submitting.

Real PBS and Slurm's PBS wrappers (qsub from slurm-wlm-torque) differ; handled here:
- the wrappers let sbatch read #PBS lines but always put their own -o/-e on the sbatch
  command line, so #PBS -o/-e/-j in the script are overridden: the output options are
  passed on the qsub command line too (real PBS accepts both, the command line wins);
- without -o the wrappers name the output after the script file, so the script is
  written to a temporary file named after the job;
- job ids come back as `123` (Slurm), `123.server` or `123[].server` (PBS arrays): all
  parse, and the output path is named from the number;
- the array index variable is PBS_ARRAYID (Torque), PBS_ARRAY_INDEX (PBS Pro and the
  Slurm spank_pbs plugin) or SLURM_ARRAY_TASK_ID; the script takes the first one set;
- PBS_O_WORKDIR may be missing (e.g. Slurm without spank_pbs): the script falls back to
  the directory submit ran in;
- qsub failures are reported on stderr by PBS but on stdout by the Slurm wrapper: the
  scheduler's own error lines are shown either way;
- walltime granularity is a second in PBS, a minute in Slurm (rounded up);
- PBS gives each array index its own output file even with -o; Slurm writes them all
  into an -o file, so leave --output out for arrays there (the default is per index).
"""

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from phi_rnn.affinity import POLICIES
from phi_rnn.errors import UsageError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCALE_SCRIPT = PROJECT_ROOT / "bench" / "scale"  # the package, run by path from the job's directory
SCHEDULERS = ("torque", "pbspro", "slurm")
MAX_NAME_LENGTH = {"torque": 15, "pbspro": 236, "slurm": 200}
ARRAY_PATTERN = {
    "torque": re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*(%\d+)?"),
    "pbspro": re.compile(r"\d+-\d+(:\d+)?(%\d+)?"),
    "slurm": re.compile(r"\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?"),
}
ARRAY_INDEX = {"slurm": "$SLURM_ARRAY_TASK_ID",
               "pbs": "${PBS_ARRAYID:-${PBS_ARRAY_INDEX:-$SLURM_ARRAY_TASK_ID}}"}
JOB_ID_PATTERN = re.compile(r"(\d+)(\[\d*\])?(\.\S+)?")
MPI_LAUNCHERS = ("hydra", "openmpi", "srun-pmi2", "srun-pmix")
SLURM_MAIL_TYPES = {"a": "FAIL", "b": "BEGIN", "e": "END", "n": "NONE"}
DEFAULT_STOP_BEFORE_S = 300


def add_submit_arguments(parser):
    parser.add_argument("--scheduler", "--flavor", dest="scheduler", choices=SCHEDULERS,
                        default="torque", help="slurm, or the PBS dialect: torque (default) or pbspro")
    parser.add_argument("--queue", "-q", "--partition", "-p", dest="queue", default="manycore",
                        help="queue / Slurm partition (default: manycore)")
    parser.add_argument("--nodes", "--select", dest="nodes", type=int, default=1,
                        help="nodes (Slurm --nodes, Torque nodes=, PBS Pro select=); "
                             "more than one: train over MPI")
    parser.add_argument("--ranks-per-node", "--ranks_per_node", dest="ranks_per_node", type=int, default=1,
                        help="MPI ranks of train per node, each on its own cores (Slurm "
                             "--ntasks-per-node, PBS Pro mpiprocs=; default 1; one per socket or "
                             "NUMA domain is the usual choice)")
    parser.add_argument("--mpi", choices=MPI_LAUNCHERS,
                        help="how MPI ranks start: mpiexec of hydra (MPICH, Intel MPI; the PBS "
                             "default) or openmpi, or on Slurm srun with PMI-2 (MPICH, the mpich "
                             "wheel; the Slurm default) or PMIx")
    parser.add_argument("--ppn", "--ncpus", dest="ppn", type=int,
                        help="cores per node (Torque ppn=, PBS Pro ncpus=, Slurm ranks per node x "
                             "--cpus-per-task); required")
    parser.add_argument("--walltime", "--time", dest="walltime",
                        help="limit as H:MM:SS, MM:SS or seconds")
    parser.add_argument("--name", "-N", help="job name (default: phi-train / phi-scale)")
    parser.add_argument("--account", "-A", help="account to charge")
    parser.add_argument("--mail", "-M", help="address for job mail")
    parser.add_argument("--mail-events", "-m", help="mail on a(bort), b(egin), e(nd) "
                        "or n(one) (default with --mail: ae)")
    parser.add_argument("--output", "-o", help="stdout file (default: <name>.o<job number>)")
    parser.add_argument("--error", "-e", help="stderr file (default: joined with stdout)")
    parser.add_argument("--threads", type=int,
                        help="train threads per rank (default: --ppn / --ranks-per-node)")
    parser.add_argument("--policy", choices=POLICIES, help="train affinity policy")
    parser.add_argument("--venv", type=Path, help="virtual environment to activate "
                        "(default: the environment running submit)")
    parser.add_argument("--conda-env", help="conda environment to activate instead")
    parser.add_argument("--directive", "--pbs-line", "--sbatch-line", dest="directives",
                        action="append", default=[], metavar="DIRECTIVE",
                        help="extra '#SBATCH' / '#PBS' directive line, e.g. --directive=--exclusive "
                             "or --directive '-l mem=8gb' (repeatable)")
    parser.add_argument("--array", metavar="RANGE", help="job array of scale points, "
                        "e.g. 0-7 (Slurm --array, Torque -t, PBS Pro -J)")
    parser.add_argument("--resume", action="store_true",
                        help="add '--resume latest' to the train command")
    parser.add_argument("--chain", type=int, metavar="N",
                        help="train past the walltime: N jobs, each after the previous, each "
                             "resuming from 'latest', until training ends (needs --walltime)")
    parser.add_argument("--stop-before", type=int, metavar="SECONDS",
                        help="with --chain: stop training (SIGTERM: checkpoint, exit 143) this "
                             f"long before the walltime (default {DEFAULT_STOP_BEFORE_S})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the script and the submit command; submit nothing")
    parser.add_argument("--qsub", "--sbatch", dest="submitter", metavar="PROGRAM",
                        help="submit program (default: sbatch or qsub on PATH)")
    # not "command": the CLI's subcommand already has that name
    parser.add_argument("job_command", nargs="*", metavar="-- train|scale ARGS",
                        help="the phi_rnn command to run in the job")


@dataclass
class Chain:
    """--chain: the jobs that carry one training run past the walltime."""
    links: int
    stop_after: int  # seconds from a job's start to its SIGTERM
    record: Path
    train_command: list


@dataclass
class Job:
    scheduler: str
    name: str
    queue: str
    nodes: int
    ppn: int
    ranks_per_node: int
    threads: int | None
    walltime: str | None
    account: str | None
    mail: str | None
    mail_events: str | None
    output: Path | None
    error: Path | None
    extra_lines: list
    array: str | None
    activation: list
    run_line: str
    chain: Chain | None
    submit_dir: Path

    @property
    def slurm(self):
        return self.scheduler == "slurm"

    @property
    def submitter(self):
        return "sbatch" if self.slurm else "qsub"


def submit_command(args):
    job = job_from_arguments(args)
    if args.dry_run:
        return print_dry_run(job)
    program = find_program(args.submitter or job.submitter, job)
    for path in (job.output, job.error):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if job.chain:
        return submit_chain(program, job)
    job_id = submit_script(program, job, render_script(job))
    print(f"submitted {job.name} to {queue_word(job)} {job.queue}: job {job_id}")
    print(f"output: {output_location(job, job_id)}")
    return 0


def print_dry_run(job):
    script = render_script(job, link=1)
    command = shlex.join([job.submitter, *submit_options(job), job.name])
    print(script + f"# submit: {command}  (with this script saved as {job.name})")
    if job.chain:
        later = shlex.join([job.submitter, *submit_options(job), *dependency_options(job, "JOB"),
                            job.name])
        print(f"# links 2-{job.chain.links}: {later}  (JOB: the previous link's job id; "
              f"the script with its own --link)")
        print(f"# record: {job.chain.record}")
    return 0


def queue_word(job):
    return "partition" if job.slurm else "queue"


def job_from_arguments(args):
    """Validates everything that can be checked before submitting."""
    if not args.job_command or args.job_command[0] not in ("train", "scale"):
        raise UsageError("give the phi_rnn command to run after '--': "
                         "'-- train ARGS' or '-- scale ARGS'")
    program, program_args = args.job_command[0], args.job_command[1:]
    if args.ppn is None or args.ppn < 1:
        raise UsageError("say how many cores the job needs: --ppn N (Torque) or --ncpus N")
    if args.nodes < 1 or args.ranks_per_node < 1:
        raise UsageError(f"--nodes {args.nodes} --ranks-per-node {args.ranks_per_node}: both must be positive")
    ranks = args.nodes * args.ranks_per_node
    if program != "train" and ranks > 1:
        raise UsageError(f"--nodes {args.nodes} --ranks-per-node {args.ranks_per_node}: MPI ranks run train; "
                         "spread scale points over nodes with --array")
    if args.scheduler == "slurm" and args.ppn % args.ranks_per_node:
        raise UsageError(f"--ppn {args.ppn} is no multiple of --ranks-per-node {args.ranks_per_node}: "
                         "Slurm gives each rank the same number of cores (--cpus-per-task)")
    submit_dir = Path.cwd()
    walltime = unless_none(args.walltime, parse_walltime)
    chain = None
    if program == "train":
        threads = args.threads if args.threads is not None else args.ppn // args.ranks_per_node
        command = train_command(args, threads, program_args)
        if args.resume:
            check_resumable(program_args, submit_dir)
        if args.chain is not None:
            chain = chain_plan(args, walltime, program_args, command, submit_dir)
        elif args.stop_before is not None:
            raise UsageError("--stop-before applies to the jobs of a --chain")
        run_line = "exec " + shlex.join(command)
    else:
        threads = None
        run_line = scale_run_line(args, program_args)
    return Job(
        scheduler=args.scheduler,
        name=checked_name(f"phi-{program}" if args.name is None else args.name, args.scheduler),
        queue=checked_word(args.queue, "--queue"),
        nodes=args.nodes,
        ppn=args.ppn,
        ranks_per_node=args.ranks_per_node,
        threads=threads,
        walltime=unless_none(walltime, format_walltime),
        account=unless_none(args.account, checked_word, "--account"),
        mail=unless_none(args.mail, checked_word, "--mail"),
        mail_events=checked_mail_events(args.mail_events, args.mail),
        output=unless_none(args.output, absolute, submit_dir, "--output"),
        error=unless_none(args.error, absolute, submit_dir, "--error"),
        extra_lines=[checked_directive(line, args.scheduler) for line in args.directives],
        array=unless_none(args.array, checked_array, args.scheduler),
        activation=activation_lines(args.venv, args.conda_env),
        run_line=run_line,
        chain=chain,
        submit_dir=submit_dir,
    )


def unless_none(value, check, *more):
    return None if value is None else check(value, *more)


def train_command(args, threads, train_args):
    """The job's train command as words, its MPI launcher in front when it has ranks."""
    if args.array is not None:
        raise UsageError("--array runs scale points; a train job is a single job")
    for flag in ("--threads", "--policy"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in train_args):
            raise UsageError(f"give {flag} to submit, before '--' (it passes it to train)")
    if threads < 1:
        raise UsageError(f"--threads {threads}: need at least one thread per rank "
                         f"(--ppn {args.ppn} over --ranks-per-node {args.ranks_per_node})")
    command = ["python", "-m", "phi_rnn", "train", "--threads", str(threads)]
    if args.policy:
        command += ["--policy", args.policy]
    command += train_args
    if args.resume:
        command += ["--resume", "latest"]
    launcher = args.mpi or ("srun-pmi2" if args.scheduler == "slurm" else "hydra")
    if launcher.startswith("srun") and args.scheduler != "slurm":
        raise UsageError(f"--mpi {launcher} starts ranks with Slurm's srun: use it with --scheduler slurm")
    ranks = args.nodes * args.ranks_per_node
    if ranks > 1:
        if args.venv is None and args.conda_env is None and importlib.util.find_spec("mpi4py") is None:
            raise UsageError(f"{ranks} MPI ranks need mpi4py in the job's environment: "
                             f"pip install 'phi_rnn[mpi]' (mpi4py + mpich) or mpi4py built against the site's MPI")
        command = launcher_command(launcher, args.nodes, args.ranks_per_node, threads,
                                   args.ppn // args.ranks_per_node) + command
    return command


def launcher_command(launcher, nodes, per_node, threads, cores_per_rank):
    """The MPI launcher for nodes x per_node ranks, with the thread count exported to every
    rank (phi_rnn then places each rank's threads on its own cores, replacing any binding
    the launcher made). mpiexec reads the job's nodes from the scheduler itself."""
    ranks = nodes * per_node
    if launcher.startswith("srun"):
        # srun inside a batch job does not take --cpus-per-task from it on every Slurm version
        return ["srun", f"--mpi={launcher.removeprefix('srun-')}", f"--nodes={nodes}",
                f"--ntasks={ranks}", f"--ntasks-per-node={per_node}",
                f"--cpus-per-task={cores_per_rank}", f"--export=ALL,OMP_NUM_THREADS={threads}"]
    if launcher == "openmpi":
        return ["mpiexec", "-n", str(ranks), "--map-by", f"ppr:{per_node}:node:pe={threads}",
                "-x", f"OMP_NUM_THREADS={threads}"]
    # Hydra: MPICH's and Intel MPI's; I_MPI_PIN_DOMAIN=omp gives an Intel MPI rank OMP_NUM_THREADS cores
    return ["mpiexec", "-n", str(ranks), "-ppn", str(per_node), "-genv", "OMP_NUM_THREADS", str(threads),
            "-genv", "I_MPI_PIN_DOMAIN", "omp"]


def chain_plan(args, walltime, train_args, command, submit_dir):
    if args.chain < 1:
        raise UsageError(f"--chain {args.chain}: at least one job")
    if walltime is None:
        raise UsageError("--chain needs --walltime: each job stops training --stop-before "
                         "seconds before it")
    if args.resume or any(arg == "--resume" or arg.startswith("--resume=") for arg in train_args):
        raise UsageError("--chain resumes from 'latest' by itself: leave out --resume")
    stop_before = DEFAULT_STOP_BEFORE_S if args.stop_before is None else args.stop_before
    if not 0 < stop_before < walltime:
        raise UsageError(f"--stop-before {stop_before}: give a number of seconds above "
                         f"zero and below the walltime ({walltime} s)")
    checkpoint_dir = option_value(train_args, ("--checkpoint_dir", "--checkpoint-dir"), "cv")
    record = submit_dir / checkpoint_dir / f"chain-{time.strftime('%Y%m%d-%H%M%S')}.log"
    return Chain(links=args.chain, stop_after=walltime - stop_before,
                 record=record, train_command=command)


def check_resumable(train_args, submit_dir):
    """`--resume latest` fails in the job when there is nothing to resume: say so now."""
    checkpoint_dir = option_value(train_args, ("--checkpoint_dir", "--checkpoint-dir"), "cv")
    pointer = submit_dir / checkpoint_dir / "latest"
    if not pointer.is_file():
        raise UsageError(f"--resume: no checkpoint to resume ({pointer} is missing); "
                         "submit without --resume to start the run")


def option_value(arguments, names, default):
    """The value of the last `--name VALUE` / `--name=VALUE` among arguments."""
    value = default
    for position, argument in enumerate(arguments):
        for name in names:
            if argument == name and position + 1 < len(arguments):
                value = arguments[position + 1]
            elif argument.startswith(name + "="):
                value = argument[len(name) + 1:]
    return value


def scale_run_line(args, scale_args):
    if args.threads is not None or args.policy or args.resume or args.chain is not None:
        raise UsageError("--threads, --policy, --resume and --chain apply to train; "
                         "scale points choose their own threads")
    if args.array is None:
        return "exec " + shlex.join(["python", str(SCALE_SCRIPT), *scale_args])
    if option_value(scale_args, ("--out",), None) is None:
        raise UsageError("a scale array needs '--out DIR' after '-- scale': every point "
                         "writes its result there for 'python -m bench.scale --collect DIR'")
    return (f'exec python {shlex.quote(str(SCALE_SCRIPT))} --point "$IDX" '
            + shlex.join(scale_args))


def parse_walltime(text):
    """Seconds from H:MM:SS, MM:SS or plain seconds (PBS's [[H:]M:]S forms)."""
    fields = text.strip().split(":")
    if (len(fields) <= 3 and all(re.fullmatch(r"[0-9]+", field) for field in fields)
            and all(len(field) == 2 and int(field) < 60 for field in fields[1:])):
        seconds = 0
        for field in fields:
            seconds = seconds * 60 + int(field)
        if seconds > 0:
            return seconds
    raise UsageError(f"invalid --walltime {text!r}: use H:MM:SS, MM:SS or seconds, above zero")


def format_walltime(seconds):
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def checked_name(name, scheduler):
    limit = MAX_NAME_LENGTH[scheduler]
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.+-]*", name) or len(name) > limit:
        raise UsageError(f"invalid job name {name!r}: {scheduler} needs at most {limit} "
                         "characters, a letter first, then letters, digits, _ . + -")
    return name


def checked_word(value, option):
    """A directive's value: sbatch and qsub would split it at a space, end it at a `#`
    and take quotes and backslashes as their own syntax."""
    if not value or re.search(r"[\s#'\"\\]", value):
        raise UsageError(f"invalid {option} {value!r}: one word without spaces, quotes, "
                         "backslashes or '#'")
    return value


def checked_mail_events(events, mail):
    if events is None:
        return "ae" if mail else None
    if not re.fullmatch(r"[abe]+|n", events):
        raise UsageError(f"invalid --mail-events {events!r}: letters from 'abe', or 'n'")
    return events


def checked_directive(line, scheduler):
    prefix = "#SBATCH" if scheduler == "slurm" else "#PBS"
    directive = re.sub(rf"^\s*{prefix}\s*", "", line).strip()
    if not directive.startswith("-") or "\n" in directive:
        example = "'--mem=8G'" if scheduler == "slurm" else "'-l mem=8gb'"
        raise UsageError(f"invalid --directive {line!r}: one {prefix} directive such as {example}")
    return directive


def checked_array(array, scheduler):
    if not ARRAY_PATTERN[scheduler].fullmatch(array):
        example = "0-7 or 0-14:2" if scheduler == "pbspro" else "0-7, 0,2,4 or 0-7%2"
        raise UsageError(f"invalid --array {array!r} for {scheduler}: e.g. {example}")
    return array


def absolute(path, submit_dir, option):
    full = submit_dir / Path(path).expanduser()
    checked_word(str(full), option)
    return full


def activation_lines(venv, conda_env):
    if venv and conda_env:
        raise UsageError("give either --venv or --conda-env, not both")
    if conda_env:
        env = shlex.quote(checked_word(conda_env, "--conda-env"))
        return ['command -v conda >/dev/null || { echo "conda not found on $(hostname)" >&2; '
                'exit 1; }',
                'eval "$(conda shell.bash hook)"',
                f"conda activate {env}"]
    if venv is None:
        return current_environment_lines()
    venv = venv.expanduser().resolve()
    if not (venv / "bin" / "activate").is_file():
        raise UsageError(f"no virtual environment at {venv} (missing bin/activate): "
                         "give --venv PATH or --conda-env NAME")
    return [f"source {shlex.quote(str(venv / 'bin' / 'activate'))}"]


def current_environment_lines():
    """Activate the environment whose Python runs submit (sys.prefix): phi_rnn is installed
    there. A conda environment is activated by its path; a venv by its activate script;
    a plain interpreter by putting its directory first on PATH."""
    prefix = Path(sys.prefix)
    if (prefix / "conda-meta").is_dir():
        return ['command -v conda >/dev/null || { echo "conda not found on $(hostname)" >&2; '
                'exit 1; }',
                'eval "$(conda shell.bash hook)"',
                f"conda activate {shlex.quote(str(prefix))}"]
    if (prefix / "bin" / "activate").is_file():
        return [f"source {shlex.quote(str(prefix / 'bin' / 'activate'))}"]
    bindir = Path(sys.executable).parent
    if not (bindir / "python").exists():
        raise UsageError(f"{sys.executable} is neither in a venv nor in a conda environment and "
                         f"{bindir} has no `python`: give --venv PATH or --conda-env NAME")
    return [f'PATH={shlex.quote(str(bindir))}:"$PATH"']


def pbs_directives(job):
    lines = [f"-N {job.name}", f"-q {job.queue}"]
    if job.scheduler == "torque":
        lines.append(f"-l nodes={job.nodes}:ppn={job.ppn}")
    else:
        lines.append(f"-l select={job.nodes}:ncpus={job.ppn}:mpiprocs={job.ranks_per_node}"
                     + (f":ompthreads={job.threads}" if job.threads else ""))
    if job.walltime:
        lines.append(f"-l walltime={job.walltime}")
    if job.account:
        lines.append(f"-A {job.account}")
    if job.mail:
        lines.append(f"-M {job.mail}")
    if job.mail_events:
        lines.append(f"-m {job.mail_events}")
    return lines + repeated_on_command_line(job) + job.extra_lines


def slurm_directives(job):
    lines = [f"--job-name={job.name}", f"--partition={job.queue}", f"--nodes={job.nodes}",
             f"--ntasks-per-node={job.ranks_per_node}",
             f"--cpus-per-task={job.ppn // job.ranks_per_node}"]
    if job.walltime:
        lines.append(f"--time={job.walltime}")
    if job.account:
        lines.append(f"--account={job.account}")
    if job.mail:
        lines.append(f"--mail-user={job.mail}")
    if job.mail_events:
        lines.append("--mail-type=" + ",".join(SLURM_MAIL_TYPES[event] for event in job.mail_events))
    # relative to the job's working directory, the submit directory (%A.%a: array and index)
    lines.append(f"--output={job.output or job.name + ('.o%A.%a' if job.array else '.o%j')}")
    if job.error:
        lines.append(f"--error={job.error}")
    if job.array:
        lines.append(f"--array={job.array}")
    return lines + job.extra_lines


def repeated_on_command_line(job):
    """PBS directives that qsub also gets as options: Slurm's wrapper decides the output
    files from its command line alone (-o/-e/-j, and the array range for per-index names)."""
    options = []
    if job.output:
        options.append(f"-o {job.output}")
    if job.error:
        options.append(f"-e {job.error}")
    else:
        options.append("-j oe")
    if job.array:
        options.append(("-t " if job.scheduler == "torque" else "-J ") + job.array)
    return options


def submit_options(job):
    if job.slurm:
        return ["--parsable"]
    return [word for option in repeated_on_command_line(job) for word in option.split(" ", 1)]


def dependency_options(job, previous_job_id):
    if job.slurm:
        return [f"--dependency=afterany:{previous_job_id}"]
    return ["-W", f"depend=afterany:{previous_job_id}"]


def run_line(job, link):
    if job.chain is None:
        return job.run_line
    chain = job.chain
    return "exec " + shlex.join([
        "python", "-m", "phi_rnn.chain", "--link", str(link), "--links", str(chain.links),
        "--record", str(chain.record), "--stop-after", str(chain.stop_after),
        "--cancel", "scancel" if job.slurm else "qdel", "--", *chain.train_command])


def render_script(job, link=1):
    if job.slurm:
        directive_lines = [f"#SBATCH {line}" for line in slurm_directives(job)]
        workdir, job_id, index = "${SLURM_SUBMIT_DIR:-$SUBMIT_DIR}", "SLURM_JOB_ID", ARRAY_INDEX["slurm"]
    else:
        directive_lines = [f"#PBS {line}" for line in pbs_directives(job)]
        workdir, job_id, index = "${PBS_O_WORKDIR:-$SUBMIT_DIR}", "PBS_JOBID", ARRAY_INDEX["pbs"]
    index_setup = [f'IDX="{index}"'] if job.array else []
    index_log = ', array index $IDX' if job.array else ""
    chain_log = f", link {link} of a chain of {job.chain.links}" if job.chain else ""
    line = run_line(job, link)
    lines = [
        "#!/bin/bash",
        *directive_lines,
        "# Rendered by 'python -m phi_rnn submit'.",
        "set -e",
        # a value inside "${VAR:-...}" would still be expanded: the directory is its own word
        f"SUBMIT_DIR={shlex.quote(str(job.submit_dir))}",
        f'cd -- "{workdir}"',
        *job.activation,
        *index_setup,
        f'echo "phi_rnn job ${{{job_id}:-?}}{index_log}{chain_log} on $(hostname) at $(date \'+%F %T %Z\')"',
        'echo "cpu: $(grep -m1 \'model name\' /proc/cpuinfo | cut -d: -f2- | sed \'s/^ *//\')'
        ', $(nproc) usable of $(grep -c ^processor /proc/cpuinfo)"',
        'echo "dir: $PWD"',
        "echo " + shlex.quote("run: " + line.removeprefix("exec ")),
        line,
    ]
    return "\n".join(lines) + "\n"


def find_program(program, job):
    path = shutil.which(program)
    if path is None:
        where = "a Slurm" if job.slurm else "a PBS"
        option = "--sbatch" if job.slurm else "--qsub"
        raise UsageError(f"{job.submitter} not found ({program!r}): submit from {where} login "
                         f"node, point {option} at it, or use --dry-run to see the script")
    return path


def submit_script(program, job, script, after=None):
    """Submits the script (after job `after` has ended, when given); returns the job id."""
    dependency = dependency_options(job, after) if after else []
    # The scheduler copies the script at submission, so a temporary file will do; it is
    # named after the job because Slurm's qsub names default output files after the script.
    with tempfile.TemporaryDirectory(prefix="phi_rnn-submit-") as directory:
        script_path = Path(directory, job.name)
        script_path.write_text(script)
        result = subprocess.run([program, *submit_options(job), *dependency, str(script_path)],
                                capture_output=True, text=True, cwd=job.submit_dir)
    if result.returncode != 0:
        raise UsageError(f"{job.submitter} rejected the job: {scheduler_error(result)}")
    words = result.stdout.split()
    if not words:
        raise UsageError(f"{job.submitter} printed no job id: {scheduler_error(result)}")
    # sbatch --parsable: "ID" or "ID;CLUSTER"; qsub: the id, last
    return words[-1].split(";")[0]


def submit_chain(program, job):
    """Submits the chain's jobs, each after the previous one, and lists their ids in the
    record, where a link that ends the chain finds the ones to cancel."""
    chain = job.chain
    chain.record.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(chain.record, "x") as record:
            record.write(f"chain of at most {chain.links} jobs submitted from {job.submit_dir} "
                         f"at {time.strftime('%F %T %Z')}: {shlex.join(chain.train_command)}\n")
    except FileExistsError:
        raise UsageError(f"{chain.record} exists: a chain was submitted this second; "
                         "submit again") from None
    job_ids = []
    try:
        for link in range(1, chain.links + 1):
            after = job_ids[-1] if job_ids else None
            job_ids.append(submit_script(program, job, render_script(job, link), after))
    except UsageError:
        cancel_jobs(job, job_ids)
        raise
    with open(chain.record, "a") as record:
        record.write(f"jobs: {' '.join(job_ids)}\n")
    cancel = "scancel" if job.slurm else "qdel"
    print(f"submitted {job.name} as a chain of {chain.links} jobs to {queue_word(job)} "
          f"{job.queue}: jobs {' '.join(job_ids)}, each after the previous")
    print(f"output: {job.submit_dir / job.name}.o<job number> (one per job)")
    print(f"record: {chain.record}")
    print(f"stop the chain: {cancel} {' '.join(job_ids)}")
    return 0


def cancel_jobs(job, job_ids):
    """Cancels the links already submitted when a later one is rejected."""
    if job_ids:
        subprocess.run(["scancel" if job.slurm else "qdel", *job_ids], capture_output=True)


def scheduler_error(result):
    """The scheduler's own message, from stderr (PBS, sbatch) or stdout (Slurm's qsub)."""
    text = (result.stderr + "\n" + result.stdout).strip()
    errors = [line.strip(" '") for line in text.splitlines() if re.search(r"error:", line)]
    if errors:
        return "; ".join(errors)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}, no message"


def output_location(job, job_id):
    if job.output:
        return str(job.output)
    number = JOB_ID_PATTERN.fullmatch(job_id)
    number = number.group(1) if number else job_id
    path = job.submit_dir / f"{job.name}.o{number}"
    if not job.array:
        return str(path)
    separator = "-" if job.scheduler == "torque" and "." in job_id else "."
    return f"{path}{separator}<index> (one per array index)"
