"""Training: configuration checks, checkpoints, resume, reproducibility, progress and budgets (tiny data)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from embedseg_service.core.data.center_mode import CenterMode
from embedseg_service.core.data.synthetic import random_labels, render_image
from embedseg_service.core.model.checkpoint import load_checkpoint, load_model
from embedseg_service.core.training.batch import choose_batch
from embedseg_service.core.training.budget import Budget, validation_due
from embedseg_service.core.training.config import (
    SelectionMetric,
    TrainConfig,
    config_from_options,
    option_default,
)
from embedseg_service.core.training.train import StopTraining, TrainProgress, last_checkpoint_path, train
from embedseg_service.core.training.validation import Validation, ap_tolerance, replaces_best, selection_key


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from threads, and threads on a busy machine are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data_2d(n: int = 3, shape: tuple[int, int] = (40, 40), seed: int = 0) -> tuple[list, list]:
    masks = [random_labels(shape, 4, (4.0, 6.0), seed=seed + i) for i in range(n)]
    images = [(render_image(m, seed=seed + i) * 1000 + 100).astype(np.uint16) for i, m in enumerate(masks)]
    return images, masks


def _data_3d(n: int = 2, shape: tuple[int, int, int] = (16, 32, 32)) -> tuple[list, list]:
    masks = [random_labels(shape, 4, (3.0, 5.0), seed=10 + i) for i in range(n)]
    images = [render_image(m, seed=10 + i) for i, m in enumerate(masks)]
    return images, masks


def _config(**overrides) -> TrainConfig:
    values = {
        "spatial_dims": 2, "epochs": 2, "crop_size": 32, "batch_size": 2, "virtual_batch": 2,
        "samples_per_epoch": 8, "device": "cpu", "seed": 0,
    }  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


# ------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("spatial_dims", 4, "spatial_dims must be 2 or 3"),
        ("epochs", 0, "epochs must be at least 1"),
        ("max_time_minutes", 0, "max_time_minutes must be positive"),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("crop_size", 30, "multiples of 8"),
        ("crop_size", "big", "crop_size must be 'auto'"),
        ("crop_size", (32, 32, 32), "crop_size needs 2 values"),
        ("center", "middle", "unknown center mode 'middle'; valid choices: medoid, approximate_medoid, centroid"),
        ("selection_metric", "loss", "unknown selection metric 'loss'; valid choices: mean_ap, ap_dsb, oracle_iou"),
        ("val_fraction", 1.0, "val_fraction must be between 0 and 1"),
        ("val_every", 0, "val_every must be at least 1"),
        ("lr", -1.0, "lr must be positive"),
        ("voxel_size", (1.0,), "voxel_size needs 2 positive values"),
        ("device", "tpu", "unknown device 'tpu'"),
        ("min_object_size", -1, "min_object_size must be a whole number >= 0, got -1"),
        ("min_object_size", 2.5, "min_object_size must be a whole number >= 0, got 2.5"),
        ("foreground_weight", 0.0, "foreground_weight must be a positive number, got 0.0"),
        ("foreground_weight", float("nan"), "foreground_weight must be a positive number, got nan"),
    ],
)
def test_config_refuses_bad_values(field: str, value, message: str) -> None:
    kwargs = {"spatial_dims": 2, field: value}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**kwargs)


def test_config_keeps_the_given_values_and_derives_the_used_ones() -> None:
    config = TrainConfig(spatial_dims=3, crop_size=16, center="centroid", selection_metric="oracle_iou",
                         voxel_size=(2, 1, 1), epochs=3.0, random_crops=1, min_object_size=5.0)  # fmt: skip
    assert (config.crop_size, config.center, config.voxel_size, config.epochs) == (16, "centroid", (2, 1, 1), 3.0)
    resolved = config.resolved
    assert resolved.crop_shape == (16, 16, 16) and resolved.center is CenterMode.centroid
    assert resolved.selection_metric is SelectionMetric.oracle_iou
    assert resolved.voxel_size == (2.0, 1.0, 1.0) and resolved.epochs == 3 and isinstance(resolved.epochs, int)
    assert resolved.random_crops == 1.0 and resolved.min_object_size == 5 and resolved.foreground_weight is None
    data = config.to_dict()  # what checkpoints store: the derived values
    assert data["center"] == "centroid" and data["crop_size"] == [16, 16, 16] and data["voxel_size"] == [2.0, 1.0, 1.0]
    assert data["selection_metric"] == "oracle_iou" and data["epochs"] == 3 and data["min_object_size"] == 5
    assert TrainConfig.from_dict(data).to_dict() == data
    with pytest.raises(ValueError, match="unknown TrainConfig fields: colour"):
        TrainConfig.from_dict({**data, "colour": 1})
    assert TrainConfig(spatial_dims=2, crop_size="64").resolved.crop_shape == (64, 64)
    assert TrainConfig(spatial_dims=2).resolved.crop_shape is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 4  # type: ignore[misc]


def test_options_of_a_job_or_the_command_line_become_a_config() -> None:
    config = config_from_options({"dims": 3, "epochs": 5, "center": CenterMode.centroid, "crop_size": 16,
                                  "batch_size": None, "val_fraction": None, "in_channels": 2})  # fmt: skip
    assert config == TrainConfig(spatial_dims=3, epochs=5, center=CenterMode.centroid, crop_size=16, in_channels=2)
    assert config.val_fraction == option_default("val_fraction") and config.batch_size is None  # None: the default
    # the data's voxel size where the options give none and it fits the dimensionality
    assert config_from_options({"dims": 2}, data_voxel_size=(0.5, 0.25)).voxel_size == (0.5, 0.25)
    assert config_from_options({"dims": 3}, data_voxel_size=(0.5, 0.25)).voxel_size is None
    assert config_from_options({"dims": 2, "voxel_size": [1, 1]}, data_voxel_size=(0.5, 0.25)).voxel_size == [1, 1]
    with pytest.raises(ValueError, match="unknown training option 'learning_rate'; valid options: amp, batch_size"):
        config_from_options({"dims": 2, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="training option 'spatial_dims' is given twice"):
        config_from_options({"dims": 2, "spatial_dims": 2})
    with pytest.raises(ValueError, match="the training options need spatial_dims"):
        config_from_options({"epochs": 2})
    with pytest.raises(ValueError, match="unknown center mode 'middle'"):
        config_from_options({"dims": 2, "center": "middle"})
    assert option_default("center") is CenterMode.medoid and option_default("epochs") == 200
    with pytest.raises(ValueError, match="the TrainConfig field spatial_dims has no default"):
        option_default("dims")


def test_choose_batch_keeps_an_effective_batch_of_16() -> None:
    assert choose_batch(2, (256, 256), None, None) == (16, 1)
    assert choose_batch(3, (32, 136, 136), None, None) == (2, 8)  # the paper's 3D crops: its 2 x 8
    assert choose_batch(3, (24, 48, 48), None, None) == (16, 1)  # small 3D crops: one pass of 16
    assert choose_batch(3, (32, 64, 64), None, None) == (8, 2)
    # crops enlarged for context: as many fewer crops per step as each is larger, at least 2
    assert choose_batch(2, (96, 96), None, None, (48, 48)) == (4, 1)
    assert choose_batch(2, (96, 96), None, None, (80, 80)) == (11, 1)
    assert choose_batch(2, (96, 96), None, None, (16, 16)) == (2, 1)
    assert choose_batch(2, (128, 128), None, None, (128, 128)) == (16, 1)
    assert choose_batch(2, (96, 96), 8, None, (48, 48)) == (8, 1)
    assert choose_batch(2, (512, 512), None, None) == (4, 4)  # large crops: smaller batch, larger m
    assert choose_batch(3, (48, 256, 256), None, None) == (1, 16)
    assert choose_batch(2, (64, 64), 4, None) == (4, 4)
    assert choose_batch(2, (64, 64), 3, 2) == (3, 2)


def test_choose_batch_on_the_cpu_bounds_the_voxels_of_a_3d_step() -> None:
    # few-slice stacks: 4 crops of 8 x 144², one pass (a step of 16 would take 4 times as long)
    assert choose_batch(3, (8, 144, 144), None, None, device_type="cpu") == (4, 1)
    assert choose_batch(3, (8, 144, 144), None, None, device_type="cuda") == (4, 4)
    assert choose_batch(3, (32, 136, 136), None, None, device_type="cpu") == (2, 2)  # at least 4 crops
    assert choose_batch(3, (16, 24, 24), None, None, device_type="cpu") == (16, 1)  # at most 16
    assert choose_batch(3, (16, 64, 64), None, None, device_type="cpu") == (9, 1)  # 4 * 8 * 136² voxels
    assert choose_batch(2, (256, 256), None, None, device_type="cpu") == (16, 1)  # 2D unchanged
    assert choose_batch(3, (8, 144, 144), 2, None, device_type="cpu") == (2, 2)


def test_selection_ignores_degenerate_states() -> None:
    collapsed = Validation(loss=0.5, oracle_iou=0.9, seed_max=0.4, ap=0.0, n_pred=0, n_gt=10)
    assert collapsed.degenerate()
    assert selection_key(SelectionMetric.oracle_iou, collapsed) is None
    assert selection_key(SelectionMetric.ap_dsb, collapsed) is None
    assert selection_key(SelectionMetric.mean_ap, collapsed) is None
    weak_seeds = Validation(loss=0.5, oracle_iou=0.8, seed_max=0.85)  # crops only: no seed reaches 0.9
    assert weak_seeds.degenerate() and selection_key(SelectionMetric.oracle_iou, weak_seeds) is None
    good = Validation(loss=0.5, oracle_iou=0.6, seed_max=0.99, ap=0.7, n_pred=9, n_gt=10)
    better_iou = Validation(loss=0.5, oracle_iou=0.7, seed_max=0.99, ap=0.6, n_pred=9, n_gt=10)
    assert selection_key(SelectionMetric.ap_dsb, good) > selection_key(SelectionMetric.ap_dsb, better_iou)
    assert selection_key(SelectionMetric.oracle_iou, better_iou) > selection_key(SelectionMetric.oracle_iou, good)
    assert selection_key(SelectionMetric.ap_dsb, Validation(oracle_iou=0.9, seed_max=0.99)) is None  # no AP yet
    assert selection_key(SelectionMetric.mean_ap, Validation(oracle_iou=0.9, seed_max=0.99)) is None


def test_mean_ap_selection_prefers_precise_masks_over_one_more_match() -> None:
    # a state that matches one more object at IoU 0.5 but draws looser masks loses to the precise one
    lucky = Validation(loss=0.5, oracle_iou=0.8, seed_max=0.99, ap=0.97, mean_ap=0.80, n_pred=187, n_gt=187)
    precise = Validation(loss=0.5, oracle_iou=0.8, seed_max=0.99, ap=0.95, mean_ap=0.85, n_pred=187, n_gt=187)
    metric = SelectionMetric.mean_ap
    assert TrainConfig(spatial_dims=2).selection_metric is metric
    assert selection_key(metric, precise) > selection_key(metric, lucky)
    assert selection_key(SelectionMetric.ap_dsb, lucky) > selection_key(SelectionMetric.ap_dsb, precise)
    key = selection_key(metric, lucky)
    assert key is not None and not replaces_best(metric, key, selection_key(metric, precise),
                                                  selection_key(metric, precise), 187)  # fmt: skip


def test_ap_selection_keeps_the_latest_state_within_noise_of_the_best() -> None:
    ap = SelectionMetric.ap_dsb
    assert ap_tolerance(15) == pytest.approx(0.1) and ap_tolerance(300) == pytest.approx(0.005)
    assert ap_tolerance(0) == 0.0
    assert replaces_best(ap, (0.5, 0.1), None, None, 15)
    # 15 validation objects: 0.63 after a best of 0.72 is within one object's worth -> the later state wins
    assert replaces_best(ap, (0.63, 0.5), (0.72, 0.6), (0.72, 0.6), 15)
    assert not replaces_best(ap, (0.60, 0.9), (0.72, 0.6), (0.72, 0.6), 15)
    # the tolerance is measured from the best AP ever seen, so it cannot drift down step by step
    assert not replaces_best(ap, (0.64, 0.5), (0.66, 0.6), (0.75, 0.6), 15)
    # many validation objects: plain maximum
    assert not replaces_best(ap, (0.71, 0.9), (0.72, 0.6), (0.72, 0.6), 1000)
    iou = SelectionMetric.oracle_iou
    assert replaces_best(iou, (0.8, 0.1), (0.7, 0.9), (0.7, 0.9), 15)
    assert not replaces_best(iou, (0.69, 0.9), (0.7, 0.1), (0.7, 0.1), 15)


def test_validation_cadence() -> None:
    assert [validation_due(e, 10, 2, None, 0.0, 1.0) for e in (1, 2, 3, 4, 10)] == [False, True, False, True, True]
    # under a budget: not before the training since the last validation lasted 4 times that validation
    assert not validation_due(3, 10, 1, 60.0, 3.0, 1.0)
    assert validation_due(3, 10, 1, 60.0, 5.0, 1.0)
    assert validation_due(3, 10, 1, 60.0, 0.0, None)  # never validated yet
    assert validation_due(10, 10, 1, 60.0, 0.0, 1.0)  # the last epoch always


def test_budget_reads_its_clock() -> None:
    now = [100.0]
    budget = Budget(lambda: now[0], t_start=100.0, budget_s=60.0, epochs=10)
    now[0] = 130.0
    assert budget.elapsed() == 30.0
    assert budget.fraction_done(2.0) == 0.5  # the budget's half beats the epochs' fifth
    assert budget.lr_factor(2) == pytest.approx(0.5**0.9)
    assert budget.eta(2.0, 0) == 30.0  # eight epochs at this pace would take longer than the budget left
    assert not budget.out_of_time()  # 30 s + the 2 % reserve for a first validation
    budget.validated(t0=125.0, with_images=True)  # a validation of 5 s
    assert budget.val_seconds == 5.0 and budget.last_val_time == 130.0
    now[0] = 149.0
    assert not budget.validation_due(4, 1)  # 19 s of training since: less than 4 validations' worth
    now[0] = 150.0
    assert budget.validation_due(4, 1)
    now[0] = 153.5
    assert not budget.out_of_time(epoch_t0=150.0, steps=4)  # 53.5 s + a validation of 5 s + a step of 0.875 s
    now[0] = 154.0
    assert budget.out_of_time(epoch_t0=150.0, steps=4)  # 54 s + 5 s + 1 s: the budget is spent


def test_last_checkpoint_path() -> None:
    assert last_checkpoint_path(Path("out/model.pt")) == Path("out/model.last.pt")
    assert last_checkpoint_path(Path("model")) == Path("model.last.pt")


# ------------------------------------------------------------------------------------- training runs


def test_train_2d_writes_best_and_last_checkpoints(tmp_path: Path) -> None:
    images, masks = _data_2d()
    seen: list[TrainProgress] = []
    result = train(images, masks, _config(), out_path=tmp_path / "m.pt", progress=seen.append)

    assert result.stopped == "completed" and result.epochs_completed == 2
    assert result.model_path == tmp_path / "m.pt" and result.model_path.is_file()
    assert result.last_path == tmp_path / "m.last.pt" and result.last_path.is_file()
    epochs = [h for h in result.history if "loss" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in epochs)
    assert all(h["val_ap"] is not None and 0.0 <= h["val_ap"] <= 1.0 for h in epochs)
    assert all(h["val_map"] is not None and 0.0 <= h["val_map"] <= h["val_ap"] for h in epochs)
    assert all(0.0 <= h["val_iou"] <= 1.0 for h in epochs)
    assert epochs[1]["lr"] == pytest.approx(5e-4 * 0.5**0.9)  # (1 - e/E)^0.9 at e = 1, E = 2

    model = load_model(result.model_path, device="cpu")
    assert model.spatial_dims == 2 and model.epoch == result.best_epoch
    assert model.config["crop_size"] == [32, 32] and model.config["seed"] == 0
    assert model.properties["crop_shape"] == [32, 32]
    assert model.properties["n_objects"] == 12  # train + val masks
    last = load_checkpoint(result.last_path)
    assert last["epoch"] == 2 and last["optimizer"]["state"]
    assert last["seeds"]["python"] == last["seeds"]["numpy"] == last["seeds"]["torch"] == 0
    assert set(last["versions"]) == {"python", "numpy", "torch", "embedseg-service"}
    assert last["batch"] == {"batch_size": 2, "virtual_batch": 2, "steps_per_epoch": 2}
    labels = model.segment(images[0], tta=False, tile=None)
    assert labels.shape == images[0].shape and labels.dtype == np.int32

    # progress: the data-derived parameters first, then every optimiser step and every epoch end
    assert seen[0].message.startswith("data-derived parameters:") and "crop shape: 32 x 32" in seen[0].message
    steps = [p for p in seen if p.step > 0]
    assert [(p.epoch, p.step) for p in steps] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(p.steps_per_epoch == 2 and p.epochs == 2 and np.isfinite(p.loss) for p in steps)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [p.message.split(":")[0] for p in seen if p.message.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]
    assert seen[-1].val_ap is not None and seen[-1].val_map is not None and seen[-1].val_iou is not None
    assert seen[-1].eta_s == 0.0


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    images, masks = _data_2d()
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(images, masks, _config(epochs=1, seed=seed), out_path=tmp_path / f"{name}.pt")
        runs[name] = _weights(tmp_path / f"{name}.last.pt")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_stop_request_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    images, masks = _data_2d()
    train(images, masks, _config(), out_path=tmp_path / "full.pt")

    def stop_after_first_epoch(info: TrainProgress) -> bool:
        return not (info.epoch == 1 and info.step == 0)  # epoch end of epoch 1

    first = train(images, masks, _config(), out_path=tmp_path / "part.pt", progress=stop_after_first_epoch)
    assert first.stopped == "requested" and first.epochs_completed == 1
    assert load_checkpoint(first.last_path)["epoch"] == 1
    assert first.model_path.is_file()

    resumed = train(images, masks, _config(), out_path=tmp_path / "part.pt", resume_from=first.last_path)
    assert resumed.stopped == "completed" and resumed.epochs_completed == 2
    assert [h["epoch"] for h in resumed.history if "loss" in h] == [1, 2]
    full, part = _weights(tmp_path / "full.last.pt"), _weights(resumed.last_path)
    for key in full:
        torch.testing.assert_close(part[key], full[key], rtol=0, atol=0, msg=key)


def test_stop_training_exception_inside_an_epoch(tmp_path: Path) -> None:
    images, masks = _data_2d()

    def stop(info: TrainProgress) -> None:
        if info.step == 1:
            raise StopTraining

    result = train(images, masks, _config(epochs=5), out_path=tmp_path / "m.pt", progress=stop)
    assert result.stopped == "requested" and result.epochs_completed == 0
    assert result.model_path.is_file() and result.last_path.is_file()
    assert load_model(result.model_path, device="cpu").epoch == 0


def test_time_budget_stops_cleanly_and_keeps_the_best(tmp_path: Path) -> None:
    images, masks = _data_2d()
    config = _config(epochs=10_000, max_time_minutes=0.1)
    result = train(images, masks, config, out_path=tmp_path / "m.pt")
    assert result.stopped == "time_budget"
    assert result.epochs_completed < 10_000
    assert result.elapsed_s < 6.0 + 60.0  # the budget plus a generous allowance for a loaded machine
    assert load_model(result.model_path, device="cpu").epoch == result.best_epoch
    assert load_checkpoint(result.last_path)["epoch"] == result.epochs_completed


def test_time_budget_follows_the_given_clock(tmp_path: Path) -> None:
    images, masks = _data_2d()
    now = [0.0]

    def one_second_per_step(info: TrainProgress) -> None:
        if info.step > 0:
            now[0] += 1.0

    config = _config(epochs=10_000, max_time_minutes=0.2)  # 12 s of this clock; 2 steps per epoch
    result = train(images, masks, config, out_path=tmp_path / "m.pt", progress=one_second_per_step,
                   clock=lambda: now[0])  # fmt: skip
    # epoch 5 starts at 10 s; after its first step one more step would end at the budget (12 s)
    assert result.stopped == "time_budget" and result.epochs_completed == 5 and now[0] == 11.0
    assert result.elapsed_s == 11.0
    epochs = [h for h in result.history if "loss" in h]
    assert [h["seconds"] for h in epochs] == [2.0] * 5
    assert [h["elapsed_s"] for h in epochs] == [2.0, 4.0, 6.0, 8.0, 10.0]
    # the learning rate decays with the budget's elapsed fraction, not with the 10 000 epochs
    assert [h["lr"] for h in epochs] == pytest.approx([5e-4 * (1 - 2 * e / 12) ** 0.9 for e in range(5)])


def test_best_checkpoint_has_the_best_validation_ap(tmp_path: Path) -> None:
    images, masks = _data_2d(n=4)
    result = train(images, masks, _config(epochs=3), out_path=tmp_path / "m.pt")
    validated = [h for h in result.history if h.get("val_map") is not None and not h["degenerate"]]
    if validated:
        best_map = max(h["val_map"] for h in validated)
        n_gt = validated[0]["val_gt_objects"]
        assert n_gt == 4  # one of the four images (4 objects each) is held out
        assert all(h["val_map"] <= h["val_ap"] + 1e-12 for h in validated)  # AP falls as the threshold rises
        assert result.best_metrics["val_map"] >= best_map - ap_tolerance(n_gt) - 1e-12
        assert load_model(result.model_path, device="cpu").metrics == result.best_metrics
    else:  # nothing usable yet: the final state is kept and flagged
        assert result.best_metrics["degenerate"] is True


def test_train_3d_with_explicit_validation_and_voxel_size(tmp_path: Path) -> None:
    images, masks = _data_3d()
    config = TrainConfig(spatial_dims=3, epochs=1, crop_size=(16, 32, 32), batch_size=2, virtual_batch=1,
                         samples_per_epoch=4, device="cpu", voxel_size=(2.0, 1.0, 1.0), min_object_size=10,
                         foreground_weight=7.5)  # fmt: skip
    result = train(images[:1], masks[:1], config, out_path=tmp_path / "m3.pt",
                   val_images=images[1:], val_masks=masks[1:])  # fmt: skip
    assert result.epochs_completed == 1
    assert np.isfinite(result.history[0]["loss"])
    model = load_model(result.model_path, device="cpu")
    assert model.spatial_dims == 3
    assert model.step == pytest.approx((2.0 / 1023, 1 / 1023, 1 / 1023))
    assert model.properties["anisotropy"] == 2.0
    # the overrides replace the data-derived values (and are stored as set by the user)
    assert model.min_object_size == 10 and model.properties["foreground_weight"] == 7.5
    assert {"min_object_size", "foreground_weight"} <= set(model.properties["overrides"])
    labels = model.segment(images[1], tta=False, tile=None)
    assert labels.shape == (16, 32, 32) and labels.dtype == np.int32


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    images, masks = _data_2d(n=2)
    out = tmp_path / "m.pt"
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        train(images, masks[:1], _config(), out_path=out)
    with pytest.raises(ValueError, match="has shape"):
        train([images[0][:32]], [masks[0]], _config(), out_path=out)
    with pytest.raises(ValueError, match="label masks must be integers"):
        train(images, [m.astype(np.float32) for m in masks], _config(), out_path=out)
    with pytest.raises(ValueError, match="give both val_images and val_masks"):
        train(images, masks, _config(), out_path=out, val_images=images)
    with pytest.raises(ValueError, match="no object"):
        train(images, [np.zeros_like(m) for m in masks], _config(), out_path=out,
              val_images=images, val_masks=masks)  # fmt: skip
    assert not out.exists()


def test_resume_refuses_another_dimensionality(tmp_path: Path) -> None:
    images, masks = _data_2d()
    result = train(images, masks, _config(epochs=1), out_path=tmp_path / "m.pt")
    images3, masks3 = _data_3d()
    config3 = TrainConfig(spatial_dims=3, epochs=2, crop_size=(16, 32, 32), device="cpu")
    with pytest.raises(ValueError, match="cannot resume a 2D checkpoint with a 3D configuration"):
        train(images3, masks3, config3, out_path=tmp_path / "m3.pt", resume_from=result.last_path)


def test_validation_without_objects_keeps_the_latest_state(tmp_path: Path) -> None:
    images, masks = _data_2d()
    empty = [np.zeros_like(masks[0])]
    seen: list[TrainProgress] = []
    result = train(images, masks, _config(), out_path=tmp_path / "m.pt", val_images=images[:1], val_masks=empty,
                   progress=seen.append)  # fmt: skip
    assert result.stopped == "completed" and result.best_epoch == 2
    assert result.best_metrics["val_loss"] is None and result.best_metrics["val_gt_objects"] == 0
    assert "val loss n/a" in [p.message for p in seen if p.message.startswith("epoch 2/2")][0]


def test_data_loader_workers_give_the_same_weights(tmp_path: Path) -> None:
    images, masks = _data_2d()
    train(images, masks, _config(epochs=1), out_path=tmp_path / "a.pt")
    train(images, masks, _config(epochs=1, num_workers=1), out_path=tmp_path / "b.pt")
    a, b = _weights(tmp_path / "a.last.pt"), _weights(tmp_path / "b.last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
