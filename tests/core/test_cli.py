"""The ``embedseg`` command line end to end on tiny synthetic data, plus its error handling and plug-ins."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from embedseg_service.core import cli
from embedseg_service.core.data.io import read_tiff
from embedseg_service.core.data.synthetic import random_labels, render_image
from embedseg_service.core.data.tiff_write import write_labels, write_tiff
from embedseg_service.core.model.checkpoint import load_model


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from threads, and threads on a busy machine are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_dataset(folder: Path, n: int = 3, shape=(40, 40), voxel=(0.5, 0.5)) -> tuple[Path, Path]:
    images, masks = folder / "images", folder / "masks"
    for i in range(n):
        labels = random_labels(shape, 4, (4.0, 6.0), seed=i)
        image = (render_image(labels, seed=i) * 1000 + 100).astype(np.uint16)
        write_tiff(images / f"img{i}.tif", image, axes="YX", voxel_size=voxel)
        write_labels(masks / f"img{i}.tif", labels, voxel_size=voxel)
    return images, masks


def test_train_predict_evaluate_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, masks = _write_dataset(tmp_path)
    model = tmp_path / "model.pt"
    code = cli.main(["train", "--images", str(images), "--masks", str(masks), "--out", str(model),
                     "--epochs", "1", "--crop-size", "32", "--batch-size", "2", "--samples-per-epoch", "8",
                     "--device", "cpu", "--seed", "1", "--min-object-size", "5",
                     "--foreground-weight", "3"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert model.is_file() and (tmp_path / "model.last.pt").is_file()
    assert "training a 2D model on 3 image(s): img0, img1, img2" in out.out
    assert "crop shape: 32 x 32 (YX) (set by user)" in out.out  # the data-derived parameters are shown
    assert "min object size: 5 (set by user)" in out.out and "foreground weight: 3 (set by user)" in out.out
    assert f"saved {model}" in out.out
    trained = load_model(model, device="cpu")
    assert trained.config["amp"] is False  # float32 unless --amp
    assert trained.min_object_size == 5 and trained.properties["foreground_weight"] == 3.0

    pred_dir = tmp_path / "pred"
    code = cli.main(["predict", "--model", str(model), "--out", str(pred_dir), "--no-tta", "--tile", "none",
                     "--device", "cpu", str(images / "img0.tif"), str(images / "img2.tif")])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert sorted(p.name for p in pred_dir.iterdir()) == ["img0.tif", "img2.tif"]
    written = read_tiff(pred_dir / "img0.tif")
    assert written.data.shape == (40, 40) and np.issubdtype(written.data.dtype, np.integer)
    assert written.voxel_size == pytest.approx((0.5, 0.5))
    assert "img0.tif:" in out.out and "object(s)" in out.out

    # --min-size overrides the model's minimum object size: nothing in a 40 x 40 image has 1600 pixels
    code = cli.main(["predict", "--model", str(model), "--out", str(tmp_path / "none"), "--no-tta", "--tile", "none",
                     "--device", "cpu", "--min-size", "1600", str(images / "img0.tif")])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert read_tiff(tmp_path / "none" / "img0.tif").data.max() == 0

    code = cli.main(["evaluate", str(masks / "img0.tif"), str(pred_dir / "img0.tif"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["thresholds"] == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])
    assert len(result["ap"]) == 9 and all(0.0 <= v <= 1.0 for v in result["ap"])
    assert [row["name"] for row in result["images"]] == ["img0"]


def test_train_resume_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, masks = _write_dataset(tmp_path, n=2)
    model = tmp_path / "m.pt"
    base = ["train", "--images", str(images), "--masks", str(masks), "--out", str(model), "--crop-size", "32",
            "--batch-size", "2", "--samples-per-epoch", "4", "--device", "cpu", "--amp"]  # fmt: skip
    assert cli.main([*base, "--epochs", "1"]) == 0
    assert cli.main([*base, "--epochs", "2", "--resume", str(tmp_path / "m.last.pt")]) == 0
    out = capsys.readouterr().out
    assert "2 epoch(s), completed" in out
    assert load_model(model, device="cpu").config["amp"] is True


def test_train_options_reach_the_config_as_a_job_s_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedseg_service.core.training import train as train_module
    from embedseg_service.core.training.config import TrainConfig

    images, masks = _write_dataset(tmp_path, n=2, voxel=(0.5, 0.25))
    configs: list[TrainConfig] = []

    def no_training(_images, _masks, config, **_kwargs):  # type: ignore[no-untyped-def]
        configs.append(config)
        raise ValueError("stopped before training")

    monkeypatch.setattr(train_module, "train", no_training)
    base = ["train", "--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "m.pt")]
    assert cli.main(base) == 2
    # every default is the configuration's; the voxel size comes from the files
    assert configs[-1] == TrainConfig(spatial_dims=2, voxel_size=(0.5, 0.25))
    assert cli.main([*base, "--max-time", "2", "--center", "centroid", "--voxel-size", "1,1", "--crop-size", "64"]) == 2
    assert configs[-1] == TrainConfig(spatial_dims=2, max_time_minutes=2.0, center="centroid", voxel_size=(1.0, 1.0),
                                      crop_size=64)  # fmt: skip
    assert cli.main([*base, "--voxel-size", "1,1,1"]) == 2
    assert len(configs) == 2  # refused before a configuration is made


def test_predict_uses_tta_unless_asked_off() -> None:
    parser = cli.build_parser(with_plugins=False)
    common = ["predict", "--model", "m.pt", "--out", "o", "x.tif"]
    assert parser.parse_args(common).tta is True
    assert parser.parse_args([*common, "--no-tta"]).tta is False
    assert parser.parse_args(["evaluate", "a", "b"]).thresholds is None  # the defaults of the labels' dimensionality


def _hand_built(folder: Path) -> tuple[Path, Path]:
    gt, pred = folder / "gt", folder / "pred"
    a = np.zeros((20, 20), np.uint16)
    a[2:8, 2:8] = 1
    a[10:18, 10:18] = 2
    a[2:6, 12:18] = 3
    b = np.zeros_like(a)
    b[2:8, 2:8] = 5  # exact match of object 1
    b[10:18, 10:17] = 7  # IoU 56/64 = 0.875 with object 2
    b[14:19, 0:5] = 9  # a false positive; object 3 is missed
    write_labels(gt / "a.tif", a)
    write_labels(pred / "a.tif", b)
    write_labels(gt / "b.tif", a)
    write_labels(pred / "b.tif", a)  # perfect
    return gt, pred


def test_evaluate_folders_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, pred = _hand_built(tmp_path)
    assert cli.main(["evaluate", str(gt), str(pred), "--json", "--thresholds", "0.5,0.9"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["thresholds"] == [0.5, 0.9]
    # image a: TP 2, FP 1, FN 1 at 0.5 -> 0.5; TP 1, FP 2, FN 2 at 0.9 -> 0.2. Image b: 1.0 at both.
    rows = {row["name"]: row for row in result["images"]}
    assert rows["a"]["ap"] == pytest.approx([0.5, 0.2])
    assert rows["b"]["ap"] == pytest.approx([1.0, 1.0])
    assert rows["a"]["n_gt"] == 3 and rows["a"]["n_pred"] == 3
    assert result["ap"] == pytest.approx([0.75, 0.6])


def test_evaluate_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, pred = _hand_built(tmp_path)
    assert cli.main(["evaluate", str(gt), str(pred), "--thresholds", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "gt", "pred", "0.50"]
    assert lines[2].split() == ["a", "3", "3", "0.500"]
    assert lines[3].split() == ["b", "3", "3", "1.000"]
    assert lines[-1].split() == ["mean", "0.750"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "{tmp}/nothing", "{tmp}/pred"], "nothing does not exist"),
        (["evaluate", "{tmp}/gt", "{tmp}/other"], "no prediction file for 1 ground-truth file(s)"),
        (["predict", "--model", "{tmp}/missing.pt", "--out", "{tmp}/o", "{tmp}/gt/a.tif"], "model file not found"),
        (["predict", "--model", "{tmp}/gt/a.tif", "--out", "{tmp}/o", "{tmp}/gt/a.tif"], "is not an EmbedSeg model"),
        (["train", "--images", "{tmp}/gt", "--masks", "{tmp}/other", "--out", "{tmp}/m.pt"], "no mask file for 1"),
        (
            ["train", "--images", "{tmp}/gt", "--masks", "{tmp}/gt", "--out", "{tmp}/m.pt", "--val-images", "{tmp}/gt"],
            "give both --val-images and --val-masks",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv, message) -> None:
    gt, _ = _hand_built(tmp_path)
    other = tmp_path / "other"
    write_labels(other / "b.tif", np.zeros((20, 20), np.uint16))
    (tmp_path / "gt" / "b.tif").unlink()
    code = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["predict", "--model", "m.pt", "--out", "o", "--tile", "30,30", "x.tif"]) == 2
    assert "--tile must be 'auto', 'none' or Y,X / Z,Y,X sizes" in capsys.readouterr().err
    assert cli.main(["train", "--images", "i", "--masks", "m", "--out", "o", "--crop-size", "12"]) == 2
    assert "--crop-size must be a positive multiple of 8" in capsys.readouterr().err
    assert cli.main(["evaluate", "a", "b", "--thresholds", "0.5,2"]) == 2
    assert "--thresholds must lie in (0, 1]" in capsys.readouterr().err
    assert cli.main([]) == 2


class _EntryPoint:
    def __init__(self, name: str, target) -> None:
        self.name = name
        self._target = target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def test_plugins_are_registered_and_a_broken_one_is_isolated(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []

    def register(subparsers) -> None:
        p = subparsers.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: calls.append(args.name) or 0)

    fake = [_EntryPoint("hello", register), _EntryPoint("serve", ImportError("No module named 'fastapi'"))]
    monkeypatch.setattr(metadata, "entry_points", lambda group: fake if group == cli.PLUGIN_GROUP else [])

    assert cli.main(["hello", "--name", "you"]) == 0
    assert calls == ["you"]
    assert cli.main(["serve"]) == 2
    assert "the 'serve' command is not available: ImportError: No module named 'fastapi'" in capsys.readouterr().err
    parser = cli.build_parser()
    assert {"train", "predict", "evaluate", "hello", "serve"} <= set(parser._subparsers._group_actions[0].choices)

    def explode(**_kwargs):
        raise RuntimeError("broken metadata")

    monkeypatch.setattr(metadata, "entry_points", explode)
    assert cli.main(["evaluate", "--help"]) == 0  # built-in commands never touch the plug-ins


def test_installed_script_runs(tmp_path: Path) -> None:
    gt, pred = _hand_built(tmp_path)
    script = Path(sys.executable).parent / "embedseg"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "embedseg_service.core.cli"]
    done = subprocess.run([*command, "evaluate", str(gt), str(pred), "--json", "--thresholds", "0.5"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ap"] == pytest.approx([0.75])
    bad = subprocess.run([*command, "evaluate", str(gt), str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 2 and "missing does not exist" in bad.stderr and "Traceback" not in bad.stderr
