"""Training-data preparation: object centres and object-centred crops, this project against the reference.

Inputs are the real files of ``tests/data``: the 2D nuclei image ``nuclei2d_dsb`` (512², 125 objects), a
2D ``cells2d_bbbc007`` image and the 3D ``nuclei3d_synthetic`` volume (31×61×57, 51 objects).

Figures, each the median of ``--repeats`` runs:

* ``centres``: medoid of every object of a whole mask. This project:
  ``embedseg_service.core.data.centers.object_centers`` (one pass with ``find_objects``, summed distances by FFT, exact
  re-scoring of the best). Reference: ``generate_center_image`` / ``generate_center_image_3d`` (a full-image scan per
  object and an n × n distance matrix, numba).
  Also printed: how many centres are the same pixel.
* ``crops``: all training crops of one 2D image with their medoid centres, from the TIFF files. This
  project: ``CropDataset`` (windows on the normalised image) and every item built once. Reference:
  ``generate_crops.process`` writing its crops to a temporary folder (its normal use); the crops
  are the same in number, their storage differs (files there, windows here).

The reference needs ``pycocotools`` only for RLE output (not used here; a stand-in module is
registered when it is missing) and calls ``tifffile.imsave``, which current tifffile no longer has
(pointed at ``tifffile.imwrite`` for the run); see ``_common.install_stand_ins`` and
``_common.compatibility_names``.

Usage::

    EMBEDSEG_REFERENCE=/path/to/folder/containing/EmbedSeg python benchmarks/bench_crops.py [--repeats 5]
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import types
from pathlib import Path

import numpy as np
from _common import comparison_parser, compatibility_names, install_stand_ins, median_times, use_reference

from embedseg_service.core.data.centers import CenterMode, object_centers
from embedseg_service.core.data.datasets import CropDataset
from embedseg_service.core.data.io import read_tiff

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def load_reference(folder: str | None) -> types.ModuleType:
    """The reference's ``generate_crops`` module, from ``folder`` or ``$EMBEDSEG_REFERENCE``."""
    use_reference(folder)
    install_stand_ins()
    compatibility_names()
    from EmbedSeg.utils import generate_crops

    return generate_crops


def bench_centres(ref, name: str, stem: str, repeats: int, anisotropy: float = 1.0) -> None:
    mask = read_tiff(DATA / name / "masks" / f"{stem}.tif").data.astype(np.int64)
    ids = np.unique(mask)[1:]
    if mask.ndim == 2:

        def run_ref():
            return ref.generate_center_image(mask, "medoid", ids, False)
    else:

        def run_ref():
            return ref.generate_center_image_3d(mask, "medoid", ids, False, anisotropy, 1)

    def run_ours():
        return object_centers(mask, CenterMode.medoid, anisotropy)

    ref_image = run_ref()  # also compiles the numba kernel
    ours_ids, ours_centres = run_ours()
    ref_points = {tuple(int(v) for v in p) for p in np.argwhere(ref_image)}
    same = sum(tuple(int(v) for v in c) in ref_points for c in ours_centres)
    t_ref = median_times(run_ref, repeats)[0]
    t_ours = median_times(run_ours, repeats)[0]
    print(
        f"centres  {name:<20} {str(mask.shape):<15} {len(ids):>4} objects  ours {t_ours * 1e3:8.1f} ms  "
        f"reference {t_ref * 1e3:8.1f} ms  speed-up {t_ref / t_ours:6.1f}x  same pixel {same}/{len(ids)}"
    )


def bench_crops(ref, name: str, stem: str, crop: int, repeats: int) -> None:
    image_path = DATA / name / "images" / f"{stem}.tif"
    mask_path = DATA / name / "masks" / f"{stem}.tif"

    def run_ours():
        image = read_tiff(image_path).data
        mask = read_tiff(mask_path).data
        ds = CropDataset([image], [mask], crop_shape=(crop, crop), center_mode="medoid", augment=False)
        for i in range(len(ds)):
            ds[i]
        return len(ds)

    def run_ref():
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            np.random.seed(0)
            ref.process(str(image_path), str(mask_path), tmp, "train", crop, "medoid")
            return len(os.listdir(Path(tmp) / "train" / "images"))

    n_ref = run_ref()
    n_ours = run_ours()
    t_ref = median_times(run_ref, repeats)[0]
    t_ours = median_times(run_ours, repeats)[0]
    print(
        f"crops    {name:<20} crop {crop}²  ours {n_ours:>4} crops {t_ours * 1e3:8.1f} ms  "
        f"reference {n_ref:>4} crops {t_ref * 1e3:8.1f} ms  speed-up {t_ref / t_ours:6.1f}x"
    )


def main() -> None:
    parser = comparison_parser(__doc__, repeats=5)
    args = parser.parse_args()
    ref = load_reference(args.reference)
    bench_centres(ref, "nuclei2d_dsb", "dsb2018_img2d", args.repeats)
    bench_centres(ref, "cells2d_bbbc007", "A9_A9_p5d", args.repeats)
    bench_centres(ref, "nuclei3d_synthetic", "synthetic_img3d", args.repeats)
    bench_centres(ref, "nuclei3d_synthetic", "synthetic_img3d", args.repeats, anisotropy=2.0)
    bench_crops(ref, "nuclei2d_dsb", "dsb2018_img2d", 64, args.repeats)
    bench_crops(ref, "cells2d_bbbc007", "A9_A9_p5d", 64, args.repeats)


if __name__ == "__main__":
    main()
