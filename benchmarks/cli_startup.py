"""CLI start-up: `capfilt --help`, every subcommand's `--help` and an argument error, as processes.

Each is timed as a whole process (the median of a few runs) next to the floor measured in the same
run, a bare `python -c pass` of the same interpreter. Target: every one under 1.5 s on 2 cores,
which holds only while the CLI imports torch, Ray, Prefect and transformers in the commands that
do their work, never to print help or refuse an argument.

    uv run python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

CAPFILT = str(Path(sys.executable).parent / "capfilt")
TARGET_S = 1.5
SUBCOMMANDS = ("bootstrap", "caption", "curate", "demo", "eval", "export", "filter", "finetune filter",
               "finetune captioner", "generate", "ingest", "synth",
               "toy pretrain", "train stage1", "train stage2")


def _median_seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(repeats: int = 3) -> list[dict]:
    """One row per command line: seconds, the bare-interpreter floor, and whether it meets the target."""
    floor = _median_seconds([sys.executable, "-c", "pass"], repeats)
    cases = {"capfilt --help": ["--help"]}
    cases |= {f"capfilt {name} --help": [*name.split(), "--help"] for name in SUBCOMMANDS}
    cases["capfilt filter --root r (argument error)"] = ["filter", "--root", "r"]
    rows = []
    for name, args in cases.items():
        seconds = _median_seconds([CAPFILT, *args], repeats)
        rows.append({"stage": "cli", "compared": f"{name} vs python -c pass", "capfilt": seconds, "baseline": floor,
                     "unit": "s", "target": f"< {TARGET_S} s", "ok": seconds < TARGET_S})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    rows = measure(parser.parse_args().repeats)
    width = max(len(r["compared"]) for r in rows)
    for r in rows:
        print(f"{r['compared']:<{width}}  {r['capfilt']:6.2f} s  (floor {r['baseline']:.2f} s)  "
              f"{'ok' if r['ok'] else 'MISS'} {r['target']}")


if __name__ == "__main__":
    main()
