"""Models kept loaded between predict jobs, batched predict jobs and the inference settings, on the real
database (SQLite and PostgreSQL) and the real loader: loads are counted by the worker's own cache."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiff_bytes, upload
from pydantic import ValidationError

from embedseg_service.core.data.io import read_tiff
from embedseg_service.core.model.checkpoint import build_network, save_checkpoint
from embedseg_service.records import jobs
from embedseg_service.records.orm import Model
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import LocalStorage
from embedseg_service.worker.model_cache import ModelCache, file_signature, model_bytes, process_cache
from embedseg_service.worker.runner import run_job

API = "/api/v1"


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(update={"progress_throttle_s": 0.05, "heartbeat_s": 0.2})


def seeds_net(bias: float) -> torch.nn.Module:
    """A 2D network whose seed map is ``bias`` everywhere (10: clustering tiles the image into small objects;
    -10: no object)."""
    net = build_network(2, 1)
    with torch.no_grad():
        net.decoders[1].output_conv.weight.zero_()
        net.decoders[1].output_conv.bias.fill_(bias)
    return net


def checkpoint(path: Path, net: torch.nn.Module) -> Path:
    return save_checkpoint(path, {"state_dict": net.state_dict(), "spatial_dims": 2, "in_channels": 1,
                                  "step": [1 / 1023, 1 / 1023], "config": {"in_channels": 1},
                                  "properties": {"min_object_size": 4}})  # fmt: skip


def store_model(session, settings: Settings, tmp_path: Path, name: str, net: torch.nn.Module) -> str:  # type: ignore[no-untyped-def]
    path = checkpoint(tmp_path / f"{name}.pt", net)
    LocalStorage(settings.storage_path).put_file(f"models/{name}.pt", path)
    model = Model(name=name, spatial_dims=2, config={"in_channels": 1}, storage_key=f"models/{name}.pt",
                  size_bytes=path.stat().st_size)  # fmt: skip
    session.add(model)
    session.commit()
    return model.id


def image_id(client, shape: tuple[int, int] = (40, 56), seed: int = 0) -> str:  # type: ignore[no-untyped-def]
    pixels = np.random.default_rng(seed).integers(0, 200, shape).astype(np.uint8)
    return upload(client, tiff_bytes(pixels)).json()["id"]


def predict(client, settings: Settings, model_id: str, volume_ids: list[str]) -> dict:  # type: ignore[no-untyped-def]
    job = client.post(f"{API}/jobs/predict", json={"model_id": model_id, "volume_ids": volume_ids, "tta": False})
    assert job.status_code == 202, job.text
    status = run_job(job.json()["id"], settings=settings)
    body = client.get(f"{API}/jobs/{job.json()['id']}").json()
    assert status == "succeeded", body["error"]
    return body


def labels_of(client, job: dict) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    ids = job["result"]["label_volume_ids"]
    return [read_tiff(io.BytesIO(client.get(f"{API}/volumes/{i}/download").content)).data for i in ids]


# --------------------------------------------------------------------------- kept models


def test_a_second_job_on_the_same_model_does_not_load_it_again(client, session, fast, tmp_path) -> None:
    cache = process_cache(fast.model_cache_bytes)
    model_id = store_model(session, fast, tmp_path, "seeds", seeds_net(10.0))
    volume = image_id(client)
    loads, hits = cache.loads, cache.hits
    first = predict(client, fast, model_id, [volume])
    assert (cache.loads, cache.hits) == (loads + 1, hits) and model_id in cache
    second = predict(client, fast, model_id, [volume])
    assert (cache.loads, cache.hits) == (loads + 1, hits + 1)
    assert first["metrics"]["volumes"][0]["n_objects"] >= 5
    np.testing.assert_array_equal(labels_of(client, first)[0], labels_of(client, second)[0])


def test_a_replaced_model_file_is_loaded_again(client, session, fast, tmp_path) -> None:
    cache = process_cache(fast.model_cache_bytes)
    model_id = store_model(session, fast, tmp_path, "replaced", seeds_net(10.0))
    volume = image_id(client)
    before = predict(client, fast, model_id, [volume])
    assert before["metrics"]["volumes"][0]["n_objects"] >= 5
    loads = cache.loads
    stored = LocalStorage(fast.storage_path)
    signature = file_signature(stored.path_for("models/replaced.pt"))
    stored.put_file("models/replaced.pt", checkpoint(tmp_path / "other.pt", seeds_net(-10.0)))  # a new file, same key
    assert file_signature(stored.path_for("models/replaced.pt")) != signature
    after = predict(client, fast, model_id, [volume])
    assert cache.loads == loads + 1
    assert after["metrics"]["volumes"][0]["n_objects"] == 0  # the new weights' labels, not the kept model's


def test_a_deleted_model_fails_the_job_and_leaves_the_cache(client, session, fast, tmp_path) -> None:
    cache = process_cache(fast.model_cache_bytes)
    model_id = store_model(session, fast, tmp_path, "deleted", seeds_net(10.0))
    volume = image_id(client)
    predict(client, fast, model_id, [volume])
    assert model_id in cache
    assert client.delete(f"{API}/models/{model_id}").status_code == 204
    # a job row naming the model, made without the API's check of its inputs
    job = jobs.create_job(session, "predict", {"model_id": model_id, "volume_ids": [volume], "tta": False},
                          volumes=[(volume, "input")])  # fmt: skip
    assert run_job(job.id, settings=fast) == "failed"
    assert client.get(f"{API}/jobs/{job.id}").json()["error"] == f"model {model_id} no longer exists"
    assert model_id not in cache


def test_the_cache_evicts_the_least_recently_used_model_beyond_its_size(tmp_path) -> None:
    paths = {name: checkpoint(tmp_path / f"{name}.pt", seeds_net(bias)) for name, bias in (("a", 1.0), ("b", 2.0))}
    probe = ModelCache(1 << 30)
    size = model_bytes(probe.get("a", paths["a"], "cpu"))
    assert size > 1_000_000 and probe.total_bytes == size
    cache = ModelCache(size + size // 2)  # room for one model
    a = cache.get("a", paths["a"], "cpu")
    assert cache.get("a", paths["a"], "cpu") is a and (cache.loads, cache.hits) == (1, 1)
    cache.get("b", paths["b"], "cpu")
    assert "a" not in cache and "b" in cache and len(cache) == 1 and cache.total_bytes == size
    assert cache.get("a", paths["a"], "cpu") is not a and cache.loads == 3 and "b" not in cache
    cache.resize(0)  # 0: nothing is kept, every get loads
    assert len(cache) == 0
    cache.get("a", paths["a"], "cpu")
    cache.get("a", paths["a"], "cpu")
    assert cache.loads == 5 and len(cache) == 0
    with pytest.raises(ValueError, match="^max_bytes must be 0 or more, got -1$"):
        ModelCache(-1)


def test_model_cache_bytes_zero_loads_the_model_for_every_job(client, session, fast, tmp_path) -> None:
    settings = fast.model_copy(update={"model_cache_bytes": 0})
    cache = process_cache(settings.model_cache_bytes)
    try:
        model_id = store_model(session, settings, tmp_path, "uncached", seeds_net(10.0))
        volume = image_id(client)
        loads = cache.loads
        predict(client, settings, model_id, [volume])
        predict(client, settings, model_id, [volume])
        assert cache.loads == loads + 2 and len(cache) == 0
    finally:
        process_cache(fast.model_cache_bytes)


# --------------------------------------------------------------------------- batches and precision


def test_a_batched_job_gives_the_labels_of_one_image_at_a_time(client, session, fast, tmp_path) -> None:
    torch.manual_seed(0)
    net = seeds_net(3.0)
    with torch.no_grad():  # offsets and seeds that depend on the image, batch norm with uneven statistics
        for parameter in net.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
        for name, buffer in net.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    model_id = store_model(session, fast, tmp_path, "batched", net)
    volumes = [image_id(client, seed=s) for s in range(3)] + [image_id(client, (32, 48), seed=3)]
    batched = predict(client, fast, model_id, volumes)
    one_by_one = predict(client, fast.model_copy(update={"inference_batch_voxels": 0}), model_id, volumes)
    assert list(batched["result"]["labels"]) == volumes  # outputs in the order of the inputs
    counts = [entry["n_objects"] for entry in batched["metrics"]["volumes"]]
    assert min(counts) >= 3 and counts == [entry["n_objects"] for entry in one_by_one["metrics"]["volumes"]]
    for labels, single in zip(labels_of(client, batched), labels_of(client, one_by_one), strict=True):
        np.testing.assert_array_equal(labels, single)
    assert [a.shape for a in labels_of(client, batched)] == [(40, 56)] * 3 + [(32, 48)]


def test_fp16_on_a_cpu_worker_fails_the_job_saying_so(client, session, fast, tmp_path) -> None:
    model_id = store_model(session, fast, tmp_path, "half", seeds_net(10.0))
    volume = image_id(client)
    job = client.post(f"{API}/jobs/predict", json={"model_id": model_id, "volume_ids": [volume]}).json()
    assert run_job(job["id"], settings=fast.model_copy(update={"inference_precision": "fp16"})) == "failed"
    error = client.get(f"{API}/jobs/{job['id']}").json()["error"]
    assert error == "inference precision fp16 needs a CUDA device, not cpu; use fp32 or bf16"
    body = predict(client, fast.model_copy(update={"inference_precision": "bf16"}), model_id, [volume])
    assert body["metrics"]["volumes"][0]["n_objects"] >= 5


def test_inference_settings_are_validated(monkeypatch) -> None:
    assert Settings(_env_file=None).inference_precision == "fp32"
    monkeypatch.setenv("EMBEDSEG_INFERENCE_PRECISION", "bf16")
    assert Settings(_env_file=None).inference_precision == "bf16"
    monkeypatch.setenv("EMBEDSEG_INFERENCE_PRECISION", "fp8")
    with pytest.raises(ValidationError, match=r"inference_precision\n  Input should be 'fp32', 'bf16' or 'fp16'"):
        Settings(_env_file=None)
    monkeypatch.delenv("EMBEDSEG_INFERENCE_PRECISION")
    settings = Settings(_env_file=None)
    assert settings.model_cache_bytes == 2 * 1024**3 and settings.inference_batch_voxels is None
    for field, value in (("model_cache_bytes", -1), ("inference_batch_voxels", -5)):
        with pytest.raises(ValidationError, match=f"{field}\n  Input should be greater than or equal to 0"):
            Settings(_env_file=None, **{field: value})
