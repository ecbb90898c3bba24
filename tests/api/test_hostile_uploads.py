"""Hostile uploads: TIFF bombs, malformed and fuzzed headers, field floods and odd names.

Each case has its expected status and never a 5xx; after the table the server answers, its memory
grew by less than 100 MB and every volume uploaded before downloads with its original sha256. The
module runs on SQLite only: the fuzzer makes more than a thousand uploads.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import random
import shutil
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from helpers import post_in_chunks, tiff_bytes, upload

V = "/api/v1/volumes"
FUZZ_CASES = 1100
FUZZ_SEED = 14
FIELDS_DETAIL = "use file, name, kind, axes, voxel_size, image_id"


@pytest.fixture
def database_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """SQLite only for this module (the TIFF checks do not depend on the database)."""
    path = tmp_path / "embedseg.db"
    shutil.copyfile(_sqlite_template, path)
    return f"sqlite:///{path}"


# --------------------------------------------------------------------------- hand-made TIFFs


def classic_tiff(
    width: int,
    height: int,
    blob: bytes,
    offsets: list[int] | None = None,
    counts: list[int] | None = None,
    *,
    compression: int = 1,
    bits: int = 8,
    rows_per_strip: int | None = None,
) -> bytes:
    """A little-endian classic TIFF with one grayscale page: ``blob`` at byte 8, then the strip tables and
    the IFD. ``offsets`` are relative to the blob (default: one strip holding the whole blob)."""
    offsets = [0] if offsets is None else offsets
    counts = [len(blob)] if counts is None else counts
    absolute = [8 + offset if offset >= 0 else 0 for offset in offsets]
    n = len(absolute)
    tables = 8 + len(blob)
    ifd = tables + (8 * n if n > 1 else 0)
    tags = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, bits),
        (259, 3, 1, compression),
        (262, 3, 1, 1),
        (273, 4, n, absolute[0] if n == 1 else tables),
        (277, 3, 1, 1),
        (278, 4, 1, rows_per_strip if rows_per_strip is not None else height),
        (279, 4, n, counts[0] if n == 1 else tables + 4 * n),
    ]
    entries = b"".join(
        struct.pack("<HHIHH", code, kind, count, value, 0)
        if kind == 3 and count == 1
        else struct.pack("<HHII", code, kind, count, value)
        for code, kind, count, value in tags
    )
    strip_tables = struct.pack(f"<{n}I", *absolute) + struct.pack(f"<{n}I", *counts) if n > 1 else b""
    ifd_bytes = struct.pack("<H", len(tags)) + entries + bytes(4)
    return b"II*\x00" + struct.pack("<I", ifd) + blob + strip_tables + ifd_bytes


def shared_strip_bomb() -> bytes:
    """131 KB declaring 16384 x 16384: every strip points at the same compressed row."""
    side = 16384
    row = zlib.compress(bytes(side))
    return classic_tiff(side, side, row, [0] * side, [len(row)] * side, compression=8, rows_per_strip=1)


def zip_bomb_in_a_strip() -> bytes:
    """A 64 x 64 image whose one strip inflates to 64 MiB."""
    return classic_tiff(64, 64, zlib.compress(bytes(64 * 1024**2), 9), compression=8)


def sparse_giant() -> bytes:
    """40000 x 40000 (1.6 GB of pixels, within the voxel budget) in a file of 200 bytes: one empty strip."""
    return classic_tiff(40000, 40000, b"", [-1], [0])


def missing_strips() -> bytes:
    """64 rows of one row per strip, but only 4 strips listed."""
    row = zlib.compress(bytes(64))
    return classic_tiff(
        64, 64, row * 4, [k * len(row) for k in range(4)], [len(row)] * 4, compression=8, rows_per_strip=1
    )


def float_image_with(values: dict[tuple[int, int], float]) -> bytes:
    data = np.ones((32, 32), np.float32)
    for position, value in values.items():
        data[position] = value
    return tiff_bytes(data, compression="zlib")


def labels_with_negatives() -> bytes:
    labels = np.zeros((32, 32), np.int16)
    labels[4:10, 4:10] = 3
    labels[20:25, 20:25] = -2
    return tiff_bytes(labels)


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "hostileboundary") -> bytes:
    """A multipart/form-data body from (name, value, filename) parts."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def post_body(client: Any, body: bytes, boundary: str = "hostileboundary") -> Any:
    return client.post(V, content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})


def small_image() -> bytes:
    return tiff_bytes(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16))


# --------------------------------------------------------------------------- the named table

Send = Callable[[Any], Any]


def file_case(content: Callable[[], bytes], filename: str = "x.tif", **fields: str) -> Send:
    return lambda client: upload(client, content(), filename=filename, **fields)


def body_case(parts: Callable[[], list[tuple[str, bytes, str | None]]]) -> Send:
    return lambda client: post_body(client, multipart(parts()))


CASES: list[tuple[str, Send, int, str]] = [
    (
        "shared_strip_bomb",
        file_case(shared_strip_bomb),
        422,
        "the TIFF's strips/tiles share bytes (two of its 16384 data segments start at bytes 8 and 8), so the file "
        "would decode to far more pixels than it holds; save the image again with a standard TIFF writer",
    ),
    (
        "declares_100000_squared",
        file_case(lambda: classic_tiff(100000, 100000, bytes(800_000))),
        413,
        "the TIFF declares shape (100000, 100000) = 10000000000 voxels, more than the limit of 2147483648 voxels; "
        "send a smaller image, or raise EMBEDSEG_MAX_VOXELS",
    ),
    (
        "zip_bomb_in_a_strip",
        file_case(zip_bomb_in_a_strip),
        422,
        "a compressed strip/tile of the TIFF inflates to more than the 4096 bytes it declares; save the image again "
        "with a standard TIFF writer",
    ),
    (
        "sparse_giant",
        file_case(sparse_giant),
        422,
        "the TIFF declares 1600000000 bytes of pixels in a file of 122 bytes, more than 4096 times its size, so it "
        "does not hold the pixels it declares; save the image again with a standard TIFF writer, uncompressed or "
        "with zlib/deflate",
    ),
    (
        "missing_strips",
        file_case(missing_strips),
        422,
        "page 0 of the TIFF lists 4 strip/tile offsets and 4 byte counts but its shape needs 64; save the image "
        "again with a standard TIFF writer",
    ),
    (
        "six_dimensions",
        file_case(lambda: tiff_bytes(np.zeros((2, 2, 2, 2, 8, 8), np.uint8))),
        422,
        "unsupported TIFF: image of shape (2, 2, 2, 2, 8, 8) has more than 4 dimensions (C, Z, Y, X); this is not "
        "supported",
    ),
    (
        "truncated",
        file_case(lambda: small_image()[:200]),
        422,
        "the TIFF is truncated: its pixel data ends at byte 768 but the file has 200 bytes; upload the complete file",
    ),
    (
        "broken_ifd",
        file_case(lambda: b"II*\x00\x08\x00\x00\x00\x01\x00" + bytes(4)),
        415,
        "unsupported TIFF: not a readable TIFF file: corrupted IFD structure",
    ),
    (
        "ifd_past_the_end",
        file_case(lambda: b"II*\x00\x08\x00\x00\x00"),
        422,
        "unsupported TIFF: the TIFF file contains no image",
    ),
    (
        "nan_and_inf",
        file_case(lambda: float_image_with({(1, 1): np.nan, (2, 2): np.nan, (3, 3): np.inf})),
        422,
        "the image holds 2 NaN and 1 infinite value(s); replace them with finite numbers (e.g. 0) and upload it again",
    ),
    (
        "negative_labels",
        file_case(labels_with_negatives, kind="labels"),
        422,
        "the label image holds 25 negative value(s); label ids must be >= 0 (0 = background, objects 1, 2, ...)",
    ),
    (
        "noise_as_labels",
        file_case(
            lambda: tiff_bytes(np.random.default_rng(0).integers(1, 60000, (128, 128)).astype(np.uint16)), kind="labels"
        ),
        422,
        "this does not look like a label image: 100% of its 16256 pairs of neighbouring foreground voxels have "
        "different ids, where objects of one id each would give few; upload it with kind=image, or upload the "
        "instance labels (0 = background, one id per object)",
    ),
    (
        "long_text_field",
        body_case(lambda: [("name", b"n" * 70_000, None), ("file", small_image(), "a.tif")]),
        413,
        "form field 'name' is longer than 65536 bytes; send a shorter value",
    ),
    (
        "500_repeated_fields",
        body_case(lambda: [("kind", b"image", None)] * 500 + [("file", small_image(), "a.tif")]),
        422,
        "form field 'kind' is sent twice; send each field once",
    ),
    (
        "500_unknown_fields",
        body_case(lambda: [(f"f{k}", b"v" * 1000, None) for k in range(500)] + [("file", small_image(), "a.tif")]),
        422,
        f"unknown form field 'f0'; {FIELDS_DETAIL}",
    ),
    (
        "fields_past_the_size_limit",
        body_case(
            lambda: (
                [("file", bytes(4 * 1024**2 - 100_000), "a.tif")]
                + [(name, b"x" * 60_000, None) for name in ("name", "kind", "axes", "voxel_size", "image_id")]
            )
        ),
        413,
        "upload exceeds the limit of 4194304 bytes (4.0 MiB); send a smaller file or raise EMBEDSEG_MAX_UPLOAD_BYTES",
    ),
    (
        "unknown_field_first",
        body_case(lambda: [("colour", b"red", None), ("file", small_image(), "a.tif")]),
        422,
        f"unknown form field 'colour'; {FIELDS_DETAIL}",
    ),
    (
        "path_in_name",
        file_case(small_image, name="../../etc/passwd"),
        422,
        "name must not contain '/', '\\' or control characters; send a plain name",
    ),
    (
        "control_character_in_name",
        file_case(small_image, name="a\x00b"),
        422,
        "name must not contain '/', '\\' or control characters; send a plain name",
    ),
    ("path_in_filename", file_case(small_image, filename="../../etc/passwd"), 201, "passwd"),
    ("windows_path_in_filename", file_case(small_image, filename="..\\..\\evil.tif"), 201, "evil"),
    ("valid_2d", file_case(small_image), 201, "x"),
    ("valid_3d_zlib", file_case(lambda: tiff_bytes(np.ones((4, 20, 30), np.uint16), compression="zlib")), 201, "x"),
    (
        "valid_float_imagej",
        file_case(lambda: tiff_bytes(np.full((3, 8, 8), 0.5, np.float32), imagej=True, metadata={"axes": "ZYX"})),
        201,
        "x",
    ),
]


# --------------------------------------------------------------------------- the fuzzer


def fuzz_bases() -> list[bytes]:
    """Small valid TIFFs of the layouts this service reads."""
    rng = np.random.default_rng(FUZZ_SEED)
    return [
        tiff_bytes(rng.integers(0, 255, (16, 24)).astype(np.uint8)),
        tiff_bytes(rng.integers(0, 999, (3, 16, 16)).astype(np.uint16), compression="zlib", tile=(16, 16)),
        tiff_bytes(rng.random((2, 12, 10)).astype(np.float32), imagej=True, metadata={"axes": "ZYX"}),
        tiff_bytes(rng.integers(0, 999, (2, 3, 8, 8)).astype(np.uint16), byteorder=">", compression="zlib"),
    ]


def _entries(data: bytes) -> list[int]:
    """Byte offsets of every IFD entry of ``data``."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        order = tif.byteorder
        starts = []
        for page in tif.pages:
            count = struct.unpack(order + "H", data[page.offset : page.offset + 2])[0]
            starts += [page.offset + 2 + 12 * k for k in range(count)]
    return starts


def mutate(data: bytes, entries: list[int], rng: random.Random) -> bytes:
    """1-4 mutations: an IFD entry's tag, type, count or value/offset set to an edge or random value, a
    random byte, the first-IFD offset, or the file cut short."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.65:
            start, width = rng.choice([(0, 2), (2, 2), (4, 4), (8, 4)])
            position = rng.choice(entries) + start
            old = int.from_bytes(out[position : position + width], "little")
            value = rng.choice(
                [
                    0,
                    1,
                    2,
                    3,
                    0xFF,
                    0xFFFF,
                    0x7FFFFFFF,
                    0xFFFFFFFF,
                    old + 1,
                    old - 1,
                    old * 16,
                    rng.getrandbits(8 * width),
                ]
            )
            out[position : position + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif roll < 0.85:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif roll < 0.93:
            out[4 + rng.randrange(4)] = rng.randrange(256)
        else:
            del out[rng.randrange(8, len(out)) :]
    return bytes(out)


# --------------------------------------------------------------------------- tests


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def _check(response: Any, status: int, detail: str) -> None:
    assert response.status_code == status, response.text
    if status == 201:
        assert response.json()["name"] == detail
    else:
        assert response.json() == {"detail": detail}


@pytest.mark.parametrize(("send", "status", "detail"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_upload_answers(client, settings, send, status, detail) -> None:  # type: ignore[no-untyped-def]
    kept = upload(client, small_image(), filename="kept.tif").json()
    _check(send(client), status, detail)
    listing = client.get(V, params={"limit": 500}).json()
    assert kept["id"] in [item["id"] for item in listing["items"]]
    assert listing["total"] == (2 if status == 201 else 1)
    stored = sorted(p.name for p in Path(settings.storage_path).rglob("*") if p.is_file())
    assert len(stored) == listing["total"]  # no partial or temporary file, nothing outside the store


def test_the_table_then_the_fuzzer_leave_the_server_up_and_earlier_volumes_intact(client) -> None:  # type: ignore[no-untyped-def]
    earlier = {}
    for k, content in enumerate(fuzz_bases()):
        body = upload(client, content, filename=f"earlier{k}.tif").json()
        earlier[body["id"]] = hashlib.sha256(content).hexdigest()
    rng = random.Random(FUZZ_SEED)
    bases = [(base, _entries(base)) for base in fuzz_bases()]
    fuzzed = [mutate(*bases[k % len(bases)], rng) for k in range(FUZZ_CASES)]
    for content in fuzzed[:40]:  # warm up the code paths before measuring memory
        upload(client, content)
    gc.collect()
    before = rss_bytes()

    for _, send, status, detail in CASES:
        _check(send(client), status, detail)
    answers: Counter[int] = Counter()
    for number, content in enumerate(fuzzed):
        response = upload(client, content, kind="labels" if number % 5 == 0 else "image")
        answers[response.status_code] += 1
        assert response.status_code in (201, 413, 415, 422), (number, response.status_code, response.text)
        if response.status_code == 201:
            preview = client.get(f"{V}/{response.json()['id']}/preview.png", params={"projection": "max"})
            assert preview.status_code in (200, 422), (number, preview.text)

    assert client.get("/api/v1/health").status_code == 200
    gc.collect()
    assert rss_bytes() - before < 100 * 1024**2
    assert answers[201] > 50 and answers[415] > 50 and answers[422] > 50, answers
    for volume_id, sha256 in earlier.items():
        download = client.get(f"{V}/{volume_id}/download")
        assert hashlib.sha256(download.content).hexdigest() == sha256


@pytest.mark.parametrize(
    ("parts", "status"),
    [
        ([("colour", b"r" * 3_000_000, None), ("file", b"II*\x00", "a.tif")], 422),
        ([("image", b"II*\x00" * 750_000, "a.tif")], 422),
        ([("name", b"n" * 3_000_000, None), ("file", b"II*\x00", "a.tif")], 413),
    ],
    ids=["unknown_field", "file_in_another_field", "long_field"],
)
@pytest.mark.usefixtures("client")
def test_refused_parts_are_not_read_to_the_end(app, parts, status) -> None:  # type: ignore[no-untyped-def]
    body = multipart(parts)
    answer, _, reads = asyncio.run(post_in_chunks(app, V, body, "hostileboundary", 16 * 1024, content_length=False))
    assert answer == status
    assert reads < 10  # of the 183 messages the body takes
