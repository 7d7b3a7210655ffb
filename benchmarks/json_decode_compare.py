"""JSON decode rate of this checkout against another checkout of streamhydro, on the same events::

    git worktree add /tmp/streamhydro-base 000907b        # the previous round's code
    python benchmarks/json_decode_compare.py --other /tmp/streamhydro-base [--events 100000] [--rounds 3]

The demo model's events (``models/breast_cancer``, 30 float features, made by this checkout's load
generator: byte-identical to the previous round's) are written to a temporary file once; then each
checkout decodes them in its own Python process, in batches of 4096, taking turns for ``--rounds``
rounds, so both meet the same machine load. Each process imports its checkout's decoder: this one's
``make_decoder(manifest, PayloadSettings())``, the other's ``Decoder(manifest, "json")`` (the API before
the ``[payload]`` section). Prints one line per run and, last, one JSON line with every rate and the
ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

DECODE = """
import sys, time, pyarrow as pa
sys.path.insert(0, sys.argv[1])
from streamhydro.registry import Registry
manifest = Registry(sys.argv[1] + "/models").get("breast_cancer", "latest").manifest
try:
    from streamhydro.config import PayloadSettings
    from streamhydro.payload.formats import make_decoder
    decoder = make_decoder(manifest, PayloadSettings())
except ImportError:
    from streamhydro.payload.decoding import Decoder
    decoder = Decoder(manifest, "json")
values = [line.rstrip(b"\\n") for line in open(sys.argv[2], "rb")]
batches = [pa.array(values[i:i + 4096], pa.binary()) for i in range(0, len(values), 4096)]
started = time.perf_counter()
rows = sum(len(decoder.decode(batch).good) for batch in batches)
print(rows / (time.perf_counter() - started))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--other", type=Path, required=True, help="another checkout of streamhydro (e.g. a git worktree)")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from streamhydro.producer import make_values
    from streamhydro.registry import Registry

    manifest = Registry(REPO / "models").get("breast_cancer", "latest").manifest
    values = make_values(manifest, "json", args.events, np.random.default_rng(0))
    rates: dict[str, list[float]] = {"this": [], "other": []}
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as events:
        events.write(b"\n".join(values) + b"\n")
        events.flush()
        for round_ in range(args.rounds):
            for name, checkout in (("this", REPO), ("other", args.other.resolve())):
                done = subprocess.run(
                    [sys.executable, "-c", DECODE, str(checkout), events.name], capture_output=True, text=True, check=True, cwd="/"
                )
                rate = float(done.stdout.strip().splitlines()[-1])
                rates[name].append(round(rate, 1))
                print(f"round {round_ + 1} {name} ({checkout}): {rate:,.0f} rows/s", file=sys.stderr)
    medians = {name: statistics.median(found) for name, found in rates.items()}
    print(json.dumps({"events": args.events, "rows_per_s": rates, "median": medians,
                      "this_over_other": round(medians["this"] / medians["other"], 3)}))


if __name__ == "__main__":
    main()
