"""Core-count scaling study: bench/speed.py once per point, each in a fresh process.

A point is (scaling, config, model, strategy, blas, policy, ranks, precision, threads); a point of more
than one MPI rank runs under `mpiexec -n RANKS` (bench/mpi_speed.py, the [mpi] extra) and
records the gradient allreduce's share of the iteration. Points are enumerated in a fixed
order, so that `--point K` names the same point in every job of a job array. Each finished
point is one JSON file under OUT/points/ (written atomically), so an interrupted study resumes
where it stopped and separate jobs can fill one directory; `--collect OUT` merges them into
results.csv/json/md, machine.json and PNG plots, with a model of the time per iteration built
from measured parts, checked against every point and extrapolated to many-core counts (float32's: bf16 points are measured and set beside their
float32 twins, never modelled; on a CPU without native bfloat16 they are left out).

    python -m bench.scale                                  # default study (a few minutes on 2 cores)
    python -m bench.scale --threads 1,2,4 --configs char-rnn,3x512 --scaling strong,weak
    python -m bench.scale --ranks 1,2 --threads 1,2        # ranks x threads: MPI data parallelism
    python -m bench.scale --precisions fp32,bf16           # bfloat16 too: measured, no model
    python -m bench.scale --list                           # the points, with their index
    python -m bench.scale --point 3 --out results/run1     # one point (job array task)
    python -m bench.scale --collect results/run1           # merge, no runs

The worker of every point is the benchmark a user runs, bench/speed.py (`--json --profile
--parts`): the study measures exactly what that command measures. The package's modules, one
job each:

    cli       the options and what to do with the points they name
    points    what a point is, and the fixed order of all of them
    machine   whose points they are (machine.json; another machine's study is refused)
    run       running a point in a fresh process group, its result file written atomically
    barrier   the cost of one parallel region (`python -m bench.scale.barrier`)
    parts     the model's parts measured inside a point's process (speed.py --parts)
    model     the model of time per iteration; predict_iteration_seconds for other studies
    collect   merging the point files into rows, results.csv and results.json
    report    results.md
    plot      speedup, efficiency and GFLOP/s plots
    rounds    a study measured in rounds merged into one (`python -m bench.scale.rounds OUT`)
    manycore.sh  the whole study on a bare many-core machine, in one command
"""
