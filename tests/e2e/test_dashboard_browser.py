"""The dashboard in a real browser (headless Chromium driven by Playwright) against a live server with
API keys: the page asks for a key, sends it with every call, shows previews fetched with it, saves
downloads under the server's file name, and forgets it again. A user's walk-through against
``embedseg serve`` (uploads, a short training, a cancelled job, a prediction, a stack's planes) takes
screenshots into ``--artefacts DIR`` and, with ``--readme-screenshots``, rewrites the README's.

Needs the ``playwright`` package (PyPI) and a Chromium binary on ``PATH`` (Debian: ``apt-get install
chromium``); Playwright's own browser download is not used. Without them the test skips, or fails
under ``EMBEDSEG_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import service_missing, tiff_bytes

POLL_S = 2.0
"""The dashboard's polling period (``POLL_MS`` in dashboard.js)."""
WAIT_MS = 20_000

# Counts the object URLs the page holds: created and not yet revoked.
COUNT_OBJECT_URLS = """
(() => {
  const live = new Set();
  const create = URL.createObjectURL.bind(URL);
  const revoke = URL.revokeObjectURL.bind(URL);
  URL.createObjectURL = (blob) => { const url = create(blob); live.add(url); return url; };
  URL.revokeObjectURL = (url) => { live.delete(url); revoke(url); };
  window.liveObjectUrls = live;
})();
"""
PREVIEW_LOADED = """(id) => {
  const img = document.querySelector(`.tile[data-volume-id="${id}"] img`);
  return img !== null && img.complete && img.naturalWidth > 0;
}"""


@dataclass(frozen=True)
class Server:
    base: str
    key: str | None
    owner: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


def chromium_path() -> str:
    """The Chromium binary on ``PATH``; missing: skip (or fail when services are required)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        service_missing("Chromium is not installed (Debian: apt-get install -y chromium)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


@contextmanager
def serving(root: Path, owner: str | None) -> Iterator[Server]:
    """The app served by uvicorn on 127.0.0.1 in a thread, SQLite in ``root``; with a key of ``owner`` if given."""
    import uvicorn

    from embedseg_service.api.app import create_app
    from embedseg_service.records.db import run_migrations
    from embedseg_service.records.keys import create_key
    from embedseg_service.records.settings import Settings

    settings = Settings(_env_file=None, data_dir=root, broker_url=None)
    root.mkdir(parents=True)
    run_migrations(settings.database_url_resolved)
    app = create_app(settings, migrate=False)
    key = None
    if owner is not None:
        with app.state.sessionmaker() as session:
            key = create_key(session, owner).secret
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Server(base=f"http://127.0.0.1:{port}", key=key, owner=owner)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A server with one API key, of owner lab-a."""
    with serving(tmp_path / "keyed", "lab-a") as running:
        yield running


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[Server]:
    """A server without API keys (anonymous access)."""
    with serving(tmp_path / "open", None) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium (the system's binary) under Playwright."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_missing("the playwright package is not installed (pip install playwright)")
    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def upload_volume(server: Server, content: bytes, name: str) -> dict[str, Any]:
    with httpx.Client(base_url=server.base, trust_env=False, timeout=30) as client:
        response = client.post("/api/v1/volumes", files={"file": (name, content, "image/tiff")},
                               headers=server.headers)  # fmt: skip
    assert response.status_code == 201, response.text
    return dict(response.json())


def anonymous_detail(server: Server) -> str:
    with httpx.Client(base_url=server.base, trust_env=False) as client:
        response = client.get("/api/v1/volumes")
    assert response.status_code == 401
    return str(response.json()["detail"])


def preview_png(server: Server, volume_id: str) -> bytes:
    with httpx.Client(base_url=server.base, trust_env=False) as client:
        response = client.get(f"/api/v1/volumes/{volume_id}/preview.png", headers=server.headers)
    assert response.status_code == 200
    return response.content


def expect_key_needed(page: Any, detail: str) -> None:
    """The 401 state: the server's detail shown, the focus in the key field, no list data, no toast."""
    page.wait_for_selector("#key-needed", state="visible", timeout=WAIT_MS)
    assert page.inner_text("#key-detail") == detail
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'api-key'",
                           timeout=WAIT_MS)  # fmt: skip
    assert page.locator(".tile").count() == 0
    assert page.is_hidden("#toast")
    assert page.evaluate("window.liveObjectUrls.size") == 0


def save_key(page: Any, key: str, remember: bool = False) -> None:
    page.fill("#api-key", key)
    page.set_checked("#key-remember", remember)
    page.click("#key-save")


def stored(page: Any) -> dict[str, str | None]:
    return dict(page.evaluate("({session: sessionStorage.getItem('embedseg.apiKey'), "
                              "local: localStorage.getItem('embedseg.apiKey')})"))  # fmt: skip


def sample_image() -> np.ndarray:
    return (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) % 251).astype(np.uint8)


def test_dashboard_asks_for_a_key_and_sends_it(browser: Any, server: Server, tmp_path: Path) -> None:
    assert server.key is not None
    image = sample_image()
    content = tiff_bytes(image)
    volume = upload_volume(server, content, "cells.tif")
    detail = anonymous_detail(server)
    preview_width, preview_height = png_size(preview_png(server, volume["id"]))

    context = browser.new_context(accept_downloads=True)
    context.add_init_script(COUNT_OBJECT_URLS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    api_calls: list[str] = []
    page.on("request", lambda request: api_calls.append(request.url) if "/api/v1/" in request.url else None)

    page.goto(f"{server.base}/dashboard/")
    expect_key_needed(page, detail)
    # polling stops until a key is saved: no calls, no toasts over two polling periods
    calls = len(api_calls)
    page.wait_for_timeout(int(2.5 * POLL_S * 1000))
    assert len(api_calls) == calls
    assert page.is_hidden("#toast")

    # a wrong key: the server's detail, still no data
    save_key(page, "esk_not-a-key")
    page.wait_for_function("() => document.getElementById('key-detail').textContent.includes('not valid')",
                           timeout=WAIT_MS)  # fmt: skip
    assert page.is_visible("#key-needed")

    save_key(page, server.key)
    page.wait_for_function(PREVIEW_LOADED, arg=volume["id"], timeout=WAIT_MS)
    assert page.is_hidden("#key-needed")
    img = page.locator(f'.tile[data-volume-id="{volume["id"]}"] img')
    assert img.get_attribute("src").startswith("blob:")
    assert page.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", img.element_handle()) == [
        preview_width, preview_height]  # fmt: skip
    assert page.inner_text("#volumes-total") == "(1)"
    assert server.key[:12] in page.inner_text("#key-status")
    assert stored(page) == {"session": server.key, "local": None}
    assert page.input_value("#api-key") == ""

    # drawing the tiles again reuses the preview's object URL: one live URL per tile, none leaked
    for _ in range(3):
        with page.expect_response(lambda response: "/api/v1/volumes?" in response.url):
            page.click('[data-refresh="volumes"]')
    page.wait_for_function(PREVIEW_LOADED, arg=volume["id"], timeout=WAIT_MS)
    assert page.evaluate("[...window.liveObjectUrls]") == [img.get_attribute("src")]

    # an upload from the page carries the key: the new volume is lab-a's
    second = tmp_path / "second.tif"
    second.write_bytes(tiff_bytes(image[::-1].copy()))
    page.set_input_files("#upload-form input[name=file]", str(second))
    page.click("#upload-form button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('.tile').length === 2", timeout=WAIT_MS)
    with httpx.Client(base_url=server.base, trust_env=False) as client:
        listed = client.get("/api/v1/volumes", headers=server.headers).json()
    assert sorted(item["name"] for item in listed["items"]) == ["cells", "second"]
    assert {item["owner"] for item in listed["items"]} == {server.owner}

    # a download is fetched with the key and saved under the server's file name
    with page.expect_download(timeout=WAIT_MS) as info:
        page.click(f'.tile[data-volume-id="{volume["id"]}"] .actions a')
    download = info.value
    assert download.suggested_filename == "cells.tif"
    assert Path(download.path()).read_bytes() == content

    # the key survives a reload of the tab (sessionStorage)
    page.reload()
    page.wait_for_function(PREVIEW_LOADED, arg=volume["id"], timeout=WAIT_MS)

    # Forget: back to the 401 state, the previews' object URLs revoked, nothing stored
    page.click("#key-forget")
    expect_key_needed(page, detail)
    assert stored(page) == {"session": None, "local": None}

    # remembered on this browser: another tab of the same browser uses it without typing
    save_key(page, server.key, remember=True)
    page.wait_for_function(PREVIEW_LOADED, arg=volume["id"], timeout=WAIT_MS)
    assert stored(page) == {"session": None, "local": server.key}
    other = context.new_page()
    other.goto(f"{server.base}/dashboard/")
    other.wait_for_function(PREVIEW_LOADED, arg=volume["id"], timeout=WAIT_MS)
    assert other.is_checked("#key-remember")
    other.click("#key-forget")
    expect_key_needed(other, detail)
    assert stored(other) == {"session": None, "local": None}
    assert errors == []
    context.close()


def test_dashboard_without_keys_keeps_plain_links(browser: Any, open_server: Server) -> None:
    content = tiff_bytes(sample_image())
    volume = upload_volume(open_server, content, "cells.tif")
    context = browser.new_context(accept_downloads=True)
    context.add_init_script(COUNT_OBJECT_URLS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{open_server.base}/dashboard/")
    page.wait_for_function(PREVIEW_LOADED, arg=volume["id"], timeout=WAIT_MS)
    assert page.is_hidden("#key-needed")
    assert page.inner_text("#key-status") == "no key"
    assert page.is_disabled("#key-forget")
    link = page.locator(f'.tile[data-volume-id="{volume["id"]}"] .actions a')
    assert link.get_attribute("href") == f"/api/v1/volumes/{volume['id']}/download"
    with page.expect_download(timeout=WAIT_MS) as info:
        link.click()
    assert info.value.suggested_filename == "cells.tif"
    assert Path(info.value.path()).read_bytes() == content
    # the download went through the link itself, not through an object URL
    assert page.evaluate("window.liveObjectUrls.size") == 1
    assert errors == []
    context.close()


def _labels3d() -> np.ndarray:
    labels = np.zeros((4, 24, 32), np.uint16)
    labels[1:3, 2:8, 3:9] = 5  # 72 voxels
    labels[0:4, 12:22, 14:30] = 2  # 640 voxels
    labels[3, 0, 0] = 9  # 1 voxel
    return labels


def _predict_3d(server: Server, tmp_path: Path, monkeypatch: Any) -> tuple[dict[str, Any], str]:
    """A 3D image (voxel size 2,1,1) and a succeeded predict job of it whose labels are :func:`_labels3d`
    (the model's segmentation, one volume or a batch, replaced; the job runs in this process as a worker would
    run it)."""
    from embedseg_service.core.model.checkpoint import TrainedModel, build_network, save_checkpoint
    from embedseg_service.records.settings import Settings
    from embedseg_service.worker.runner import run_job

    payload = {
        "state_dict": build_network(3, 1).state_dict(),
        "spatial_dims": 3,
        "in_channels": 1,
        "step": [2 / 1023, 1 / 1023, 1 / 1023],
        "config": {"in_channels": 1},
        "properties": {"min_object_size": 1},
    }
    model_file = save_checkpoint(tmp_path / "m3d.pt", payload)
    stack = tiff_bytes(np.zeros((4, 24, 32), np.uint8))
    with httpx.Client(base_url=server.base, trust_env=False, timeout=60, headers=server.headers) as client:
        image = client.post(
            "/api/v1/volumes", files={"file": ("stack.tif", stack)}, data={"axes": "ZYX", "voxel_size": "2,1,1"}
        ).json()
        model = client.post("/api/v1/models", files={"file": ("m3d.pt", model_file.read_bytes())}).json()
        job = client.post("/api/v1/jobs/predict",
                          json={"model_id": model["id"], "volume_ids": [image["id"]], "tta": False}).json()  # fmt: skip
    monkeypatch.setattr(TrainedModel, "segment", lambda _model, _image, **_options: _labels3d())
    monkeypatch.setattr(TrainedModel, "segment_batch", lambda _model, images, **_options: [_labels3d() for _ in images],
                        raising=False)  # fmt: skip
    settings = Settings(_env_file=None, data_dir=tmp_path / "keyed", broker_url=None)
    assert run_job(job["id"], settings=settings) == "succeeded"
    return image, job["id"]


PLANES_LOADED = """() => {
  const imgs = [...document.querySelectorAll('.objects [data-plane] img')];
  return imgs.length === 3 && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""


def test_a_prediction_shows_its_objects_and_three_planes(browser: Any, server: Server, tmp_path: Path,
                                                          monkeypatch: Any) -> None:  # fmt: skip
    assert server.key is not None
    image, job_id = _predict_3d(server, tmp_path, monkeypatch)
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 800})
    context.add_init_script(COUNT_OBJECT_URLS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server.base}/dashboard/#job={job_id}")
    save_key(page, server.key)
    page.wait_for_function("() => document.querySelectorAll('.objects-table tbody tr[data-label]').length === 3",
                           timeout=WAIT_MS)  # fmt: skip
    labels = page.eval_on_selector_all(".objects-table tbody tr", "rows => rows.map((r) => r.dataset.label)")
    assert labels == ["2", "5", "9"]
    first = page.eval_on_selector_all(
        ".objects-table tbody tr:first-child td", "cells => cells.map((c) => c.textContent)"
    )
    assert first == ["2", "640", "1.5, 16.5, 21.5", "3, 16.50, 21.50", "0,12,14 – 3,21,29", "—", "—"]

    # three planes of the label volume over its image; XZ and YZ: 4 slices of 2 drawn 8 rows tall
    page.wait_for_function(PLANES_LOADED, timeout=WAIT_MS)
    sizes = page.eval_on_selector_all(
        ".objects [data-plane] img", "imgs => imgs.map((i) => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[32, 24], [32, 8], [24, 8]]

    # sorted by the server: by voxel count, largest first
    page.click('.objects-table th button[data-sort="voxel_count"]')
    # the header turns at once, the rows when the server's page arrives (the status then counts the objects)
    page.wait_for_function("() => document.querySelector('th[aria-sort=descending] [data-sort=voxel_count]') !== null "
                           "&& document.querySelector('.objects [role=status]').textContent === '3 objects'",
                           timeout=WAIT_MS)  # fmt: skip
    assert page.eval_on_selector_all(".objects-table tbody tr", "rows => rows.map((r) => r.dataset.label)") == [
        "2", "5", "9"]  # fmt: skip
    # an object's button moves the planes through it, at its centroid (1.5, 4.5, 5.5) rounded; keyboard works
    page.focus('.objects-table tr[data-label="5"] button')
    page.keyboard.press("Enter")
    sliders = page.eval_on_selector_all(".objects [data-plane] input", "inputs => inputs.map((i) => i.value)")
    assert sliders == ["2", "5", "6"]

    # the CSV is fetched with the key and saved under the server's name
    with page.expect_download(timeout=WAIT_MS) as info:
        page.click(".objects a:text('Download CSV')")
    assert info.value.suggested_filename == f"{job_id[:8]}-objects.csv"
    lines = Path(info.value.path()).read_text().splitlines()
    assert lines[0].startswith("volume_id,labels_id,label,voxel_count,centroid_z,centroid_y,centroid_x")
    assert [line.split(",")[2] for line in lines[1:]] == ["2", "5", "9"]

    # closing the detail revokes its planes' object URLs
    planes = page.eval_on_selector_all(".objects [data-plane] img", "imgs => imgs.map((i) => i.src)")
    assert len(planes) == 3 and all(src.startswith("blob:") for src in planes)
    page.click("#job-detail .detail-head button:text('Close')")
    page.wait_for_function("(srcs) => srcs.every((src) => !window.liveObjectUrls.has(src))", arg=planes,
                           timeout=WAIT_MS)  # fmt: skip
    assert image["id"] in page.eval_on_selector_all(".tile", "tiles => tiles.map((t) => t.dataset.volumeId)")
    assert errors == []
    context.close()


# --------------------------------------------------------------------------- a user's walk-through

ROOT = Path(__file__).resolve().parents[2]
DOCS_IMAGES = ROOT / "docs" / "images"
README_SHOTS = {"training": "dashboard-training.png", "prediction": "dashboard-prediction.png"}
"""The screenshots the README shows (``--readme-screenshots`` rewrites them): name here -> file in docs/images."""
JOB_WAIT_MS = 300_000
"""How long the page may take to show a job's end (a loaded 2-core machine)."""
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 420, "height": 800}
SHORT_TRAIN = {"epochs": "2", "crop_size": "32", "batch_size": "16", "seed": "0", "max_time_minutes": "5"}
"""The training started from the page: 2 epochs of a few optimiser steps on 32 x 32 crops."""


def embedseg_command() -> list[str]:
    """The installed ``embedseg`` script of this interpreter, else ``python -m embedseg_service.core.cli``."""
    script = Path(sys.executable).with_name("embedseg")
    return [str(script)] if script.exists() else [sys.executable, "-m", "embedseg_service.core.cli"]


@contextmanager
def embedseg_serve(root: Path) -> Iterator[Server]:
    """``embedseg serve`` as a subprocess on the embedded default (SQLite, local storage and the local worker in
    ``root``), with one API key of owner lab-a made beforehand."""
    from embedseg_service.records.db import make_engine, make_sessionmaker, run_migrations
    from embedseg_service.records.keys import create_key
    from embedseg_service.records.settings import Settings

    url = Settings(_env_file=None, data_dir=root, broker_url=None).database_url_resolved
    run_migrations(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        key = create_key(session, "lab-a").secret
    engine.dispose()
    env = {name: value for name, value in os.environ.items() if not name.startswith("EMBEDSEG_")}
    env.update(EMBEDSEG_DATA_DIR=str(root), PYTHONUNBUFFERED="1")
    port = free_port()
    log = root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*embedseg_command(), "serve", "--port", str(port), "--log-level", "warning"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(base):
            assert proc.poll() is None, f"embedseg serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"embedseg serve did not answer:\n{log.read_text()}"
            time.sleep(0.2)
        yield Server(base=base, key=key, owner="lab-a")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/v1/health", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def upload_from_page(page: Any, path: Path, kind: str = "image", of_image: str | None = None) -> None:
    """Upload ``path`` with the volumes card's form, as ``kind`` (labels: of the image whose option starts with
    ``of_image``); waits for its tile."""
    tiles = page.locator(".tile").count()
    page.set_input_files("#upload-form input[name=file]", str(path))
    page.select_option("#upload-form select[name=kind]", kind)
    if of_image is not None:
        page.select_option(
            "#upload-form select[name=image_id]",
            label=option_label(page, "#upload-form select[name=image_id]", of_image),
        )
    page.click("#upload-form button[type=submit]")
    page.wait_for_function("(n) => document.querySelectorAll('.tile').length === n", arg=tiles + 1, timeout=WAIT_MS)


def option_label(page: Any, select: str, start: str) -> str:
    """The one option of ``select`` whose text starts with ``start`` (a user picks it by its text; the lists
    fill in after the volumes card is drawn)."""
    page.wait_for_function("([select, start]) => [...document.querySelectorAll(`${select} option`)]"
                           ".some((o) => o.textContent.startsWith(start))", arg=[select, start],
                           timeout=WAIT_MS)  # fmt: skip
    labels = [text for text in page.eval_on_selector_all(f"{select} option", "os => os.map((o) => o.textContent)")
              if text.startswith(start)]  # fmt: skip
    assert len(labels) == 1, (start, labels)
    return str(labels[0])


def choose_pair(page: Any, pairs: str, left: str, right: str) -> None:
    """Pick the first row of the ``data-pairs`` box ``pairs`` by the options' texts."""
    row = f'[data-pairs="{pairs}"] .pair:first-child'
    page.select_option(f"{row} [data-side=left]", label=option_label(page, f"{row} [data-side=left]", left))
    page.select_option(f"{row} [data-side=right]", label=option_label(page, f"{row} [data-side=right]", right))


def start_job(page: Any, form: str) -> str:
    """Submit a job form; the id of the job it started (the page selects it: ``#job=<id>``)."""
    before = page.evaluate("location.hash")
    page.click(f"#{form} button[type=submit]")
    page.wait_for_function("(before) => /^#job=/.test(location.hash) && location.hash !== before", arg=before,
                           timeout=WAIT_MS)  # fmt: skip
    return str(page.evaluate("location.hash")).removeprefix("#job=")


def wait_status(page: Any, job_id: str, status: str, timeout: int = JOB_WAIT_MS) -> None:
    """Wait until the jobs table shows ``status`` for ``job_id``."""
    page.wait_for_function("([id, status]) => { const row = document.querySelector(`#jobs tr[data-job-id='${id}']`); "
                           "return row !== null && row.querySelector(`.status-${status}`) !== null; }",
                           arg=[job_id, status], timeout=timeout)  # fmt: skip


def wait_detail(page: Any, job_id: str, status: str, timeout: int = JOB_WAIT_MS) -> None:
    """Wait until the job detail shows ``job_id`` (its short id) with ``status``."""
    page.wait_for_function("([id, status]) => { const head = document.querySelector('#job-detail .detail-head'); "
                           "return head !== null && head.querySelector('.mono').textContent === id.slice(0, 8) "
                           "&& head.querySelector(`.status-${status}`) !== null; }",
                           arg=[job_id, status], timeout=timeout)  # fmt: skip


def image_bytes(page: Any, img: str) -> bytes:
    """The bytes the page's ``img`` element shows (its blob URL read back in the page)."""
    encoded = page.eval_on_selector(
        img,
        """async (node) => {
      const bytes = new Uint8Array(await (await fetch(node.src)).arrayBuffer());
      let text = "";
      for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
      return btoa(text);
    }""",
    )
    return base64.b64decode(encoded)


def screenshot(page: Any, folder: Path, name: str) -> Path:
    """A PNG of the page's viewport saved as ``folder/<name>.png``, once no message covers it (none an error)."""
    assert not page.is_visible("#toast.bad"), page.inner_text("#toast")
    page.wait_for_selector("#toast", state="hidden", timeout=WAIT_MS)
    assert page.evaluate(OVERFLOWING) == []
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    assert png_size(path.read_bytes()) == (page.viewport_size["width"], page.viewport_size["height"])
    return path


def write_readme_shot(source: Path, target: Path) -> None:
    """A small copy of a screenshot for the README: 128 colours (Pillow's quantize), PNG optimised."""
    from PIL import Image

    with Image.open(source) as shot:
        shot.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            target, optimize=True
        )


def _train_in_page(page: Any, image: Path, mask: Path, folder: Path) -> None:
    """Upload a 2D image and its mask, train briefly, cancel a second (queued) training meanwhile, and see the
    first end at 100 % with its loss and validation AP curves."""
    upload_from_page(page, image)
    upload_from_page(page, mask, "labels", of_image="nuclei ·")
    assert page.inner_text(".tile:has(.kind-labels) .name") == "nuclei_mask"
    choose_pair(page, "train", "nuclei ·", "nuclei_mask ·")
    for name, value in SHORT_TRAIN.items():
        page.fill(f"#train-form input[name={name}]", value)
    page.fill("#train-form input[name=name]", "first-try")
    first = start_job(page, "train-form")

    # a second, long training waits behind the first (one local worker): cancelled from its detail
    page.fill("#train-form input[name=epochs]", "500")
    page.fill("#train-form input[name=name]", "too-long")
    second = start_job(page, "train-form")
    wait_detail(page, second, "queued", WAIT_MS)
    page.focus("#job-detail .detail-head button:text('Cancel')")
    page.keyboard.press("Enter")
    wait_detail(page, second, "cancelled", WAIT_MS)
    wait_status(page, second, "cancelled", WAIT_MS)
    assert page.is_hidden("#job-detail .detail-head button:text('Cancel')")

    page.click(f"#jobs tr[data-job-id='{first}']")
    wait_detail(page, first, "succeeded")
    wait_status(page, first, "succeeded")
    assert page.get_attribute("#job-detail .bar.big > span", "style") == "width:100%"
    assert page.get_attribute(f"#jobs tr[data-job-id='{first}'] .bar > span", "style") == "width:100%"
    facts = page.eval_on_selector_all("#job-detail .facts > *", "nodes => nodes.map((n) => n.textContent)")
    assert facts[facts.index("Progress") + 1] == "100 %"
    # one chart: train and validation loss, validation IoU and mean AP per epoch (2 points each)
    for series in ("loss", "val-loss", "iou", "ap"):
        points = page.get_attribute(f"#job-detail svg.chart polyline.{series}", "points")
        assert points is not None and len(points.split()) == 2, (series, points)
    assert page.locator("#job-detail .legend [data-series=val_map]").count() == 1
    page.wait_for_selector("#models tr:has-text('first-try')", timeout=WAIT_MS)  # the trained model, listed
    screenshot(page, folder, "training")


def _predict_in_page(page: Any, server: Server, model_file: Path, folder: Path) -> None:
    """Upload a trained checkpoint, segment the image with it against its mask, and see the AP, the labels'
    preview, the object table and the labels over the image."""
    page.set_input_files("#model-upload-form input[name=file]", str(model_file))
    page.fill("#model-upload-form input[name=name]", "dsb-nuclei")
    page.click("#model-upload-form button[type=submit]")
    page.wait_for_selector("#models tr:has-text('dsb-nuclei')", timeout=WAIT_MS)

    page.click("[data-tab=predict]")
    model_select = "#predict-form select[name=model_id]"
    page.select_option(model_select, label=option_label(page, model_select, "dsb-nuclei (2D"))
    choose_pair(page, "predict", "nuclei ·", "nuclei_mask ·")
    page.set_checked("#predict-form input[name=tta]", False)
    job_id = start_job(page, "predict-form")
    wait_detail(page, job_id, "succeeded")
    assert page.get_attribute("#job-detail .bar.big > span", "style") == "width:100%"
    with httpx.Client(base_url=server.base, trust_env=False, headers=server.headers) as client:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
    ap = job["metrics"]["ap"]["ap"]
    assert ap[0] > 0.5, ap
    overall = page.eval_on_selector_all("#job-detail table.ap tr.total td", "cells => cells.map((c) => c.textContent)")
    assert overall[:3] == ["overall", "", ""]
    assert [float(cell) for cell in overall[3:]] == pytest.approx(ap, abs=0.0005 + 1e-9)  # 3 decimals

    # the object table: one row per object, the number the job found
    n_objects = job["result"]["object_tables"]["volumes"][0]["n_objects"]
    assert n_objects > 50
    page.wait_for_function("(n) => document.querySelector('.objects [role=status]').textContent === `${n} objects`",
                           arg=n_objects, timeout=WAIT_MS)  # fmt: skip
    rows = page.locator(".objects-table tbody tr[data-label]").count()
    assert rows == min(n_objects, 100)

    # the labels' tile: its preview is a PNG of the image's size, labels in colour over the image
    labels_id = job["result"]["label_volume_ids"][0]
    page.wait_for_function(PREVIEW_LOADED, arg=labels_id, timeout=WAIT_MS)
    preview = _decoded(image_bytes(page, f'.tile[data-volume-id="{labels_id}"] img'))
    assert preview.size == (512, 512)
    assert len(preview.getcolors(maxcolors=512 * 512)) > 100
    # the labels over the image in the job's detail (one XY plane of a 2D volume)
    page.wait_for_function(PLANE_LOADED, arg=".objects [data-plane=xy] img", timeout=WAIT_MS)
    assert _decoded(image_bytes(page, ".objects [data-plane=xy] img")).size == (512, 512)
    page.eval_on_selector("#job-detail", "(node) => node.scrollIntoView()")
    screenshot(page, folder, "prediction")


PLANE_LOADED = """(selector) => {
  const img = document.querySelector(selector);
  return img !== null && img.complete && img.naturalWidth > 0;
}"""


OVERFLOWING = """() => [...document.querySelectorAll('body *')].filter((node) => {
  if (!node.getClientRects().length || node.closest('.scroll-x')) return false;
  const right = node.getBoundingClientRect().right;
  if (right > innerWidth + 0.5) return true;
  if (!node.matches('a, button, input, select')) return false;
  for (let box = node.parentElement; box; box = box.parentElement) {
    if (getComputedStyle(box).overflowX !== 'visible') return right > box.getBoundingClientRect().right + 0.5;
  }
  return false;
}).map((node) => `${node.tagName.toLowerCase()}#${node.id}.${node.className.baseVal ?? node.className}`)"""
"""Visible elements reaching past the window's right edge, and controls cut off by a box that clips them
(boxes that scroll sideways excepted)."""


def _decoded(data: bytes) -> Any:
    """A PNG decoded by Pillow (RGB)."""
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def _planes_in_page(page: Any, image: Path, mask: Path, folder: Path) -> None:
    """Upload a 3D stack (voxel size from its metadata) and its labels, open its planes, and see XY, XZ and YZ
    with the Z rows as tall as the voxels are deep."""
    from embedseg_service.core.data.io import read_tiff

    stack = read_tiff(image)
    depth, height, width = stack.data.shape
    vz, vy, vx = stack.voxel_size
    upload_from_page(page, image)
    upload_from_page(page, mask, "labels", of_image=f"{image.stem} ·")
    tile = page.locator(".tile").filter(has=page.locator(".kind-image")).filter(has_text=image.stem)
    assert "voxel 1.740×0.260×0.260" in tile.inner_text()
    tile.locator("button:text('Planes')").click()
    page.wait_for_function("() => { const imgs = [...document.querySelectorAll('#viewer-body [data-plane] img')]; "
                           "return imgs.length === 3 && imgs.every((i) => i.complete && i.naturalWidth > 0); }",
                           timeout=WAIT_MS)  # fmt: skip
    sizes = [_decoded(image_bytes(page, f"#viewer-body [data-plane={plane}] img")).size for plane in ("xy", "xz", "yz")]
    assert sizes == [(width, height), (width, round(depth * vz / vx)), (height, round(depth * vz / vy))]
    assert page.evaluate("document.activeElement.id") == "viewer-close"
    page.eval_on_selector("#viewer-card", "(node) => node.scrollIntoView()")
    screenshot(page, folder, "planes")


@pytest.mark.slow
def test_a_user_walks_through_the_dashboard(browser: Any, tmp_path: Path, data_dir: Path, dsb_model: Path,
                                            artefacts: Path, request: pytest.FixtureRequest) -> None:  # fmt: skip
    """Everything through the page, against ``embedseg serve``: the key, uploads of a 2D image and its mask, a
    short training (and a second one cancelled), a prediction with an uploaded model, the 3D planes of a stack;
    screenshots at 1280 x 800 and 420 px wide in ``artefacts``."""
    nuclei = tmp_path / "nuclei.tif"
    nuclei_mask = tmp_path / "nuclei_mask.tif"
    shutil.copyfile(data_dir / "nuclei2d_dsb" / "images" / "dsb2018_img2d.tif", nuclei)
    shutil.copyfile(data_dir / "nuclei2d_dsb" / "masks" / "dsb2018_img2d.tif", nuclei_mask)
    fewslice = data_dir / "nuclei3d_cells3d_fewslice"
    with embedseg_serve(tmp_path / "service") as server:
        assert server.key is not None
        context = browser.new_context(viewport=WIDE, accept_downloads=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{server.base}/dashboard/")
        page.wait_for_selector("#key-needed", state="visible", timeout=WAIT_MS)
        save_key(page, server.key)
        page.wait_for_selector("#volumes .empty:text('No volumes yet')", timeout=WAIT_MS)

        _train_in_page(page, nuclei, nuclei_mask, artefacts)
        _predict_in_page(page, server, dsb_model, artefacts)
        _planes_in_page(page, fewslice / "images" / "test_bottom_left.tif",
                        fewslice / "masks" / "test_bottom_left.tif", artefacts)  # fmt: skip

        # a phone-sized window: one column, nothing wider than the window
        page.set_viewport_size(NARROW)
        page.eval_on_selector("#volumes-card", "(node) => node.scrollIntoView()")
        assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
        screenshot(page, artefacts, "narrow")
        assert errors == []
        context.close()
    if request.config.getoption("--readme-screenshots"):
        DOCS_IMAGES.mkdir(exist_ok=True)
        for name, file_name in README_SHOTS.items():
            write_readme_shot(artefacts / f"{name}.png", DOCS_IMAGES / file_name)
