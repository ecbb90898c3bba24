"""Job specs and helpers in embedseg_service.records.schemas: defaults, and messages that say how to fix bad values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from embedseg_service.api.errors import format_validation_errors
from embedseg_service.core.data.center_mode import CenterMode
from embedseg_service.core.training.config import TrainConfig, config_from_options, option_default
from embedseg_service.records.schemas import (
    SPEC_BY_KIND,
    EvaluateSpec,
    PredictSpec,
    TrainSpec,
    parse_voxel_size,
)


def message(model, **values) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError) as raised:
        model(**values)
    return format_validation_errors(raised.value.errors())


def test_train_defaults() -> None:
    spec = TrainSpec(image_ids=["a"], mask_ids=["b"])
    assert spec.model_dump(mode="json") == {
        "image_ids": ["a"],
        "mask_ids": ["b"],
        "val_image_ids": None,
        "val_mask_ids": None,
        "val_fraction": None,
        "dims": 2,
        "epochs": 200,
        "max_time_minutes": None,
        "batch_size": None,
        "crop_size": "auto",
        "lr": 0.0005,
        "center": "medoid",
        "voxel_size": None,
        "seed": 0,
        "amp": False,
        "min_object_size": None,
        "foreground_weight": None,
        "name": None,
        "callback_url": None,
        "queue": None,
    }
    assert spec.volume_roles() == [("a", "image"), ("b", "mask")]
    full = TrainSpec(
        image_ids=["a"],
        mask_ids=["b"],
        val_image_ids=["c"],
        val_mask_ids=["d"],
        dims=3,
        crop_size=64,
        center="centroid",
        voxel_size=[2, 0.5, 0.5],
        max_time_minutes=5,
    )
    assert full.center is CenterMode.centroid
    assert full.volume_roles()[2:] == [("c", "val_image"), ("d", "val_mask")]


def test_train_spec_takes_its_defaults_from_the_train_config() -> None:
    spec = TrainSpec(image_ids=["a"], mask_ids=["b"])
    options = spec.training_options()
    assert set(options) == set(TrainSpec.model_fields) - {"image_ids", "mask_ids", "val_image_ids", "val_mask_ids",
                                                          "name", "callback_url", "queue"}  # fmt: skip
    for name, value in options.items():
        if name == "dims":
            assert value == 2  # the API's default dimensionality; the library has none
        elif name == "val_fraction":
            assert value is None  # unset, as it excludes validation volumes: the library's default applies
        else:
            assert value == option_default(name), name
    # a default spec becomes the library's default configuration
    assert config_from_options(options) == TrainConfig(spatial_dims=2)
    full = TrainSpec(image_ids=["a"], mask_ids=["b"], dims=3, crop_size=64, center="centroid", voxel_size=[2, 0.5, 0.5],
                     val_fraction=0.2, epochs=7, lr=1e-3, seed=3, amp=True, batch_size=4)  # fmt: skip
    config = config_from_options(full.training_options())
    assert config.to_dict() == {**TrainConfig(spatial_dims=3).to_dict(), "crop_size": [64, 64, 64],
                                "center": "centroid", "voxel_size": [2.0, 0.5, 0.5], "val_fraction": 0.2,
                                "epochs": 7, "lr": 1e-3, "seed": 3, "amp": True, "batch_size": 4}  # fmt: skip


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"image_ids": ["a"], "mask_ids": ["b", "c"]},
            "image_ids has 1 volumes but mask_ids has 2; give one mask per image, in the same order",
        ),
        (
            {"image_ids": [], "mask_ids": []},
            "image_ids: List should have at least 1 item after validation, not 0; "
            "mask_ids: List should have at least 1 item after validation, not 0",
        ),
        ({"image_ids": ["a", "a"], "mask_ids": ["b", "c"]}, "image_ids lists volume a twice; give each volume once"),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "val_image_ids": ["c"]},
            "give both val_image_ids and val_mask_ids, or neither",
        ),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "val_image_ids": ["c"], "val_mask_ids": ["d"], "val_fraction": 0.2},
            "give either validation volumes (val_image_ids, val_mask_ids) or val_fraction, not both",
        ),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "val_image_ids": ["a"], "val_mask_ids": ["b"]},
            "volume a is both a training and a validation image; validation images must be held out",
        ),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "crop_size": 100},
            "crop_size: crop_size must be a positive multiple of 8 (e.g. 128), got 100",
        ),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "crop_size": "big"},
            "crop_size: crop_size must be 'auto' or a positive multiple of 8, got 'big'",
        ),
        ({"image_ids": ["a"], "mask_ids": ["b"], "dims": 4}, "dims: Input should be 2 or 3"),
        ({"image_ids": ["a"], "mask_ids": ["b"], "epochs": 0}, "epochs: Input should be greater than or equal to 1"),
        ({"image_ids": ["a"], "mask_ids": ["b"], "lr": -1}, "lr: Input should be greater than 0"),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "center": "mean"},
            "center: Input should be 'medoid', 'approximate_medoid' or 'centroid'",
        ),
        ({"image_ids": ["a"], "mask_ids": ["b"], "voxel_size": [1, 1]}, "voxel_size has 2 values but dims is 3"),
        ({"image_ids": ["a"], "mask_ids": ["b"], "val_fraction": 1.0}, "val_fraction: Input should be less than 1"),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "learning_rate": 0.1},
            "learning_rate: Extra inputs are not permitted",
        ),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "min_object_size": -1},
            "min_object_size: Input should be greater than or equal to 0",
        ),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "min_object_size": 2.5},
            "min_object_size: Input should be a valid integer, got a number with a fractional part",
        ),
        (
            {"image_ids": ["a"], "mask_ids": ["b"], "foreground_weight": 0},
            "foreground_weight: Input should be greater than 0",
        ),
    ],
)
def test_train_spec_messages(values, expected) -> None:  # type: ignore[no-untyped-def]
    if "voxel_size" in values:
        values = {**values, "dims": 3}
    assert message(TrainSpec, **values) == expected


def test_predict_spec() -> None:
    spec = PredictSpec(model_id="m", volume_ids=["a", "b"], gt_ids=["c", "d"], tile=[64, 128])
    assert spec.volume_roles() == [("a", "input"), ("b", "input"), ("c", "gt"), ("d", "gt")]
    assert PredictSpec(model_id="m", volume_ids=["a"]).model_dump(mode="json") == {
        "model_id": "m",
        "volume_ids": ["a"],
        "tta": True,
        "tile": "auto",
        "min_size": None,
        "gt_ids": None,
        "callback_url": None,
        "queue": None,
    }
    assert PredictSpec(model_id="m", volume_ids=["a"], min_size=0).min_size == 0
    assert message(PredictSpec, model_id="m", volume_ids=["a"], min_size=-5) == (
        "min_size: Input should be greater than or equal to 0"
    )
    assert message(PredictSpec, model_id="m", volume_ids=["a"], gt_ids=["c", "d"]) == (
        "gt_ids has 2 volumes but volume_ids has 1; give one ground-truth mask per volume, in the same order"
    )
    assert message(PredictSpec, model_id="m", volume_ids=["a"], tile="big") == (
        "tile: tile must be 'auto' or 2 (y,x) or 3 (z,y,x) sizes, each a positive multiple of 8"
    )
    assert message(PredictSpec, model_id="m", volume_ids=["a"], tile=[64]) == (
        "tile: tile must be 'auto' or 2 (y,x) or 3 (z,y,x) sizes, each a positive multiple of 8"
    )
    assert message(PredictSpec, model_id="m", volume_ids=["a"], tile=[64, 60]) == (
        "tile: each tile size must be a positive multiple of 8 (e.g. 128), got 60"
    )
    assert message(PredictSpec, model_id="", volume_ids=["a"]) == ("model_id: String should have at least 1 character")


def test_evaluate_spec() -> None:
    spec = EvaluateSpec(pairs=[{"gt_id": "g", "pred_id": "p"}])
    assert spec.thresholds is None  # the defaults of the volumes' dimensionality, chosen when the job runs
    assert spec.volume_roles() == [("g", "gt"), ("p", "pred")]
    assert EvaluateSpec(pairs=[{"gt_id": "g", "pred_id": "p"}], thresholds=[0.75, 0.5, 0.5]).thresholds == [0.5, 0.75]
    assert message(EvaluateSpec, pairs=[{"gt_id": "g", "pred_id": "p"}], thresholds=[0]) == (
        "thresholds: every IoU threshold must be in (0, 1], e.g. [0.5, 0.75]"
    )
    assert message(EvaluateSpec, pairs=[{"gt_id": "g"}]) == "pairs.0.pred_id: Field required"
    assert set(SPEC_BY_KIND) == {"train", "predict", "evaluate"}


@pytest.mark.parametrize(
    ("text", "ndim", "expected"),
    [("2,0.5,0.5", None, [2.0, 0.5, 0.5]), (" 0.3 , 0.3 ", 2, [0.3, 0.3]), ("", None, None), (None, 3, None)],
)
def test_parse_voxel_size(text, ndim, expected) -> None:  # type: ignore[no-untyped-def]
    assert parse_voxel_size(text, ndim) == expected


@pytest.mark.parametrize(
    ("text", "ndim", "error"),
    [
        ("1", None, "voxel_size '1' must have 2 (y,x) or 3 (z,y,x) values, got 1"),
        ("1,0,1", None, "voxel_size '1,0,1' must be positive numbers"),
        ("1,nan", None, "voxel_size '1,nan' must be positive numbers"),
        ("1,1", 3, "voxel_size has 2 values but the volume has 3 spatial axes"),
    ],
)
def test_parse_voxel_size_errors(text, ndim, error) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as raised:
        parse_voxel_size(text, ndim)
    assert str(raised.value) == error
