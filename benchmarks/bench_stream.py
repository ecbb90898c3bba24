"""Peak memory and time of streamed prediction (docs/method.md §11.5) against whole-volume prediction.

A uint8 volume of bright balls is written chunk by chunk as a zipped OME-Zarr store; then, each in its own
process, the ERF-Net (random weights, seed bias raised so that it finds objects) predicts it:

* ``stream``: :func:`embedseg_service.core.inference.stream.segment_streamed` from the store into an OME-Zarr
  label folder, window by window;
* ``whole``: the volume read whole and segmented with :func:`embedseg_service.core.inference.predict.segment`
  (skipped with ``--no-whole``, for volumes that do not fit).

Each prints its resident memory after the imports, its peak (``ru_maxrss``), the growth and the seconds;
the script prints both lines and, when both ran, whether the labels hold the same objects. ``--tta``: both
with test-time augmentation.

    python benchmarks/bench_stream.py [--shape 48,512,512] [--core 48,192,192] [--margin 32] [--tile 48,128,128]
                                      [--tta]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def write_volume(folder: Path, shape: tuple[int, ...]) -> Path:
    """Balls of radius 6 on a jittered grid 20 pixels apart, written a slab of 16 slices at a time."""
    import numcodecs
    import numpy as np
    import zarr
    from zarr.storage import LocalStore

    from embedseg_service.core.data.ome_zarr import zip_folder

    group = zarr.open_group(store=LocalStore(folder / "in.ome.zarr"), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                   "datasets": [{"path": "0"}]}]  # fmt: skip
    array = group.create_array("0", shape=shape, chunks=(16, 256, 256), dtype="uint8",
                               compressors=numcodecs.Blosc(cname="lz4"))  # fmt: skip
    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[:16, : shape[1], : shape[2]]
    for z0 in range(0, shape[0], 16):
        slab = np.full((min(16, shape[0] - z0), shape[1], shape[2]), 20, np.uint8)
        for cy in range(10, shape[1] - 10, 20):
            for cx in range(10, shape[2] - 10, 20):
                c = np.array([8, cy, cx]) + rng.uniform(-2, 2, 3)
                ball = (zz[: slab.shape[0]] - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 36
                slab[ball] = 200
        array[z0 : z0 + slab.shape[0]] = slab
    zip_folder(folder / "in.ome.zarr", folder / "in.ome.zarr.zip")
    return folder / "in.ome.zarr.zip"


def _network():  # type: ignore[no-untyped-def]
    import torch

    from embedseg_service.core.model.erfnet import BranchedERFNet

    torch.manual_seed(0)
    net = BranchedERFNet(3).eval()
    with torch.no_grad():
        net.decoders[1].output_conv.bias.fill_(2.5)
    return net


def run_case(case: str, source: Path, out: Path, args: argparse.Namespace) -> None:
    from embedseg_service.core.data.normalization import NormalizationSettings, normalize
    from embedseg_service.core.data.ome_zarr import OmeZarrVolume, create_labels
    from embedseg_service.core.data.volume_source import OmeZarrSource
    from embedseg_service.core.inference.predict import segment
    from embedseg_service.core.inference.stream import segment_streamed
    from embedseg_service.core.model.embedding import step_for

    net = _network()
    before = _rss()
    started = time.perf_counter()
    with OmeZarrVolume(source) as volume:
        if case == "stream":
            labels = create_labels(out, volume.info.shape, voxel_size=None, chunks=(16, 256, 256))
            options = {"tile": args.tile, "core": args.core, "margin": (args.margin,) * 3, "device": "cpu",
                       "tta": args.tta}  # fmt: skip
            settings = NormalizationSettings()
            segment_streamed(net, OmeZarrSource(volume), labels, step=step_for(3), normalization=settings, min_size=30,
                             **options)  # fmt: skip
        else:
            import numpy as np

            result = segment(net, normalize(volume.read()), step=step_for(3), tile=args.tile, min_size=30, device="cpu",
                             tta=args.tta)  # fmt: skip
            np.save(out.parent / "whole.npy", result)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"case": case, "after_imports": before, "peak": peak, "growth": peak - before,
                      "seconds": round(time.perf_counter() - started, 1)}))  # fmt: skip


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=_sizes, default=(48, 512, 512))
    parser.add_argument("--core", type=_sizes, default=(48, 192, 192))
    parser.add_argument("--tile", type=_sizes, default=(48, 128, 128))
    parser.add_argument("--margin", type=int, default=32)
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-volume prediction")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation in both")
    parser.add_argument("--case", choices=("stream", "whole"), help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args.case, args.source, args.out, args)
        return
    with tempfile.TemporaryDirectory() as folder:
        source = write_volume(Path(folder), args.shape)
        print(f"volume {args.shape}: {4 * args.shape[0] * args.shape[1] * args.shape[2] / 2**20:.0f} MiB as float32")
        for case in ("stream",) + (() if args.no_whole else ("whole",)):
            command = [sys.executable, __file__, "--case", case, "--source", str(source), "--out",
                       str(Path(folder) / f"{case}.ome.zarr"), "--tile", ",".join(map(str, args.tile)),
                       "--core", ",".join(map(str, args.core)), "--margin", str(args.margin)]  # fmt: skip
            command += ["--tta"] if args.tta else []
            print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())
        if not args.no_whole:
            import numpy as np

            from embedseg_service.core.data.ome_zarr import OmeZarrVolume, zip_folder

            zip_folder(Path(folder) / "stream.ome.zarr", Path(folder) / "stream.zip")
            with OmeZarrVolume(Path(folder) / "stream.zip") as streamed:
                a = streamed.read().astype(np.int64)
            b = np.load(Path(folder) / "whole.npy").astype(np.int64)
            pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
            same = len(set(pairs[0])) == len(set(pairs[1])) == pairs.shape[1]
            print(json.dumps({"objects": int(len(set(pairs[1])) - 1), "same_objects": bool(same)}))


if __name__ == "__main__":
    main()
