"""3D inference throughput: ours vs the reference EmbedSeg, without and with test-time augmentation.

Both networks carry the same (random) weights: the reference ``BranchedERFNet_3d`` state dict is
loaded into ours with ``core.erfnet.load_reference_state_dict``. Ours runs ``core.predict.predict_raw``
(one window over the whole volume); the reference runs its network on the padded volume, and for
TTA its ``apply_tta_3d`` 16 times with a running mean, as its ``test.py`` does. Prints voxels/s
(median of ``--repeats``), the ratio ours / reference, and the largest absolute difference between
the raw outputs (without TTA; with TTA for offsets and sigma, which both average).

    EMBEDSEG_REFERENCE=/path/to/folder/with/EmbedSeg python benchmarks/bench_inference.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.device import resolve_device  # noqa: E402
from core.erfnet import BranchedERFNet, load_reference_state_dict  # noqa: E402
from core.predict import predict_raw  # noqa: E402
from core.tiling import pad_to_multiple  # noqa: E402


def import_reference(path: str | None):
    folder = path or os.environ.get("EMBEDSEG_REFERENCE")
    if not folder:
        sys.exit("set EMBEDSEG_REFERENCE (or pass --reference) to the folder that contains EmbedSeg/")
    sys.path.insert(0, folder)
    import EmbedSeg.utils.test_time_augmentation as ref_tta
    from EmbedSeg.models.BranchedERFNet_3d import BranchedERFNet_3d

    return BranchedERFNet_3d, ref_tta


def reference_model(cls, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls([6, 1], input_channels=1)
    model.init_output(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.to(device).eval()


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="folder that contains EmbedSeg/ (default: $EMBEDSEG_REFERENCE)")
    parser.add_argument("--shape", default="64,256,256", help="Z,Y,X of the volume (default 64,256,256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta-repeats", type=int, default=None, help="repeats with TTA (default: --repeats)")
    parser.add_argument("--tta-batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-tta", action="store_true", help="skip the TTA comparison")
    args = parser.parse_args()

    cls, ref_tta = import_reference(args.reference)
    device = resolve_device(args.device)
    # the reference moves TTA inputs with a hard-coded .cuda(); send them to the chosen device instead
    ref_tta.to_cuda_3d = lambda a: torch.from_numpy(np.ascontiguousarray(a)[np.newaxis]).float().to(device)

    shape = tuple(int(s) for s in args.shape.split(","))
    voxels = int(np.prod(shape))
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    ref = reference_model(cls, device)
    ours = BranchedERFNet(3).to(device)
    load_reference_state_dict(ours, ref.state_dict())
    ours.eval()
    padded = pad_to_multiple(torch.from_numpy(image)[None, None]).to(device)
    crop = (slice(None), slice(None), *(slice(0, s) for s in shape))
    print(f"device {device}, volume {shape} ({voxels} voxels), torch threads {torch.get_num_threads()}")

    def ref_plain() -> np.ndarray:
        with torch.no_grad():
            return ref(padded)[crop][0].cpu().numpy()

    def ours_plain() -> np.ndarray:
        return predict_raw(ours, image, device=device, tile=None)

    def ref_with_tta() -> np.ndarray:
        with torch.no_grad():
            average = None
            for i in range(16):
                out = ref_tta.apply_tta_3d(padded, ref, i)
                average = out if average is None else (average * i + out) / (i + 1)
            return average[crop][0]

    def ours_with_tta() -> np.ndarray:
        return predict_raw(ours, image, device=device, tile=None, tta=True, tta_batch_size=args.tta_batch_size)

    ref_plain(), ours_plain()  # warm-up
    rows = []
    t_ref, out_ref = timed(ref_plain, args.repeats)
    t_ours, out_ours = timed(ours_plain, args.repeats)
    rows.append(("no TTA", t_ref, t_ours))
    diff = float(np.abs(out_ref - out_ours).max())
    print(f"max |raw ours - raw reference| without TTA: {diff:.3g}")
    if not args.no_tta:
        n = args.tta_repeats or args.repeats
        t_ref_tta, tta_ref = timed(ref_with_tta, n)
        t_ours_tta, tta_ours = timed(ours_with_tta, n)
        rows.append(("TTA x16", t_ref_tta, t_ours_tta))
        diff_tta = float(np.abs(tta_ref[:6] - tta_ours[:6]).max())
        print(f"max |offsets, sigma ours - reference| with TTA: {diff_tta:.3g}")
    print(f"{'case':8} {'reference s':>12} {'ours s':>9} {'reference vox/s':>16} {'ours vox/s':>12} {'ratio':>6}")
    for name, tr, to in rows:
        print(f"{name:8} {tr:12.2f} {to:9.2f} {voxels / tr:16.3g} {voxels / to:12.3g} {tr / to:6.2f}")


if __name__ == "__main__":
    main()
