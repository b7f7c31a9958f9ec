"""docs/pages/figures/associations_demo.png: two of the demo's voxel-wise associations.

    make demo && .venv/bin/python docs/pages/figures/associations_demo.py
"""

from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from nilearn import plotting

from engine.outputs.workspace import mni_template

WORKSPACE = Path(__file__).parents[3] / "workspace" / "demo" / "associations"
PANELS = [("gm_age", "p_fwe", "GM probability ~ age + sex + site, 240 participants: t where p_FWE < 0.05 "
           "(1,000 permutations)"),
          ("relevance_gm", "p_fdr", "T1 ensemble: LRP share (R / Σ|R|) ~ GM probability + age + sex + site, 48 test "
           "participants: t where p_FDR < 0.05")]


def main():
    fig = Figure(figsize=(8, 5.2), facecolor="white")
    for row, (name, p_name, title) in enumerate(PANELS):
        t_image, p_image = (nib.load(WORKSPACE / name / f"{stat}.nii.gz") for stat in ("t", p_name))
        t = np.asarray(t_image.dataobj, dtype=np.float32)
        shown = np.where(np.asarray(p_image.dataobj) < 0.05, t, 0)
        axes = fig.add_axes((0, 0.5 * (1 - row), 1, 0.43))
        fig.text(0.01, 0.5 * (1 - row) + 0.455, title, fontsize=8)
        plotting.plot_stat_map(nib.Nifti1Image(shown, t_image.affine), bg_img=mni_template(), axes=axes,
                               cut_coords=(-22, -20, -12), draw_cross=False,
                               vmax=float(np.nanmax(np.abs(shown))) or 1.0)
    fig.savefig(Path(__file__).with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    main()
