"""The training loop: char-rnn's train.lua, plus exact resume and safe interruption.

Time is counted two ways, both adding up across resumed runs (kept in every checkpoint's
meta and the metrics log): training seconds, the iterations themselves (batch, forward,
backward, gradient exchange, update); wall seconds, the training loop's whole time, its
evaluations and checkpoint writes included (not the set-up: loading the corpus and the
kernels). A resumed run adds to the totals of the checkpoint it resumes from.

Exit statuses: 0 done (the last iteration, --patience, or --target_val_loss reached, or not:
a line says so); 2 bad input; 3 training diverged (NaN or exploding loss; the last good
checkpoint is kept); 129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM after
writing a checkpoint.
"""
import copy
import json
import math
import os
import signal
import sys
import time

import numba
import numpy as np

from phi_rnn import bf16, checkpoint, config, data, distributed, files, metrics
from phi_rnn import kernels as K
from phi_rnn.affinity import format_cpu_list
from phi_rnn.errors import UsageError
from phi_rnn.model import Network
from phi_rnn.progress import Progress

EXIT_DIVERGED = 3
# 128 + the signal's number, as a shell reports a process killed by it. SIGHUP: the
# terminal or ssh session closed.
EXIT_SIGNAL = {signal.SIGHUP: 129, signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupt:
    """First SIGTERM/SIGINT/SIGHUP: finish the iteration, checkpoint, exit. Second: exit at
    once (checkpoint writes are atomic, so nothing is corrupted). Under MPI the batch system
    and mpiexec may each deliver the same walltime SIGTERM: a repeat within `repeat_grace_s`
    of the first is that same event."""

    def __init__(self, repeat_grace_s=0.0):
        self.signum = None
        self.received = None
        self.repeat_grace_s = repeat_grace_s
        for signum in EXIT_SIGNAL:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == self.signum and time.monotonic() - self.received < self.repeat_grace_s:
                return
            os._exit(EXIT_SIGNAL[signum])
        self.signum, self.received = signum, time.monotonic()

    def flags(self):
        """One count per stop signal, summed over the MPI ranks with the gradient."""
        return [float(self.signum == signum) for signum in EXIT_SIGNAL]

    def agreed(self, flags):
        """The signal every rank stops for (the first received by any rank), or None."""
        return next((signum for signum, count in zip(EXIT_SIGNAL, flags) if count), None)


def compile_kernels(model, strategy, log, precision="fp32"):
    """Compile (first run) or load from numba's cache every kernel, visibly and timed."""
    t0 = time.perf_counter()
    log("loading kernels (compiled on the first run, cached afterwards)...", flush=True)
    net = Network(model, 3, 4, 2, dropout=0.5, strategy=strategy, precision=precision)
    net.init_params(np.random.default_rng(0))
    x = np.zeros((2, 2), np.int32)
    net.forward(x, x, net.zero_state(2), np.random.default_rng(0))
    net.backward(x, True)
    net.update(1e-3, 0.95, 5.0)
    compiled = any(d.stats.cache_misses for d in (K.layer_forward, K.layer_forward_blocks, K.rmsprop_step))
    log(f"kernels ready in {time.perf_counter() - t0:.1f} s ({'compiled' if compiled else 'from cache'})",
        flush=True)


def evaluate(net, loader, max_batches=None, split="val", world=distributed.Single()):
    """Mean loss over the first max_batches (default: all) batches of a split: state from
    zeros, carried across its batches, no dropout; over MPI ranks, each evaluates its streams
    and the losses are combined. Returns (loss, batches)."""
    loader.reset(split)
    batches = min(max_batches or loader.size[split], loader.size[split])
    start, stop = world.stream_range(loader.batch_size)
    state = net.zero_state(stop - start)
    total = 0.0
    for batch in range(batches):
        x, y = loader.next_batch(split, start, stop)
        total += net.forward(x, y, state, same_weights=batch > 0)
    return world.mean_over_streams(total / batches), batches


def _take_options(o, saved, names, given, reason, log):
    """Set options `names` of o from a checkpoint's; warn about each one the command line
    gave (`given`) with another value."""
    for name in names:
        if name in given and getattr(o, name) != saved[name]:
            log(f"warning: --{name} {getattr(o, name)} ignored: {reason} {saved[name]}")
        setattr(o, name, saved[name])


def _check_vocab(ck, vocab, encoding):
    if ck.meta.get("encoding", "utf-8") != encoding:
        raise UsageError(f"{ck.path} was trained with --encoding {ck.meta.get('encoding')}, "
                         f"the data is read with --encoding {encoding}")
    if ck.vocab != vocab:
        missing = sorted(set(vocab) - set(ck.vocab))
        extra = sorted(set(ck.vocab) - set(vocab))
        names = lambda ss: ", ".join(data.describe_symbol(s, encoding) for s in ss[:10]) or "none"
        raise UsageError(f"vocabulary mismatch with {ck.path}: the data has {names(missing)} "
                         f"not in the checkpoint; the checkpoint has {names(extra)} not in the data")


def _check_corpus(ck, corpus, path):
    """--resume continues on the corpus it was trained on (the position in the data means
    nothing on another); --init_from may start anywhere."""
    trained_on = ck.meta.get("corpus_sha256")
    if trained_on is not None and trained_on != corpus.sha256:
        raise UsageError(f"{ck.path} was trained on another corpus (sha256 {trained_on[:16]}..., {path} has "
                         f"{corpus.sha256[:16]}...); --resume continues on the same data, --init_from "
                         f"starts a new run from its weights")


def _check_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"checkpoint directory {directory} is not writable ({e.strerror})") from None


class Run:
    """Everything a checkpoint must hold to continue exactly."""

    def __init__(self, o, vocab, corpus_sha256):
        self.options = dict(vars(o))
        self.vocab = vocab
        self.corpus_sha256 = corpus_sha256
        self.iteration = 0
        self.learning_rate = scaled_learning_rate(o)
        self.train_losses = []
        self.val_losses = {}
        self.loss0 = None
        self.training_seconds = 0.0  # totals over the run and the runs it resumes (module docstring)
        self.wall_seconds = 0.0  # up to start_clock()
        self.clock_started = None
        self.target_reached = None  # the record of the last --target_val_loss reached

    def start_clock(self):
        self.clock_started = time.monotonic()

    def wall_now(self):
        """The run's wall seconds so far."""
        return self.wall_seconds + time.monotonic() - self.clock_started

    def meta(self, net, loader, rng, epoch):
        return {"model": net.model, "rnn_size": net.H, "num_layers": net.L, "vocab": self.vocab,
                "vocab_size": len(self.vocab), "encoding": self.options["encoding"],
                "corpus_sha256": self.corpus_sha256,
                "options": self.options, "iteration": self.iteration, "epoch": epoch,
                "learning_rate": self.learning_rate, "val_losses": self.val_losses, "loss0": self.loss0,
                "data_position": loader.position, "rng_state": rng.bit_generator.state,
                "training_seconds": self.training_seconds, "wall_seconds": self.wall_now(),
                **({"target_reached": self.target_reached} if self.target_reached else {})}

    def restore(self, ck):
        meta = ck.meta
        self.iteration = int(meta["iteration"])
        self.learning_rate = float(meta["learning_rate"])
        self.train_losses = ck.arrays["train_losses"].tolist()
        self.val_losses = dict(meta["val_losses"])
        self.loss0 = meta["loss0"]
        self.training_seconds = float(meta.get("training_seconds", 0.0))
        self.wall_seconds = float(meta.get("wall_seconds", 0.0))
        self.target_reached = meta.get("target_reached")

    def record(self, iteration, loss):
        """Iteration `iteration` is done with training loss `loss`."""
        self.loss0 = loss if self.loss0 is None else self.loss0
        self.iteration = iteration
        self.train_losses.append(loss)

    def evaluations_since_best(self):
        """(lowest validation loss so far or None, evaluations after it)."""
        losses = [loss for _, loss in sorted((int(i), loss) for i, loss in self.val_losses.items())]
        if not losses:
            return None, 0
        best = min(range(len(losses)), key=losses.__getitem__)
        return losses[best], len(losses) - 1 - best


def _take_directory(directory, log):
    """The checkpoint directory's lock for this run, then the leftovers of writes that a
    SIGKILL cut short: with the lock held no other run is writing them."""
    lock = checkpoint.lock_directory(directory)
    stale = files.remove_stale_temp_files(directory)
    if stale:
        log(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write from {directory}")
    return lock


# the time-to-loss study's result (bench/time_to_loss.py writes it): measured_recipe() reads it
RECIPES = os.path.join("results", "time-to-loss", "recipes.json")
RECIPE_FLAGS = ("batch_size", "lr_scaling", "lr_warmup", "learning_rate", "precision")  # the last two optional


def measured_recipe(threads, path=None, bf16_runs=True):
    """The fastest recipe the time-to-loss study measured at `threads` threads, as the flags
    {name: value} it gives, or None: no study result (the file is absent in an installed
    package), none for this thread count, or an entry that is not valid flags. Without
    `bf16_runs` (a CPU the trainer refuses --precision bf16 on) a bfloat16 recipe is given
    without its precision: it converges as in float32, only slower.

    `path` (default RECIPES in the source tree) is JSON of this form:
        {"recipes": [{"threads": 4, "batch_size": 64, "lr_scaling": "linear", "lr_warmup": 100,
                      "learning_rate": 0.002, "target_val_loss": 1.6, "wall_seconds": 812.5}, ...]}
    one entry per thread count; batch_size, lr_scaling and lr_warmup required, learning_rate
    and precision optional (absent: the defaults); other keys (what it reached, how fast) are the
    study's and are not read."""
    path = path or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), RECIPES)
    try:
        with open(path, encoding="utf-8") as f:
            recipes = json.load(f)["recipes"]
        entry = next(r for r in recipes if r.get("threads") == threads)
        flags = {name: entry[name] for name in RECIPE_FLAGS if name in entry}
        valid = all(config.option_problem(name, value) is None for name, value in flags.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return None
    if not bf16_runs and flags.get("precision") == "bf16":
        del flags["precision"]
    return flags if valid and set(RECIPE_FLAGS[:3]) <= set(flags) else None


def _larger_batch_advice(threads, recipe):
    if recipe:
        flags = " ".join(f"--{name} {value}" for name, value in recipe.items())
        return f"the time-to-loss study's fastest recipe at {threads} threads is {flags} ({RECIPES})"
    return (f"a batch larger than char-rnn's {config.REFERENCE_BATCH} may need its learning rate scaled "
            f"(--lr_scaling linear or sqrt) and eased in (--lr_warmup N)")


def idle_threads_note(threads, batch_size, strategy, cpus=(), recipe=None):
    """The batch strategy gives thread i the i-th block of batch rows (numba hands prange
    iteration i to thread i), so with more threads than rows threads batch_size.. get none and
    wait. Returns the line naming them and what to do (with `recipe`, measured_recipe's flags
    for this thread count, when there is one), or None. bench/scale/model.py costs the ways
    out from measured parts: more rows per thread, or fewer threads at the same speed. It
    finds the gemm strategy (each step's products shared by MKL's threads) slower than idle
    threads, and teams of threads sharing a block's products (a hybrid, not built) no faster
    than the batch strategy at char-rnn's sizes (bench/README.md, "The hybrid, decided")."""
    if strategy != "batch" or threads <= batch_size:
        return None
    idle = threads - batch_size
    which = f"thread {batch_size}" if idle == 1 else f"threads {batch_size}-{threads - 1}"
    where = f" (CPUs {format_cpu_list(list(cpus)[batch_size:threads])})" if len(cpus) >= threads else ""
    rows, cores = "row" if batch_size == 1 else "rows", "core" if idle == 1 else "cores"
    get = "gets" if idle == 1 else "get"
    return (f"note: {threads} threads for a batch of {batch_size} {rows}: {which}{where} {get} no "
            f"rows and wait, {idle} of {threads} idle. Give every thread rows with --batch_size "
            f"{threads} (or a multiple of it; {_larger_batch_advice(threads, recipe)}), or run --threads "
            f"{batch_size}: the same speed with {idle} {cores} free (the batch strategy runs; --strategy gemm "
            f"is slower)")


def scaled_learning_rate(o):
    """--learning_rate, char-rnn's rate for its batch of 50, scaled to --batch_size as
    --lr_scaling says (none: as given, not even multiplied by 1)."""
    ratio = o.batch_size / config.REFERENCE_BATCH
    if o.lr_scaling == "linear":
        return o.learning_rate * ratio
    if o.lr_scaling == "sqrt":
        return o.learning_rate * math.sqrt(ratio)
    return o.learning_rate


def warmed_up(learning_rate, iteration, warmup):
    """The rate iteration `iteration` (from 1) uses under --lr_warmup `warmup`:
    learning_rate * iteration / warmup before iteration `warmup`, learning_rate itself from it
    on (and always with warmup 0)."""
    return learning_rate * iteration / warmup if iteration < warmup else learning_rate


def learning_rate_line(o, rate):
    """The start-up line on the effective learning rate `rate` under --lr_scaling and
    --lr_warmup, or None when neither is given (char-rnn's rate, as given)."""
    parts = []
    if o.lr_scaling != "none":
        ratio = f"{o.batch_size}/{config.REFERENCE_BATCH}"
        factor = ratio if o.lr_scaling == "linear" else f"sqrt({ratio})"
        parts.append(f"--learning_rate {o.learning_rate:g} x {factor} (--lr_scaling {o.lr_scaling})")
    if o.lr_warmup:
        parts.append(f"rising linearly from {warmed_up(rate, 1, o.lr_warmup):g} at iteration 1 to it at "
                     f"iteration {o.lr_warmup} (--lr_warmup {o.lr_warmup})")
    return f"learning rate {rate:g}: {', '.join(parts)}" if parts else None


def thread_cpus():
    """The CPU of each OpenMP thread as the affinity plan placed it (OMP_PLACES "{c0},{c1},..."
    in thread order), or [] when threads are not bound."""
    places = os.environ.get("OMP_PLACES", "")
    try:
        return [int(place.strip("{}")) for place in places.split(",")] if places.startswith("{") else []
    except ValueError:
        return []


def _open_sources(o, given, log):
    """--resume's or --init_from's checkpoint, loaded, with the options it decides taken into
    o (a resumed run keeps its training options, --init_from takes the architecture).
    Returns (resume, init), at most one of them a checkpoint, the other None."""
    resume = checkpoint.load(o.resume, o.checkpoint_dir) if o.resume else None
    init = checkpoint.load(o.init_from, o.checkpoint_dir) if o.init_from else None
    if resume:
        _take_options(o, resume.meta["options"], config.RUN_OPTIONS, given,
                      "a resumed run keeps the checkpoint's", log)
        missing = [name for name in checkpoint.RESUME_ARRAYS if name not in resume.arrays]
        if missing:
            raise UsageError(f"cannot resume from {resume.path}: it lacks {', '.join(missing)}; "
                             f"--init_from starts a new run from its weights")
        log(f"resuming from {resume.path} at iteration {resume.meta['iteration']}")
    elif init:
        _take_options(o, init.meta, config.ARCH_OPTIONS, given, "--init_from takes the checkpoint's", log)
        log(f"initializing from {init.path} (model {o.model}, {o.num_layers} x {o.rnn_size})")
    return resume, init


def _open_data(o, corpus, resume, init, world, log):
    """The corpus (loaded here when None) checked against the checkpoint's, and its loader at
    the resumed position. Returns (corpus, loader)."""
    corpus_path = os.path.join(o.data_dir, "input.txt")
    corpus = corpus or world.root_first(lambda: data.load_corpus(corpus_path, o.encoding, log))
    if resume:
        _check_corpus(resume, corpus, corpus_path)
    if resume or init:
        _check_vocab(resume or init, corpus.vocab, o.encoding)
    loader = data.CharLoader(corpus.ids, o.batch_size, o.seq_length, o.train_frac, o.val_frac, len(corpus.vocab))
    if resume:
        loader.restore(resume.meta["data_position"])
    return corpus, loader


def divergence(loss, loss0):
    """What is wrong with an iteration's loss (NaN, infinite, or exploding: above 3 x the first
    loss, char-rnn's test), or None."""
    if np.isnan(loss):
        return "NaN"
    if not np.isfinite(loss):
        return "infinite"
    if loss0 is not None and loss > 3 * loss0:
        return f"exploding ({loss:.4f} > 3 x first loss {loss0:.4f})"
    return None


class SlowEvaluationNote:
    """Once per run, a note when an evaluation took longer than the training since the
    previous one, naming the --val_max_batches that makes it about a tenth of that."""

    def __init__(self, run):
        self.run = run
        self.trained_before = run.training_seconds  # the run's training seconds at the last evaluation
        self.given = False

    def after_evaluation(self, eval_seconds, batches):
        """The note (once) or None; starts counting the training towards the next evaluation."""
        trained, self.trained_before = self.run.training_seconds - self.trained_before, self.run.training_seconds
        if eval_seconds <= trained or self.given:
            return None
        self.given = True
        fits = max(1, int(batches * 0.1 * trained / eval_seconds))
        return (f"note: this evaluation took longer ({eval_seconds:.1f} s) than the training since the "
                f"previous one ({trained:.1f} s); --val_max_batches {fits} evaluates only the "
                f"first {fits} of its {batches} batches (the same ones each time), about a tenth of that")


class Training:
    """This process's part of a run: the network on its rows of the batch (`rows`, (first,
    stop) of the global batch's streams; all of them in one process), the state carried across
    batches, the data, the random generator and the run's record; the loop in train() drives
    it."""

    def __init__(self, o, world, corpus, loader, resume, init, log):
        self.o, self.world, self.loader = o, world, loader
        self.rows = world.stream_range(o.batch_size)
        first, stop = self.rows
        threads = numba.get_num_threads()
        recipe = measured_recipe(threads, bf16_runs=bool(bf16.native_features()))
        note = idle_threads_note(threads, stop - first, o.strategy, thread_cpus(), recipe)
        if note:
            log(note)
        compile_kernels(o.model, o.strategy, log, o.precision)
        self.net = Network(o.model, len(corpus.vocab), o.rnn_size, o.num_layers, o.dropout, o.strategy,
                           precision=o.precision)
        self.net.streams = (first, o.batch_size)
        self.rng = np.random.default_rng(o.seed)
        self.run = Run(o, corpus.vocab, corpus.sha256)
        self.state = self.net.zero_state(stop - first)
        self._restore(resume, init)
        self.last_saved = resume.path if resume else None
        log(f"number of parameters in the model: {self.net.params.data.size}")
        rate = None if resume else learning_rate_line(o, self.run.learning_rate)
        if rate:
            log(rate)

    def _restore(self, resume, init):
        """Weights from the checkpoint (or char-rnn's init); a resumed run's optimizer, carried
        state, random generator and record too."""
        source = resume or init
        if source:
            for name, value in source.params.items():
                self.net.params[name][...] = value
        else:
            self.net.init_params(self.rng)
        if resume:
            self.run.restore(resume)
            self.net.rms[:] = resume.arrays["optim.rms"]
            self.state[:] = resume.arrays["state"][:, :, self.rows[0]:self.rows[1]]
            self.rng.bit_generator.state = resume.meta["rng_state"]

    def step(self, flags):
        """One iteration's forward, backward, exchange of the gradient (with this process's stop
        `flags`) and update. Returns (loss, the flags summed over ranks, the learning rate it
        used, grad/param norm, seconds of compute)."""
        o, net = self.o, self.net
        t_batch = time.perf_counter()
        x, y = self.loader.next_batch("train", *self.rows)
        t0 = time.perf_counter()
        loss = net.forward(x, y, self.state, self.rng if o.dropout > 0 else None)
        net.backward(x, o.dropout > 0)
        loss, stop_flags = self.world.allreduce_gradient(net.grads, loss, flags)
        learning_rate = warmed_up(self.run.learning_rate, self.run.iteration + 1, o.lr_warmup)
        norm_ratio = net.update(learning_rate, o.decay_rate, o.grad_clip)
        t1 = time.perf_counter()
        self.run.training_seconds += t1 - t_batch
        return loss, stop_flags, learning_rate, norm_ratio, t1 - t0

    def save(self, val_loss):
        """A checkpoint of the run now (every rank takes part, rank 0 writes): named by its
        validation loss (None: an interrupted run's); the best so far becomes `best`. Returns
        its path."""
        o, run, world = self.o, self.run, self.world
        epoch = run.iteration / self.loader.ntrain
        path = os.path.join(o.checkpoint_dir, checkpoint.checkpoint_name(o.savefile, epoch, val_loss))
        every_stream = world.gather_streams(self.state)
        world.check_identical(self.net.params.data)
        error = None
        if world.root:
            try:
                checkpoint.save(path, self.net.params.views, run.meta(self.net, self.loader, self.rng, epoch),
                                self.net.rms, every_stream, run.train_losses)
            except OSError as e:
                previous = (f"the previous checkpoint {self.last_saved} is intact" if self.last_saved
                            else "none was written before")
                error = UsageError(f"cannot write checkpoint {path} ({e.strerror}); {previous}")
            else:
                if val_loss is not None and run.evaluations_since_best() == (val_loss, 0):
                    checkpoint.point(o.checkpoint_dir, checkpoint.BEST, path)
                checkpoint.prune(o.checkpoint_dir, o.savefile, o.keep, path)
        world.agree(error)
        self.last_saved = path
        return path

    def decay_learning_rate(self, log):
        """char-rnn's schedule: at the end of every epoch from learning_rate_decay_after on."""
        o, run, ntrain = self.o, self.run, self.loader.ntrain
        epoch_ends = run.iteration % ntrain == 0
        if epoch_ends and o.learning_rate_decay < 1 and run.iteration / ntrain >= o.learning_rate_decay_after:
            run.learning_rate *= o.learning_rate_decay
            log(f"decayed learning rate by a factor {o.learning_rate_decay} to {run.learning_rate}")

    def validate(self, loss):
        """The validation loss now, recorded (the training loss `loss` without a validation
        split). Returns (loss, batches evaluated, seconds)."""
        t0 = time.perf_counter()
        val_loss, batches = (evaluate(self.net, self.loader, self.o.val_max_batches, world=self.world)
                             if self.loader.nval else (loss, 0))
        self.run.val_losses[str(self.run.iteration)] = val_loss
        return val_loss, batches, time.perf_counter() - t0

    def reach_target(self, val_loss, wall_seconds):
        """Whether validation loss `val_loss` reaches --target_val_loss; if so the run records
        when (for the checkpoint's meta)."""
        o, run = self.o, self.run
        if o.target_val_loss is None or val_loss > o.target_val_loss:
            return False
        run.target_reached = {"target_val_loss": o.target_val_loss, "val_loss": val_loss,
                              "iteration": run.iteration, "epoch": run.iteration / self.loader.ntrain,
                              "training_seconds": run.training_seconds, "wall_seconds": wall_seconds}
        return True

    def target_line(self):
        r = self.run.target_reached
        return (f"validation loss {r['val_loss']:.4f} reached --target_val_loss {r['target_val_loss']:g} at "
                f"iteration {r['iteration']} (epoch {r['epoch']:.3f}) after {r['training_seconds']:.1f} s of "
                f"training, {r['wall_seconds']:.1f} s wall: stopped; the checkpoint is {self.last_saved}")

    def target_missed(self):
        """At the end of a run with --target_val_loss that did not reach it: the line that says so."""
        o, run = self.o, self.run
        reached = run.target_reached and run.target_reached["iteration"] == run.iteration
        if o.target_val_loss is None or reached:
            return None
        best, _ = run.evaluations_since_best()
        lowest = "no evaluation" if best is None else f"the lowest validation loss is {best:.4f}"
        return (f"--target_val_loss {o.target_val_loss:g} not reached in {run.iteration} iterations "
                f"({run.training_seconds:.1f} s of training, {run.wall_now():.1f} s wall): {lowest}")

    def metrics_log(self, resumed, log):
        """Rank 0's metrics log (None on the others), continuing a resumed run's."""
        if not self.world.root:
            return None
        run, o = self.run, self.o
        history = (run.iteration, run.train_losses, run.val_losses, self.loader.ntrain) if resumed else None
        return metrics.MetricsLog(metrics.log_path(o.checkpoint_dir, o.savefile), o.batch_size * o.seq_length,
                                  history, log)


def diverged(world, wrong, iteration, last_saved):
    """Rank 0 says the loss went `wrong` (divergence()) and where the last good checkpoint is.
    Returns the exit status."""
    if world.root:
        print(f"phi_rnn: error: loss is {wrong} at iteration {iteration}: stopped. The last good checkpoint is "
              f"{last_saved or '(none yet)'}; try a lower --learning_rate or --grad_clip", file=sys.stderr)
    return EXIT_DIVERGED


def patience_ran_out(o, run):
    """The line that stops a run with --patience whose validation loss has not gone lower
    in that many evaluations, or None."""
    best, stale = run.evaluations_since_best()
    if not o.patience or stale < o.patience:
        return None
    return (f"no lower validation loss in {stale} evaluations (--patience {o.patience}): stopped; "
            f"the best, {best:.4f}, is {checkpoint.resolve(checkpoint.BEST, o.checkpoint_dir)}")


def _open_directory(o, corpus, world, log):
    """Rank 0 writes the checkpoints and the corpus cache's stat: it alone holds the directory.
    Returns its lock (None on the other ranks), held until the process ends."""
    _check_writable(o.checkpoint_dir)
    if not world.root:
        return None
    lock = _take_directory(o.checkpoint_dir, log)
    corpus.keep_stat()
    return lock


def train(o, given=frozenset(), log=print, corpus=None, world=distributed.Single()):
    """Train with options `o` (see phi_rnn.config); `given`: the options the command line
    gave; `corpus`: data.load_corpus of o.data_dir's input.txt (loaded here when None). In one
    process, or as one rank of `world` on its share of the batch's streams. Returns the exit
    status."""
    o = copy.copy(o)  # --resume / --init_from replace options: the caller's stay as given
    resume, init = _open_sources(o, given, log)
    corpus, loader = _open_data(o, corpus, resume, init, world, log)
    lock = _open_directory(o, corpus, world, log)  # noqa: F841  (held until the process ends)
    log(f"vocab size: {len(corpus.vocab)}, data: {loader.ntrain} train / {loader.nval} val / "
        f"{loader.ntest} test batches of {o.batch_size} x {o.seq_length}")
    t = Training(o, world, corpus, loader, resume, init, log)
    run = t.run
    iterations = int(o.max_epochs * loader.ntrain)
    last = min(iterations, o.max_iters) if o.max_iters else iterations
    interrupt = Interrupt(repeat_grace_s=2.0 if world.size > 1 else 0.0)
    metrics_log = t.metrics_log(resume is not None, log)
    progress = Progress(run.iteration, last, iterations, o.print_every, log)
    log = progress.log
    slow_evaluation = SlowEvaluationNote(run)
    run.start_clock()
    while run.iteration < last:
        i = run.iteration + 1
        loss, stop_flags, learning_rate, norm_ratio, elapsed = t.step(interrupt.flags())
        epoch = i / loader.ntrain
        wrong = divergence(loss, run.loss0)
        if wrong:
            return diverged(world, wrong, i, t.last_saved)
        run.record(i, loss)
        t.decay_learning_rate(log)
        evaluating = i % o.eval_val_every == 0 or i == last
        val_loss, batches, eval_seconds = t.validate(loss) if evaluating else (None, 0, 0.0)
        wall = run.wall_now()
        reached = evaluating and t.reach_target(val_loss, wall)
        # the row before the checkpoint: a run resumed from it drops rows past it
        if metrics_log:
            metrics_log.append(i, epoch, (loss, val_loss), learning_rate, norm_ratio,
                               (elapsed, run.training_seconds, wall))
        if evaluating:
            log(f"validation loss {val_loss:.4f} ({batches} batches in {eval_seconds:.1f} s); "
                f"saved checkpoint {t.save(val_loss)}")
            note = slow_evaluation.after_evaluation(eval_seconds, batches)
            if note:
                log(note)
        progress.iteration(i, epoch, loss, norm_ratio, elapsed)
        end = t.target_line() if reached else patience_ran_out(o, run) if evaluating else None
        if end:
            log(end)
            break
        stop = interrupt.agreed(stop_flags)
        if stop is not None:
            log(f"{signal.Signals(stop).name} received: saved checkpoint {t.save(None)}; continue with "
                f"--resume latest", flush=True)
            return EXIT_SIGNAL[stop]
    missed = t.target_missed()
    if missed:
        log(missed)
    progress.close()
    return 0
