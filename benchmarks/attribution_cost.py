"""Attribution cost per subject relative to a plain input-gradient pass, on CPU (or GPU if present).

    python benchmarks/attribution_cost.py [--voxel-size 4] [--batch 8] [--threads 1 2]

An MRInet on the demo cohort's brain box (4 mm: 46×55×44, T1 input; the cost does not depend
on the trained weights, so a freshly initialised model is used) explains a batch of random
inputs with every method, best of three after a warm-up. The model is placed as the engine
places it (``engine.models.networks.place``: channels-last weights), its LRP form made once as the
explain tasks make it once per member (``engine.models.attribution.ExplainedModel``), and the heap
is kept as they keep it (``engine.models.heap.heap_kept``). The reference is one forward
and one backward pass to the input (``torch.autograd.grad``) on that same model, as PyTorch
computes it, timed again right before each method (the machine's speed drifts by
10-20 % over minutes); the same pass on the model in PyTorch's default layout is reported too. The
engine's own ``gradient`` is cheaper than the reference: it takes the first convolution's input
gradient by depthwise convolutions (``engine.models.input_gradient``), as do the other gradient
methods and LRP's rules.
Methods slower than 10 s per batch are timed once after the warm-up.
Writes ``benchmarks/results/attribution_cost.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from record import best_of, save_results  # sibling script

from engine.data.grid import mni_grid
from engine.models.attribution import METHODS, AttributionOptions, ExplainedModel, attribute
from engine.models.heap import heap_kept
from engine.models.networks import ModelSpec, build_model, place
from engine.models.noise import NoiseNet

#: The brain box of the demo cohort's mask at each voxel size (``CohortVolumes.shape``).
BOX = {4.0: (46, 55, 44), 2.0: (91, 109, 87)}
OPTIONS = AttributionOptions(smoothgrad_samples=8, ig_steps=8, occlusion_patch=8, occlusion_stride=8, noise_steps=20)


def input_gradient(model, inputs):
    inputs = inputs.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)
    return gradient


def measure(voxel_size: float, batch: int, threads: int, device: torch.device) -> list[dict]:
    torch.set_num_threads(threads)
    shape = BOX.get(voxel_size) or mni_grid(voxel_size).shape
    default_model = build_model(ModelSpec("mrinet", shape, 1, 1), target_mean=50.0, target_scale=18.0).to(device)
    model = place(copy.deepcopy(default_model), device).eval()
    explained = ExplainedModel(model)
    default_model.eval()
    inputs = torch.randn(batch, 1, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(torch.tensor(shape).prod()).reshape(shape) // 800).numpy()  # ~150 blocky regions
    noise_net = place(NoiseNet(1), device).eval()  # noise_model: inference only (its training is once per member)

    def timed(function):
        def run():
            function()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return best_of(run, warm_up=True)

    default_layout = timed(lambda: input_gradient(default_model, inputs))
    rows = [{"method": "input gradient, default layout", "seconds_per_batch": default_layout}]
    for method in METHODS:  # the reference is timed right before each method: the machine's speed drifts
        reference = timed(lambda: input_gradient(model, inputs))
        seconds = timed(lambda method=method: attribute(explained, inputs, method, OPTIONS, region_labels=labels,
                                                        noise_model=noise_net))
        rows.append({"method": method, "seconds_per_batch": seconds, "gradient_seconds_per_batch": reference,
                     "relative_to_gradient": seconds / reference})
        print(f"{threads} thread(s), {method}: {seconds:.2f} s per batch of {batch}, {seconds / reference:.2f}× "
              f"the input gradient ({reference:.2f} s)", flush=True)
    references = [row["gradient_seconds_per_batch"] for row in rows[1:]]
    rows.insert(0, {"method": "input gradient (reference, median)", "seconds_per_batch": float(np.median(references)),
                    "relative_to_gradient": 1.0})
    rows[1]["relative_to_gradient"] = rows[1]["seconds_per_batch"] / rows[0]["seconds_per_batch"]
    for row in rows:
        row.update({"voxel_size_mm": voxel_size, "batch": batch, "threads": threads, "device": str(device),
                    "subjects_per_s": batch / row["seconds_per_batch"]})
    return rows


def table(rows: list[dict]) -> str:
    settings = sorted({(r["device"], r["threads"]) for r in rows})
    header = "| method | " + " | ".join(f"{d} {t} thr: ×gradient | subj/s" for d, t in settings) + " |"
    lines = [header, "|---|" + "---|---|" * len(settings)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for device, threads in settings:
            row = next(r for r in rows if r["method"] == method and r["device"] == device and r["threads"] == threads)
            cells.append(f"{row['relative_to_gradient']:.2f} | {row['subjects_per_s']:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel-size", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = []
    with heap_kept():
        for threads in args.threads:
            rows += measure(args.voxel_size, args.batch, threads, torch.device("cpu"))
        if torch.cuda.is_available():
            rows += measure(args.voxel_size, args.batch, 1, torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    save_results(args.out / "attribution_cost.json", rows)
    print(f"MRInet, {args.voxel_size:g} mm brain box, batch {args.batch}; options {OPTIONS}")
    print(table(rows))


if __name__ == "__main__":
    main()
