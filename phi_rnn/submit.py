"""`python -m phi_rnn submit`: render a PBS job script for a phi_rnn run and qsub it.

Usage (options before `--`, the phi_rnn command to run in the job after it):

    python -m phi_rnn submit --ppn 64 --walltime 2:00:00 -- train --data_dir data/tinyshakespeare
    python -m phi_rnn submit --flavor pbspro --ncpus 68 --walltime 30:00 --resume -- train ...
    python -m phi_rnn submit --ppn 64 --array 0-7 -- scale --out results/scale64
    python -m phi_rnn submit --nodes 4 --ppn 64 --ranks-per-node 4 --walltime 4:00:00 -- train ...
    python -m phi_rnn submit --dry-run ...          # print the script and the qsub command

The job script carries #PBS directives (name, queue, nodes=X:ppn=Y for Torque or
select=X:ncpus=Y:mpiprocs=K:ompthreads=T for PBS Pro, walltime, account, mail, output
paths, array range), changes to the submit directory, activates the environment (by
default the one running `submit`: its venv, its conda environment, or its interpreter's
directory put first on PATH; --venv PATH or --conda-env NAME otherwise), logs the node (host,
CPU model, job id, array index, date, directory) and then `exec`s the phi_rnn command, so
that the scheduler's signals reach Python itself rather than a waiting shell. Every value
from the command line or the submit directory reaches the script as one single-quoted
shell word (or a checked #PBS directive): nothing in it is ever expanded or run.

- `train`: `python -m phi_rnn train --threads T [--policy P] ARGS`; T defaults to the
  cores requested (--ppn / --ncpus) over the ranks per node.  With --nodes N > 1 or
  --ranks-per-node K > 1 it runs as N x K MPI ranks (data-parallel, phi_rnn.distributed):
  `mpiexec -n NK -ppn K -genv OMP_NUM_THREADS T ...` (--mpi hydra: MPICH, Intel MPI) or
  `mpiexec -n NK --map-by ppr:K:node:pe=T -x OMP_NUM_THREADS=T ...` (--mpi openmpi); both
  read the nodes from $PBS_NODEFILE, and mpiexec forwards the walltime SIGTERM to the ranks.
- `scale` with --array: `python bench/scale.py --point "$IDX" ARGS` (ARGS must hold
  --out DIR; merge the points afterwards with `python bench/scale.py --collect DIR`);
  without --array the whole study runs in one job.

Walltime and resubmission: at the walltime limit the scheduler sends SIGTERM (then
SIGKILL after a grace period: Torque kill_delay, PBS Pro kill_delay, Slurm KillWait).
Training answers SIGTERM by writing a checkpoint and exiting 143.  Submitting with
`--resume` adds `--resume latest` to the train command, which continues from the
checkpoint directory's `latest` pointer, so resubmitting after a walltime kill is:

    python -m phi_rnn submit --resume <same options> -- train <same train args>

(`--resume latest` can also be written among the train args by hand.  --resume checks
that the checkpoint directory, as seen from the submit directory, has a `latest` pointer,
because a job with nothing to resume would fail; scale points need no flag: an
interrupted study skips its finished points.)  Output goes to the scheduler's default
`<name>.o<job number>` in the submit directory, stdout and stderr joined, unless
--output / --error say otherwise; their directories are created before submitting.

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
from dataclasses import dataclass
from pathlib import Path

from phi_rnn.affinity import POLICIES
from phi_rnn.errors import UsageError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCALE_SCRIPT = PROJECT_ROOT / "bench" / "scale.py"
MAX_NAME_LENGTH = {"torque": 15, "pbspro": 236}
ARRAY_PATTERN = {
    "torque": re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*(%\d+)?"),
    "pbspro": re.compile(r"\d+-\d+(:\d+)?(%\d+)?"),
}
ARRAY_INDEX = "${PBS_ARRAYID:-${PBS_ARRAY_INDEX:-$SLURM_ARRAY_TASK_ID}}"
JOB_ID_PATTERN = re.compile(r"(\d+)(\[\d*\])?(\.\S+)?")
MPI_LAUNCHERS = ("hydra", "openmpi")


def add_submit_arguments(parser):
    parser.add_argument("--flavor", choices=("torque", "pbspro"), default="torque",
                        help="PBS dialect of the directives (default: torque)")
    parser.add_argument("--queue", "-q", default="manycore", help="queue (default: manycore)")
    parser.add_argument("--nodes", "--select", dest="nodes", type=int, default=1,
                        help="nodes (Torque nodes=, PBS Pro select=); more than one: train over MPI")
    parser.add_argument("--ranks-per-node", "--ranks_per_node", dest="ranks_per_node", type=int, default=1,
                        help="MPI ranks of train per node, each on its own cores (PBS Pro mpiprocs=; "
                             "default 1; one per socket or NUMA domain is the usual choice)")
    parser.add_argument("--mpi", choices=MPI_LAUNCHERS, default="hydra",
                        help="mpiexec dialect: hydra (MPICH, Intel MPI; default) or openmpi")
    parser.add_argument("--ppn", "--ncpus", dest="ppn", type=int,
                        help="cores per node (Torque ppn=, PBS Pro ncpus=); required")
    parser.add_argument("--walltime", help="limit as H:MM:SS, MM:SS or seconds")
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
    parser.add_argument("--pbs-line", action="append", default=[], metavar="DIRECTIVE",
                        help="extra '#PBS DIRECTIVE' line (repeatable)")
    parser.add_argument("--array", metavar="RANGE", help="job array of scale points, "
                        "e.g. 0-7 (Torque -t, PBS Pro -J)")
    parser.add_argument("--resume", action="store_true",
                        help="add '--resume latest' to the train command")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the script and the qsub command; submit nothing")
    parser.add_argument("--qsub", default="qsub", help="qsub program (default: qsub on PATH)")
    # not "command": the CLI's subcommand already has that name
    parser.add_argument("job_command", nargs="*", metavar="-- train|scale ARGS",
                        help="the phi_rnn command to run in the job")


@dataclass
class Job:
    flavor: str
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
    submit_dir: Path


def submit_command(args):
    job = job_from_arguments(args)
    script = render_script(job)
    if args.dry_run:
        qsub_line = shlex.join(["qsub", *qsub_options(job), job.name])
        print(script + f"# submit: {qsub_line}  (with this script saved as {job.name})")
        return 0
    qsub = find_qsub(args.qsub)
    for path in (job.output, job.error):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    job_id = run_qsub(qsub, job, script)
    print(f"submitted {job.name} to queue {job.queue}: job {job_id}")
    print(f"output: {output_location(job, job_id)}")
    return 0


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
    submit_dir = Path.cwd()
    if program == "train":
        threads = args.threads if args.threads is not None else args.ppn // args.ranks_per_node
        run_line = train_run_line(args, threads, program_args)
        if args.resume:
            check_resumable(program_args, submit_dir)
    else:
        threads = None
        run_line = scale_run_line(args, program_args)
    return Job(
        flavor=args.flavor,
        name=checked_name(f"phi-{program}" if args.name is None else args.name, args.flavor),
        queue=checked_word(args.queue, "--queue"),
        nodes=args.nodes,
        ppn=args.ppn,
        ranks_per_node=args.ranks_per_node,
        threads=threads,
        walltime=unless_none(args.walltime, lambda text: format_walltime(parse_walltime(text))),
        account=unless_none(args.account, checked_word, "--account"),
        mail=unless_none(args.mail, checked_word, "--mail"),
        mail_events=checked_mail_events(args.mail_events, args.mail),
        output=unless_none(args.output, absolute, submit_dir),
        error=unless_none(args.error, absolute, submit_dir),
        extra_lines=[checked_pbs_line(line) for line in args.pbs_line],
        array=unless_none(args.array, checked_array, args.flavor),
        activation=activation_lines(args.venv, args.conda_env),
        run_line=run_line,
        submit_dir=submit_dir,
    )


def unless_none(value, check, *more):
    return None if value is None else check(value, *more)


def train_run_line(args, threads, train_args):
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
    ranks = args.nodes * args.ranks_per_node
    if ranks > 1:
        if args.venv is None and args.conda_env is None and importlib.util.find_spec("mpi4py") is None:
            raise UsageError(f"{ranks} MPI ranks need mpi4py in the job's environment: "
                             f"pip install 'phi_rnn[mpi]' (mpi4py + mpich) or mpi4py built against the site's MPI")
        command = mpiexec_command(args.mpi, ranks, args.ranks_per_node, threads) + command
    return "exec " + shlex.join(command)


def mpiexec_command(launcher, ranks, per_node, threads):
    """mpiexec for `ranks` ranks, `per_node` on each node, with the thread count exported to
    every rank (phi_rnn then places each rank's threads on its own cores, replacing any
    binding the launcher made). Both launchers read the nodes from $PBS_NODEFILE themselves."""
    if launcher == "openmpi":
        return ["mpiexec", "-n", str(ranks), "--map-by", f"ppr:{per_node}:node:pe={threads}",
                "-x", f"OMP_NUM_THREADS={threads}"]
    # Hydra: MPICH's and Intel MPI's; I_MPI_PIN_DOMAIN=omp gives an Intel MPI rank OMP_NUM_THREADS cores
    return ["mpiexec", "-n", str(ranks), "-ppn", str(per_node), "-genv", "OMP_NUM_THREADS", str(threads),
            "-genv", "I_MPI_PIN_DOMAIN", "omp"]


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
    if args.threads is not None or args.policy or args.resume:
        raise UsageError("--threads, --policy and --resume apply to train; "
                         "scale points choose their own threads")
    if args.array is None:
        return "exec " + shlex.join(["python", str(SCALE_SCRIPT), *scale_args])
    if option_value(scale_args, ("--out",), None) is None:
        raise UsageError("a scale array needs '--out DIR' after '-- scale': every point "
                         "writes its result there for 'bench/scale.py --collect DIR'")
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


def checked_name(name, flavor):
    limit = MAX_NAME_LENGTH[flavor]
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.+-]*", name) or len(name) > limit:
        raise UsageError(f"invalid job name {name!r}: {flavor} needs at most {limit} "
                         "characters, a letter first, then letters, digits, _ . + -")
    return name


def checked_word(value, option):
    if not value or re.search(r"[\s#'\"]", value):
        raise UsageError(f"invalid {option} {value!r}: one word without spaces or quotes")
    return value


def checked_mail_events(events, mail):
    if events is None:
        return "ae" if mail else None
    if not re.fullmatch(r"[abe]+|n", events):
        raise UsageError(f"invalid --mail-events {events!r}: letters from 'abe', or 'n'")
    return events


def checked_pbs_line(line):
    directive = re.sub(r"^\s*#PBS\s*", "", line).strip()
    if not directive.startswith("-") or "\n" in directive:
        raise UsageError(f"invalid --pbs-line {line!r}: one directive such as '-l mem=8gb'")
    return directive


def checked_array(array, flavor):
    if not ARRAY_PATTERN[flavor].fullmatch(array):
        example = "0-7, 0,2,4 or 0-7%2" if flavor == "torque" else "0-7 or 0-14:2"
        raise UsageError(f"invalid --array {array!r} for {flavor}: e.g. {example}")
    return array


def absolute(path, submit_dir):
    full = submit_dir / Path(path).expanduser()
    if re.search(r"\s", str(full)):
        raise UsageError(f"output path {str(full)!r} has a space: qsub cannot take it")
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


def directives(job):
    lines = [f"-N {job.name}", f"-q {job.queue}"]
    if job.flavor == "torque":
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


def repeated_on_command_line(job):
    """Directives that qsub also gets as options: Slurm's wrapper decides the output files
    from its command line alone (-o/-e/-j, and the array range for per-index names)."""
    options = []
    if job.output:
        options.append(f"-o {job.output}")
    if job.error:
        options.append(f"-e {job.error}")
    else:
        options.append("-j oe")
    if job.array:
        options.append(("-t " if job.flavor == "torque" else "-J ") + job.array)
    return options


def qsub_options(job):
    return [word for option in repeated_on_command_line(job) for word in option.split(" ", 1)]


def render_script(job):
    index_setup = [f'IDX="{ARRAY_INDEX}"'] if job.array else []
    index_log = ', array index $IDX' if job.array else ""
    lines = [
        "#!/bin/bash",
        *(f"#PBS {line}" for line in directives(job)),
        "# Rendered by 'python -m phi_rnn submit'.",
        "set -e",
        # a value inside "${VAR:-...}" would still be expanded: the directory is its own word
        f"SUBMIT_DIR={shlex.quote(str(job.submit_dir))}",
        'cd -- "${PBS_O_WORKDIR:-$SUBMIT_DIR}"',
        *job.activation,
        *index_setup,
        f'echo "phi_rnn job ${{PBS_JOBID:-?}}{index_log} on $(hostname) at $(date \'+%F %T %Z\')"',
        'echo "cpu: $(grep -m1 \'model name\' /proc/cpuinfo | cut -d: -f2- | sed \'s/^ *//\')'
        ', $(nproc) usable of $(grep -c ^processor /proc/cpuinfo)"',
        'echo "dir: $PWD"',
        "echo " + shlex.quote("run: " + job.run_line.removeprefix("exec ")),
        job.run_line,
    ]
    return "\n".join(lines) + "\n"


def find_qsub(qsub):
    path = shutil.which(qsub)
    if path is None:
        raise UsageError(f"qsub not found ({qsub!r}): submit from a PBS login node, "
                         "point --qsub at it, or use --dry-run to see the script")
    return path


def run_qsub(qsub, job, script):
    # qsub copies the script at submission, so a temporary file will do; it is named
    # after the job because Slurm's qsub names default output files after the script.
    with tempfile.TemporaryDirectory(prefix="phi_rnn-submit-") as directory:
        script_path = Path(directory, job.name)
        script_path.write_text(script)
        result = subprocess.run([qsub, *qsub_options(job), str(script_path)],
                                capture_output=True, text=True, cwd=job.submit_dir)
    if result.returncode != 0:
        raise UsageError(f"qsub rejected the job: {qsub_error(result)}")
    words = result.stdout.split()
    if not words:
        raise UsageError(f"qsub printed no job id: {qsub_error(result)}")
    return words[-1]


def qsub_error(result):
    """The scheduler's own message, from stderr (PBS) or stdout (Slurm's wrapper)."""
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
    separator = "-" if job.flavor == "torque" and "." in job_id else "."
    return f"{path}{separator}<index> (one per array index)"
