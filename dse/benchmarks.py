"""Benchmark figures of the tool itself: ``python -m dse.benchmarks [SECTION ...]``.

Each section is a function registered in :data:`SECTIONS` (``@section("name")``) that returns lines of
text; with no argument every section runs. Figures are measured side by side in one run (the machine
may be shared, so ratios and medians, never single timings).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

SectionFn = Callable[[], list[str]]
SECTIONS: dict[str, SectionFn] = {}


def section(name: str) -> Callable[[SectionFn], SectionFn]:
    """Register ``fn() -> list of lines`` as benchmark section ``name``."""

    def deco(fn: SectionFn) -> SectionFn:
        SECTIONS[name] = fn
        return fn

    return deco


def median_seconds(fn: Callable[[], object], *, repeat: int = 7, min_time_s: float = 0.2) -> float:
    """Median seconds per call of ``fn``: ``repeat`` rounds, each of enough calls to last ``min_time_s``."""
    fn()  # warm-up
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - t0 >= min_time_s / 4 or calls >= 1 << 20:
            break
        calls *= 2
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls)
    rounds.sort()
    return rounds[len(rounds) // 2]


@section("cost")
def cost_section() -> list[str]:
    from dse.cost_bench import benchmark_lines

    return benchmark_lines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dse.benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"sections to run (default: all of {', '.join(SECTIONS)})")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    for name in args.sections or list(SECTIONS):
        print(f"== {name}")
        for line in SECTIONS[name]():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
