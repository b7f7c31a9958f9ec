"""Relevance in each participant's own parcels, two routes: on the template grid and in native space.

    .venv/bin/relcohort run docs/catalog-native.yaml && .venv/bin/python benchmarks/native_route.py

Reads the native demo's workspace (``workspace/native``: native scans registered with ANTs SyN,
an MRInet ensemble, LRP maps of the test participants). Per aseg structure of every test
participant's FreeSurfer-style ``aparc+aseg.mgz``, the LRP relevance (ensemble mean) is summed

* on the template grid: the label volume brought there by the register stage (genericLabel
  interpolation) and reduced with the stored maps (``ParticipantLabels``), and
* in native space: each map taken back onto the participant's own ``aparc+aseg.mgz`` through the
  inverse transform, as a density, and summed there (``NativeLabels``), as the seed study did.

It prints, per structure, how the two sums agree across participants (Pearson r, median relative
difference) and the analyses' Pearson r with the FreeSurfer volume each way
(``subcortical_volume_template`` / ``_native``), and writes ``results/native_route.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from record import save_results  # sibling script

from engine import open_workspace
from engine.analysis.atlas import NativeLabels, ParticipantLabels, region_reduce
from engine.data.inputs import Modality, read_participants, resolve_files
from engine.data.labels import label_table

LABELS = Modality("APARC_ASEG", "derivatives/freesurfer/{participant_id}/mri/aparc+aseg.mgz", "int16",
                  kind="label", labels="freesurfer")


def measure(workspace: Path) -> tuple[list[dict], dict]:
    ws = open_workspace(workspace)
    lrp = ws.relevance.relevance_mean.sel(attribution="lrp")
    table = label_table("freesurfer")
    started = time.perf_counter()
    template = region_reduce(lrp, ParticipantLabels("APARC_ASEG", ws.images["APARC_ASEG"], table)).compute()
    template_seconds = time.perf_counter() - started
    cohort = workspace / "demo_cohort"
    files, _ = resolve_files(cohort, read_participants(cohort / "participants.tsv"), [LABELS])
    started = time.perf_counter()
    parcels = NativeLabels("APARC_ASEG", {pid: paths["APARC_ASEG"] for pid, paths in files.items()}, table,
                           ws.layout.registered)
    native = region_reduce(lrp, parcels)
    native_seconds = time.perf_counter() - started
    correlations = {route: ws.associations[f"subcortical_volume_{route}"].correlations.set_index("region")
                    for route in ("template", "native")}
    rows = []
    for region in correlations["template"].index.intersection(correlations["native"].index):
        on_grid, in_native = template["sum"].sel(region=region).values, native["sum"].sel(region=region).values
        rows.append({"region": region, "median_sum_template": float(np.median(on_grid)),
                     "median_sum_native": float(np.median(in_native)),
                     "r_between_routes": float(np.corrcoef(on_grid, in_native)[0, 1]),
                     "median_relative_difference": float(np.median(np.abs(in_native - on_grid)
                                                                   / np.maximum(np.abs(on_grid), 1e-12))),
                     "r_volume_template": float(correlations["template"].loc[region, "r"]),
                     "r_volume_native": float(correlations["native"].loc[region, "r"])})
    timing = {"participants": int(lrp.sizes["subject"]), "template_s": template_seconds, "native_s": native_seconds}
    return rows, timing


def markdown(rows: list[dict]) -> str:
    lines = ["| structure | median Σ R, template grid | median Σ R, native | r between routes "
             "| median \\|Δ\\| / \\|Σ\\| | r with volume, template | r with volume, native |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: row["r_volume_native"]):
        lines.append(f"| {row['region']} | {row['median_sum_template']:.3f} | {row['median_sum_native']:.3f} "
                     f"| {row['r_between_routes']:.3f} | {row['median_relative_difference']:.0%} "
                     f"| {row['r_volume_template']:+.2f} | {row['r_volume_native']:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path(__file__).parents[1] / "workspace/native")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows, timing = measure(args.workspace)
    save_results(args.out / "native_route.json", [{"timing": timing, "regions": rows}])
    print(markdown(rows))
    rows = pd.DataFrame(rows)
    change = np.abs(rows.r_volume_native - rows.r_volume_template)
    print(f"\n{timing['participants']} participants; template route {timing['template_s']:.2f} s, native route "
          f"{timing['native_s']:.1f} s; |Δ r with volume| median {change.median():.3f}, max {change.max():.3f}")


if __name__ == "__main__":
    main()
