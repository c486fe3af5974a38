"""Time to a good model: how many iterations each global batch size and learning-rate recipe
needs to reach a validation loss, and what that costs in seconds at each core count.

Iterations to a target do not depend on the machine, so the study runs the real trainer
(`python -m phi_rnn train`, char-rnn's defaults otherwise, the full validation set), each run
in a fresh process at --threads 1, a few at a time, and reads the run's metrics log. Seconds
come separately: time per iteration t(batch, threads) measured at 1 and 2 threads (and at 2
MPI ranks of 1 thread) by `measure-speed` (on a quiet machine), and from the scaling study's
model of the time per iteration beyond. Time to target = iterations to target x t(batch, threads); for each core
count the table picks the batch and recipe that get there first.

    python bench/time_to_loss.py run [--jobs 2]      # the convergence runs (resumable)
    python bench/time_to_loss.py measure-speed       # t(batch, threads) at 1 and 2 threads
    python bench/time_to_loss.py measure-speed --again 100:1:1:bf16   # one point again, the rest kept
    python bench/time_to_loss.py measure-speed --again 2:2:1:fp32,2:2:1:bf16 --rounds 3   # in turn, medians
    python bench/time_to_loss.py table               # CSV, JSON, Markdown, plot, recipes.json
    python bench/time_to_loss.py validate --threads 2   # the table against a real --target_val_loss run
    python bench/time_to_loss.py validate --ranks 2     # the same at 2 MPI ranks of 1 thread
    python bench/time_to_loss.py full-run    # the 2-thread recipe and char-rnn's for 50 epochs: best val loss

Each finished run is one JSON file under OUT/runs/ (written atomically): an interrupted study
continues where it stopped; a run cut off mid-way continues from its checkpoint (--resume).
The plan grows from the results: the base recipes first, warm-up where the trainer has
--lr_warmup, then a grid around each batch's best and a second seed for the best rows.

A target is reached at the first evaluation at or below it (what `--target_val_loss` stops
at); the crossing interpolated between that evaluation and the one before is kept beside it.
Each batch size's epoch and validation set are char-rnn's split of the corpus for that batch:
the corpus cut to whole batches, the last 5% of the batches (at least one) held out. The
batches are column blocks of B streams, so the held-out text is the end of each stream: other
passages at each batch size, 5.2% of the corpus at batch 50, 7.2% at 1600 (one batch), and an
epoch 1.06 M characters at 50, 0.96 M at 1600.
"""
import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from phi_rnn import data, metrics  # noqa: E402
from phi_rnn.cli import OneLineErrorParser  # noqa: E402  (one-line errors, exit 2; starts no runtime)

TARGETS = (1.60, 1.50, 1.45)
STOP_AT = min(TARGETS)
BATCHES = (50, 100, 200, 400, 800, 1600)
PRECISIONS = ("fp32", "bf16")
BF16_MAX_BATCH = 200  # the batches a core count up to 128 would pick (the float32 table's)
BF16_LEADERS = 2
# The batches 64 to 128 cores pick (time to 1.50 at batch 50 stops falling there): a few
# iterations fewer to 1.50 at these is what moves the many-core table.
BF16_GRID_BATCHES = (100, 200)
BF16_GRID = "bf16 grid"  # the recipe name of the runs around the bfloat16 leaders
BF16_GRID_LR = 1.2
CHAR_RNN_BATCH, CHAR_RNN_LR = 50, 2e-3
SEEDS = (123, 456)
MAX_EPOCHS = 10
MIN_UPDATES = 250  # a large batch gets at least this many iterations, more epochs than MAX_EPOCHS
EVALS_PER_EPOCH = 10
CORES = (1, 2, 16, 64, 68, 128)
MEASURED_THREADS = (1, 2)
MEASURED_RANKS = (2,)  # MPI ranks on this node, 1 thread each: the validation's third layout
MAX_MPI_BATCH = 200
RATIO_ROWS = (1, 2, 4)  # batch rows per thread at which bfloat16's gain over float32 is measured
RATIO_ROUNDS = 3  # times each ratio point is measured, the precisions in turn: the median kept
# A run this far behind cannot be among the fast ones; it stops and reports where it was.
EXIT_DIVERGED = 3  # phi_rnn.train's status for a loss that went NaN or exploded
# (epoch, iterations, best val loss): a run past both that has not got below the loss stops.
# The iterations keep a large batch going: it needs more epochs (fewer updates per epoch) to
# leave the unigram plateau near 3.3 at all.
STALLED = ((3.0, 300, 2.0), (5.0, 600, 1.70))
SEED_REFERENCE = {"server CPU (9 h)": 9 * 3600, "laptop CPU (2.5 h)": 2.5 * 3600,
                  "GTX 920M (33 min)": 33 * 60}
OUT = REPO_ROOT / "results" / "time-to-loss"
WORK = REPO_ROOT / "cv" / "time-to-loss"
DATA_DIR = "data/tinyshakespeare"
SEQ_LENGTH, TRAIN_FRAC, VAL_FRAC = 50, 0.95, 0.05


@dataclass(frozen=True)
class Spec:
    """One convergence run."""
    batch: int
    learning_rate: float
    warmup: int  # iterations of linear learning-rate warm-up (0: none)
    seed: int
    recipe: str  # how the learning rate was chosen
    precision: str = "fp32"  # the trainer's --precision

    @property
    def run_id(self):
        suffix = "" if self.precision == "fp32" else f"-{self.precision}"
        return f"b{self.batch}-lr{self.learning_rate:.4g}-w{self.warmup}-s{self.seed}{suffix}"

    @classmethod
    def of(cls, result, **changes):
        """The spec of a recorded run (a result or a table row), with `changes`."""
        fields = {"batch": result.get("batch", result.get("batch_size")), "learning_rate": result["learning_rate"],
                  "warmup": result.get("warmup", result.get("lr_warmup")), "seed": result["seed"],
                  "recipe": result["recipe"], "precision": result["precision"]}
        return cls(**{**fields, **changes})


def corpus_chars(data_dir=DATA_DIR):
    with open(REPO_ROOT / data_dir / "input.txt", encoding="utf-8") as f:
        return len(f.read())


def iterations_per_epoch(batch, chars):
    return data.split_sizes(chars // (batch * SEQ_LENGTH), TRAIN_FRAC, VAL_FRAC)[0]


def max_epochs(batch, chars):
    """MAX_EPOCHS, or as many as MIN_UPDATES iterations take at a large batch."""
    return max(MAX_EPOCHS, math.ceil(MIN_UPDATES / iterations_per_epoch(batch, chars)))


def eval_every(batch, chars):
    return max(1, round(iterations_per_epoch(batch, chars) / EVALS_PER_EPOCH))


def scaled_lr(batch, rule, base_lr=CHAR_RNN_LR):
    ratio = batch / CHAR_RNN_BATCH
    return base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def mpi_prefix(ranks):
    """The launcher of `ranks` MPI ranks on this node (none for one process)."""
    if ranks == 1:
        return []
    mpiexec = Path(sys.executable).parent / "mpiexec"
    return [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(ranks)]


def train_command(spec, chars, checkpoint_dir, resume=False, threads=1, ranks=1, epochs=None, every=None):
    """The trainer's command line for `spec`: one thread unbound (runs side by side), or more
    threads (or MPI ranks, `threads` each) placed compactly (a timed run). `epochs` and
    `every` (iterations between evaluations) replace the study's max_epochs / eval_every."""
    unbound = threads == 1 and ranks == 1
    epochs = epochs or max_epochs(spec.batch, chars)
    every = every or eval_every(spec.batch, chars)
    cmd = mpi_prefix(ranks) + [sys.executable, "-m", "phi_rnn", "train", "--data_dir", DATA_DIR,
           "--batch_size", str(spec.batch), "--learning_rate", f"{spec.learning_rate:.6g}",
           "--max_epochs", str(epochs), "--eval_val_every", str(every),
           "--seed", str(spec.seed), "--threads", str(threads), "--policy", "none" if unbound else "compact",
           "--keep", "1", "--print_every", "100", "--checkpoint_dir", str(checkpoint_dir), "--savefile", "run"]
    if spec.warmup:
        cmd += ["--lr_warmup", str(spec.warmup)]
    if spec.precision != "fp32":
        cmd += ["--precision", spec.precision]
    if resume:
        cmd += ["--resume", "latest"]
    return cmd


# ---- reading a run's curve -------------------------------------------------------------

def evaluations(rows):
    """[(iteration, epoch, val_loss, training seconds so far)] from metrics-log rows."""
    out, seconds = [], 0.0
    for row in rows:
        seconds += (row["ms_per_iteration"] or 0.0) / 1000
        if row["val_loss"] is not None:
            out.append((int(row["iteration"]), row["epoch"], row["val_loss"], seconds))
    return out


def crossing(evals, target):
    """Where the curve first reaches `target`: the first evaluation at or below it (iteration,
    epoch, seconds) and the iteration interpolated linearly in loss between it and the
    evaluation before; None when never reached."""
    for k, (iteration, epoch, loss, seconds) in enumerate(evals):
        if loss <= target:
            if k == 0:
                interpolated = float(iteration)
            else:
                i0, _, l0, _ = evals[k - 1]
                interpolated = i0 + (iteration - i0) * (l0 - target) / (l0 - loss)
            return {"iterations": iteration, "epochs": epoch, "train_seconds": seconds,
                    "iterations_interpolated": interpolated}
    return None


def summarize(evals, targets=TARGETS):
    best = min(evals, key=lambda e: e[2]) if evals else None
    return {"evaluations": [list(e) for e in evals],
            "best_val_loss": best[2] if best else None,
            "best_at_iteration": best[0] if best else None,
            "last_iteration": evals[-1][0] if evals else 0,
            "last_epoch": evals[-1][1] if evals else 0.0,
            "targets": {f"{t:.2f}": crossing(evals, t) for t in targets}}


def stop_reason(evals, stop_at=STOP_AT, stalled=STALLED):
    """Why a run still going should stop now (None: it goes on)."""
    if not evals:
        return None
    best = min(e[2] for e in evals)
    if best <= stop_at:
        return f"reached {stop_at:.2f}"
    iteration, epoch = evals[-1][:2]
    for at_epoch, at_iteration, above in stalled:
        if epoch >= at_epoch and iteration >= at_iteration and best > above:
            return f"stalled: best {best:.4f} > {above} at epoch {epoch:.2f}, iteration {iteration}"
    return None


# ---- running ---------------------------------------------------------------------------

def write_json(path, value):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def read_evals(log):
    try:
        return evaluations(metrics.read_rows(log))
    except (OSError, ValueError):
        return []


def run_one(spec, chars, out, work, stopping, log=print):
    """Runs `spec` to its stop (target, stall, divergence or max_epochs); writes its JSON."""
    directory = work / spec.run_id
    directory.mkdir(parents=True, exist_ok=True)
    metrics_log = Path(metrics.log_path(str(directory), "run"))
    resume = any(directory.glob("lm_run_*.npz"))
    cmd = train_command(spec, chars, directory, resume)
    shown = train_command(spec, chars, f"cv/time-to-loss/{spec.run_id}")
    log(f"start {spec.run_id} ({spec.recipe}){' resuming' if resume else ''}")
    with open(directory / "stdout.txt", "a") as stdout:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=stdout, stderr=subprocess.STDOUT)
        reason = None
        while proc.poll() is None:
            stopping.wait(5)
            if stopping.is_set():
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                break
            reason = reason or stop_reason(read_evals(metrics_log))
            if reason and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
    evals = read_evals(metrics_log)
    if reason is None and proc.returncode not in (0, EXIT_DIVERGED):
        # a signal, or a failure that is not the run's (a refused option, a broken tree): the
        # run is not recorded and continues from its checkpoint next time
        log(f"{spec.run_id} ended with exit status {proc.returncode} (see {directory / 'stdout.txt'}); "
            f"not recorded, it resumes next time")
        return None
    if reason is None:
        reason = f"{max_epochs(spec.batch, chars)} epochs" if proc.returncode == 0 else "diverged (trainer exit status 3)"
    result = {**asdict(spec), "run_id": spec.run_id,
              "iterations_per_epoch": iterations_per_epoch(spec.batch, chars),
              "eval_val_every": eval_every(spec.batch, chars), "max_epochs": max_epochs(spec.batch, chars),
              "stopped": reason, "exit_status": proc.returncode,
              "command": "python " + " ".join(shown[1:]),
              "train_seconds_note": "1 thread, on a machine shared with other work: not the table's seconds",
              **summarize(evals)}
    write_json(out / "runs" / f"{spec.run_id}.json", result)
    t = result["targets"]
    log(f"done {spec.run_id}: {reason}; best {result['best_val_loss']}; "
        + ", ".join(f"{k}: {v['epochs']:.2f} ep" if v else f"{k}: -" for k, v in t.items()))
    return result


def load_results(out):
    results = {}
    for path in sorted((out / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        r.setdefault("precision", "fp32")  # recorded before the study had a bfloat16 dimension
        results[r["run_id"]] = r
    return results


def native_bf16():
    """Whether this CPU runs the trainer's --precision bf16 (else the trainer refuses it),
    asked of a fresh process: this one starts trainers and loads no GEMM library."""
    from bench.side_by_side import bf16_support
    return bool(bf16_support()["native"])


def trainer_has(flag):
    help_text = subprocess.run([sys.executable, "-m", "phi_rnn", "train", "--help"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout
    return flag in help_text


def epochs_to(result, target="1.50"):
    hit = result["targets"].get(target)
    return hit["epochs"] if hit else math.inf


def rank_key(result, target="1.50"):
    """Fewest iterations to the target first, then the lowest loss reached."""
    hit = result["targets"].get(target)
    return (hit["iterations"] if hit else math.inf, result["best_val_loss"] or math.inf)


def best_per_batch(results, seed=SEEDS[0], precision="fp32"):
    best = {}
    for r in results.values():
        if r["seed"] == seed and r["precision"] == precision and (r["batch"] not in best or rank_key(r) < rank_key(best[r["batch"]])):
            best[r["batch"]] = r
    return best


def leaders(results, count=BF16_LEADERS, seed=SEEDS[0]):
    """The `count` fastest float32 runs to 1.50 of each batch up to BF16_MAX_BATCH (one seed):
    a single run's crossing is noisy, so bfloat16 gets more than one recipe to match."""
    chosen = []
    for batch, runs in sorted(_by_batch(results, seed).items()):
        if batch <= BF16_MAX_BATCH:
            chosen += sorted((r for r in runs if r["precision"] == "fp32"), key=rank_key)[:count]
    return chosen


def plan(results, chars, warmup=True, bf16=False):
    """The runs to do, in order of priority: char-rnn's rate at batch 50 and twice it; linear
    scaling from char-rnn's rate, then with warm-up over one epoch (where the trainer has
    --lr_warmup); linear scaling from batch 50's best rate at batch 100 and 200 (warm-up from
    200); 1.4 x batch 50's best rate; the second seed of batch 50's best; square-root scaling; the second seed of
    char-rnn's recipe and of the larger batch that needs the fewest epochs to 1.50 (once the
    linear recipes are done); square-root scaling with warm-up; once all of that is done, x0.7
    and x1.4 around each batch's best. Before that grid, on a CPU with native bfloat16 (`bf16`),
    char-rnn's recipe and each batch's leaders again in --precision bf16, and once those are
    done a small bfloat16 grid around the leaders at batch 100 and 200 (bf16_grid)."""
    every = results
    results = {k: r for k, r in every.items() if r["precision"] == "fp32"}

    def spec(batch, rule, warm=False, base_lr=CHAR_RNN_LR, name=None):
        return Spec(batch, scaled_lr(batch, rule, base_lr), iterations_per_epoch(batch, chars) if warm else 0,
                    SEEDS[0], (name or rule) + ("+warmup" if warm else ""))

    batch_50 = [Spec(CHAR_RNN_BATCH, CHAR_RNN_LR, 0, SEEDS[0], "char-rnn"),
                Spec(CHAR_RNN_BATCH, 2 * CHAR_RNN_LR, 0, SEEDS[0], "grid")]
    specs = batch_50 + [spec(batch, "linear") for batch in BATCHES[1:]]
    specs += [spec(batch, "linear", warm=True) for batch in BATCHES[2:] if warmup]
    linear = list(specs)
    if all(s.run_id in results for s in batch_50):
        best_50 = best_per_batch(results)[CHAR_RNN_BATCH]
        if best_50["learning_rate"] != CHAR_RNN_LR:
            base = best_50["learning_rate"]
            specs += [spec(batch, "linear", warmup and batch >= 200, base, f"linear from {base:g}")
                      for batch in BATCHES[1:3]]
        specs.append(Spec(CHAR_RNN_BATCH, float(f"{best_50['learning_rate'] * 1.4:.3g}"), 0, SEEDS[0], "grid"))
        specs.append(Spec.of(best_50, seed=SEEDS[1]))
    specs += [spec(batch, "sqrt") for batch in BATCHES[1:]]
    if all(s.run_id in results for s in linear):
        first = [r for r in results.values() if r["seed"] == SEEDS[0]]
        larger = min((r for r in first if r["batch"] > CHAR_RNN_BATCH), key=lambda r: (epochs_to(r), r["batch"]))
        specs += [Spec.of(results[batch_50[0].run_id], seed=SEEDS[1]), Spec.of(larger, seed=SEEDS[1])]
    specs += [spec(batch, "sqrt", warm=True) for batch in BATCHES[2:] if warmup]
    if bf16 and batch_50[0].run_id in results:
        specs += [Spec.of(r, precision="bf16") for r in [results[batch_50[0].run_id]] + leaders(results)]
    if not all(s.run_id in every for s in specs):
        return specs
    if bf16:
        specs += bf16_grid(every, chars)
    for batch, best in sorted(best_per_batch(results).items()):
        for factor in (0.7, 1.4):
            lr = float(f"{best['learning_rate'] * factor:.3g}")
            tried = [r["learning_rate"] for r in results.values()
                     if r["batch"] == batch and r["warmup"] == best["warmup"] and r["seed"] == SEEDS[0]]
            if all(abs(lr / t - 1) > 0.15 for t in tried):
                specs.append(Spec(batch, lr, best["warmup"], SEEDS[0], "grid"))
    return specs


def bf16_grid(results, chars, batches=BF16_GRID_BATCHES):
    """Around the bfloat16 leader of each of `batches` (the fewest iterations to 1.50 among
    the runs before this grid, so the grid does not chase its own lucky runs): the rate
    x BF16_GRID_LR and / BF16_GRID_LR; a leader with warm-up also gets it halved and doubled,
    one without gets a quarter epoch of it at its rate and at the higher one (a warm-up is
    what lets a higher rate through the first updates)."""
    specs = []
    for batch in batches:
        runs = [r for r in results.values() if r["batch"] == batch and r["precision"] == "bf16"
                and r["seed"] == SEEDS[0] and r["recipe"] != BF16_GRID]
        if not runs:
            continue
        leader = min(runs, key=rank_key)
        lr, warmup = leader["learning_rate"], leader["warmup"]
        up, down = (float(f"{lr * f:.3g}") for f in (BF16_GRID_LR, 1 / BF16_GRID_LR))
        points = [(up, warmup), (down, warmup)]
        if warmup:
            points += [(lr, warmup // 2), (lr, 2 * warmup)]
        else:
            quarter = round(iterations_per_epoch(batch, chars) / 4)
            points += [(lr, quarter), (up, quarter)]
        specs += [Spec(batch, rate, warm, SEEDS[0], BF16_GRID, "bf16") for rate, warm in points]
    return specs


def run_study(out, work, jobs, log=print):
    """Runs the plan, `jobs` runs at a time. SIGTERM/SIGINT: every run in flight checkpoints
    and stops (it continues from there next time), then the study ends."""
    chars = corpus_chars()
    lock = threading.Lock()
    running, failed = set(), set()  # a failed run is tried again by the next invocation
    results = load_results(out)
    stopping = threading.Event()
    bf16_native = trainer_has("--precision") and native_bf16()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    def next_spec():
        if stopping.is_set():
            return None
        # without --lr_warmup in the trainer the warm-up recipes wait (asked again each time)
        warmup = trainer_has("--lr_warmup")
        with lock:
            for spec in plan(results, chars, warmup, bf16_native):
                if spec.run_id not in results and spec.run_id not in running | failed:
                    running.add(spec.run_id)
                    return spec
            return None

    def worker():
        while True:
            spec = next_spec()
            if spec is None:
                with lock:
                    idle = not running
                if idle or stopping.is_set():
                    return
                time.sleep(10)  # the plan may grow once the runs in flight finish
                continue
            result = run_one(spec, chars, out, work, stopping, log)
            with lock:
                running.discard(spec.run_id)
                if result:
                    results[spec.run_id] = result
                elif not stopping.is_set():
                    failed.add(spec.run_id)

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1)  # the main thread stays free to take the signal
    log(f"{len(results)} runs in {out / 'runs'}")


# ---- time per iteration --------------------------------------------------------------

def speed_iterations(batch):
    """Enough iterations for ~15 s per point at 1 thread (about 1.3 ms per batch row)."""
    return max(10, round(15000 / (1.3 * batch)))


def speed_layouts(batches=BATCHES, threads=MEASURED_THREADS, ranks=MEASURED_RANKS, bf16=True):
    """The points measure_speed times once each: (batch, threads, ranks, precision). Every
    batch at each thread count; the batches up to MAX_MPI_BATCH at 1 thread per rank; with
    `bf16`, the batches up to BF16_MAX_BATCH in bfloat16 too (the ratio points apart:
    ratio_layouts)."""
    points = [(b, p, 1, "fp32") for b in batches for p in threads]
    points += [(b, 1, k, "fp32") for b in batches if b <= MAX_MPI_BATCH for k in ranks]
    if bf16:
        points += [(b, p, 1, "bf16") for b in batches if b <= BF16_MAX_BATCH for p in threads]
    return points


def ratio_layouts():
    """Both precisions at 2 threads with RATIO_ROWS rows per thread (what a batch of 50 to 200
    gives each thread at 16 to 128 threads: the bfloat16/float32 ratio there), the precisions
    in turn; measured in RATIO_ROUNDS rounds."""
    return [(2 * r, 2, 1, precision) for r in RATIO_ROWS for precision in PRECISIONS]


def measure_speed(out, layouts, log=print, again=False, rounds=1):
    """t(batch, threads, ranks, precision): the trainer's ms per iteration (its compute:
    forward, backward, gradient exchange, update) at each of `layouts` (speed_layouts), each a
    fresh process (or MPI job at 1 thread per rank). The mean, the first iterations left out:
    a run's training seconds are iterations x the mean. Run it on a quiet machine: the result
    is the table's measured seconds. `rounds`: the layouts are measured that many times, in
    turn (a shared machine drifts: bfloat16 and float32 at the same rows alternate), and each
    point keeps the median of its rounds' means, every round's mean beside it. `again`:
    measure `layouts` once more, the other points of speed.json kept (a point a disturbed
    machine got wrong)."""
    measured = {layout: [] for layout in layouts}
    for _ in range(rounds):
        for layout in layouts:
            measured[layout].append(_measure_point(*layout, log=log))
    points = [_median_of_rounds(runs) for runs in measured.values()]
    if again:
        key = lambda pt: (pt["batch_size"], pt["threads"], pt["ranks"], pt["precision"])  # noqa: E731
        fresh = {key(pt) for pt in points}
        kept = json.loads((out / "speed.json").read_text())["points"]
        points = [pt for pt in kept if key(pt) not in fresh] + points
    record = {"machine": this_machine(), "command": "python bench/time_to_loss.py measure-speed",
              "load_average_after": os.getloadavg()[0], "points": points}
    write_json(out / "speed.json", record)
    return record


def _measure_point(batch, p, k, precision, log=print):
    """One fresh trainer process (or MPI job) at this layout: its point of speed.json."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        n = speed_iterations(batch)
        cmd = mpi_prefix(k) + [
            sys.executable, "-m", "phi_rnn", "train", "--data_dir", DATA_DIR, "--precision", precision,
            "--batch_size", str(batch), "--max_iters", str(n), "--eval_val_every", str(10 * n),
            "--val_max_batches", "1", "--threads", str(p), "--policy", "compact", "--print_every", str(n),
            "--checkpoint_dir", tmp, "--savefile", "speed"]
        load = os.getloadavg()[0]
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        rows = metrics.read_rows(metrics.log_path(tmp, "speed"))
    times = [r["ms_per_iteration"] for r in rows[3:]]
    mean, median = statistics.fmean(times), statistics.median(times)
    log(f"batch {batch:5d}, {p} thread(s) x {k} rank(s), {precision}: {mean:8.2f} ms per iteration "
        f"(median {median:.2f}; load {load:.2f})")
    return {"batch_size": batch, "threads": p, "ranks": k, "precision": precision, "mean_ms": mean,
            "median_ms": median, "iterations": n, "load_average_before": load}


def _median_of_rounds(runs):
    """A layout's point from its rounds: the median round's fields, the median of the means."""
    if len(runs) == 1:
        return runs[0]
    middle = sorted(runs, key=lambda r: r["mean_ms"])[(len(runs) - 1) // 2]
    return dict(middle, mean_ms=statistics.median(r["mean_ms"] for r in runs),
                median_ms=statistics.median(r["median_ms"] for r in runs),
                round_means_ms=[r["mean_ms"] for r in runs])


def this_machine():
    """The machine as the scaling study records it: CPU model, family and model numbers,
    vector ISA, the avx/fma/amx flags, caches."""
    from bench.scale.machine import this_machine as record
    return record()


def iteration_seconds(speed, model=None):
    """t(batch, threads, precision) in seconds -> (seconds, 'measured' | 'modelled'). Measured
    where speed.json has the point (one process). Beyond it, float32: the scaling study's model
    of the time per iteration, scaled to this machine by the measured 1-thread time at that
    batch (the model's speedup over its own 1-thread time, applied here); bfloat16: that
    float32 time x the bfloat16/float32 ratio measured at 2 threads with the nearest number of
    batch rows per thread (the model's parts are float32's)."""
    points = [pt for pt in (speed or {}).get("points", []) if pt["ranks"] == 1]
    measured = {(pt["batch_size"], pt["threads"], pt.get("precision", "fp32")): pt["mean_ms"] / 1e3
                for pt in points}
    ratios = {b // 2: measured[b, 2, "bf16"] / measured[b, 2, "fp32"]
              for (b, p, precision) in measured if p == 2 and precision == "bf16" and (b, 2, "fp32") in measured}
    model = model or modelled_seconds

    def t(batch, threads, precision="fp32"):
        if (batch, threads, precision) in measured:
            return measured[batch, threads, precision], "measured"
        if precision != "fp32":
            rows = math.ceil(batch / threads)
            if not ratios:
                return None, "not measured"
            nearest = min(ratios, key=lambda r: (abs(math.log2(r / rows)), r))
            return t(batch, threads)[0] * ratios[nearest], "modelled"
        one = measured.get((batch, 1, "fp32"))
        if one is None:
            return model(batch, threads), "modelled"
        return one * model(batch, threads) / model(batch, 1), "modelled"
    return t


def modelled_seconds(batch, threads):
    from types import SimpleNamespace
    from bench.scale.model import predict_iteration_seconds
    char_rnn = SimpleNamespace(num_layers=2, rnn_size=128, seq_length=SEQ_LENGTH, batch_size=batch)
    return predict_iteration_seconds(char_rnn, threads)


# ---- the tables ------------------------------------------------------------------------

def time_rows(results, t, cores=CORES, targets=TARGETS):
    """One row per (run, core count): seconds to each target = iterations x t(batch, cores)."""
    rows = []
    for r in sorted(results.values(), key=lambda r: (r["batch"], r["learning_rate"], r["warmup"], r["seed"])):
        for p in cores:
            seconds, source = t(r["batch"], p, r["precision"])
            if seconds is None:
                continue
            row = {"cores": p, "batch_size": r["batch"], "recipe": r["recipe"],
                   "learning_rate": r["learning_rate"], "lr_warmup": r["warmup"], "seed": r["seed"],
                   "precision": r["precision"], "ms_per_iteration": seconds * 1e3, "source": source}
            for target in targets:
                hit = r["targets"].get(f"{target:.2f}")
                row[f"iterations_to_{target:.2f}"] = hit["iterations"] if hit else None
                row[f"epochs_to_{target:.2f}"] = hit["epochs"] if hit else None
                row[f"seconds_to_{target:.2f}"] = hit["iterations"] * seconds if hit else None
            rows.append(row)
    return rows


def best_envelope(rows, target, seed=SEEDS[0]):
    """{cores: the row with the shortest time to `target`} among the first seed's runs (ties:
    the smaller batch); core counts where no run reached it are left out."""
    key = f"seconds_to_{target:.2f}"
    best = {}
    for row in rows:
        if row["seed"] != seed or row[key] is None:
            continue
        p = row["cores"]
        if p not in best or (row[key], row["batch_size"]) < (best[p][key], best[p]["batch_size"]):
            best[p] = row
    return best


def largest_batch_within(results, target="1.50", slack=0.10, seed=SEEDS[0]):
    """The largest batch whose fewest epochs to `target` stay within `slack` of the best batch-50
    recipe's; with the epochs of each batch's best."""
    best = {b: min(epochs_to(r, target) for r in rs)
            for b, rs in _by_batch(results, seed).items()}
    reference = best.get(CHAR_RNN_BATCH, math.inf)
    within = [b for b, e in best.items() if e <= reference * (1 + slack)]
    return {"target": target, "slack": slack, "batch_50_epochs": reference,
            "epochs_by_batch": {str(b): (e if math.isfinite(e) else None) for b, e in sorted(best.items())},
            "largest_batch": max(within) if within and math.isfinite(reference) else None}


def _by_batch(results, seed):
    groups = {}
    for r in results.values():
        if r["seed"] == seed:
            groups.setdefault(r["batch"], []).append(r)
    return groups


def recipes_per_thread_count(rows, target=1.50):
    """The shortest time to `target` per thread count, in the form phi_rnn.train's
    measured_recipe reads (the start-up note's advice): the batch, the learning rate as run
    (lr_scaling none), the warm-up, and what the study found it takes."""
    key = f"{target:.2f}"
    return {"recipes": [
        {"threads": p, "batch_size": row["batch_size"], "lr_scaling": "none",
         "learning_rate": row["learning_rate"], "lr_warmup": row["lr_warmup"], "precision": row["precision"],
         "target_val_loss": target,
         "iterations": row[f"iterations_to_{key}"], "epochs": round(row[f"epochs_to_{key}"], 3),
         "train_seconds": round(row[f"seconds_to_{key}"], 1), "seconds_are": row["source"]}
        for p, row in sorted(best_envelope(rows, target).items())]}


def _is_char_rnn(row):
    return (row["batch_size"] == CHAR_RNN_BATCH and row["learning_rate"] == CHAR_RNN_LR
            and row["lr_warmup"] == 0 and row["seed"] == SEEDS[0] and row["precision"] == "fp32")


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def convergence_markdown(results):
    lines = ["| batch | recipe | learning rate | warm-up (it) | precision | seed | "
             + " | ".join(f"to {t:.2f}: it / epochs" for t in TARGETS) + " | best val | stopped |",
             "|" + "---|" * (8 + len(TARGETS))]
    for r in sorted(results.values(),
                    key=lambda r: (r["batch"], r["precision"], r["seed"], r["warmup"], r["learning_rate"])):
        cells = []
        for t in TARGETS:
            hit = r["targets"][f"{t:.2f}"]
            cells.append(f"{hit['iterations']} / {hit['epochs']:.2f}" if hit
                         else f"not within {r['last_epoch']:.1f}")
        lines.append(f"| {r['batch']} | {r['recipe']} | {r['learning_rate']:.4g} | {r['warmup']} | {r['precision']} | "
                     f"{r['seed']} | "
                     + " | ".join(cells) + f" | {_fmt(r['best_val_loss'], 4)} | {r['stopped']} |")
    return "\n".join(lines)


def time_markdown(rows, targets=(1.50, 1.45)):
    lines = ["| cores | source | " + " | ".join(f"to {t:.2f}: batch, lr, warm-up, precision -> time" for t in targets)
             + " | char-rnn's recipe (b50, 2e-3) to 1.50 |", "|" + "---|" * (3 + len(targets))]
    envelopes = {t: best_envelope(rows, t) for t in targets}
    charrnn = {row["cores"]: row for row in rows if _is_char_rnn(row)}
    for p in CORES:
        cells, source = [], None
        for t in targets:
            row = envelopes[t].get(p)
            source = source or (row and row["source"])
            cells.append(f"{row['batch_size']}, {row['learning_rate']:.3g}, {row['lr_warmup']}, {row['precision']} -> "
                         f"{_duration(row[f'seconds_to_{t:.2f}'])}" if row else "not reached")
        ref, best = charrnn.get(p), envelopes[targets[0]].get(p)
        ref_cell = "-"
        if ref and ref["seconds_to_1.50"]:
            ref_cell = _duration(ref["seconds_to_1.50"])
            if best and targets[0] == 1.50:
                ref_cell += f" ({ref['seconds_to_1.50'] / best['seconds_to_1.50']:.2f}x the best's)"
        lines.append(f"| {p} | {source or '-'} | " + " | ".join(cells) + f" | {ref_cell} |")
    return "\n".join(lines)


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def plot(rows, path, targets=(1.50, 1.45)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(targets), figsize=(6.5 * len(targets), 5), squeeze=False)
    for ax, target in zip(axes[0], targets):
        key = f"seconds_to_{target:.2f}"
        for batch in BATCHES:
            by_cores = {}
            for row in rows:
                if (row["batch_size"] == batch and row["seed"] == SEEDS[0] and row["precision"] == "fp32"
                        and row[key] is not None):
                    if row["cores"] not in by_cores or row[key] < by_cores[row["cores"]][key]:
                        by_cores[row["cores"]] = row
            if not by_cores:
                continue
            cores = sorted(by_cores)
            line, = ax.plot(cores, [by_cores[p][key] / 60 for p in cores], "-", lw=1, label=f"batch {batch}")
            for p in cores:
                measured = by_cores[p]["source"] == "measured"
                ax.plot(p, by_cores[p][key] / 60, "o", color=line.get_color(),
                        mfc=line.get_color() if measured else "white")
        charrnn = sorted((row["cores"], row[key]) for row in rows if _is_char_rnn(row) and row[key] is not None)
        if charrnn:
            ax.plot([c for c, _ in charrnn], [v / 60 for _, v in charrnn], "k--", lw=1,
                    label="char-rnn's recipe (batch 50, 2e-3)")
        bf16 = best_envelope([row for row in rows if row["precision"] == "bf16"], target)
        if bf16:
            ax.plot(sorted(bf16), [bf16[p][key] / 60 for p in sorted(bf16)], "m:", lw=2,
                    label="best in bfloat16 (beyond 2 cores: float32's model x bf16/fp32 at 2)")
        best = best_envelope(rows, target)
        cores = sorted(best)
        if cores:
            ax.plot(cores, [best[p][key] / 60 for p in cores], "k-", lw=3, alpha=0.5,
                    label="best batch, recipe and precision")
        for (name, seconds), style in zip(SEED_REFERENCE.items(), (":", "--", "-.")):
            ax.axhline(seconds / 60, color="grey", ls=style, lw=1)
            ax.text(1, seconds / 60 * 1.08, f"char-rnn, {name}, 50 epochs", fontsize=7, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(CORES)
        ax.set_xticklabels(["" if p == 68 else str(p) for p in CORES])  # 68 sits on 64
        ax.set_xlabel("cores (threads); filled: measured, open: modelled")
        ax.set_ylabel("minutes of training")
        ax.set_title(f"time to validation loss {target:.2f}, tiny-shakespeare, 2 x 128 LSTM")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def full_run_section(out):
    """results.md's full-run section when full-run.json is there (it is made apart: 50 epochs)."""
    path = out / "full-run.json"
    if not path.exists():
        return ""
    return "\n## Full run: char-rnn's 50 epochs\n\n" + full_run_markdown(json.loads(path.read_text())) + "\n"


def write_tables(out, log=print):
    results = load_results(out)
    speed_path = out / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.exists() else None
    if speed is None:
        log("no speed.json (measure-speed): every time per iteration is the model's")
    rows = time_rows(results, iteration_seconds(speed))
    fields = list(rows[0]) if rows else []
    with open(out / "time-to-loss.csv", "w", newline="") as f:
        import csv
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    within = largest_batch_within(results)
    recipes = recipes_per_thread_count(rows)
    summary = {"targets": TARGETS, "max_epochs": MAX_EPOCHS, "min_updates": MIN_UPDATES, "speed": speed,
               "convergence": [{k: v for k, v in r.items() if k != "evaluations"} for r in results.values()],
               "best_by_cores": {f"{t:.2f}": {str(p): row for p, row in best_envelope(rows, t).items()}
                                 for t in TARGETS},
               "largest_batch_within_10pct_epochs_to_1.50": within, "recipes": recipes}
    write_json(out / "time-to-loss.json", summary)
    write_json(out / "recipes.json", recipes)
    (out / "results.md").write_text(
        "## Convergence (iterations and epochs to each validation loss; one thread per run)\n\n"
        + convergence_markdown(results) + "\n\n## Time to target against cores\n\n" + time_markdown(rows)
        + f"\n\nLargest batch whose epochs to 1.50 stay within 10% of the best batch-50 recipe's: "
          f"{within['largest_batch']} (epochs to 1.50 by batch: {within['epochs_by_batch']})\n"
        + full_run_section(out))
    plot(rows, out / "time-to-loss.png")
    log(f"wrote {out}/time-to-loss.csv, .json, .png, results.md, recipes.json ({len(results)} runs)")


# ---- checking the table against a real run -----------------------------------------------

def timed_run(spec, layout, target, chars, directory):
    """One training at `layout` (threads, ranks) until val `target` (--target_val_loss): wall
    seconds of the whole process (or MPI job), training seconds and iterations from its
    metrics log."""
    threads, ranks = layout
    stop = ["--target_val_loss", f"{target}"]
    cmd = train_command(spec, chars, directory, threads=threads, ranks=ranks) + stop
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    evals = read_evals(Path(metrics.log_path(str(directory), "run")))
    hit = crossing(evals, target)
    shown = train_command(spec, chars, "cv/validate", threads=threads, ranks=ranks)
    shown[shown.index(sys.executable)] = "python"
    return {"command": " ".join(shown + stop).replace(str(Path(sys.executable).parent) + "/", ""),
            "wall_seconds": wall, "train_seconds": hit["train_seconds"] if hit else None,
            "iterations": hit["iterations"] if hit else None, "best_val_loss": min(e[2] for e in evals)}


def rank_seconds(speed, ranks):
    """t(batch) at `ranks` MPI ranks of 1 thread on this node in float32, measured (no model)."""
    measured = {pt["batch_size"]: pt["mean_ms"] / 1e3 for pt in (speed or {}).get("points", [])
                if pt["ranks"] == ranks and pt["threads"] == 1 and pt["precision"] == "fp32"}

    def t(batch, cores, precision="fp32"):
        if batch not in measured or precision != "fp32":
            return None, "not measured"
        return measured[batch], "measured"
    return t


def validate(out, threads, ranks=1, target=1.50, log=print):
    """The study's best recipe for `threads` threads (or `ranks` MPI ranks of 1 thread) and
    char-rnn's recipe, each trained to `target`: the best must get there >= 1.5x sooner in
    wall time, and each run's training time must land within 15% of what the table predicts
    (the study's iterations to `target` x the measured time per iteration). Run it on a quiet
    machine."""
    import tempfile
    chars = corpus_chars()
    results = load_results(out)
    speed_path = out / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.exists() else None
    layout = (1, ranks) if ranks > 1 else (threads, 1)
    cores = layout[0] * layout[1]
    t = rank_seconds(speed, ranks) if ranks > 1 else iteration_seconds(speed)
    if ranks > 1:
        measured = {r["run_id"]: r for r in results.values() if t(r["batch"], cores)[0] is not None}
        best = best_envelope(time_rows(measured, t, cores=(cores,)), target)[cores]
    else:
        best = best_envelope(time_rows(results, t, cores=(cores,)), target)[cores]
    specs = {"best": Spec.of(best), "char-rnn": Spec(CHAR_RNN_BATCH, CHAR_RNN_LR, 0, SEEDS[0], "char-rnn")}
    record = {"threads": layout[0], "ranks": layout[1], "target": target, "machine": this_machine(), "runs": {}}
    for name, spec in specs.items():
        with tempfile.TemporaryDirectory() as tmp:
            run = timed_run(spec, layout, target, chars, tmp)
        predicted_s, _ = t(spec.batch, cores, spec.precision)
        hit = results[spec.run_id]["targets"][f"{target:.2f}"]
        run["study_iterations"] = hit["iterations"] if hit else None
        run["predicted_train_seconds"] = hit["iterations"] * predicted_s if hit else None
        run["train_vs_predicted"] = (run["train_seconds"] / run["predicted_train_seconds"] - 1
                                     if run["train_seconds"] and run["predicted_train_seconds"] else None)
        record["runs"][name] = run
        log(f"{name} ({spec.run_id}) at {layout[0]} thread(s) x {layout[1]} rank(s): {run['wall_seconds']:.1f} s "
            f"wall, {_fmt(run['train_seconds'], 1)} s training in {run['iterations']} iterations against "
            f"{_fmt(run['predicted_train_seconds'], 1)} s predicted ({run['study_iterations']} in the study)")
    runs = record["runs"]
    record["wall_speedup_over_char_rnn"] = runs["char-rnn"]["wall_seconds"] / runs["best"]["wall_seconds"]
    record["load_average_after"] = os.getloadavg()[0]
    name = f"validation-t{threads}.json" if ranks == 1 else f"validation-r{ranks}.json"
    write_json(out / name, record)
    log(f"best recipe {record['wall_speedup_over_char_rnn']:.2f}x sooner than char-rnn's in wall time")
    return record


# ---- a full run: char-rnn's 50 epochs ----------------------------------------------------

FULL_EPOCHS = 50  # char-rnn's max_epochs
CHAR_RNN_EVAL_EVERY = 1000  # char-rnn's eval_val_every
# Ten times as often as char-rnn: a fast recipe's minimum can fall between char-rnn's
# evaluations. Every 1000th iteration is among these, so char-rnn's own view is kept as well.
FULL_EVAL_EVERY = 100
# The loss does not depend on the thread count (only the order of the gradient sums does);
# one thread leaves the machine's other core to other work.
FULL_THREADS = 1
FULL_RECIPE_THREADS = 2  # whose recipe in recipes.json is "the study's best"
CHAR_RNN_DECAY = (0.97, 10)  # char-rnn's learning_rate_decay per epoch, after this epoch
# A learning rate several times char-rnn's reaches 1.50 in a third of the epochs and then
# overfits while it is still high (its best 0.003 worse than char-rnn's at char-rnn's decay):
# the fast recipe's full run anneals it sooner, by 0.9 per epoch after epoch 3, past its 1.50.
FAST_DECAY = (0.9, 3)


def recipe_spec(out, threads=FULL_RECIPE_THREADS):
    """The study's fastest recipe for `threads` threads, as `table` wrote it to recipes.json
    (the learning rate as run: lr_scaling none), at the study's seed."""
    path = out / "recipes.json"
    try:
        rows = [r for r in json.loads(path.read_text())["recipes"] if r["threads"] == threads]
        if not rows or rows[0]["lr_scaling"] != "none":
            raise ValueError(f"{path} has no recipe for {threads} threads with the learning rate as run")
        row = rows[0]
        return Spec(row["batch_size"], row["learning_rate"], row["lr_warmup"], SEEDS[0],
                    f"best at {threads} threads", row["precision"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    except (KeyError, TypeError) as e:  # JSON, but not as table writes it
        raise ValueError(f"{path} is not a recipes file as table writes it ({type(e).__name__}: {e})") from None


def full_run_summary(evals, every=CHAR_RNN_EVAL_EVERY):
    """Best and final validation loss of a full run's curve, and the best as char-rnn would
    have seen it (evaluating every `every` iterations and at the last)."""
    last = evals[-1]
    seen = [e for e in evals if e[0] % every == 0 or e is last]
    best, best_seen = min(evals, key=lambda e: e[2]), min(seen, key=lambda e: e[2])
    return {"iterations": last[0], "epochs": last[1], "train_seconds": last[3],
            "final_val_loss": last[2], "best_val_loss": best[2], "best_at_iteration": best[0],
            "best_at_epoch": best[1],
            "char_rnn_evaluations": {"every": every, "best_val_loss": best_seen[2],
                                     "best_at_iteration": best_seen[0]},
            "evaluations": [list(e) for e in evals]}


def median_ms(metrics_log):
    """The median iteration's milliseconds: what a run takes per iteration, whatever paused it
    (a stopped process counts its pause in the iteration it stopped in)."""
    return statistics.median(r["ms_per_iteration"] for r in metrics.read_rows(metrics_log)
                             if r["ms_per_iteration"] is not None)


def decay_flags(decay):
    """The trainer's flags for a (rate per epoch, after epoch) learning-rate decay."""
    rate, after = decay
    return ["--learning_rate_decay", f"{rate:g}", "--learning_rate_decay_after", str(after)]


def full_run_one(spec, chars, directory, log=print, decay=CHAR_RNN_DECAY):
    """`spec` trained for FULL_EPOCHS at FULL_THREADS with the learning-rate `decay` (resumed
    from its checkpoint when an earlier invocation was cut off; not trained again when its log
    already reaches the last iteration). Returns its record; wall seconds add up across
    invocations."""
    directory.mkdir(parents=True, exist_ok=True)
    metrics_log = Path(metrics.log_path(str(directory), "run"))
    total = FULL_EPOCHS * iterations_per_epoch(spec.batch, chars)
    evals = read_evals(metrics_log)
    wall_file = directory / "wall_seconds"
    status = 0
    if not evals or evals[-1][0] < total:
        resume = any(directory.glob("lm_run_*.npz"))
        cmd = train_command(spec, chars, directory, resume, threads=FULL_THREADS, epochs=FULL_EPOCHS,
                            every=FULL_EVAL_EVERY) + decay_flags(decay)
        log(f"start {spec.run_id} for {FULL_EPOCHS} epochs ({total} iterations){' resuming' if resume else ''}")
        started = time.perf_counter()
        with open(directory / "stdout.txt", "a") as stdout:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=stdout, stderr=subprocess.STDOUT)
            # SIGTERM checkpoints the trainer (a later invocation resumes) instead of orphaning it
            previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
            status = proc.wait()
            signal.signal(signal.SIGTERM, previous)
        wall = time.perf_counter() - started + (float(wall_file.read_text()) if wall_file.exists() else 0.0)
        wall_file.write_text(f"{wall}\n")
        evals = read_evals(metrics_log)
        if status not in (0, EXIT_DIVERGED):
            raise RuntimeError(f"{spec.run_id} ended with exit status {status} (see {directory / 'stdout.txt'}); "
                               f"full-run again resumes it")
    shown = train_command(spec, chars, f"cv/time-to-loss/full-run/{directory.name}", threads=FULL_THREADS,
                          epochs=FULL_EPOCHS, every=FULL_EVAL_EVERY) + decay_flags(decay)
    record = {**asdict(spec), "run_id": spec.run_id, "threads": FULL_THREADS,
              "learning_rate_decay": decay[0], "learning_rate_decay_after": decay[1],
              "command": "python " + " ".join(shown[1:]),
              "median_ms_per_iteration": median_ms(metrics_log),
              "seconds_note": "1 thread on a machine shared with other work, which may pause it: train and "
                              "wall seconds include any pause; the median iteration does not",
              "completed": bool(evals) and evals[-1][0] == total,
              "diverged": status == EXIT_DIVERGED,
              "wall_seconds": float(wall_file.read_text()) if wall_file.exists() else None,
              **full_run_summary(evals)}
    log(f"done {spec.run_id}: best val {record['best_val_loss']:.4f} at epoch {record['best_at_epoch']:.2f}, "
        f"final {record['final_val_loss']:.4f}, {record['iterations']} iterations, "
        f"{record['train_seconds']:.0f} s training")
    return record


def full_run(out, work, log=print):
    """The study's best 2-thread recipe (annealed by FAST_DECAY) and char-rnn's recipe (float32,
    batch 50, 2e-3, char-rnn's decay), each trained for char-rnn's 50 epochs with char-rnn's
    other defaults, one after the other: the bar is a best validation loss no worse than
    char-rnn's recipe's. Writes OUT/full-run.json."""
    chars = corpus_chars()
    best = recipe_spec(out)
    rate, after = FAST_DECAY
    runs = {"best": full_run_one(best, chars, work / "full-run" / f"{best.run_id}-decay{rate:g}-after{after}", log,
                                 FAST_DECAY)}
    char_rnn = Spec(CHAR_RNN_BATCH, CHAR_RNN_LR, 0, SEEDS[0], "char-rnn")
    runs["char-rnn"] = full_run_one(char_rnn, chars, work / "full-run" / char_rnn.run_id, log)
    best, ref = runs["best"], runs["char-rnn"]
    record = {"epochs": FULL_EPOCHS, "threads": FULL_THREADS, "eval_val_every": FULL_EVAL_EVERY,
              "machine": this_machine(), "load_average_after": os.getloadavg()[0],
              "command": "python bench/time_to_loss.py full-run",
              "best_minus_char_rnn": {
                  "best_val_loss": best["best_val_loss"] - ref["best_val_loss"],
                  "final_val_loss": best["final_val_loss"] - ref["final_val_loss"],
                  "best_val_loss_at_char_rnn_evaluations": (best["char_rnn_evaluations"]["best_val_loss"]
                                                            - ref["char_rnn_evaluations"]["best_val_loss"])},
              "best_no_worse_than_char_rnn": best["best_val_loss"] <= ref["best_val_loss"],
              "runs": runs}
    write_json(out / "full-run.json", record)
    diff = record["best_minus_char_rnn"]["best_val_loss"]
    log(f"best recipe's best val {best['best_val_loss']:.4f} against char-rnn's {ref['best_val_loss']:.4f}: "
        f"{abs(diff):.4f} {'worse' if diff > 0 else 'better or equal'}; wrote {out / 'full-run.json'}")
    return record


def full_run_markdown(record):
    """results.md's section on full-run.json."""
    lines = [f"| run | batch | learning rate | warm-up (it) | decay per epoch, after epoch | precision | iterations | "
             f"best val (epoch) | best val at char-rnn's evaluations (every {CHAR_RNN_EVAL_EVERY}) | final val | "
             f"training seconds (pauses included) | median ms per iteration |",
             "|" + "---|" * 12]
    for name, r in record["runs"].items():
        decay = f"{r.get('learning_rate_decay', CHAR_RNN_DECAY[0]):g}, {r.get('learning_rate_decay_after', CHAR_RNN_DECAY[1])}"
        lines.append(f"| {name} | {r['batch']} | {r['learning_rate']:.4g} | {r['warmup']} | {decay} | {r['precision']} | "
                     f"{r['iterations']} | {r['best_val_loss']:.4f} ({r['best_at_epoch']:.1f}) | "
                     f"{r['char_rnn_evaluations']['best_val_loss']:.4f} | {r['final_val_loss']:.4f} | "
                     f"{r['train_seconds']:.0f} | {_fmt(r.get('median_ms_per_iteration'), 1)} |")
    diff = record["best_minus_char_rnn"]["best_val_loss"]
    verdict = ("no worse than char-rnn's recipe's" if diff <= 0 else f"{diff:.4f} worse than char-rnn's recipe's")
    return (f"{record['epochs']} epochs each, {record['threads']} thread, validation every "
            f"{record['eval_val_every']} iterations (`python bench/time_to_loss.py full-run`, full-run.json):\n\n"
            + "\n".join(lines) + f"\n\nThe best recipe's best validation loss is {verdict}.")


def point_list(text):
    """'50:1:1:bf16,100:2:1:fp32' -> [(50, 1, 1, 'bf16'), (100, 2, 1, 'fp32')]."""
    try:
        points = [(int(b), int(t), int(r), p) for b, t, r, p in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not batch:threads:ranks:precision,...: {text!r}") from None
    if any(min(b, t, r) < 1 or p not in PRECISIONS for b, t, r, p in points):
        raise argparse.ArgumentTypeError(f"counts must be positive and precisions of {', '.join(PRECISIONS)}: {text!r}")
    return points


def main(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "measure-speed", "table", "validate", "full-run"))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--work", type=Path, default=WORK, help="checkpoints and metrics logs of the runs")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each at 1 thread)")
    p.add_argument("--threads", type=int, default=2, help="validate: the thread count to check")
    p.add_argument("--ranks", type=int, default=1, help="validate: MPI ranks of 1 thread each instead")
    p.add_argument("--again", type=point_list, metavar="B:T:R:P,...",
                   help="measure-speed: only these points again (batch:threads:ranks:precision), keeping the rest")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure-speed --again: measure the points this many times in turn, keep each one's median")
    args = p.parse_args(argv)
    if args.action == "run":
        run_study(args.out, args.work, args.jobs, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
    elif args.action == "measure-speed":
        if args.rounds < 1:
            p.error(f"--rounds must be positive, got {args.rounds}")
        if args.again:
            measure_speed(args.out, args.again, again=True, rounds=args.rounds)
        else:
            bf16_here = native_bf16()
            measure_speed(args.out, speed_layouts(bf16=bf16_here))
            if bf16_here:
                measure_speed(args.out, ratio_layouts(), again=True, rounds=RATIO_ROUNDS)
    elif args.action == "validate":
        validate(args.out, args.threads, args.ranks)
    elif args.action == "full-run":
        try:
            full_run(args.out, args.work, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
        except (OSError, ValueError) as e:  # no recipes.json, or not one with the recipe: bad input
            p.exit(2, f"{p.prog}: full-run: {e}\n")
        except RuntimeError as e:  # a run that failed (it resumes next time)
            p.exit(1, f"{p.prog}: full-run: {e}\n")
    else:
        write_tables(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
