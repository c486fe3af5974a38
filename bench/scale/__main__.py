"""`python -m bench.scale` from the project directory; `python <project>/bench/scale` from
anywhere (a batch job's directory, which relative --out paths are read against)."""
import sys
from pathlib import Path

if not __package__:  # run by path: the project directory stands where the package's would
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from bench.scale.cli import main  # noqa: E402

sys.exit(main())
