"""Active learning ("ML in the loop"): let a surrogate model choose which simulations to run.

The shape follows Parsl's and Globus Compute's molecular-design demo. We hold a library of
candidate "molecules", each described by a few numeric descriptors, and want the one with
the highest value of some property. Running the simulation for all of them is too dear,
so we:

1. simulate a small random sample of candidates on the endpoint;
2. train a scikit-learn Gaussian process on the results so far (a small surrogate that
   also says how unsure it is; a random forest's tree spread is a rougher guide, and
   found the optimum far less reliably here);
3. keep ``--batch`` simulations in flight, and each time one finishes (``as_completed``)
   retrain the model and give the free slot to the unevaluated candidate with the best
   predicted value plus ``--explore`` times its predicted standard deviation;
4. stop after ``--budget`` simulations, and run a random sample of the same size for
   comparison.

The "simulation" is NOT chemistry: it is a cheap deterministic stand-in for a
quantum-chemistry calculation (say, an ionization energy from xTB or DFT) - a smooth
analytic landscape over the descriptors, with a little pseudo-noise from a hash, reached
by a few milliseconds of fixed-point iteration. Swap in a real code and nothing else
changes.

Usage::

    python examples/ml_in_the_loop.py --endpoint EP_ID --budget 40
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import Executor as FuturesExecutor
from concurrent.futures import Future, as_completed
from typing import Any

import numpy as np
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import Matern
from tqdm import tqdm

from gc_client import Executor

#: Descriptors per candidate (think size, polarity, ring count, ...), each in [0, 1).
DESCRIPTORS = 4
#: How far (in descriptor units) the surrogate expects one result to inform another. Fixed
#: rather than fitted: fitting kernel hyper-parameters on a few dozen points costs ~50x
#: more per retraining and, this early, mostly fits noise.
LENGTH_SCALE = 0.3
#: Variance the surrogate allows each (normalized) result for noise.
NOISE_VARIANCE = 1e-3


def simulate(descriptors: list[float]) -> float:
    """Run the stand-in "quantum-chemistry" calculation for one candidate; return its value.

    A cheap deterministic stand-in, not chemistry: an analytic landscape with a broad
    global peak and a narrower lesser one (a trap), plus pseudo-noise from a hash of the input,
    approached by a fixed-point loop so each call costs a few milliseconds, as a real
    calculation costs minutes. It imports only the standard library, inside the body,
    so the worker needs nothing from this file.
    """
    import hashlib
    import math

    # The landscape: Gaussian peaks (centre, height, width) and a gentle slope.
    peaks = (((0.72, 0.31, 0.58, 0.84), 3.0, 0.30), ((0.25, 0.70, 0.40, 0.30), 2.0, 0.20))
    target = 0.4 * descriptors[0] - 0.2 * descriptors[3]
    for centre, height, width in peaks:
        distance2 = sum((x - c) ** 2 for x, c in zip(descriptors, centre))
        target += height * math.exp(-distance2 / (2 * width * width))
    # Deterministic "noise": the same candidate always gives the same value.
    digest = hashlib.sha256(repr([round(x, 12) for x in descriptors]).encode()).digest()
    target += 0.05 * (int.from_bytes(digest[:8], "big") / 2 ** 64 - 0.5)
    # "Iterate to self-consistency": converges to the target; this is where the time goes.
    value = 0.0
    for _ in range(20_000):
        value += (target - value) * 1e-3
    return round(value, 6)


def make_candidates(count: int, seed: int) -> np.ndarray:
    """The candidate library: ``count`` rows of descriptors, fixed by the seed."""
    return np.random.default_rng(seed).random((count, DESCRIPTORS))


def train_surrogate(features: np.ndarray, values: np.ndarray) -> GaussianProcessRegressor:
    """Fit the Gaussian process on everything simulated so far (milliseconds)."""
    model = GaussianProcessRegressor(Matern(length_scale=LENGTH_SCALE, nu=2.5),
                                     alpha=NOISE_VARIANCE, normalize_y=True, optimizer=None)
    return model.fit(features, values)


def rank_candidates(model: GaussianProcessRegressor, features: np.ndarray,
                    explore: float) -> np.ndarray:
    """Candidate indices, most promising first: predicted value + ``explore`` x its std."""
    mean, std = model.predict(features, return_std=True)
    return np.argsort(-(mean + explore * std))


def run_campaign(ex: FuturesExecutor, candidates: np.ndarray, *, initial: int, batch: int,
                 budget: int, explore: float, seed: int) -> list[tuple[int, float]]:
    """Run the active-learning loop on ``ex``; return ``(candidate, value)`` in arrival order."""
    rng = np.random.default_rng(seed + 1)
    results: list[tuple[int, float]] = []
    taken: set[int] = set()

    def submit(index: int) -> None:
        taken.add(index)
        in_flight[ex.submit(simulate, candidates[index].tolist())] = index

    in_flight: dict[Future[float], int] = {}
    with tqdm(total=budget, desc="simulations", unit="sim") as bar:
        # 1. A random start, all of it back before the first model is trained.
        for index in rng.choice(len(candidates), size=min(initial, budget), replace=False):
            submit(int(index))
        for future in as_completed(list(in_flight)):
            results.append((in_flight.pop(future), future.result()))
            bar.update()
        # 2. Then keep `batch` simulations running, retraining each time one comes back.
        while len(taken) < budget or in_flight:
            free = min(batch - len(in_flight), budget - len(taken))
            if free > 0:
                done = [index for index, _ in results]
                model = train_surrogate(candidates[done], np.array([v for _, v in results]))
                ranked = (int(i) for i in rank_candidates(model, candidates, explore))
                for index in [i for i in ranked if i not in taken][:free]:
                    submit(index)
            future = next(as_completed(list(in_flight)))
            results.append((in_flight.pop(future), future.result()))
            bar.update()
            bar.set_postfix(best=f"{max(v for _, v in results):.3f}")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", default=os.environ.get("GC_ENDPOINT_ID"),
                        help="endpoint id [default: $GC_ENDPOINT_ID]")
    parser.add_argument("--initial", type=int, default=8, help="random simulations to start with")
    parser.add_argument("--batch", type=int, default=4, help="simulations kept in flight")
    parser.add_argument("--budget", type=int, default=40, help="simulations in all")
    parser.add_argument("--candidates", type=int, default=500, help="size of the candidate library")
    parser.add_argument("--explore", type=float, default=2.0,
                        help="weight of the model's uncertainty in choosing (0 = greedy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.endpoint:
        parser.error("give --endpoint or set GC_ENDPOINT_ID")
    if not 1 <= args.initial <= args.budget <= args.candidates or args.batch < 1:
        parser.error("need 1 <= --initial <= --budget <= --candidates and --batch >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the campaign and a random baseline of the same budget; print and return a summary."""
    args = parse_args(argv)
    candidates = make_candidates(args.candidates, args.seed)
    started = time.monotonic()
    with Executor(endpoint_id=args.endpoint) as ex:
        results = run_campaign(ex, candidates, initial=args.initial, batch=args.batch,
                               budget=args.budget, explore=args.explore, seed=args.seed)
        campaign_seconds = time.monotonic() - started
        # The baseline: as many simulations, of candidates drawn at random.
        sample = np.random.default_rng(args.seed + 2).choice(
            args.candidates, size=args.budget, replace=False)
        random_values = list(ex.map(simulate, [candidates[i].tolist() for i in sample]))

    found_at, (best, best_value) = max(enumerate(results, 1), key=lambda item: item[1][1])
    summary = {
        "best_candidate": best,
        "best_descriptors": [round(x, 3) for x in candidates[best].tolist()],
        "best_value": best_value,
        "found_at": found_at,
        "simulations": len(results),
        "distinct_candidates": len({index for index, _ in results}),
        "random_best_value": max(random_values),
        "random_simulations": len(random_values),
        "seconds": round(campaign_seconds, 2),
    }
    print(f"best candidate: #{best} {summary['best_descriptors']} value {best_value:.4f}, "
          f"found at simulation {found_at} of {len(results)} "
          f"({args.candidates} candidates, {campaign_seconds:.1f}s)")
    print(f"random sample of {len(random_values)}: best value {max(random_values):.4f} "
          f"-> active learning {'beat' if best_value > max(random_values) else 'did not beat'} "
          f"it by {best_value - max(random_values):+.4f}")
    return summary


if __name__ == "__main__":
    main()
