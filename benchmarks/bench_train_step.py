"""Training step (forward + loss + backward + Adam step): this project against the reference (embedseg 0.2.5).

Shapes: ``2d`` batch 2 x 256 x 256, ``3d`` batch 1 x 32 x 128 x 128 and ``3d-thin`` batch 4 x 8 x 136 x 136
(the reference's 3D training batch on few-slice stacks), one input channel, synthetic objects.
Both networks start from the same weights: the reference's after its ``init_output`` (as its training
starts), imported with ``embedseg_service.core.model.erfnet.load_reference_state_dict``. Both losses use the same step,
1/1023 per pixel (the reference's loss is built with grid = crop extent and pixel = (grid - 1) / 1023), foreground
weight 10 and medoid centres. Each (implementation, shape) runs in its own subprocess so that the peak
resident memory (``ru_maxrss``) is its own.

Usage::

    EMBEDSEG_REFERENCE=/path/to/folder/containing/EmbedSeg python benchmarks/bench_train_step.py \
        [--repeats 7] [--threads N] [--device cpu|cuda] [--amp]

Prints per shape: the median step time of each (``--repeats`` timed steps after 2 warm-up steps),
the first step's loss of each, the peak RSS of each process, and the ratios ours / reference
(targets: time <= 0.8, RSS <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from _common import comparison_parser, reference_folder, run_timed, use_reference

SHAPES = {"2d": (2, (256, 256)), "3d": (1, (32, 128, 128)), "3d-thin": (4, (8, 136, 136))}
OBJECTS = {"2d": (40, (6.0, 14.0)), "3d": (30, [(3.0, 6.0), (6.0, 12.0), (6.0, 12.0)]),
           "3d-thin": (4, [(2.0, 3.0), (14.0, 24.0), (14.0, 24.0)])}  # fmt: skip


def _inputs(dims_key: str):
    import numpy as np
    import torch

    from embedseg_service.core.data.centers import CenterMode, object_centers
    from embedseg_service.core.data.synthetic import random_labels, render_image

    batch, shape = SHAPES[dims_key]
    n_objects, radius = OBJECTS[dims_key]
    labels = np.stack([random_labels(shape, n_objects, radius, seed=b) for b in range(batch)])
    images = np.stack([render_image(lab, seed=b) for b, lab in enumerate(labels)])[:, None]
    centers, ids = [], []
    for lab in labels:
        k_ids, k_centers = object_centers(lab, CenterMode.medoid, 1.0)
        ids.append(np.asarray(k_ids, dtype=np.int64))
        centers.append(np.asarray(k_centers, dtype=np.float64))
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), centers, ids


def _reference_modules(folder: str, dims: int, shape: tuple[int, ...]):
    """The reference network and loss; the loss's grid is the crop extent with the same step as ours."""
    use_reference(folder)
    from embedseg_service.core.model.embedding import DEFAULT_STEP

    grid = list(reversed(shape))  # x, y[, z]
    pixel = [(g - 1) * DEFAULT_STEP for g in grid]
    if dims == 2:
        from EmbedSeg.criterions.my_loss import SpatialEmbLoss
        from EmbedSeg.models.BranchedERFNet import BranchedERFNet

        net = BranchedERFNet(num_classes=[4, 1], input_channels=1)
        loss = SpatialEmbLoss(grid_y=grid[1], grid_x=grid[0], pixel_y=pixel[1], pixel_x=pixel[0], n_sigma=2,
                              foreground_weight=10)  # fmt: skip
    else:
        from EmbedSeg.criterions.my_loss_3d import SpatialEmbLoss_3d
        from EmbedSeg.models.BranchedERFNet_3d import BranchedERFNet_3d

        net = BranchedERFNet_3d(num_classes=[6, 1], input_channels=1)
        loss = SpatialEmbLoss_3d(grid_z=grid[2], grid_y=grid[1], grid_x=grid[0], pixel_z=pixel[2], pixel_y=pixel[1],
                                 pixel_x=pixel[0], n_sigma=3, foreground_weight=10)  # fmt: skip
    return net, loss


def worker(impl: str, dims_key: str, repeats: int, reference: str, device_name: str, amp: bool = False) -> dict:
    """Run in a subprocess: time ``repeats`` training steps and report the peak RSS."""
    import contextlib
    import io

    import numpy as np
    import torch

    from embedseg_service.core.model.embedding import step_for
    from embedseg_service.core.model.erfnet import BranchedERFNet, load_reference_state_dict
    from embedseg_service.core.training.loss import EmbedSegLoss

    device = torch.device(device_name)
    dims = 2 if dims_key == "2d" else 3
    images, labels, centers, ids = _inputs(dims_key)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints on construction
        ref_net, ref_loss = _reference_modules(reference, dims, SHAPES[dims_key][1])
        ref_net.init_output(dims)  # as the reference's training starts (offsets 0, sigma bias 1)
    if impl == "ours":
        net = BranchedERFNet(dims, in_channels=1)
        load_reference_state_dict(net, ref_net.state_dict())
        del ref_net, ref_loss
        loss_fn = EmbedSegLoss(dims, step_for(dims), foreground_weight=10.0)
        centers_t = [torch.as_tensor(c, dtype=torch.float32, device=device) for c in centers]
        ids_t = [torch.as_tensor(i, device=device) for i in ids]

        def loss_of(raw: torch.Tensor) -> torch.Tensor:
            return loss_fn(raw, labels_d, centers_t, ids_t, None)

    else:
        net, loss_fn = ref_net, ref_loss
        # the reference marks each object's centre pixel in a boolean image
        center_images = torch.zeros(labels.shape, dtype=torch.bool)
        for b, c in enumerate(centers):
            idx = np.rint(c).astype(np.int64)
            center_images[(b, *idx.T)] = True
        center_images_d = center_images.to(device)

        def loss_of(raw: torch.Tensor) -> torch.Tensor:
            with contextlib.redirect_stdout(io.StringIO()):
                return loss_fn(raw, labels_d, (labels_d > 0).long(), center_images_d).mean()

    torch.backends.cudnn.benchmark = True  # as both trainings set it
    net.to(device).train()
    loss_fn.to(device)
    images_d = images.to(device)
    labels_d = labels.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-4, weight_decay=1e-4)
    mixed = amp and impl == "ours" and device.type == "cuda"  # as embedseg_service.core.training.train runs on CUDA
    scaler = torch.amp.GradScaler("cuda", enabled=mixed)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=mixed):
            raw = net(images_d)
        loss = loss_of(raw.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    torch.manual_seed(1)
    first_loss = step()
    step()
    times, _, _ = run_timed(step, repeats)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"impl": impl, "dims": dims_key, "median_s": statistics.median(times), "times": times,
           "first_loss": first_loss, "peak_rss_mib": rss_kib / 1024.0}  # fmt: skip
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = comparison_parser(__doc__, repeats=7, device="cpu", threads=True)
    parser.add_argument("--shapes", default="2d,3d")
    parser.add_argument("--amp", action="store_true", help="ours with float16 autocast on CUDA, as its training runs")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "DIMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.reference = reference_folder(args.reference)
    if args.repeats < 5:
        sys.exit("--repeats must be at least 5")
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker[0], args.worker[1], args.repeats, args.reference, args.device, args.amp)))
        return

    amp_note = ", ours with amp" if args.amp else ""
    print(
        f"train step, device {args.device}{amp_note}, median of {args.repeats} steps, "
        f"threads {args.threads or 'default'}"
    )
    for dims_key in args.shapes.split(","):
        batch, shape = SHAPES[dims_key]
        results = {}
        for impl in ("reference", "ours"):
            cmd = [sys.executable, __file__, "--worker", impl, dims_key, "--repeats", str(args.repeats),
                   "--reference", args.reference, "--device", args.device]  # fmt: skip
            if args.amp:
                cmd.append("--amp")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{impl} {dims_key} failed:\n{done.stderr}")
            results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
        ours, ref = results["ours"], results["reference"]
        label = f"{dims_key} {batch}x{'x'.join(map(str, shape))}"
        print(
            f"{label:>16}: time ours {ours['median_s']:.3f} s, reference {ref['median_s']:.3f} s, "
            f"ratio {ours['median_s'] / ref['median_s']:.2f} (target <= 0.8)"
        )
        print(
            f"{'':>16}  peak RSS ours {ours['peak_rss_mib']:.0f} MiB, reference {ref['peak_rss_mib']:.0f} MiB, "
            f"ratio {ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f} (target <= 1.0)"
        )
        if "peak_cuda_mib" in ours:
            print(
                f"{'':>16}  peak CUDA ours {ours['peak_cuda_mib']:.0f} MiB, reference {ref['peak_cuda_mib']:.0f} MiB, "
                f"ratio {ours['peak_cuda_mib'] / ref['peak_cuda_mib']:.2f}"
            )
        print(f"{'':>16}  first-step loss ours {ours['first_loss']:.6f}, reference {ref['first_loss']:.6f}")


if __name__ == "__main__":
    main()
