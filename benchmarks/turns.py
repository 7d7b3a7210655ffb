"""Candidates taking turns on the same work, for the benchmarks that pick between implementations
(``json_decoders.py``, ``output_encoders.py``): imported by them, not run on its own."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Mapping


def take_turns(runs: Mapping[str, Callable[[], object]], rows: int, rounds: int, baseline: str) -> dict:
    """Each of ``runs`` (one pass over ``rows`` rows) in turn, ``rounds`` times, one line per round on
    stderr. Returns rows/s per round, their medians, and each median's ratio to ``baseline``'s."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            rates[name].append(rows / (time.perf_counter() - started))
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {r[-1]:,.0f}" for n, r in rates.items()), file=sys.stderr, flush=True)
    medians = {name: round(statistics.median(r)) for name, r in rates.items()}
    return {
        "rows_per_s": rates, "median_rows_per_s": medians,
        f"vs_{baseline}": {name: round(m / medians[baseline], 3) for name, m in medians.items()},
    }
