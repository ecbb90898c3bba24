"""Peak memory of tiled prediction: a volume 8x the tile against one tile plus the output arrays.

Each case runs in its own process (``--case``) and reports ``ru_maxrss``:

* ``single``: one tile-sized volume, predicted whole;
* ``tiled``: a volume of 2x the tile along every axis (8x the voxels), predicted tile by tile;
* ``whole``: the same large volume predicted in one window (what tiling avoids).

The budget for ``tiled`` is the ``single`` peak plus the volume-sized arrays that ``tiled`` must hold
and ``single`` holds smaller (input image and stitched raw output, float32); the script prints
``tiled / budget`` (target <= 1.2), also for the memory above the process' state before prediction.
Medians over ``--repeats`` runs.

    python benchmarks/bench_tiling.py [--tile 32,128,128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys


def run_case(case: str, tile: tuple[int, ...], tta: bool) -> None:
    import numpy as np
    import torch

    from embedseg_service.core.inference.predict import predict_raw
    from embedseg_service.core.model.erfnet import BranchedERFNet

    torch.manual_seed(0)
    dims = len(tile)
    model = BranchedERFNet(dims).eval()
    shape = tile if case == "single" else tuple(2 * t for t in tile)
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    with torch.inference_mode():  # warm the kernels on a small input so both cases start alike
        model(torch.zeros((1, 1) + (8,) * dims))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    raw = predict_raw(model, image, device="cpu", tile=None if case != "tiled" else tile, tta=tta, tta_batch_size=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arrays = image.nbytes + raw.nbytes
    print(json.dumps({"case": case, "shape": shape, "peak": peak, "before": before, "arrays": arrays}))


def measure(case: str, tile: tuple[int, ...], tta: bool) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--tile", ",".join(map(str, tile))] + (["--tta"] if tta else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile", default="32,128,128", help="tile shape in array order (default 32,128,128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta", action="store_true", help="with test-time augmentation")
    parser.add_argument("--skip-whole", action="store_true", help="do not run the untiled large volume")
    parser.add_argument("--case", choices=["single", "tiled", "whole"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    tile = tuple(int(t) for t in args.tile.split(","))
    if args.case:
        run_case(args.case, tile, args.tta)
        return

    cases = ["single", "tiled"] + ([] if args.skip_whole else ["whole"])
    results = {c: [measure(c, tile, args.tta) for _ in range(args.repeats)] for c in cases}
    keys = ("peak", "before", "arrays")
    med = {c: {k: statistics.median(r[k] for r in rs) for k in keys} for c, rs in results.items()}
    mib = 1 << 20
    print(f"tile {tile}, volume {tuple(2 * t for t in tile)} (8x), TTA {args.tta}, medians of {args.repeats}")
    print(f"{'case':7} {'peak MiB':>9} {'before MiB':>11} {'above MiB':>10} {'arrays MiB':>11}")
    for c in cases:
        m = med[c]
        print(
            f"{c:7} {m['peak'] / mib:9.0f} {m['before'] / mib:11.0f} {(m['peak'] - m['before']) / mib:10.0f} "
            f"{m['arrays'] / mib:11.0f}"
        )
    s, t = med["single"], med["tiled"]
    extra = t["arrays"] - s["arrays"]
    print(f"tiled peak / (single peak + extra arrays) = {t['peak'] / (s['peak'] + extra):.3f} (target <= 1.2)")
    above = (t["peak"] - t["before"]) / (s["peak"] - s["before"] + extra)
    print(f"same, memory above the state before prediction = {above:.3f}")
    if "whole" in med:
        w = med["whole"]
        print(
            f"whole-volume peak / tiled peak = {w['peak'] / t['peak']:.2f} "
            f"(above-before: {(w['peak'] - w['before']) / (t['peak'] - t['before']):.2f})"
        )


if __name__ == "__main__":
    main()
