"""Wall time of the two test tiers on this machine (what `make test` and `make test-all`
run, without the venv setup):

  python -m benchmarks.test_tiers               # both tiers
  python -m benchmarks.test_tiers --tiers fast  # the fast tier only
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

# (pytest arguments, hypothesis examples) as `make test` and `make test-all` run them
TIERS = {"fast": (["-m", "not slow"], "3"), "all": ([], "10")}


def run_tier(extra: list[str], examples: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2",
                          "-p", "no:cacheprovider", *extra], capture_output=True, text=True,
                         env={**os.environ, "HYPOTHESIS_EXAMPLES": examples})
    lines = [l for l in res.stdout.splitlines() if re.search(r"\d+ (passed|failed)", l)]
    return time.perf_counter() - t0, (lines[-1] if lines else res.stdout[-300:]).strip("= ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiers", default="fast,all", help="comma-separated: fast, all")
    args = p.parse_args(argv)
    print("| tier | wall | result |\n|---|---:|---|")
    for tier in args.tiers.split(","):
        seconds, summary = run_tier(*TIERS[tier])
        print(f"| {tier} | {seconds / 60:.1f} min | {summary} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
