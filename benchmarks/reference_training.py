"""The reference EmbedSeg 0.2.5 trained and applied as its example notebooks do, under a CPU-time budget.

Used by ``bench_quality.py``, in 2D (its 2D notebooks) or 3D (its 3D notebooks, e.g.
``examples/3d/Mouse-Organoid-Cells-CBG``). Every step calls the reference's own functions:

- data: ``preprocess_data.split_train_val`` (validation images held out with its fixed seed, or the
  validation images the benchmark names), ``get_data_properties`` (``mode`` ``"2d"``/``"3d"``), the
  notebooks' crop-size rule (mean object extent + 5 standard deviations, rounded up to 8, per axis;
  Y and X share the larger) and ``generate_crops.process`` / ``process_3d`` (medoid centres,
  min-max-percentile 1-99.8 normalisation, ``one_hot`` False; 3D: ``anisotropy_factor`` = voxel
  Z / X, ``speed_up`` 3);
- training: ``create_dataset_dict`` / ``create_model_dict`` / ``create_loss_dict`` /
  ``create_configs`` with the notebooks' values (2D: batch 16, default loss weights; 3D: name
  ``"3d"``, training batch 4, validation batch 16, ``BranchedERFNet_3d`` with 6 + 1 outputs,
  ``SpatialEmbLoss_3d`` with ``n_sigma`` 3 and the data's foreground weight, ``n_z``/``n_y``/``n_x``
  and ``anisotropy_factor``; virtual multiplier 1, ``n_epochs`` 200) and ``train.begin_training``
  itself (Adam 5e-4, weight decay 1e-4, its poly decay, validation IoU every epoch,
  ``best_iou_model.pth``);
- inference: ``create_test_configs_dict`` and ``test.begin_evaluating`` (fg 0.5, seed 0.9, the data's
  minimum object size; TTA by ``apply_tta_2d`` or ``apply_tta_3d`` (16 passes); 3D: ``Cluster_3d``
  on the ``n_z`` x ``n_y`` x ``n_x`` grid, test stacks reflect-padded to multiples of 8 by its own
  ``pad_3d``), whose predictions are read back for scoring.

Crops of few-slice stacks: the crop-size rule gives at least 8 slices (16 for nuclei spanning 4-6
slices), but the loss's coordinate grid is ``n_z`` deep, the test stacks' depth rounded up to 8 (8
for 5-6 slices), and a deeper crop fails in ``SpatialEmbLoss_3d`` (tensor sizes differ), so the
crop is capped at the grid on every axis. And ``process_3d`` only writes a crop that fits wholly
inside the stack, so a stack with fewer slices (or rows, columns) than the crop gives no crop at
all: such stacks are padded, for crop generation only, to the crop size (evenly before and after;
a 5-slice stack becomes 8 slices), the image with its median background intensity (voxels labelled
0), the labels with 0. Data properties are measured on the unpadded stacks, and test stacks are not
padded here: the reference reflect-pads them to a multiple of 8 itself at inference.

Deviations, all forced by running on one CPU thread with current libraries: data-loader workers 0
(so that the loading counts in the process CPU time), device ``cpu`` (the reference's TTA moves
tensors with a hard-coded ``.cuda()``, sent to the CPU here), and stand-ins for ``torchvision`` and
``pycocotools`` (which cannot be installed beside the CPU build of torch) and for two names newer
``tifffile``/``matplotlib`` releases dropped (``tifffile.imsave``, ``matplotlib.rcsetup.interactive_bk``).
The budget is enforced through the ``tqdm`` wrapper the reference puts around its data loaders.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _common import CpuBudget, compatibility_names, install_stand_ins, use_reference

PROJECT = "bench"
CENTER = "medoid"
CROP_N_SIGMA = 5
NORM = "min-max-percentile"
VAL_FRACTION = 0.15
NOTEBOOK_EPOCHS = 200
BATCH_SIZE = 16
BATCH_SIZE_3D = 4
"""Training batch of the 3D notebooks (their validation batch is ``BATCH_SIZE``)."""
SPEED_UP_3D = 3
"""``speed_up`` of the 3D notebooks' ``process_3d`` (medoids computed on every 3rd pixel in Y and X)."""


# --------------------------------------------------------------------------------------------
# the reference's modules


def import_reference(folder: str | None) -> types.SimpleNamespace:
    """Import the reference's modules from ``folder`` (the parent of ``EmbedSeg/``; default
    ``$EMBEDSEG_REFERENCE``), with the stand-ins and compatibility names of ``_common``."""
    stand_ins = install_stand_ins()
    compat = compatibility_names()
    use_reference(folder)
    with contextlib.redirect_stdout(sys.stderr):
        import EmbedSeg.test as ref_test
        import EmbedSeg.train as ref_train
        import EmbedSeg.utils.test_time_augmentation as ref_tta
        from EmbedSeg.utils import create_dicts, generate_crops, preprocess_data
    return types.SimpleNamespace(
        train=ref_train,
        test=ref_test,
        tta=ref_tta,
        create_dicts=create_dicts,
        generate_crops=generate_crops,
        preprocess_data=preprocess_data,
        stand_ins=stand_ins,
        compat=compat,
    )


# --------------------------------------------------------------------------------------------
# budget


class BudgetStop(Exception):  # a stop signal, not an error
    """Raised inside the reference's training loop when the CPU budget is spent."""


class ReferenceBudget(CpuBudget):
    """Replaces ``EmbedSeg.train.tqdm``: times every training batch and epoch in process CPU seconds.

    A training epoch starts only while the previous epoch's CPU time still fits in what is left
    of the budget; within an epoch, a batch starts only while the previous batch's time fits.
    """

    def __init__(self, train_module: types.ModuleType, start: float, budget_s: float) -> None:
        super().__init__(start, budget_s)
        self.module = train_module
        self.epoch_train_s: list[float] = []
        self.epoch_starts: list[float] = []
        self.epochs_completed = 0
        self.first_epoch_estimate: int | None = None
        self.stop_reason = "completed"

    def __call__(self, iterable: Iterable[Any], *_args: Any, **_kwargs: Any) -> Iterable[Any]:
        if iterable is getattr(self.module, "train_dataset_it", None):
            return self._train(iterable)
        if iterable is getattr(self.module, "val_dataset_it", None):
            return self._val(iterable)
        return iterable

    def _train(self, loader: Iterable[Any]) -> Iterator[Any]:
        t = self.now()
        if self.epoch_starts:
            cost = t - self.epoch_starts[-1]
            self.epoch_s.append(cost)
            if self.first_epoch_estimate is None:
                fit = len(self.epoch_starts) + int(max(0.0, self.budget_s - t) // cost)
                self.first_epoch_estimate = min(NOTEBOOK_EPOCHS, fit)
                print(f"[budget] first epoch took {cost:.1f} CPU s: about {self.first_epoch_estimate} epochs fit "
                      f"(n_epochs stays the notebook's {NOTEBOOK_EPOCHS}; each epoch starts only if the "
                      f"previous epoch's CPU time fits)", flush=True)  # fmt: skip
            if not self.fits(t, cost):
                self.stop_reason = "next epoch does not fit"
                raise BudgetStop(self.stop_reason)
        self.epoch_starts.append(t)
        previous = t
        last_step = 0.0
        iterator = iter(loader)
        while True:
            if not self.fits(previous, last_step):
                self.stop_reason = "budget spent within an epoch"
                raise BudgetStop(self.stop_reason)
            try:
                batch = next(iterator)
            except StopIteration:
                break
            yield batch
            t = self.now()
            last_step = t - previous
            self.step_s.append(last_step)
            previous = t
        self.epoch_train_s.append(previous - self.epoch_starts[-1])

    def _val(self, loader: Iterable[Any]) -> Iterator[Any]:
        t0 = self.now()
        yield from loader
        self.epoch_val_s.append(self.now() - t0)
        self.epochs_completed += 1


# --------------------------------------------------------------------------------------------
# the pipeline


def _layout(data_dir: Path, names: list[str], target: Path) -> str:
    """Copy image/mask pairs into ``target`` (the reference reads folders); masks as uint16. Returns the data type."""
    import tifffile

    (target / "images").mkdir(parents=True, exist_ok=True)
    (target / "masks").mkdir(parents=True, exist_ok=True)
    data_type = "8-bit"
    for name in names:
        shutil.copy(data_dir / "images" / f"{name}.tif", target / "images" / f"{name}.tif")
        image = tifffile.imread(data_dir / "images" / f"{name}.tif")
        if image.dtype.itemsize > 1:
            data_type = "16-bit"
        mask = tifffile.imread(data_dir / "masks" / f"{name}.tif")
        if mask.dtype == np.uint16:
            shutil.copy(data_dir / "masks" / f"{name}.tif", target / "masks" / f"{name}.tif")
        else:
            if mask.min() < 0 or mask.max() > np.iinfo(np.uint16).max:
                raise ValueError(f"mask {name} has ids outside uint16, which the reference reads masks as")
            tifffile.imwrite(target / "masks" / f"{name}.tif", mask.astype(np.uint16))
    return data_type


def seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _split(
    ref: types.SimpleNamespace, data_root: Path, data_dir: Path, n_train: int, val_names: list[str] | None
) -> str | None:
    """``split_train_val``: the notebooks' split (``int(0.15 * n)`` validation images, its fixed seed, at least
    one here), or all of ``download/train`` for training and ``val_names`` for validation. Returns the
    validation images' data type when ``val_names`` are given."""
    n_val = 0 if val_names else max(1, int(VAL_FRACTION * n_train))
    ref.preprocess_data.split_train_val(data_dir=str(data_root), project_name=PROJECT, train_val_name="train",
                                        subset=n_val, by_fraction=False)  # fmt: skip
    return _layout(data_dir, val_names, data_root / PROJECT / "val") if val_names else None


def _crop_size(ref: types.SimpleNamespace, props: dict[str, Any], dims: int) -> list[int]:
    """The notebooks' crop size in array order: mean object extent + 5 standard deviations per axis, rounded
    up to 8; Y and X get the larger of the two. Capped at the grid ``n_z``/``n_y``/``n_x`` (the test images'
    size rounded up to 8), which its loss needs to cover a crop."""
    pp = ref.preprocess_data

    def rule(axis: str) -> int:
        extent = props[f"avg_object_size_{axis}"] + CROP_N_SIGMA * props[f"stdev_object_size_{axis}"]
        return min(int(pp.round_up_8(extent)), int(props[f"n_{axis}"]))

    yx = max(rule("y"), rule("x"))
    return [rule("z"), yx, yx] if dims == 3 else [yx, yx]


def _padded_for_crops(
    image_path: Path, mask_path: Path, crop: list[int], target: Path
) -> tuple[Path, Path, list[int] | None]:
    """The stack and its labels padded to at least ``crop`` per axis (evenly before and after: the image with
    its median background intensity, the labels with 0), written under ``target``. Returns the two paths
    and the padded shape, or the given paths and ``None`` when the stack fits."""
    import tifffile

    image, mask = tifffile.imread(image_path), tifffile.imread(mask_path)
    short = [max(0, c - n) for c, n in zip(crop, image.shape)]
    if not any(short):
        return image_path, mask_path, None
    pad = [(k // 2, k - k // 2) for k in short]
    background = np.median(image[mask == 0]) if np.any(mask == 0) else image.min()
    fill = np.asarray(np.round(background) if image.dtype.kind in "ui" else background).astype(image.dtype)
    out_image, out_mask = target / "images" / image_path.name, target / "masks" / mask_path.name
    out_image.parent.mkdir(parents=True, exist_ok=True)
    out_mask.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(out_image, np.pad(image, pad, constant_values=fill))
    tifffile.imwrite(out_mask, np.pad(mask, pad))
    return out_image, out_mask, [n + k for n, k in zip(image.shape, short)]


def _make_crops(
    ref: types.SimpleNamespace, data_root: Path, work: Path, crop: list[int], data_type: str, anisotropy: float
) -> dict[str, list[int]]:
    """``generate_crops.process`` (2D) or ``process_3d`` on every training and validation image; returns the
    padded shape of each 3D stack that had to be padded to fit a crop."""
    gc = ref.generate_crops
    crops_dir = work / "crops" / PROJECT
    padded: dict[str, list[int]] = {}
    for subset in ("train", "val"):
        image_names = sorted((data_root / PROJECT / subset / "images").glob("*.tif"))
        mask_names = sorted((data_root / PROJECT / subset / "masks").glob("*.tif"))
        for image_path, mask_path in zip(image_names, mask_names):
            if len(crop) == 2:
                gc.process(str(image_path), str(mask_path), str(crops_dir), subset, crop[0], CENTER,
                           one_hot=False, norm=NORM, data_type=data_type)  # fmt: skip
                continue
            image_path, mask_path, shape = _padded_for_crops(image_path, mask_path, crop, work / "padded" / subset)
            if shape is not None:
                padded[image_path.stem] = shape
            gc.process_3d(str(image_path), str(mask_path), str(crops_dir), subset, crop_size_x=crop[2],
                          crop_size_y=crop[1], crop_size_z=crop[0], center=CENTER, norm=NORM, one_hot=False,
                          anisotropy_factor=anisotropy, speed_up=SPEED_UP_3D, data_type=data_type)  # fmt: skip
    return padded


def _count(folder: Path) -> int:
    return len(os.listdir(folder)) if folder.exists() else 0


def _training_dicts(
    ref: types.SimpleNamespace,
    work: Path,
    props: dict[str, Any],
    dims: int,
    anisotropy: float,
    sizes: tuple[int, int],
) -> tuple[dict[str, Any], ...]:
    """``begin_training``'s arguments as the 2D or 3D notebooks make them: dataset dicts for the
    ``sizes`` (training, validation) crops, model, loss and configs dicts."""
    cd = ref.create_dicts
    mode = "3d" if dims == 3 else "2d"
    batches = (BATCH_SIZE_3D if dims == 3 else BATCH_SIZE, BATCH_SIZE)
    datasets = [
        cd.create_dataset_dict(
            data_dir=str(work / "crops"),
            project_name=PROJECT,
            center=CENTER,
            size=size,
            batch_size=batch,
            one_hot=False,
            type=subset,
            name=mode,
            workers=0,
        )  # fmt: skip
        for subset, size, batch in zip(("train", "val"), sizes, batches)
    ]
    if dims == 3:
        model_dict = cd.create_model_dict(input_channels=1, num_classes=[6, 1], name="3d")
        loss_dict = cd.create_loss_dict(n_sigma=3, foreground_weight=float(props["foreground_weight"]))
        grid = {"n_z": int(props["n_z"]), "anisotropy_factor": anisotropy}
    else:
        model_dict, loss_dict, grid = cd.create_model_dict(input_channels=1), cd.create_loss_dict(), {}
    configs = cd.create_configs(n_epochs=NOTEBOOK_EPOCHS, one_hot=False, resume_path=None,
                                save_dir=str(work / "experiment"), n_y=int(props["n_y"]), n_x=int(props["n_x"]),
                                device="cpu", **grid)  # fmt: skip
    return (*datasets, model_dict, loss_dict, configs)


def train_reference(
    ref: types.SimpleNamespace,
    data_dir: Path,
    train_names: list[str],
    test_names: list[str],
    seed: int,
    budget_s: float,
    work: Path,
    *,
    dims: int = 2,
    val_names: list[str] | None = None,
    anisotropy: float = 1.0,
) -> dict[str, Any]:
    """Prepare the data, make the crops and train under ``budget_s`` CPU seconds; returns a record.

    ``dims`` 3 runs the 3D notebooks' pipeline with ``anisotropy`` (voxel Z / X) as its
    ``anisotropy_factor``; ``val_names`` replaces the notebooks' validation split."""
    import torch

    pp = ref.preprocess_data
    data_root, save_dir = work / "data", work / "experiment"
    for folder in (data_root, work / "crops", work / "padded", save_dir):
        if folder.exists():
            shutil.rmtree(folder)
    download = data_root / PROJECT / "download"
    data_type = _layout(data_dir, train_names, download / "train")
    _layout(data_dir, test_names, download / "test")

    start = time.process_time()
    if _split(ref, data_root, data_dir, len(train_names), val_names) == "16-bit":
        data_type = "16-bit"
    seed_all(seed)  # split_train_val reseeds numpy with its own seed
    chosen_val = sorted(p.stem for p in (data_root / PROJECT / "val" / "images").glob("*.tif"))
    mode = "3d" if dims == 3 else "2d"
    props = pp.get_data_properties(str(data_root), PROJECT, train_val_name=["train", "val"], test_name=["test"],
                                   mode=mode, one_hot=False, process_k=None)  # fmt: skip
    props["data_type"] = data_type
    crop = _crop_size(ref, props, dims)
    padded = _make_crops(ref, data_root, work, crop, data_type, anisotropy)
    prep_s = time.process_time() - start
    crops_dir = work / "crops" / PROJECT
    train_size, val_size = _count(crops_dir / "train" / "images"), _count(crops_dir / "val" / "images")
    print(f"[reference] crop size {crop}, {train_size} training and {val_size} validation crops, "
          f"data preparation {prep_s:.1f} CPU s; padded for crops: {padded or 'none'}", flush=True)  # fmt: skip

    batch = BATCH_SIZE_3D if dims == 3 else BATCH_SIZE
    dicts = _training_dicts(ref, work, props, dims, anisotropy, (train_size, val_size))
    budget = ReferenceBudget(ref.train, start, budget_s)
    ref.train.tqdm = budget
    try:
        ref.train.begin_training(*dicts)
    except BudgetStop:
        pass
    train_s = time.process_time() - start

    best = save_dir / "best_iou_model.pth"
    last = save_dir / "checkpoint.pth"
    checkpoint = best if best.exists() else (last if last.exists() else None)
    best_iou = None
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        best_iou = float(state.get("best_iou", 0.0))
    return {
        "cpu_s": train_s,
        "prep_cpu_s": prep_s,
        "steps": len(budget.step_s),
        "steps_per_epoch": train_size // batch,  # its training loader drops the last partial batch
        "epochs": budget.epochs_completed,
        "stopped": budget.stop_reason,
        "first_epoch_estimate": budget.first_epoch_estimate,
        "n_epochs": NOTEBOOK_EPOCHS,
        "step_s": budget.step_s,
        "epoch_s": budget.epoch_s,
        "epoch_train_s": budget.epoch_train_s,
        "epoch_val_s": budget.epoch_val_s,
        "checkpoint": str(checkpoint.relative_to(work)) if checkpoint else None,
        "checkpoint_kind": "best_iou" if checkpoint == best else ("last" if checkpoint else None),
        "best_val_iou": best_iou,
        "val_names": chosen_val,
        "dims": dims,
        "crop_size": crop if dims == 3 else crop[0],
        "padded_for_crops": padded,
        "batch_size": batch,
        "train_crops": train_size,
        "val_crops": val_size,
        "min_object_size": int(props["min_object_size"]),
        "foreground_weight": float(props["foreground_weight"]),
        "anisotropy": anisotropy,
        "n_z": int(props["n_z"]) if dims == 3 else None,
        "n_y": int(props["n_y"]),
        "n_x": int(props["n_x"]),
        "data_type": data_type,
        "stand_ins": ref.stand_ins,
        "compat": ref.compat,
    }


@contextlib.contextmanager
def _cuda_to(device: Any) -> Iterator[None]:
    """``Tensor.cuda()`` sends tensors to ``device`` (the reference's TTA hard-codes ``.cuda()``)."""
    import torch

    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *_args, **_kwargs: self.to(device)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def predict_reference(
    ref: types.SimpleNamespace, record: dict[str, Any], work: Path, tta: bool
) -> tuple[dict[str, np.ndarray], float | None, float]:
    """Segment the test images with ``begin_evaluating``; returns predictions by name, its own AP0.5, CPU s."""
    import tifffile
    import torch

    out = work / f"inference_tta{int(tta)}"
    if out.exists():
        shutil.rmtree(out)
    grid = {}
    if record.get("dims", 2) == 3:
        grid = {"n_z": record["n_z"], "anisotropy_factor": record["anisotropy"], "name": "3d"}
    configs = ref.create_dicts.create_test_configs_dict(
        data_dir=str(work / "data" / PROJECT), checkpoint_path=str(work / record["checkpoint"]), tta=tta,
        ap_val=0.5, min_object_size=record["min_object_size"], save_dir=str(out), norm=NORM,
        data_type=record["data_type"], one_hot=False, n_y=record["n_y"], n_x=record["n_x"], cluster_fast=True,
        device="cpu", num_workers=0, **grid,
    )  # fmt: skip
    t0 = time.process_time()
    with _cuda_to(torch.device("cpu")):
        result = ref.test.begin_evaluating(configs)
    cpu_s = time.process_time() - t0
    own = result.get("AP_dsb_05")
    predictions = {p.stem: tifffile.imread(p) for p in sorted((out / "predictions").glob("*.tif"))}
    return predictions, (float(own) if own is not None and math.isfinite(own) else None), cpu_s


def save_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
