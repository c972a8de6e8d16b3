"""A parameter sweep: estimate pi from 1,000 Monte Carlo tasks, with a progress bar.

Each task throws darts at the unit square and counts those inside the quarter circle;
the estimate is 4 x (hits / throws), with the standard error over the tasks. The sweep
is a ``map`` with a ``buffersize``: however many tasks you ask for, at most that many
are in flight and memory stays flat.
"""

from __future__ import annotations

import argparse
import math
import os
from itertools import repeat

from gc_client import Executor


def count_hits(seed: int, throws: int) -> int:
    """Throw ``throws`` darts with a seeded generator; return how many land inside."""
    import random

    rng = random.Random(seed)
    return sum(1 for _ in range(throws) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", default=os.environ.get("GC_ENDPOINT_ID"),
                        help="endpoint id [default: $GC_ENDPOINT_ID]")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--throws", type=int, default=2000, help="darts per task")
    parser.add_argument("--in-flight", type=int, default=500,
                        help="tasks submitted ahead of the results read")
    args = parser.parse_args()
    if not args.endpoint:
        parser.error("give --endpoint or set GC_ENDPOINT_ID")

    with Executor(endpoint_id=args.endpoint) as ex:
        hits = ex.map(count_hits, range(args.tasks), repeat(args.throws, args.tasks),
                      buffersize=args.in_flight, progress=True)
        estimates = [4.0 * h / args.throws for h in hits]

    mean = sum(estimates) / len(estimates)
    spread = math.sqrt(sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1))
    error = spread / math.sqrt(len(estimates))
    print(f"pi ~ {mean:.5f} +/- {error:.5f} from {args.tasks * args.throws:,} darts "
          f"in {args.tasks} tasks (true value {math.pi:.5f})")


if __name__ == "__main__":
    main()
