"""Load time of two bundles on one backend, alone in its process: load() and a first one-image cached sample,
the best of N rounds alternating between the bundles, garbage collected before each (bundle_size.py times
loads between decoding and log p runs of both backends, where they swing more):

    python benchmarks/load_time.py [--backend torchscript] [--rounds 12] BUNDLE_A BUNDLE_B

Prints JSON: each bundle's best time and B's over A's.
"""

from __future__ import annotations

import argparse
import gc
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torchscript")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("bundles", nargs=2)
    a = ap.parse_args()
    from genforge.runtime import load

    times: dict[str, list[float]] = {b: [] for b in a.bundles}
    for _ in range(a.rounds):
        for b in a.bundles:
            gc.collect()
            t0 = time.perf_counter()
            s = load(b, backend=a.backend)
            s.sample(1, decoder="cached")
            times[b].append(time.perf_counter() - t0)
            del s
    best = {b: round(min(t), 3) for b, t in times.items()}
    first, second = a.bundles
    print(json.dumps({"backend": a.backend, "rounds": a.rounds, "load_and_first_sample_s": best,
                      "second_over_first": round(min(times[second]) / min(times[first]), 3)}))


if __name__ == "__main__":
    main()
