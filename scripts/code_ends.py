"""How many bytes a code's ending costs: latentpack's `entropy.finish` (format 3) against
constriction's own sealing (formats 1-2) and the ideal length, on random streams of random tables.

    python scripts/code_ends.py [--streams 20000]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_streams(rng, n: int):
    """(constriction categorical model, its probabilities, symbols) x n: tables of 2-39 symbols from
    a Dirichlet of random concentration, streams of 0-119 symbols."""
    import constriction

    for _ in range(n):
        probs = rng.dirichlet(np.ones(int(rng.integers(2, 40))) * rng.uniform(0.05, 2.0))
        model = constriction.stream.model.Categorical(probs, perfect=False)
        yield model, probs, rng.choice(len(probs), size=int(rng.integers(0, 120)), p=probs).astype(np.int32)


def measure(n: int, seed: int = 3) -> dict:
    """Mean bytes per code of `finish`, of constriction's sealed words, and the ideal (-log2 p / 8)."""
    import constriction

    from pipeline import entropy

    ours = sealed = ideal = 0.0
    for model, probs, symbols in random_streams(np.random.default_rng(seed), n):
        coder = constriction.stream.queue.RangeEncoder()
        coder.encode(symbols, model)
        ours += len(entropy.finish(coder))
        sealed += len(coder.get_compressed().tobytes())
        ideal += -np.log2(probs[symbols]).sum() / 8
    return {"streams": n, "finish": ours / n, "constriction": sealed / n, "ideal": ideal / n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=20000)
    r = measure(p.parse_args().streams)
    print(f"{r['streams']} random streams, mean bytes per code: finish {r['finish']:.2f}, "
          f"constriction's sealing {r['constriction']:.2f}, ideal {r['ideal']:.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
