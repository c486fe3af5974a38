"""A study measured in rounds, merged into one: for every point (and every region cost) the
round whose median is the median over the rounds.

    python -m bench.scale.rounds OUT      # OUT/rounds/r1, r2, ... -> OUT/points, OUT/regions,
                                          # and OUT/rounds/validation.md

On a shared machine the speed of a core drifts over minutes (other tenants, the host), while
the points of one round are measured seconds apart: the model compares points with parts
measured minutes earlier, so one round's drift reads as model error. bench/scale/manycore.sh
(ROUNDS=N) runs the same parts N times, one after another, and merges them here. The merged
point is one real measurement (the median round's, not an average of rounds); its record
keeps every round's median in `round_medians_ms`.

The model is also validated round by round (each round's points against that round's
parts, all measured within a minute or two): validation.md lists every point's error in
each round and their median, the error with the drift between rounds taken out.
"""
import json
import shutil
import statistics
import sys
from pathlib import Path

from phi_rnn.cli import OneLineErrorParser  # one-line errors, exit 2; starts no runtime

from .collect import collect
from .model import VALIDATION_BAR
from .run import json_files, write_atomic, write_json_atomic

PROG = "bench.scale.rounds"


def round_directories(out):
    return sorted(p for p in (out / "rounds").glob("r*") if p.is_dir())


def median_record(records, value):
    """The record whose value(record) is the median (the lower one of an even count)."""
    ordered = sorted(records, key=value)
    return ordered[(len(ordered) - 1) // 2]


def merge(out):
    """Merge OUT/rounds/*/{points,regions} into OUT/{points,regions}; returns
    (points merged, rounds found)."""
    rounds = round_directories(out)
    merged = 0
    for sub, value in (("points", lambda r: r["result"]["phi_rnn"]["median_ms"]),
                       ("regions", lambda r: r["region_us"])):
        by_name = {}
        for directory in rounds:
            for path in json_files(directory / sub):
                by_name.setdefault(path.name, []).append(json.loads(path.read_text()))
        for name, records in by_name.items():
            chosen = dict(median_record(records, value))
            if sub == "points":
                chosen["round_medians_ms"] = [value(r) for r in records]
                merged += 1
            write_json_atomic(out / sub / name, chosen)
    if not (out / "machine.json").exists():
        shutil.copy(rounds[0] / "machine.json", out / "machine.json")
    return merged, len(rounds)


def validate_rounds(out):
    """Collect every round on its own; write OUT/rounds/validation.{json,md} with each
    point's model error per round and the median; returns {key: [errors]}."""
    errors = {}
    rounds = round_directories(out)
    for directory in rounds:
        rows, _, _ = collect(directory)
        for row in rows:
            if row.get("model_error") is not None:
                errors.setdefault(row["key"], []).append(row["model_error"])
        for report in ("results.csv", "results.json", "results.md", "*.png"):  # one set: OUT's
            for path in directory.glob(report):
                path.unlink()
    write_json_atomic(out / "rounds" / "validation.json", errors)
    lines = ["# The model, validated round by round", "",
             f"Each round's points against the parts measured in the same round ({len(rounds)} "
             "rounds); the median over the rounds is the error with the drift between rounds "
             f"taken out. The bar is {VALIDATION_BAR:.0%}.", "",
             "| point | " + " | ".join(d.name for d in rounds) + " | median |",
             "|---|" + "---|" * (len(rounds) + 1)]
    for key, errs in sorted(errors.items()):
        cells = [f"{100 * e:+.1f}%" for e in errs] + [""] * (len(rounds) - len(errs))
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {100 * statistics.median(errs):+.1f}% |")
    within = sum(abs(statistics.median(e)) <= VALIDATION_BAR for e in errors.values())
    lines += ["", f"{within} of {len(errors)} points within {VALIDATION_BAR:.0%} (median over rounds)."]
    write_atomic(out / "rounds" / "validation.md", "\n".join(lines) + "\n")
    return errors


def main(argv=None):
    parser = OneLineErrorParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, metavar="OUT", help="the study's directory, holding rounds/r1, r2, ...")
    out = parser.parse_args(argv).out
    if not round_directories(out):
        parser.error(f"no {out / 'rounds'}/r* directories")
    merged, rounds = merge(out)
    errors = validate_rounds(out)
    within = sum(abs(statistics.median(e)) <= VALIDATION_BAR for e in errors.values())
    print(f"merged {merged} points from {rounds} rounds into {out}; the model, round by round: "
          f"{within} of {len(errors)} points within {VALIDATION_BAR:.0%} (median error; {out / 'rounds' / 'validation.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
