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


# --------------------------------------------------------------------------- the Storage contract, on both backends

PART = 5 * 1024 * 1024
"""The object store's part size in these tests (the S3 minimum): a file of more than one part is
sent as a multipart upload."""


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:  # type: ignore[no-untyped-def]
    """A :class:`LocalStorage`, or an ``S3Storage`` on the session's SeaweedFS server (a prefix of its own)."""
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return request.getfixturevalue("s3_server").storage(tmp_path / "cache", part_bytes=PART)


def big_bytes(size: int) -> bytes:
    return hashlib.sha256(b"seed").digest() * (size // 32) + b"x" * (size % 32)


def test_contract_put_read_size_hash_and_path(store) -> None:  # type: ignore[no-untyped-def]
    written = store.put("jobs/j1/a1/labels.tif", [b"ab", b"", b"cde"])
    assert (written.key, written.size, written.sha256) == (
        "jobs/j1/a1/labels.tif",
        5,
        hashlib.sha256(b"abcde").hexdigest(),
    )
    assert store.exists("jobs/j1/a1/labels.tif") and store.size("jobs/j1/a1/labels.tif") == 5
    with store.open_read("jobs/j1/a1/labels.tif") as handle:
        assert handle.read(2) == b"ab" and handle.read() == b"cde"
    assert store.path_for("jobs/j1/a1/labels.tif").read_bytes() == b"abcde"
    assert store.put("volumes/empty.tif", []).size == 0 and store.open_read("volumes/empty.tif").read() == b""


def test_contract_a_file_of_several_parts_streams_in_and_out(store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = big_bytes(2 * PART + 12345)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    assert store.put_file("models/big.pt", source) == len(data)
    assert store.size("models/big.pt") == len(data)
    with store.open_read("models/big.pt") as handle:
        chunks = iter(lambda: handle.read(1024 * 1024), b"")
        assert hashlib.sha256(b"".join(chunks)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert store.path_for("models/big.pt").read_bytes() == data


def test_contract_nothing_visible_until_commit_and_abort_leaves_nothing(store) -> None:  # type: ignore[no-untyped-def]
    store.put("volumes/a.tif", [b"old"])
    with pytest.raises(RuntimeError), store.open_write("volumes/a.tif") as pending:
        pending.write(big_bytes(PART + 1))  # a part is sent already on the object store
        assert store.open_read("volumes/a.tif").read() == b"old"
        raise RuntimeError("client went away")
    assert store.open_read("volumes/a.tif").read() == b"old"
    assert store.clean_temp() == 0, "the aborted write left a temporary file or an unfinished upload"
    pending = store.begin_write("volumes/a.tif")
    pending.write_unhashed(b"new")
    pending.set_sha256(hashlib.sha256(b"new").hexdigest())
    pending.close()
    assert store.open_read("volumes/a.tif").read() == b"old" and store.size("volumes/a.tif") == 3
    pending.commit()
    assert store.open_read("volumes/a.tif").read() == b"new"
    assert store.path_for("volumes/a.tif").read_bytes() == b"new"
    assert store.list_keys("volumes") == ["volumes/a.tif"]


def test_contract_delete_and_list(store) -> None:  # type: ignore[no-untyped-def]
    for key in ("jobs/j1/a1/a.tif", "jobs/j1/a2/b.tif", "jobs/j2/a1/c.tif", "volumes/v.tif"):
        store.put(key, [key.encode()])
    assert store.list_keys("jobs") == ["jobs/j1/a1/a.tif", "jobs/j1/a2/b.tif", "jobs/j2/a1/c.tif"]
    assert store.list_keys("jobs/j1") == ["jobs/j1/a1/a.tif", "jobs/j1/a2/b.tif"]
    assert store.list_folders("jobs") == ["j1", "j2"] and store.list_folders("jobs/j1") == ["a1", "a2"]
    assert store.list_keys("nothing") == [] and store.list_folders("nothing") == []
    assert store.delete("jobs/j2/a1/c.tif") is True and store.delete("jobs/j2/a1/c.tif") is False
    assert store.delete_prefix("jobs/j1") == 2 and store.delete_prefix("jobs/j1") == 0
    assert store.list_keys("jobs") == [] and "j1" not in store.list_folders("jobs")
    assert store.list_keys("volumes") == ["volumes/v.tif"]


def test_contract_missing_keys_raise_and_unsafe_keys_are_refused(store) -> None:  # type: ignore[no-untyped-def]
    for call in (store.open_read, store.path_for, store.size):
        with pytest.raises(StorageError, match="no stored file under key 'volumes/x.tif'"):
            call("volumes/x.tif")
    assert not store.exists("volumes/x.tif")
    for key in ("../etc/passwd", "a//b", ".hidden"):
        with pytest.raises(StorageError, match="invalid storage key"):
            store.put(key, [b"x"])


def test_contract_clean_temp_removes_an_abandoned_write(store) -> None:  # type: ignore[no-untyped-def]
    pending = store.begin_write("volumes/a.tif")
    pending.write(big_bytes(PART + 1))
    pending.close()
    # a local temporary file; on the object store also the started multipart upload
    assert store.clean_temp() == (1 if isinstance(store, LocalStorage) else 2)
    assert store.clean_temp() == 0 and store.list_keys("volumes") == []
    assert store.reachable() is None
