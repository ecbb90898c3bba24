"""EmbedSeg loss: value and time per step of this project's ``EmbedSegLoss`` against the reference (embedseg 0.2.5).

Cases: 2D batch 2 x 256 x 256 with 40 objects per image; 3D batch 1 x 32 x 128 x 128 with 30 objects. Labels
are random non-overlapping ellipses / ellipsoids (``embedseg_service.core.data.synthetic.random_labels``), centres
their medoids. Two kinds of raw output, identical for both implementations:

* ``random``: Gaussian offsets (std 0.01, i.e. about 10 px of reach), sigma 0.9 +- 0.05 (0.5-level radius
  about 10 px), seed logits N(0, 1);
* ``near``: the ideal output of ``embedseg_service.core.data.synthetic.perfect_raw`` with 3 px of embedding noise,
  sigma noise 0.1 and seed noise 1 (a trained-looking output).

The reference's ``SpatialEmbLoss`` / ``SpatialEmbLoss_3d`` is built with grid = image extent and
pixel = (grid - 1) / 1023 per axis, i.e. this project's default step of 1/1023 per pixel
(``embedseg_service.core.model.embedding.step_from_reference``), foreground weight 10, and ``center_images`` marking
our medoids.

Usage::

    EMBEDSEG_REFERENCE=/path/to/folder/containing/EmbedSeg python benchmarks/bench_loss.py \
        [--repeats 5] [--threads N] [--device cpu|cuda] [--cases 2d,3d] [--raw random,near]

Prints per case: both loss values and their relative difference (target <= 1e-4), the largest gradient
difference relative to the largest gradient, the median time of a forward + backward step of each (wall
and process CPU time; the two run alternately), and the speed-up (target >= 3). On a shared machine,
``--threads 1`` gives the steadiest ratios.

The gradients differ by up to a few 1e-3 of the largest one: in float32 the hinge errors of faint
background pixels are rounded to multiples of 2^-24 and tie, and each implementation shares the Lovász
weights of a tie differently (the value does not depend on it). In float64 this project's gradient
matches a term-by-term float64 evaluation of the loss to ~1e-8 (tests/core/test_loss.py).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from _common import comparison_parser, median_times_alternating, use_reference

from embedseg_service.core.data.centers import CenterMode, object_centers
from embedseg_service.core.data.synthetic import perfect_raw, random_labels
from embedseg_service.core.model.embedding import DEFAULT_STEP, step_from_reference
from embedseg_service.core.training.loss import EmbedSegLoss

CASES = {
    "2d": {"batch": 2, "shape": (256, 256), "n_objects": 40, "radius": (6.0, 14.0)},
    "3d": {"batch": 1, "shape": (32, 128, 128), "n_objects": 30, "radius": [(3.0, 6.0), (6.0, 12.0), (6.0, 12.0)]},
}


def load_reference(folder: str | None):
    """The reference's 2D and 3D loss classes, from ``folder`` or ``$EMBEDSEG_REFERENCE``."""
    use_reference(folder)
    from EmbedSeg.criterions.my_loss import SpatialEmbLoss
    from EmbedSeg.criterions.my_loss_3d import SpatialEmbLoss_3d

    return SpatialEmbLoss, SpatialEmbLoss_3d


def make_inputs(case: dict, kind: str, seed: int = 0):
    shape, dims = case["shape"], len(case["shape"])
    labels = np.stack(
        [random_labels(shape, case["n_objects"], case["radius"], seed=seed + b) for b in range(case["batch"])]
    )
    centers, ids = [], []
    for lab in labels:
        k_ids, k_centers = object_centers(lab, CenterMode.medoid, 1.0)
        ids.append(torch.as_tensor(k_ids))
        centers.append(torch.as_tensor(k_centers))
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        raw = torch.empty((case["batch"], 2 * dims + 1, *shape))
        raw[:, :dims] = torch.randn((case["batch"], dims, *shape), generator=gen) * 0.01
        raw[:, dims : 2 * dims] = 0.9 + 0.05 * torch.randn((case["batch"], dims, *shape), generator=gen)
        raw[:, 2 * dims] = torch.randn((case["batch"], *shape), generator=gen)
    else:
        raw = torch.stack(
            [
                torch.from_numpy(
                    perfect_raw(lab, 1 / 1023, offset_noise=3.0, sigma_noise=0.1, seed_noise=1.0, seed=seed + b)
                )
                for b, lab in enumerate(labels)
            ]
        )
    return raw, torch.from_numpy(labels.astype(np.int64)), centers, ids


def center_images(labels: torch.Tensor, centers: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(labels.shape, dtype=torch.bool)
    for b, c in enumerate(centers):
        idx = torch.round(c).long()
        out[(torch.full((len(idx),), b), *idx.T)] = True
    return out


def main() -> None:
    parser = comparison_parser(__doc__, repeats=5, device="cpu", threads=True)
    parser.add_argument("--cases", default="2d,3d")
    parser.add_argument("--raw", default="random,near", help="kinds of raw output: random, near")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ref_2d, ref_3d = load_reference(args.reference)
    print(f"device {device}, torch threads {torch.get_num_threads()}, repeats {args.repeats} (median)")
    print("times: median wall seconds per forward + backward (process CPU seconds in brackets)")
    print(
        f"{'case':16s} {'raw':7s} {'reference':>12s} {'ours':>12s} {'rel.diff':>9s} {'grad diff':>9s} "
        f"{'ref s':>15s} {'ours s':>15s} {'speed-up (cpu)':>15s}"
    )
    for key in args.cases.split(","):
        case = CASES[key]
        dims = len(case["shape"])
        # the reference's coordinate buffer is grid_z x grid_y x grid_x: use grid = image extent and
        # pixel = (grid - 1) * h, the same step (grid 1024 on every axis would take 12 GiB in 3D)
        grid = list(reversed(case["shape"]))  # x, y[, z]
        pixel = [(g - 1) * DEFAULT_STEP for g in grid]
        step = step_from_reference(grid, pixel)
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints on construction and per call
            if dims == 2:
                ref = ref_2d(
                    grid_y=grid[1], grid_x=grid[0], pixel_y=pixel[1], pixel_x=pixel[0], n_sigma=2, foreground_weight=10
                )
            else:
                ref = ref_3d(
                    grid_z=grid[2],
                    grid_y=grid[1],
                    grid_x=grid[0],
                    pixel_z=pixel[2],
                    pixel_y=pixel[1],
                    pixel_x=pixel[0],
                    n_sigma=3,
                    foreground_weight=10,
                )
        ref = ref.to(device)
        ours = EmbedSegLoss(dims, step, foreground_weight=10.0)
        for kind in args.raw.split(","):
            bench_case(key, kind, ref, ours, device, args.repeats)


def bench_case(key: str, kind: str, ref, ours: EmbedSegLoss, device: torch.device, repeats: int) -> None:
    case = CASES[key]
    raw, labels, centers, ids = make_inputs(case, kind)
    raw, labels = raw.to(device), labels.to(device)
    cimg = center_images(labels.cpu(), centers).to(device)
    centers = [c.to(device) for c in centers]
    ids = [i.to(device) for i in ids]
    fg = (labels > 0).long()

    def run_ref(keep_grad: bool = False):
        x = raw.clone().requires_grad_()
        with contextlib.redirect_stdout(io.StringIO()):
            loss = ref(x, labels, fg, cimg)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (float(loss.detach()), x.grad) if keep_grad else None

    def run_ours(keep_grad: bool = False):
        x = raw.clone().requires_grad_()
        loss = ours(x, labels, centers, ids)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (float(loss.detach()), x.grad) if keep_grad else None

    v_ref, g_ref = run_ref(True)
    v_ours, g_ours = run_ours(True)
    rel = abs(v_ours - v_ref) / abs(v_ref)
    grad_diff = float((g_ours - g_ref).abs().max() / g_ref.abs().max())
    (w_ref, c_ref), (w_ours, c_ours) = median_times_alternating((run_ref, run_ours), repeats)
    name = f"{key} {case['batch']}x{'x'.join(map(str, case['shape']))}"
    print(
        f"{name:16s} {kind:7s} {v_ref:12.7f} {v_ours:12.7f} {rel:9.2e} {grad_diff:9.2e} "
        f"{w_ref:7.3f} ({c_ref:5.2f}) {w_ours:7.3f} ({c_ours:5.2f}) {w_ref / w_ours:6.1f}x ({c_ref / c_ours:4.1f}x)",
        flush=True,
    )


if __name__ == "__main__":
    main()
