"""Upload throughput and memory of the API: a 1 GiB TIFF over loopback to a real server.

Starts ``embedseg serve`` (the embedded default: SQLite, local storage, local worker) on a
free loopback port with a temporary data directory, writes a 1 GiB uint16 TIFF to disk and
uploads it with httpx, which streams the multipart body from the file. For every repeat it
prints the throughput (MB/s, 10^6 bytes) and the extra peak resident memory of the API
process (VmHWM from /proc, reset before each upload through /proc/<pid>/clear_refs),
then the medians against the targets (>= 300 MB/s, < 64 MiB).

    python benchmarks/bench_upload.py [--size-mib 1024] [--repeats 3]

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import tifffile
from _common import listening_pid, running_server

TARGET_MB_S = 300.0
TARGET_EXTRA_MIB = 64.0


# ------------------------------------------------------------------ process memory


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ data


def write_big_tiff(path: Path, size_mib: int) -> int:
    """A uint16 (Z, 1024, 1024) TIFF of about ``size_mib`` MiB, written slice by slice; returns its size."""
    planes = max(1, size_mib // 2)
    volume = tifffile.memmap(path, shape=(planes, 1024, 1024), dtype=np.uint16, metadata={"axes": "ZYX"})
    yy, xx = np.mgrid[0:1024, 0:1024].astype(np.uint32)
    for z in range(planes):
        volume[z] = ((xx * 7 + yy * 13 + z * 101) % 4096).astype(np.uint16)
    volume.flush()
    del volume
    return path.stat().st_size


def multipart_body(path: Path, chunk_bytes: int = 1 << 20) -> tuple[Iterator[bytes], dict[str, str]]:
    """A multipart/form-data body with ``path`` in the field ``file``, read from disk in chunks, and its headers.

    Built by hand so that the client reads 1 MiB at a time and sends an exact Content-Length.
    """
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: image/tiff\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + path.stat().st_size + len(tail)

    def chunks() -> Iterator[bytes]:
        yield head
        with path.open("rb") as handle:
            while data := handle.read(chunk_bytes):
                yield data
        yield tail

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}
    return chunks(), headers


def upload(base: str, path: Path) -> tuple[float, dict]:
    """POST the file as multipart field ``file``, streamed from disk; returns (seconds, response JSON)."""
    body, headers = multipart_body(path)
    with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
        start = time.perf_counter()
        response = client.post(f"{base}/api/v1/volumes", content=body, headers=headers)
        seconds = time.perf_counter() - start
    if response.status_code != 201:
        raise RuntimeError(f"upload answered {response.status_code}: {response.text[:500]}")
    return seconds, response.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the TIFF (default 1024 = 1 GiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the TIFF and the server's data")
    parser.add_argument(
        "--server",
        choices=("serve", "uvicorn"),
        default="serve",
        help="`embedseg serve` (embedded default, default) or uvicorn on the app factory alone",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="embedseg-bench-upload-", dir=args.tmp) as tmp:
        tmp_path = Path(tmp)
        tiff = tmp_path / "big.tif"
        start = time.perf_counter()
        size = write_big_tiff(tiff, args.size_mib)
        print(f"wrote {tiff.name}: {size / 2**20:.0f} MiB in {time.perf_counter() - start:.1f} s")
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        limit = {"EMBEDSEG_MAX_UPLOAD_BYTES": str(2 * size + 2**20)}
        with running_server(data_dir, env=limit, server=args.server) as (base, process):
            pid = listening_pid(process.pid, int(base.rsplit(":", 1)[1]))
            print(
                f"server {base} (API process {pid}); repeats {args.repeats}; "
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
            )
            rates, extras = [], []
            for repeat in range(args.repeats):
                can_reset = reset_peak(pid)
                before = memory_kib(pid)
                baseline = before["VmRSS"] if can_reset else before["VmHWM"]
                seconds, body = upload(base, tiff)
                after = memory_kib(pid)
                rate = size / seconds / 1e6
                extra_mib = max(0, after["VmHWM"] - baseline) / 1024
                rates.append(rate)
                extras.append(extra_mib)
                print(
                    f"  upload {repeat + 1}: {seconds:6.2f} s  {rate:7.1f} MB/s  "
                    f"extra peak RSS {extra_mib:6.1f} MiB  (RSS {before['VmRSS'] / 1024:.0f} -> "
                    f"{after['VmRSS'] / 1024:.0f} MiB; shape {body['shape']})"
                )
                httpx.delete(f"{base}/api/v1/volumes/{body['id']}", timeout=60).raise_for_status()
            rate, extra = statistics.median(rates), statistics.median(extras)
            verdict = "met" if rate >= TARGET_MB_S else "MISSED"
            print(
                f"median: {rate:.1f} MB/s (target >= {TARGET_MB_S:.0f}: {verdict}), "
                f"extra peak RSS {extra:.1f} MiB (target < {TARGET_EXTRA_MIB:.0f}: "
                f"{'met' if extra < TARGET_EXTRA_MIB else 'MISSED'})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
