"""One link of a chain of train jobs (`python -m phi_rnn submit --chain N`).

A run longer than the queue's walltime goes as N jobs submitted at once, each starting
after the previous one has ended (Slurm `--dependency=afterany`, PBS `-W
depend=afterany`). Every job runs this module in place of train (the job script `exec`s
it; the scheduler's own stop signals reach train directly, as every process of the job):

    python -m phi_rnn.chain --link K --links N --record DIR/chain-STAMP.log
        --stop-after SECONDS --cancel scancel|qdel -- [launcher] python -m phi_rnn train ARGS

It reads the chain's record (a text file in the checkpoint directory DIR, one line per
event): when an earlier link ended the chain, this job has nothing to do and exits 0.
Otherwise it runs the train command, adding `--resume latest` when DIR has a `latest`
checkpoint, and sends it SIGTERM --stop-after seconds after the job started, so that
training checkpoints and exits 143 before the walltime kill rather than during its grace
period. The job times this itself because the schedulers' own warnings are too coarse
(Slurm's `--signal` checks every 30 s and may come up to a minute early) or missing (PBS).

When training ends the link writes its outcome to the record and its output:
- exit 143 with a new checkpoint: the next link continues from it;
- exit 143 without one (training had not started: a slow start, a busy node): the next
  link tries again, unless the link before this one had none either;
- exit 0 (training finished), any other exit (training failed), 143 without a new
  checkpoint twice in a row (the walltime leaves no time to train), or 143 on the last
  link: the chain ends here; the links after this one are cancelled (their job ids are the record's
  `jobs:` line) and, should a cancellation fail, find the end in the record and exit.
The link exits with train's own status.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from phi_rnn.checkpoint import LATEST

CONTINUE_STATUS = 143  # train after SIGTERM and its checkpoint
NO_CHECKPOINT = "without a new checkpoint"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
JOBS_PREFIX = "jobs:"
END_PREFIX = "ended:"


def link_arguments(parser):
    parser.add_argument("--link", type=int, required=True, help="this job's place in the chain, from 1")
    parser.add_argument("--links", type=int, required=True, help="jobs in the chain")
    parser.add_argument("--record", type=Path, required=True,
                        help="the chain's record, in the checkpoint directory")
    parser.add_argument("--stop-after", type=float, required=True,
                        help="seconds after the start at which train gets SIGTERM")
    parser.add_argument("--cancel", required=True, help="the scheduler's job cancel program")
    parser.add_argument("train_command", nargs="+", help="the train command, after '--'")


class Record:
    """The chain's record: appended to by submit and by every link, one line per event."""

    def __init__(self, path):
        self.path = path

    def lines(self):
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def ending(self):
        """The line that ended the chain, or None while it goes on."""
        return next((line for line in self.lines() if line.startswith(END_PREFIX)), None)

    def ended_without_checkpoint(self, link):
        """Whether link `link` stopped without a new checkpoint."""
        return any(line.startswith(f"link {link} of ") and NO_CHECKPOINT in line for line in self.lines())

    def job_ids(self):
        return next((line.split()[1:] for line in self.lines() if line.startswith(JOBS_PREFIX)), [])

    def add(self, line):
        """Appends the line and shows it in the job's output."""
        self.path.parent.mkdir(parents=True, exist_ok=True)  # train makes it later
        with open(self.path, "a") as record:
            record.write(line + "\n")
        print(f"chain: {line}", flush=True)


class Train:
    """The train process, and the SIGTERM that stops it before the walltime.

    The link does not pass on the stop signals it receives itself: the scheduler signals
    every process of a job (a walltime kill, a cancellation) and train has its own, so a
    second copy from here would make train exit at once, without its checkpoint. It only
    notes them, to say what stopped training."""

    def __init__(self, stop_after, stop_through=None):
        """stop_through: a command that delivers the SIGTERM instead (for srun's ranks)."""
        self.process = None
        self.stop_through = stop_through
        self.warned = False
        self.received = []
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: self.received.append(signum))
        signal.signal(signal.SIGALRM, self.warn)
        signal.setitimer(signal.ITIMER_REAL, max(stop_after, 0.001))

    def warn(self, signum, frame):
        self.warned = True
        if self.process is not None:
            self.stop()

    def stop(self):
        if self.stop_through:
            subprocess.run(self.stop_through)
        else:
            self.process.send_signal(signal.SIGTERM)

    def run(self, command):
        """Runs the command to its end; returns its exit status as a shell reports it."""
        self.process = subprocess.Popen(command)
        if self.warned:  # the timer went off while train was starting
            self.stop()
        status = exit_status(self.process.wait())
        signal.setitimer(signal.ITIMER_REAL, 0)
        return status

    def stopped_by(self):
        if self.warned:
            return "stopped by the chain's SIGTERM before the walltime"
        if self.received:
            return f"stopped by {signal.Signals(self.received[0]).name} from the scheduler"
        return "stopped by SIGTERM"


def run_link(link, links, record_path, stop_after, cancel, train_command):
    record = Record(record_path)
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or "?"
    name = f"link {link} of {links} (job {job})"
    ending = record.ending()
    if ending is not None:
        print(f"chain: {name}: nothing to do, the chain has ended: "
              f"{ending[len(END_PREFIX):].strip()}", flush=True)
        return 0
    # srun ends its job step on SIGTERM (SIGKILL for the ranks after a moment) instead of
    # passing it on: its ranks get the SIGTERM from Slurm, which signals the job's steps
    srun = train_command[0] == "srun"
    train = Train(stop_after, [cancel, "--signal=TERM", job] if srun else None)
    checkpoint_dir = record_path.parent
    latest = latest_checkpoint(checkpoint_dir)
    command = list(train_command)
    if latest is None:
        record.add(f"{name} on {socket.gethostname()} at {now()}: starting training "
                   f"(no {checkpoint_dir / LATEST} yet)")
    else:
        command += ["--resume", LATEST]
        record.add(f"{name} on {socket.gethostname()} at {now()}: resuming from "
                   f"{checkpoint_dir / latest[0]}")
    try:
        status = train.run(command)
    except OSError as e:  # no such launcher or python on the node
        print(f"phi_rnn: error: cannot run {command[0]}: {e.strerror}", file=sys.stderr, flush=True)
        status = 127
    progressed = latest_checkpoint(checkpoint_dir) != latest
    retry = not progressed and not record.ended_without_checkpoint(link - 1)
    continues = status == CONTINUE_STATUS and link < links and (progressed or retry)
    record.add(f"{name} at {now()}: {outcome(status, train, link, links, progressed, retry, checkpoint_dir)}")
    if not continues:
        end_chain(record, name, status, link, cancel)
    return status


def latest_checkpoint(checkpoint_dir):
    """(name, mtime) of the checkpoint `latest` names, or None: a new checkpoint may have the
    old one's name (an interrupted one's names the epoch to 1/100) but is a new file."""
    try:
        name = (checkpoint_dir / LATEST).read_text().strip()
        return name, (checkpoint_dir / name).stat().st_mtime_ns
    except (FileNotFoundError, IsADirectoryError):
        return None


def now():
    return time.strftime("%F %T %Z")


def exit_status(returncode):
    """A shell's view: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def outcome(status, train, link, links, progressed, retry, checkpoint_dir):
    if status == 0:
        return "training finished (exit 0)"
    if status != CONTINUE_STATUS:
        return f"training failed (exit {status}): the job's output says why"
    stopped = train.stopped_by()
    if not progressed and not retry:
        return (f"{stopped}, {NO_CHECKPOINT} (exit 143), as the link before: the job leaves "
                "no time to train; give a longer --walltime or a shorter --stop-before")
    if link == links:
        how = "after its checkpoint" if progressed else NO_CHECKPOINT
        return (f"{stopped}, {how} (exit 143), the last link: training is not "
                "finished; submit a new chain with the same arguments to go on from "
                f"{checkpoint_dir / LATEST}")
    if not progressed:
        return f"{stopped}, {NO_CHECKPOINT} (exit 143); link {link + 1} tries again"
    return f"{stopped}, after its checkpoint (exit 143); link {link + 1} continues"


def end_chain(record, name, status, link, cancel):
    record.add(f"{END_PREFIX} {name} exited {status}")
    later = record.job_ids()[link:]
    if not later:
        return
    try:
        result = subprocess.run([cancel, *later], capture_output=True, text=True)
        message = (result.stderr + result.stdout).strip().replace("\n", "; ")
        cancelled = result.returncode == 0
    except OSError as e:
        message, cancelled = f"{cancel}: {e.strerror}", False
    if cancelled:
        record.add(f"cancelled the later links: jobs {' '.join(later)}")
    else:
        record.add(f"could not cancel jobs {' '.join(later)} ({message}); they will exit at "
                   "once, seeing the end in this record")


def main(argv=None):
    from phi_rnn.cli import OneLineErrorParser
    parser = OneLineErrorParser(prog="phi_rnn.chain", description=__doc__.splitlines()[0])
    link_arguments(parser)
    args = parser.parse_args(argv)
    return run_link(args.link, args.links, args.record, args.stop_after, args.cancel,
                    args.train_command)


if __name__ == "__main__":
    sys.exit(main())
