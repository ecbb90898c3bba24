"""The dashboard in a real browser (headless Chromium driven by Playwright) against a live server with
API keys: the page asks for a key, sends it with every call, shows previews fetched with it, saves
downloads under the server's file name, and forgets it again.

Needs the ``playwright`` package (PyPI) and a Chromium binary on ``PATH`` (Debian: ``apt-get install
chromium``); Playwright's own browser download is not used. Without them the test skips, or fails
under ``EMBEDSEG_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import shutil
import socket
import struct
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
    (the model's segmentation replaced; the job runs in this process as a worker would run it)."""
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
    page.wait_for_function("() => document.querySelector('.objects-table tbody tr').dataset.label === '2' && "
                           "document.querySelector('th[aria-sort=descending] [data-sort=voxel_count]') !== null",
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
