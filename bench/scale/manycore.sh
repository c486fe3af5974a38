#!/usr/bin/env bash
# The scaling study on a bare many-core machine, in one command.
#
#   bash bench/scale/manycore.sh bundle   here (after `make install`): MKL's libraries from the venv's
#                                         mkl wheel, xz-compressed, and native/build's pieces into
#                                         bench/manycore-bundle/ (git-ignored; carry it with the tree)
#   bash bench/scale/manycore.sh          there: unpack, warm numba's cache once, measure, collect
#
# "There" is a machine with Python (numpy, numba, threadpoolctl, tqdm, matplotlib) and no MKL,
# no libxsmm, no package index. The study writes results/scale-<cpu model>-<cores>c/. Its
# parts run most important first and stop at a deadline (MANYCORE_BUDGET_S, default 450 s
# after the start), so a slow machine still leaves a collected, smaller study. On a CPU with
# native bfloat16 (avx512_bf16 or amx_bf16, as phi_rnn.bf16 sees it) the char-rnn config is also
# measured in bf16 right after the parts the model needs; then the batch sizes that
# results/time-to-loss/recipes.json picks for 16 threads (fp32, and bf16 where native).
#
# Environment: PYTHON (default python3), THREADS (default 1,2,4,8,12,16, capped at the cores
# this process may use), MANYCORE_BUDGET_S, MANYCORE_QUICK=1 (a few iterations: the proof run),
# MANYCORE_PARTS=N (the first N parts only; 3: what the model needs, bf16 and the recipes' batch
# sizes next), ROUNDS=N (every part N
# times, merged point by point by bench/scale/rounds.py: on a shared machine whose speed drifts).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUNDLE_DIR=$ROOT/bench/manycore-bundle
ARCHIVE=$BUNDLE_DIR/mkl.tar.xz
UNPACKED=$ROOT/bench/manycore-unpacked  # not in the bundle: carry bench/manycore-bundle alone
PYTHON=${PYTHON:-python3}
# MKL's single dynamic library, the interface and GNU-OpenMP threading layers it loads, and
# the CPU paths a 16-core x86-64 server takes: def (AMD, and any CPU MKL does not tune
# for), avx2, avx512 (Intel). LD_DEBUG=files showed nothing else loaded for sgemm.
MKL_LIBS=(libmkl_rt libmkl_intel_lp64 libmkl_gnu_thread libmkl_core libmkl_def libmkl_avx2 libmkl_avx512)

say() { echo "manycore: $*" >&2; }
die() { say "error: $*"; exit 2; }

build_bundle() {
    local venv_python=${VENV_PYTHON:-$ROOT/.venv/bin/python}
    [ -x "$venv_python" ] || die "no $venv_python: run make install first"
    [ -f "$ROOT/native/build/libsmall_gemm.so" ] && [ -x "$ROOT/native/build/affinity_probe" ] \
        || die "native/build is incomplete: make native (with libxsmm installed)"
    mkdir -p "$BUNDLE_DIR/native"
    # the native pieces change with the code: plain copies, refreshed every time
    cp "$ROOT/native/build/libsmall_gemm.so" "$ROOT/native/build/affinity_probe" "$BUNDLE_DIR/native/"
    local mkl_rt version
    mkl_rt=$("$venv_python" -c 'from phi_rnn.blas import MKL_RT_PATH; print(MKL_RT_PATH)')
    # the stamp names the layout too: a bundle of another layout is rebuilt
    version="$("$venv_python" -c 'from phi_rnn.blas import mkl_version; print(mkl_version())'), libgomp apart"
    # MKL changes with the wheel only, and compressing it takes minutes: kept while its version is
    if [ -f "$ARCHIVE" ] && [ "$(cat "$BUNDLE_DIR/MKL_VERSION" 2>/dev/null)" = "$version" ]; then
        say "kept $ARCHIVE (MKL $version); refreshed native/"
        return
    fi
    local stage
    stage=$(mktemp -d)
    trap "rm -rf '$stage'" EXIT
    mkdir -p "$stage/lib"
    for lib in "${MKL_LIBS[@]}"; do
        cp "$(dirname "$mkl_rt")/$lib".so.* "$stage/lib/" || die "$lib not found next to $mkl_rt"
    done
    # libgomp for a machine without one (numba's omp layer and MKL's GNU layer both need it),
    # in a folder of its own: MKL loads a libgomp from its own folder before the process's,
    # and two OpenMP runtimes in one process are two thread pools fighting for the cores
    mkdir -p "$stage/gomp"
    cp "$(gcc -print-file-name=libgomp.so.1)" "$stage/gomp/" 2>/dev/null || true
    # the x86 filter and a dictionary as large as the biggest library: the CPU-path
    # libraries share much of their code
    tar -C "$stage" -cf - . | xz --x86 --lzma2=preset=9e,dict=128MiB -T1 > "$ARCHIVE.tmp"
    mv "$ARCHIVE.tmp" "$ARCHIVE"
    echo "$version" > "$BUNDLE_DIR/MKL_VERSION"
    say "wrote $ARCHIVE ($(du -m "$ARCHIVE" | cut -f1) MB): MKL $version, ${MKL_LIBS[*]}; native/: libsmall_gemm.so, affinity_probe"
}

unpack_bundle() {
    [ -f "$ARCHIVE" ] || die "no $ARCHIVE: build it with 'bash bench/scale/manycore.sh bundle' where make install works, and carry it"
    if [ ! -f "$UNPACKED/.done" ] || [ "$ARCHIVE" -nt "$UNPACKED/.done" ]; then
        rm -rf "$UNPACKED"
        mkdir -p "$UNPACKED"
        # Python's lzma, not xz(1): the one tool every such machine has
        "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="data")' \
            "$ARCHIVE" "$UNPACKED"
        touch "$UNPACKED/.done"
    fi
    # phi_rnn looks for its native pieces in native/build (git-ignored, so never carried)
    # (a new file renamed into place: a process running from the old one keeps its copy)
    mkdir -p "$ROOT/native/build"
    local name
    for name in affinity_probe libsmall_gemm.so; do
        if ! cmp -s "$BUNDLE_DIR/native/$name" "$ROOT/native/build/$name"; then
            cp "$BUNDLE_DIR/native/$name" "$ROOT/native/build/.$name.tmp"
            mv "$ROOT/native/build/.$name.tmp" "$ROOT/native/build/$name"
        fi
    done
    export PHI_RNN_MKL_RT
    PHI_RNN_MKL_RT=$(ls "$UNPACKED"/lib/libmkl_rt.so.*)
    # phi_rnn measures once which GEMM library is fastest here and keeps the answer there
    export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$UNPACKED/cache}
    if ! "$PYTHON" -c 'import ctypes.util, sys; sys.exit(ctypes.util.find_library("gomp") is None)'; then
        say "no libgomp on this machine: using the bundle's"
        export LD_LIBRARY_PATH=$UNPACKED/gomp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
}

check_python() {
    "$PYTHON" -c 'import numpy, numba, threadpoolctl, tqdm, matplotlib' 2>/dev/null \
        || die "$PYTHON lacks one of numpy, numba, threadpoolctl, tqdm, matplotlib"
}

# MKL dies at its first GEMM when the CPU path it wants is not in the bundle (libmkl_avx10 on
# the newest Xeons): cap it at the paths bundled, and say so.
check_mkl() {
    local probe='import ctypes, os, numpy as np
mkl = ctypes.CDLL(os.environ["PHI_RNN_MKL_RT"])
a = np.ones((64, 64), np.float32); c = np.zeros_like(a)
p = lambda x: x.ctypes.data_as(ctypes.c_void_p)
mkl.cblas_sgemm(101, 111, 111, 64, 64, 64, ctypes.c_float(1), p(a), 64, p(a), 64, ctypes.c_float(0), p(c), 64)
assert c[0, 0] == 64'
    if MKL_THREADING_LAYER=GNU "$PYTHON" -c "$probe" 2>/dev/null; then return; fi
    for isa in AVX512 AVX2; do
        if MKL_ENABLE_INSTRUCTIONS=$isa MKL_THREADING_LAYER=GNU "$PYTHON" -c "$probe" 2>/dev/null; then
            say "MKL's code path for this CPU is not bundled: MKL_ENABLE_INSTRUCTIONS=$isa"
            export MKL_ENABLE_INSTRUCTIONS=$isa
            return
        fi
    done
    die "MKL from the bundle cannot run a GEMM here: $(MKL_THREADING_LAYER=GNU "$PYTHON" -c "$probe" 2>&1 | tail -1)"
}

# libsmall_gemm.so was built here; on a machine whose C library is older it cannot load:
# then every GEMM runs on MKL and the libxsmm comparison is left out.
check_libxsmm() {
    if "$PYTHON" -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$ROOT/native/build/libsmall_gemm.so" 2>/dev/null; then
        LIBXSMM=1
    else
        say "libsmall_gemm.so does not load here ($("$PYTHON" -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$ROOT/native/build/libsmall_gemm.so" 2>&1 | tail -1)): MKL only"
        rm -f "$ROOT/native/build/libsmall_gemm.so"
        LIBXSMM=0
    fi
}

# The native bfloat16 features phi_rnn may use here, space-separated; empty where none (the
# reason is said once, on stderr). After unpack_bundle: phi_rnn.bf16 loads the bundle's MKL.
bf16_features() {
    "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1])
from bench.side_by_side import bf16_support
s = bf16_support()
print(" ".join(s["native"]))
if s["refusal"]: print("manycore: no bf16 parts:", s["refusal"], file=sys.stderr)' "$ROOT" || true
}

# The configs of the batch sizes results/time-to-loss/recipes.json picks for 16 threads, as
# LAYERSxSIZE-bBATCH of char-rnn's network, comma-separated; char-rnn's own batch is left out
# (its part measures it), and so is everything when the file is absent or unreadable.
recipe_configs() {
    "$PYTHON" -c 'import json, sys
try:
    recipes = json.load(open(sys.argv[1]))["recipes"]
    batches = sorted({int(r["batch_size"]) for r in recipes if r.get("threads") == 16} - {50})
except (OSError, ValueError, KeyError, TypeError):
    batches = []
print(",".join(f"2x128-b{b}" for b in batches))' "$ROOT/results/time-to-loss/recipes.json" 2>/dev/null || true
}

usable_cores() {
    "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from bench.scale.points import physical_cores; print(physical_cores())' "$ROOT"
}

# THREADS with every count above the usable cores dropped
thread_counts() {
    local cores=$1 out=() t
    IFS=, read -ra wanted <<< "${THREADS:-1,2,4,8,12,16}"
    for t in "${wanted[@]}"; do [ "$t" -le "$cores" ] && out+=("$t"); done
    (IFS=,; echo "${out[*]}")
}

run_study() {
    local start=$SECONDS budget=${MANYCORE_BUDGET_S:-450}
    check_python
    unpack_bundle
    check_mkl
    check_libxsmm
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    local cores threads top scale=("$PYTHON" -m bench.scale)
    cores=$(usable_cores)
    threads=$(thread_counts "$cores")
    top=${threads##*,}
    [ -n "$threads" ] || die "no thread count of ${THREADS:-1,2,4,8,12,16} fits the $cores usable cores"
    local out
    out=$("${scale[@]}" --print-out)
    say "$cores usable cores; threads $threads; results in ${out#"$ROOT"/}"

    # numba compiles every kernel once (~15-25 s) into phi_rnn's cache, and the model's
    # parts (bench/scale/parts.py, measured at more than one thread); each point then starts from
    # the cache
    say "warming numba's cache"
    local strategy
    for strategy in batch gemm; do
        "$PYTHON" "$ROOT/bench/speed.py" --rnn_size 16 --num_layers 1 --batch_size 4 --seq_length 8 \
            --iters 1 --warmup 1 --threads "${threads%%,*}" --no-torch --json --strategy $strategy > /dev/null
        "$PYTHON" "$ROOT/bench/speed.py" --rnn_size 16 --num_layers 1 --batch_size 4 --seq_length 8 \
            --iters 1 --warmup 1 --threads "$top" --no-torch --json --strategy $strategy --parts > /dev/null
    done
    local bf16 recipes precisions=fp32
    bf16=$(bf16_features)
    if [ -n "$bf16" ]; then
        precisions=fp32,bf16
        say "native bfloat16 ($bf16): bf16 parts too"
        local t
        for t in "${threads%%,*}" "$top"; do  # one thread runs the serial kernels, more the parallel ones
            "$PYTHON" "$ROOT/bench/speed.py" --rnn_size 16 --num_layers 1 --batch_size 4 --seq_length 8 \
                --iters 1 --warmup 1 --threads "$t" --no-torch --json --precision bf16 > /dev/null
        done
    fi
    recipes=$(recipe_configs)

    local quick=()
    [ "${MANYCORE_QUICK:-0}" = 1 ] && quick=(--iters 2 --warmup 1)
    # most important first; each part is skipped once the budget is spent
    local parts=(
        "char-rnn strong scaling, batch and gemm|--configs char-rnn --strategies batch,gemm --threads $threads --iters 20 --warmup 3"
        "char-rnn block series: b batch rows on one core, b = ceil(50 / threads) (the model's R(b))|--configs 2x128-b1,2x128-b2,2x128-b4,2x128-b5,2x128-b7,2x128-b8,2x128-b13,2x128-b25 --strategies batch --threads 1 --iters 20 --warmup 3"
        "weak scaling, batch 8 per thread|--configs 2x128-b8 --scaling weak --strategies batch,gemm --threads $threads --iters 20 --warmup 3"
    )
    # after the parts the model needs: bf16 is measured only (the model is float32's)
    [ -z "$bf16" ] || parts+=("char-rnn in bf16 at every thread count|--configs char-rnn --strategies batch \
--precisions bf16 --threads $threads --iters 20 --warmup 3")
    [ -z "$recipes" ] || parts+=("the batch sizes recipes.json picks for 16 threads ($recipes), $precisions|--configs \
$recipes --strategies batch --precisions $precisions --threads $threads --iters 20 --warmup 3")
    parts+=(
        "compact vs scatter at $top threads|--configs char-rnn --strategies batch --policies scatter --threads $top --iters 20 --warmup 3"
        "MKL vs libxsmm at 1 and $top threads|--configs char-rnn --strategies batch --blas mkl --threads 1,$top --iters 20 --warmup 3"
        "MKL's block at $top threads on one core (the model's R(b) for MKL)|--configs 2x128-b$(((50 + top - 1) / top)) --strategies batch --blas mkl --threads 1 --iters 20 --warmup 3"
        "3x512 batch 128 strong scaling, batch and gemm|--configs 3x512-b128 --strategies batch,gemm --threads $threads --iters 3 --warmup 1"
        "3x512 block series, b = ceil(128 / threads)|--configs 3x512-b1-s100,3x512-b2-s100,3x512-b8-s100,3x512-b11-s100,3x512-b16-s100,3x512-b32-s100,3x512-b64-s100 --strategies batch --threads 1 --iters 2 --warmup 1"
    )
    local rounds=${ROUNDS:-1} round part label args left dest
    parts=("${parts[@]:0:${MANYCORE_PARTS:-${#parts[@]}}}")
    for ((round = 1; round <= rounds; round++)); do
        dest=$out
        [ "$rounds" = 1 ] || dest=$out/rounds/r$round
        for part in "${parts[@]}"; do
            label=${part%%|*}
            read -ra args <<< "${part#*|}"
            [ "$LIBXSMM" = 1 ] || [[ "$label" != MKL* ]] || { say "skipped (no libxsmm): $label"; continue; }
            left=$((budget - (SECONDS - start)))
            if [ "$left" -lt 10 ]; then say "budget spent, skipped: $label"; continue; fi
            say "round $round/$rounds: $label ($left s left; load $(cut -d' ' -f1-3 /proc/loadavg))"
            # the study stops cleanly on SIGTERM: the running point leaves no file, the rest stay
            timeout -s TERM "$left" "${scale[@]}" "${args[@]}" "${quick[@]}" --timeout "$left" --no-report --out "$dest" \
                || say "part ended with status $?: $label"
        done
    done
    [ "$rounds" = 1 ] || "$PYTHON" -m bench.scale.rounds "$out"
    "${scale[@]}" --collect "$out"
    say "done in $((SECONDS - start)) s: ${out#"$ROOT"/}"
}

case "${1:-run}" in
    bundle) build_bundle ;;
    run) run_study ;;
    *) die "usage: bash bench/scale/manycore.sh [bundle|run]" ;;
esac
