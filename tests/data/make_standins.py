"""Rebuild the two stand-ins for few-slice, strongly anisotropic confocal stacks.

Both sets use the layout of the other test data, ``<set>/images/<name>.tif`` with the labels in
``<set>/masks/<name>.tif``, uint8 images, uint16 labels, zlib-compressed, with the voxel size in the
files' ImageJ metadata (``embedseg_service.core.data.io.read_tiff`` returns it). Names start with the split they belong
to (``train_``, ``val_``, ``test_``); ``tests/data/README.md`` describes them.

- ``nuclei3d_cells3d_fewslice``: every 6th slice of the nuclei volume of ``nuclei3d_cells3d``
  (slices 21, 27, ..., 51: the six that cut through the nuclei), voxel 1.74 x 0.26 x 0.26 um, cut
  into three regions of the field. Intensities are mapped linearly from the source's 0.1-99.9
  percentiles to 0-255. Needs the source files (``--cells3d``).
- ``nuclei3d_fewslice_synthetic``: :func:`embedseg_service.core.data.synthetic.anisotropic_nuclei_stack` with the seeds
  and shapes of :data:`SYNTHETIC`, voxel 1.0 x 0.2 x 0.2 um.

Usage::

    python tests/data/make_standins.py [--cells3d DIR] [--out DIR] [--check]

``DIR`` for ``--cells3d`` holds ``images/cells3d_nuclei.tif`` and ``masks/cells3d_nuclei.tif`` (the
``nuclei3d_cells3d`` set; see ``tests/data/README.md`` for where its pixels come from); without it
only the synthetic set is written. ``--out`` defaults to this folder. ``--check`` writes nothing and
exits with status 1 when a file there differs from what would be written (pixels or voxel size).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from embedseg_service.core.data.io import read_tiff  # noqa: E402
from embedseg_service.core.data.synthetic import anisotropic_nuclei_stack  # noqa: E402
from embedseg_service.core.data.tiff_write import write_labels, write_tiff  # noqa: E402

HERE = Path(__file__).resolve().parent
CELLS3D_SET = "nuclei3d_cells3d_fewslice"
SYNTHETIC_SET = "nuclei3d_fewslice_synthetic"

CELLS3D_SHAPE = (60, 256, 256)
CELLS3D_VOXEL_UM = (0.29, 0.26, 0.26)
CELLS3D_SLICES = slice(21, 52, 6)
"""Every 6th slice, through the nuclei (which lie in slices 17-59 of 60)."""
CELLS3D_VOXEL_SUB_UM = (round(CELLS3D_VOXEL_UM[0] * 6, 6), *CELLS3D_VOXEL_UM[1:])
CELLS3D_REGIONS: dict[str, tuple[slice, slice]] = {
    # (Y, X) windows. Rows 112-127 are left out, so no nucleus lies in both training and val/test;
    # val and test share one nucleus, cut at x = 144.
    "train_top": (slice(0, 112), slice(0, 256)),
    "val_bottom_right": (slice(128, 256), slice(144, 256)),
    "test_bottom_left": (slice(128, 256), slice(0, 144)),
}

SYNTHETIC_VOXEL_UM = (1.0, 0.2, 0.2)


@dataclass(frozen=True)
class SyntheticStack:
    name: str
    shape: tuple[int, int, int]
    n_objects: int
    seed: int


SYNTHETIC: tuple[SyntheticStack, ...] = (
    SyntheticStack("train_0", (5, 192, 192), 6, 1201),
    SyntheticStack("train_1", (5, 192, 192), 6, 1202),
    SyntheticStack("val_0", (5, 192, 192), 6, 1211),
    SyntheticStack("test_0", (5, 192, 256), 8, 1221),
)


def cells3d_stacks(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (image uint8, labels)`` of the cells3d stand-in, from the ``nuclei3d_cells3d`` set in ``folder``."""
    image = read_tiff(folder / "images" / "cells3d_nuclei.tif").data
    labels = read_tiff(folder / "masks" / "cells3d_nuclei.tif").data
    if image.shape != CELLS3D_SHAPE or labels.shape != CELLS3D_SHAPE:
        raise SystemExit(f"expected {CELLS3D_SHAPE} (Z, Y, X) image and labels, got {image.shape} and {labels.shape}")
    lo, hi = np.percentile(image, [0.1, 99.9])
    scaled = np.clip(np.round((image.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    out = {}
    for name, (ys, xs) in CELLS3D_REGIONS.items():
        out[name] = (scaled[CELLS3D_SLICES, ys, xs], labels[CELLS3D_SLICES, ys, xs])
    train_ids = set(np.unique(out["train_top"][1]).tolist()) - {0}
    held_ids = set().union(*(np.unique(lab).tolist() for n, (_, lab) in out.items() if n != "train_top")) - {0}
    if train_ids & held_ids:
        raise SystemExit(f"nuclei {sorted(train_ids & held_ids)} would lie in both training and held-out stacks")
    return out


def synthetic_stacks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (image uint8, labels int32)`` of the synthetic stand-in."""
    return {s.name: anisotropic_nuclei_stack(s.shape, s.n_objects, s.seed) for s in SYNTHETIC}


def write_set(folder: Path, stacks: dict[str, tuple[np.ndarray, np.ndarray]], voxel: tuple[float, ...]) -> None:
    for name, (image, labels) in stacks.items():
        write_tiff(folder / "images" / f"{name}.tif", image, axes="ZYX", voxel_size=voxel)
        write_labels(folder / "masks" / f"{name}.tif", labels, voxel_size=voxel)
        n = len(np.unique(labels)) - 1
        print(f"  {folder.name}/{name}: {image.shape} {image.dtype}, {n} objects")


def differences(expected: Path, written: Path) -> list[str]:
    """Relative paths of files under ``written`` whose pixels or voxel size differ from those under ``expected``."""
    out = []
    for path in sorted(written.rglob("*.tif")):
        rel = path.relative_to(written)
        target = expected / rel
        if not target.exists():
            out.append(f"{rel} (missing)")
            continue
        a, b = read_tiff(path), read_tiff(target)
        same_voxel = a.voxel_size is not None and b.voxel_size is not None
        same_voxel = same_voxel and np.allclose(a.voxel_size, b.voxel_size, rtol=1e-6)
        if a.data.dtype != b.data.dtype or not np.array_equal(a.data, b.data) or not same_voxel:
            out.append(str(rel))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells3d", type=Path, help="folder of the nuclei3d_cells3d set (images/, masks/)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write the sets into (default: here)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args()
    sets = [(SYNTHETIC_SET, synthetic_stacks(), SYNTHETIC_VOXEL_UM)]
    if args.cells3d is not None:
        sets.append((CELLS3D_SET, cells3d_stacks(args.cells3d), CELLS3D_VOXEL_SUB_UM))
    else:
        print(f"no --cells3d: {CELLS3D_SET} is not rebuilt")
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) if args.check else args.out
        for name, stacks, voxel in sets:
            write_set(target / name, stacks, voxel)
        if args.check:
            bad = differences(args.out, target)
            print("\n".join(f"differs: {b}" for b in bad) or f"all files under {args.out} match")
            if bad:
                sys.exit(1)


if __name__ == "__main__":
    main()
