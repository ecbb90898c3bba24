"""Clustering speed and agreement: this project's ``core.cluster`` against the reference (embedseg 0.2.5).

Cases: 2D 512x512 with ~50 objects; 3D 64x256x256 with ~100 objects (anisotropic step); the same 3D
labels with noise (spurious foreground and seed candidates that are rejected). Both implementations get
the identical raw output; the reference's ``Cluster`` / ``Cluster_3d`` is built with grid = image shape
and pixel = step * (grid - 1), so both use the same coordinate step.

Usage::

    EMBEDSEG_REFERENCE=/path/to/folder/containing/EmbedSeg python benchmarks/bench_clustering.py [--repeats 3]

Prints, per case: median times (s), the speed-up, AP0.5 / AP0.9 of our labels against the reference's,
and whether the two label images are equal up to relabelling.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from _common import comparison_parser, median_times, use_reference

from embedseg_service.core.data.synthetic import perfect_raw, random_labels
from embedseg_service.core.inference.clustering import cluster
from embedseg_service.core.metrics import average_precision

STEP = 1.0 / 1023.0


def reference_clusterers(folder: str | None):
    """The reference's ``Cluster`` and ``Cluster_3d`` classes, from ``folder`` or ``$EMBEDSEG_REFERENCE``."""
    use_reference(folder)
    from EmbedSeg.utils.utils import Cluster, Cluster_3d

    return Cluster, Cluster_3d


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return np.unique(pairs[0]).size == pairs.shape[1] == np.unique(pairs[1]).size


def differing(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels whose object differs after mapping each of ``b``'s objects to its best-overlapping one in ``a``."""
    fg = (a > 0) | (b > 0)
    pairs, counts = np.unique(np.stack([b[fg], a[fg]]), axis=1, return_counts=True)
    order = np.lexsort((-counts, pairs[0]))  # per b label, the largest overlap first
    pairs = pairs[:, order]
    first = np.concatenate([[True], pairs[0, 1:] != pairs[0, :-1]])
    lookup = np.zeros(int(b.max()) + 1, dtype=np.int64)
    lookup[pairs[0, first]] = pairs[1, first]
    return int((lookup[b[fg]] != a[fg]).sum())


def run_case(name, raw, step, ref_cluster, n_sigma, repeats, min_size, ours_repeats=7):
    torch_raw = torch.from_numpy(raw)
    kwargs = {"seed_thresh": 0.9, "fg_thresh": 0.5, "min_object_size": min_size}
    t_ref, c_ref, ref = median_times(
        lambda: ref_cluster.cluster(torch_raw, n_sigma=n_sigma, **kwargs).numpy(), repeats, warm_up=True
    )
    t_ours, c_ours, ours = median_times(
        lambda: cluster(torch_raw, step=step, min_size=min_size, device="cpu"), max(repeats, ours_repeats), warm_up=True
    )
    ref = ref.astype(np.int32)
    res = average_precision(ref, ours, thresholds=[0.5, 0.9])
    fg = int((raw[-1] > 0).sum())
    cand = int((raw[-1] >= np.log(9.0)).sum())
    print(
        f"{name}: foreground {fg}, seed candidates {cand}, objects ref {int(ref.max())} ours {int(ours.max())}\n"
        f"  wall: ref {t_ref:8.3f} s  ours {t_ours:7.4f} s  speed-up {t_ref / t_ours:6.1f}x\n"
        f"  cpu:  ref {c_ref:8.3f} s  ours {c_ours:7.4f} s  speed-up {c_ref / c_ours:6.1f}x\n"
        f"  ours vs ref: AP0.5 {res.at(0.5).ap:.4f}  AP0.9 {res.at(0.9).ap:.4f}  "
        f"identical up to relabelling: {same_up_to_relabelling(ref, ours)}"
        + ("" if same_up_to_relabelling(ref, ours) else f"  (pixels with different objects: {differing(ref, ours)})"),
        flush=True,
    )


def main() -> None:
    parser = comparison_parser(__doc__, repeats=3, threads=True)
    parser.add_argument("--cases", default="2d,3d,noisy", help="comma-separated subset of 2d, 3d, noisy")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    Cluster, Cluster_3d = reference_clusterers(args.reference)
    cases = set(args.cases.split(","))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device cpu, repeats {args.repeats}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    for name, labels, raw, step, n_sigma, ref in clustering_cases(Cluster, Cluster_3d, "cpu", cases):
        if name.endswith("noisy"):
            spurious = int(((raw[-1] >= np.log(9.0)) & (labels == 0)).sum())
            print(f"noisy case: {spurious} seed candidates on background (each one a seed whose proposal is rejected)")
        run_case(name, raw, step, ref, n_sigma, args.repeats, 36)


def clustering_cases(Cluster, Cluster_3d, device: str, cases=("2d", "3d", "noisy")):
    """Yield (name, labels, raw output, step, n_sigma, reference clusterer on ``device``) for the chosen cases:
    2D 512x512 with 50 objects; 3D 64x256x256 with 100 objects (anisotropy 2); the same 3D labels
    with noise (spurious foreground and seed candidates that are rejected)."""
    if "2d" in cases:
        shape2 = (512, 512)
        labels2 = random_labels(shape2, 50, (8, 20), seed=0)
        ref2 = Cluster(shape2[0], shape2[1], STEP * (shape2[0] - 1), STEP * (shape2[1] - 1), device=device)
        yield "2D 512x512, 50 objects", labels2, perfect_raw(labels2, STEP, offset_noise=0.3, seed=0), STEP, 2, ref2
    if "3d" not in cases and "noisy" not in cases:
        return
    shape3 = (64, 256, 256)
    step3 = (2.0 * STEP, STEP, STEP)  # anisotropy 2
    labels3 = random_labels(shape3, 100, [(4, 8), (8, 16), (8, 16)], seed=1)
    ref3 = Cluster_3d(
        shape3[0], shape3[1], shape3[2],
        step3[0] * (shape3[0] - 1), step3[1] * (shape3[1] - 1), step3[2] * (shape3[2] - 1),
        device=device,
    )  # fmt: skip
    if "3d" in cases:
        raw3 = perfect_raw(labels3, step3, offset_noise=0.3, seed=1)
        yield "3D 64x256x256, 100 objects", labels3, raw3, step3, 3, ref3
    if "noisy" in cases:
        noisy = perfect_raw(
            labels3, step3, offset_noise=1.0, sigma_noise=0.02, seed_noise=0.5,
            seed_background=-3.0, background_seed_noise=1.5, background_sigma=1.3, seed=2,
        )  # fmt: skip
        yield "3D 64x256x256, 100 objects, noisy", labels3, noisy, step3, 3, ref3


if __name__ == "__main__":
    main()
