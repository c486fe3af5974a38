"""Corpora of any size: time to the first training iteration and private memory, first run
(encoding) and cached run, on synthetic corpora of growing size.

    python bench/corpus.py                                  # 10 MB, 100 MB, 1 GB; ascii and multibyte
    python bench/corpus.py --sizes 10G --kinds ascii        # needs ~2.1x the size free on --dir
    python bench/corpus.py --sizes 10M --json

Each corpus is tiny-shakespeare repeated to the size (ascii), or the same text with its
letters moved to 2-, 3- and 4-byte UTF-8 characters (multibyte: Cyrillic lower case, CJK
upper case, an emoji for each 'E'). Each run is the real CLI, `python -m phi_rnn train`
(char-rnn's default model, 2 iterations, one validation batch), in a fresh process; this
script reads its output as it comes and samples its /proc/PID/status every 10 ms:
private memory is RssAnon (what the process itself allocated; the memory-mapped token
cache and the page cache are file pages, RssFile, shared and evictable, reported apart).
"corpus load" is the corpus's own share of a cached run, timed in this process: open the
cache, build the loader, gather the first batch. The rest of a run's start (Python,
numba's cached kernels, MKL, the thread placement check) does not depend on the corpus.
The corpus files and their caches are deleted afterwards unless --keep.
"""
import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from phi_rnn import affinity  # noqa: E402  (light: starts no runtime)
from phi_rnn.cli import OneLineErrorParser  # noqa: E402  (one-line errors, exit 2; starts no runtime)

SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare", "input.txt")
UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}
MULTIBYTE = {**{ord(c): 0x430 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")},  # 2 bytes
             **{ord(c): 0x4E00 + i for i, c in enumerate("ABCDFGHIJKLMNOPQRSTUVWXYZ")},  # 3 bytes
             ord("E"): 0x1F600}  # 4 bytes


def parse_size(text):
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r}: a number with K, M or G")
    return int(float(match.group(1)) * UNITS.get(match.group(2), 1))


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10M,100M,1G", help="corpus sizes in bytes (K, M, G = 10^3, 10^6, 10^9)")
    p.add_argument("--kinds", default="ascii,multibyte", help="ascii and/or multibyte")
    p.add_argument("--dir", default=None, help="where to write the corpora (default: a temp directory)")
    p.add_argument("--threads", type=int, default=None, help="threads of the training runs (default: all)")
    p.add_argument("--keep", action="store_true", help="keep the corpora and their caches")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.kinds = args.kinds.split(",")
    if not set(args.kinds) <= {"ascii", "multibyte"}:
        p.error(f"--kinds: ascii and/or multibyte, not {','.join(args.kinds)}")
    return args


def make_corpus(path, kind, size):
    """tiny-shakespeare (translated for multibyte) repeated to `size` bytes, cut at a line end."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    block = (text.translate(MULTIBYTE) if kind == "multibyte" else text).encode()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        rest = block[:size % len(block)]
        f.write(rest[:rest.rfind(b"\n") + 1])
        f.flush()
        os.fsync(f.fileno())  # on disk, as a real corpus is: the first run does not pay its writeback


def machine():
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    import numba
    import numpy
    topo = affinity.read_topology().to_dict()
    return {"cpu": topo["model_name"], "logical_cpus": topo["logical_cpus"], "cores": topo["cores"],
            "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "cpu_flags": " ".join(f for f in ("avx2", "avx512f", "avx512bw", "sha_ni") if f in flags),
            "versions": {"python": platform.python_version(), "numpy": numpy.__version__,
                         "numba": numba.__version__, "kernel": platform.release()}}


def _status_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_training(data_dir, checkpoint_dir, threads):
    """One `phi_rnn train` run: seconds to its first iteration line, encode MB/s (when it
    encoded), peak RssAnon and RssFile (MB) from start to exit."""
    cmd = [sys.executable, "-m", "phi_rnn", "train", "--data_dir", data_dir, "--checkpoint_dir", checkpoint_dir,
           "--max_iters", "2", "--val_max_batches", "1", "--print_every", "1"]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    peak = {"RssAnon": 0, "RssFile": 0}

    def sample():
        while proc.poll() is None:
            for field in peak:
                peak[field] = max(peak[field], _status_kb(proc.pid, field))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first, rate, output = None, None, []
    for line in proc.stdout:
        output.append(line)
        if first is None and re.match(r"1/\d+ \(epoch", line):
            first = time.perf_counter() - t0
        found = re.search(r"^encoded .* \((\d+) MB/s\)", line)
        if found:
            rate = int(found.group(1))
    proc.wait()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"train exited {proc.returncode}:\n{''.join(output[-20:])}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {"first_iteration_s": first, "encode_mb_per_s": rate, "cpu_s": cpu,
            "peak_private_mb": peak["RssAnon"] / 1024, "peak_file_mb": peak["RssFile"] / 1024,
            "seconds": time.perf_counter() - t0}


def corpus_load_ms(path):
    """The corpus's own share of a cached run, in this process: open the cache, make the
    loader, gather the first batch (median of 5)."""
    from phi_rnn import data
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        corpus = data.load_corpus(path, log=lambda *a, **k: None)
        data.CharLoader(corpus.ids, 50, 50, 0.95, 0.05, len(corpus.vocab)).next_batch("train")
        times.append((time.perf_counter() - t0) * 1e3)
        del corpus
    return sorted(times)[2]


def measure(args, root):
    rows = []
    for kind in args.kinds:
        for size in args.sizes:
            data_dir = os.path.join(root, f"{kind}-{size}")
            os.makedirs(data_dir, exist_ok=True)
            path = os.path.join(data_dir, "input.txt")
            make_corpus(path, kind, size)
            # a corpus changed in the last 2 s is verified by hash on every run (data.RACY_NS);
            # a real corpus is older than that when it is trained on
            time.sleep(max(0.0, os.stat(path).st_ctime + 2.1 - time.time()))
            row = {"kind": kind, "bytes": os.path.getsize(path)}
            for run in ("first", "cached"):
                row[run] = run_training(data_dir, os.path.join(data_dir, "cv"), args.threads)
            row["cached"]["corpus_load_ms"] = corpus_load_ms(path)
            rows.append(row)
            if not args.keep:
                shutil.rmtree(data_dir)
            if not args.json:
                print_row(row, flush=True)
    return rows


def print_header(m, threads):
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['logical_cpus']} CPUs, {m['memory_gb']:.0f} GiB; "
          f"CPU flags: {m['cpu_flags']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print("load average (1, 5, 15 min) at the start: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    print(f"runs: python -m phi_rnn train (2 x 128 LSTM, batch 50, seq 50, 2 iterations, --val_max_batches 1), "
          f"threads {threads or 'all'}; private = peak RssAnon, file = peak RssFile")
    print("to 1st iteration: wall seconds from the start of the process to its first iteration line; cpu: "
          "CPU seconds (user + sys, all threads) of the whole run, which a loaded machine does not inflate much")
    print(f"{'corpus':>18} | {'first run: to 1st iteration':>27} {'cpu':>7} {'encode':>9} {'private':>9} {'file':>8} | "
          f"{'cached: to 1st iteration':>24} {'cpu':>7} {'private':>9} {'file':>8} {'corpus load':>12}")


def print_row(r, flush=False):
    f, c = r["first"], r["cached"]
    print(f"{r['kind']:>9} {r['bytes'] / 1e6:6.0f} MB | {f['first_iteration_s']:25.1f} s {f['cpu_s']:5.1f} s "
          f"{f['encode_mb_per_s'] or 0:4d} MB/s {f['peak_private_mb']:6.0f} MB {f['peak_file_mb']:5.0f} MB | "
          f"{c['first_iteration_s']:22.1f} s {c['cpu_s']:5.1f} s {c['peak_private_mb']:6.0f} MB "
          f"{c['peak_file_mb']:5.0f} MB {c['corpus_load_ms']:9.1f} ms", flush=flush)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(SHAKESPEARE):
        print(f"corpus.py: error: {SHAKESPEARE} is missing: make data", file=sys.stderr)
        return 2
    m = machine()
    if not args.json:
        print_header(m, args.threads)
    root = args.dir or tempfile.mkdtemp(prefix="phi_rnn-corpus-")
    free = shutil.disk_usage(root).free
    need = 2.1 * max(args.sizes)
    if free < need:
        print(f"corpus.py: error: {root} has {free / 1e9:.1f} GB free; the largest corpus and its cache need "
              f"{need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    try:
        rows = measure(args, root)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"machine": m, "threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
