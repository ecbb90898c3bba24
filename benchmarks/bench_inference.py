"""3D inference throughput: ours vs the reference EmbedSeg, without and with test-time augmentation.

Both networks carry the same (random) weights: the reference ``BranchedERFNet_3d`` state dict is
loaded into ours with ``embedseg_service.core.model.erfnet.load_reference_state_dict``. Ours runs
``embedseg_service.core.inference.predict.predict_raw`` (one window over the whole volume); the reference runs its
network on the padded volume, and for TTA its ``apply_tta_3d`` 16 times with a running mean, as its ``test.py`` does.
Prints voxels/s and process CPU seconds (medians of ``--repeats``), the ratios reference time / ours, and the
largest absolute difference between the raw outputs (without TTA; with TTA for offsets and
sigma, which the reference averages and ours takes the median of).

    EMBEDSEG_REFERENCE=/path/to/folder/with/EmbedSeg python benchmarks/bench_inference.py
"""

from __future__ import annotations

import numpy as np
import torch
from _common import comparison_parser, median_times, use_reference

from embedseg_service.core.device import resolve_device
from embedseg_service.core.inference.padding import pad_to_multiple
from embedseg_service.core.inference.predict import predict_raw
from embedseg_service.core.model.erfnet import BranchedERFNet, load_reference_state_dict


def import_reference(folder: str | None):
    """The reference's ``BranchedERFNet_3d`` class and TTA module, from ``folder`` or ``$EMBEDSEG_REFERENCE``."""
    use_reference(folder)
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


def main() -> None:
    parser = comparison_parser(__doc__, repeats=3, device="auto")
    parser.add_argument("--shape", default="64,256,256", help="Z,Y,X of the volume (default 64,256,256)")
    parser.add_argument("--tta-shape", default=None, help="Z,Y,X of the TTA volume (default: --shape)")
    parser.add_argument("--tta-batch-size", type=int, default=4)
    parser.add_argument("--no-tta", action="store_true", help="skip the TTA comparison")
    args = parser.parse_args()

    cls, ref_tta = import_reference(args.reference)
    device = resolve_device(args.device)
    # the reference moves TTA inputs with a hard-coded .cuda(); send them to the chosen device instead
    ref_tta.to_cuda_3d = lambda a: torch.from_numpy(np.ascontiguousarray(a)[np.newaxis]).float().to(device)

    ref = reference_model(cls, device)
    ours = BranchedERFNet(3).to(device)
    load_reference_state_dict(ours, ref.state_dict())
    ours.eval()
    print(f"device {device}, torch threads {torch.get_num_threads()}, medians of {args.repeats} runs")
    rows = []
    for tta in (False, True):
        if tta and args.no_tta:
            break
        shape = tuple(int(s) for s in (args.tta_shape if tta and args.tta_shape else args.shape).split(","))
        image = np.random.default_rng(0).random(shape).astype(np.float32)
        padded = pad_to_multiple(torch.from_numpy(image)[None, None]).to(device)
        crop = (slice(None), slice(None), *(slice(0, s) for s in shape))

        def ref_run(tta: bool = tta, padded: torch.Tensor = padded, crop: tuple = crop) -> np.ndarray:
            with torch.no_grad():
                if not tta:
                    return ref(padded)[crop][0].cpu().numpy()
                average = None
                for i in range(16):
                    out = ref_tta.apply_tta_3d(padded, ref, i)
                    average = out if average is None else (average * i + out) / (i + 1)
                return average[crop][0]

        def ours_run(tta: bool = tta, image: np.ndarray = image) -> np.ndarray:
            return predict_raw(ours, image, device=device, tile=None, tta=tta, tta_batch_size=args.tta_batch_size)

        if not tta:
            ref_run(), ours_run()  # warm-up
        sync = torch.cuda.synchronize if torch.cuda.is_available() else None
        w_ref, c_ref, out_ref = median_times(ref_run, args.repeats, sync=sync)
        w_ours, c_ours, out_ours = median_times(ours_run, args.repeats, sync=sync)
        name = "TTA x16" if tta else "no TTA"
        rows.append((name, shape, int(np.prod(shape)), w_ref, w_ours, c_ref, c_ours))
        if tta:  # the reference averages the passes, ours takes their median (inference.tta.TTACombine)
            diff = float(np.abs(out_ref[:6] - out_ours[:6]).max())
            print(f"max |offsets, sigma ours (median) - reference (mean)| with TTA: {diff:.3g}")
        else:
            print(
                f"max |raw ours - raw reference| without TTA: {float(np.abs(out_ref - out_ours).max()):.3g} "
                f"(outputs up to {float(np.abs(out_ref).max()):.3g})"
            )
    print(
        f"{'case':8} {'volume':>14} {'ref wall s':>10} {'ours wall s':>11} {'ref vox/s':>10} {'ours vox/s':>10} "
        f"{'ratio':>6} {'ref cpu s':>9} {'ours cpu s':>10} {'cpu ratio':>9}"
    )
    for name, shape, voxels, w_ref, w_ours, c_ref, c_ours in rows:
        print(
            f"{name:8} {'x'.join(map(str, shape)):>14} {w_ref:10.2f} {w_ours:11.2f} {voxels / w_ref:10.3g} "
            f"{voxels / w_ours:10.3g} {w_ref / w_ours:6.2f} {c_ref:9.2f} {c_ours:10.2f} {c_ref / c_ours:9.2f}"
        )


if __name__ == "__main__":
    main()
