"""Local storage: atomic writes, job-scoped keys, refusal of unsafe keys."""

from __future__ import annotations

import hashlib

import pytest

from embedseg_service.records.storage import LocalStorage, Storage, StorageError, job_output_key, model_key, volume_key


def files(root) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_put_streams_chunks_and_reports_size_and_hash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path)
    assert isinstance(storage, Storage)
    written = storage.put("jobs/j1/labels.tif", [b"ab", b"", b"cde"])
    assert (written.size, written.sha256) == (5, hashlib.sha256(b"abcde").hexdigest())
    assert storage.exists("jobs/j1/labels.tif")
    assert storage.size("jobs/j1/labels.tif") == 5
    with storage.open_read("jobs/j1/labels.tif") as handle:
        assert handle.read() == b"abcde"
    assert storage.path_for("jobs/j1/labels.tif") == tmp_path / "jobs" / "j1" / "labels.tif"
    assert files(tmp_path) == ["jobs/j1/labels.tif"]


def test_nothing_visible_until_commit_and_failed_write_leaves_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path)
    storage.put("volumes/a.tif", [b"old"])
    with pytest.raises(RuntimeError), storage.open_write("volumes/a.tif") as pending:
        pending.write(b"new partial")
        assert storage.open_read("volumes/a.tif").read() == b"old"
        raise RuntimeError("client went away")
    assert storage.open_read("volumes/a.tif").read() == b"old"
    assert files(tmp_path) == ["volumes/a.tif"]
    pending = storage.begin_write("volumes/a.tif")
    pending.write(b"new")
    assert storage.open_read("volumes/a.tif").read() == b"old"
    pending.commit()
    assert storage.open_read("volumes/a.tif").read() == b"new"
    assert files(tmp_path) == ["volumes/a.tif"]


def test_delete_and_delete_prefix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path)
    storage.put(job_output_key("j1", "a.tif"), [b"1"])
    storage.put(job_output_key("j1", "b.tif"), [b"2"])
    storage.put(job_output_key("j2", "a.tif"), [b"3"])
    assert storage.delete("jobs/j2/a.tif") is True
    assert storage.delete("jobs/j2/a.tif") is False
    assert storage.delete_prefix("jobs/j1") == 2
    assert storage.delete_prefix("jobs/j1") == 0
    assert files(tmp_path) == []


def test_missing_files_raise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path)
    for call in (storage.open_read, storage.path_for, storage.size):
        with pytest.raises(StorageError, match="no stored file under key 'volumes/x.tif'"):
            call("volumes/x.tif")
    assert not storage.exists("volumes/x.tif")


@pytest.mark.parametrize("key", ["", "../etc/passwd", "/abs", "a//b", "a/./b", "a/../b", "a b", ".hidden"])
def test_unsafe_keys_are_refused(tmp_path, key) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StorageError, match="invalid storage key"):
        LocalStorage(tmp_path).put(key, [b"x"])


def test_key_helpers() -> None:
    assert volume_key("v1") == "volumes/v1.tif"
    assert model_key("m1") == "models/m1.pt"
    assert job_output_key("j1", "model.pt") == "jobs/j1/model.pt"


def test_reachable_and_clean_temp(tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path / "store")
    assert storage.reachable() is None
    pending = storage.begin_write("volumes/a.tif")
    pending.write(b"x")
    pending.close()
    assert storage.clean_temp() == 1
    assert files(tmp_path / "store") == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert LocalStorage(blocker).reachable().startswith(f"storage folder {blocker} is not writable: ")
