"""Family-wise error of the roi tests under a planted null.

Cohorts without any effect: per participant, relevance in 30 regions that share a common factor
(so regions are correlated, as parcels of one map are) and each region's volume, independent of it;
a covariate (age). Each cohort runs ``region_correlations(..., "partial", permutations=199)``; a
cohort is a family-wise error when any region is called at α = 0.05. The table gives the share of
cohorts with a family-wise error for each p-value, with its 95 % Clopper–Pearson interval: the
Freedman–Lane max-|t| ``p_fwe`` should hold 0.05, the uncorrected per-region p's should not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from record import rejection_rate, save_results  # sibling script

from engine.analysis.stats import region_correlations

P_VALUES = {"p_fwe": "Freedman–Lane max-|t| over the regions (family-wise)",
            "p_bonferroni": "Bonferroni over the regions",
            "p_permutation": "Freedman–Lane per region (uncorrected)",
            "p": "parametric per region (uncorrected)"}


def simulate(cohorts: int, participants: int, regions: int, permutations: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    people = [f"sub-{index}" for index in range(participants)]
    errors = dict.fromkeys(P_VALUES, 0)
    for cohort in range(cohorts):
        shared = rng.normal(size=(participants, 1))
        relevance = 0.5 * shared + rng.normal(size=(participants, regions))
        volume = rng.normal(size=(participants, regions))
        table = pd.DataFrame({"participant_id": np.repeat(people, regions),
                              "region": np.tile(np.arange(regions), participants),
                              "relevance": relevance.ravel(), "volume": volume.ravel(),
                              "age": np.repeat(rng.normal(size=participants), regions)})
        result = region_correlations(table, "relevance", "volume", ["age"], "partial", permutations, seed=cohort)
        for column in errors:
            errors[column] += bool((result[column] < 0.05).any())
    rows = []
    for column, what in P_VALUES.items():
        rows.append({"p-value": column, "what": what, **rejection_rate(errors[column], cohorts),
                     "participants": participants, "regions": regions, "permutations": permutations})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = simulate(args.cohorts, participants=40, regions=30, permutations=199, seed=0)
    for row in rows:
        print(f"{row['p-value']:>14}: family-wise error {row['family_wise_error_rate']:.3f} "
              f"(95 % CI {row['ci_low']:.3f}–{row['ci_high']:.3f})  {row['what']}")
    args.out.mkdir(parents=True, exist_ok=True)
    save_results(args.out / "roi_family_wise_error.json", rows)


if __name__ == "__main__":
    main()
