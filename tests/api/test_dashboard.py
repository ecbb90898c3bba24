"""The dashboard: served with the right content types, and calling only routes the app has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pytest
from helpers import tiff_bytes, upload

from embedseg_service.api.dashboard import DASHBOARD_PATH, static_dir
from embedseg_service.records.orm import VolumeKind
from embedseg_service.records.settings import Settings

with warnings.catch_warnings():  # starlette's notice about its httpx-based test client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ROUTE = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) (/api/v1[^"]*)"')
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")

# Loads dashboard.js into a Node vm context with a stub document and in-memory Web Storage, then
# prints the JSON of the expression given as the second argument.
NODE_HARNESS = """
const vm = require("vm");
const fs = require("fs");
function memoryStorage() {
  const items = new Map();
  return {
    getItem: (key) => (items.has(key) ? items.get(key) : null),
    setItem: (key, value) => { items.set(key, String(value)); },
    removeItem: (key) => { items.delete(key); },
  };
}
const window = { sessionStorage: memoryStorage(), localStorage: memoryStorage() };
const context = vm.createContext({ window, document: { addEventListener() {} }, URL, URLSearchParams, console });
vm.runInContext(fs.readFileSync(process.argv[1], "utf8"), context);
console.log(JSON.stringify(vm.runInContext(process.argv[2], context)));
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from embedseg_service.api.app import create_app

    data = tmp_path_factory.mktemp("dashboard-data")
    return create_app(Settings(data_dir=data, _env_file=None), migrate=False)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as test_client:
        yield test_client


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.links: list[str] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if "id" in values:
            self.ids.append(values["id"] or "")
        if tag == "script":
            self.scripts.append(values.get("src") or "")
        elif tag == "link" and values.get("rel") == "stylesheet":
            self.styles.append(values.get("href") or "")
        elif tag == "a" and values.get("href"):
            self.links.append(values["href"] or "")


def _page_assets(html: str) -> _Assets:
    parser = _Assets()
    parser.feed(html)
    return parser


def _template(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_root_redirects_to_the_dashboard(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == DASHBOARD_PATH + "/"
    response = client.get(DASHBOARD_PATH, follow_redirects=False)
    assert response.status_code in (307, 308)
    assert response.headers["location"].endswith(DASHBOARD_PATH + "/")


def test_page_and_assets_are_served_with_their_content_types(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>EmbedSeg service</title>" in page.text
    assets = _page_assets(page.text)
    assert assets.scripts == ["dashboard.js"]
    assert assets.styles == ["dashboard.css"]
    script = client.get(f"{DASHBOARD_PATH}/{assets.scripts[0]}")
    assert script.status_code == 200
    assert script.headers["content-type"].split(";")[0] in {"text/javascript", "application/javascript"}
    assert script.text == (static_dir() / "dashboard.js").read_text()
    style = client.get(f"{DASHBOARD_PATH}/{assets.styles[0]}")
    assert style.status_code == 200
    assert style.headers["content-type"].split(";")[0] == "text/css"
    assert client.get(f"{DASHBOARD_PATH}/missing.js").status_code == 404


def test_dashboard_routes_stay_out_of_the_openapi_schema(app) -> None:
    paths = app.openapi()["paths"]
    assert "/" not in paths
    assert not any(path.startswith(DASHBOARD_PATH) for path in paths)


def test_page_loads_nothing_from_other_hosts() -> None:
    html = (static_dir() / "index.html").read_text()
    script = (static_dir() / "dashboard.js").read_text()
    css = (static_dir() / "dashboard.css").read_text()
    for text in (html, script, css):
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text)
        assert "@import" not in text
        assert not re.search(r"url\((?!data:)", text)
    # The only absolute URL in the script is the SVG namespace, which is an identifier.
    assert re.findall(r"https?://[^\"' ]+", script) == ["http://www.w3.org/2000/svg"]


def test_script_calls_only_routes_of_the_app(app) -> None:
    schema = app.openapi()["paths"]
    operations = {(method.upper(), _template(path)) for path, item in schema.items() for method in item}
    script = (static_dir() / "dashboard.js").read_text()
    used = ROUTE.findall(script)
    assert len(used) >= 16
    for method, path in used:
        assert (method, _template(path)) in operations, f"{method} {path} is not a route of the app"
    # Every /api/v1 path in the script appears in the ROUTES table.
    assert len(re.findall(r"/api/v1", script)) == len(used)


def test_script_sends_the_job_options_the_schemas_accept() -> None:
    from embedseg_service.records.schemas import EvalPair, EvaluateSpec, PredictSpec, TrainSpec

    script = (static_dir() / "dashboard.js").read_text()

    def keys(function: str) -> set[str]:
        body = re.search(rf"function {function}\(form\) \{{(.*?)\n\}}", script, re.S).group(1)
        return set(re.findall(r"^\s+(\w+):", body, re.M))

    # the dashboard offers no webhook (callback_url is for pipelines) and sends jobs to the default queue
    assert keys("trainBody") == set(TrainSpec.model_fields) - {"val_image_ids", "val_mask_ids", "callback_url", "queue"}
    assert keys("predictBody") == set(PredictSpec.model_fields) - {"callback_url", "queue"}
    assert keys("evaluateBody") == set(EvaluateSpec.model_fields) - {"callback_url", "queue"}
    assert {"gt_id", "pred_id"} == set(EvalPair.model_fields)
    assert "{ gt_id: gt, pred_id: pred }" in script


def test_job_forms_start_at_the_schemas_defaults() -> None:
    from embedseg_service.records.schemas import EvaluateSpec, PredictSpec

    html = (static_dir() / "index.html").read_text()
    tta = re.search(r'<input type="checkbox" name="tta"[^>]*>', html).group(0)
    assert ("checked" in tta) is PredictSpec.model_fields["tta"].default is True
    # no thresholds typed in: the job takes the defaults of its volumes' dimensionality
    thresholds = re.search(r'<input[^>]*name="thresholds"[^>]*>', html).group(0)
    assert "value=" not in thresholds and EvaluateSpec.model_fields["thresholds"].default is None
    script = (static_dir() / "dashboard.js").read_text()
    assert "thresholds: thresholds ? numbers(thresholds) : undefined" in script


def test_upload_form_sends_the_fields_the_volume_route_reads() -> None:
    from embedseg_service.api.routes.volumes import FORM_FIELDS

    html = (static_dir() / "index.html").read_text()
    form = re.search(r'<form id="upload-form".*?</form>', html, re.S).group(0)
    names = set(re.findall(r'name="(\w+)"', form))
    assert names == {"file", "kind", "voxel_size", "image_id"}
    assert names - {"file"} <= set(FORM_FIELDS)
    kinds = set(re.findall(r'<option value="(\w+)"', form))
    assert kinds == {kind.value for kind in VolumeKind}


def test_model_upload_form_sends_the_fields_the_model_route_reads() -> None:
    from embedseg_service.api.routes.models import FORM_FIELDS

    html = (static_dir() / "index.html").read_text()
    form = re.search(r'<form id="model-upload-form".*?</form>', html, re.S).group(0)
    names = set(re.findall(r'name="(\w+)"', form))
    assert names == {"file", "name"}
    assert names - {"file"} <= set(FORM_FIELDS)


def test_links_and_ids_of_the_page_exist(app) -> None:
    html = (static_dir() / "index.html").read_text()
    assets = _page_assets(html)
    assert assets.links == [app.docs_url]
    script = (static_dir() / "dashboard.js").read_text()
    for element_id in set(re.findall(r'getElementById\("([\w-]+)"\)', script)):
        assert element_id in assets.ids, f"dashboard.js looks up #{element_id}, which index.html lacks"


def run_script(expression: str) -> Any:
    """The JSON value of a JavaScript ``expression`` evaluated after dashboard.js was loaded (Node.js)."""
    assert NODE is not None
    result = subprocess.run([NODE, "-e", NODE_HARNESS, str(static_dir() / "dashboard.js"), expression],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _functions_calling(script: str, call: str) -> set[str]:
    """Names of the top-level functions of ``script`` whose bodies contain ``call`` (not its definition)."""
    starts = [(match.start(), match.group(1)) for match in re.finditer(r"^(?:async )?function (\w+)\(", script, re.M)]
    names = set()
    for match in re.finditer(r"(?<!function )" + re.escape(call), script):
        enclosing = [name for start, name in starts if start < match.start()]
        names.add(enclosing[-1] if enclosing else "<top level>")
    return names


def test_page_has_the_key_field() -> None:
    html = (static_dir() / "index.html").read_text()
    form = re.search(r'<form id="key-form".*?</form>', html, re.S).group(0)
    assert re.search(r'<label for="api-key">API key</label>', form)
    key_input = re.search(r'<input [^>]*id="api-key"[^>]*>', form).group(0)
    assert 'type="password"' in key_input and 'autocomplete="off"' in key_input
    assert re.search(r'<input type="checkbox" id="key-remember">\s*remember on this browser', form)
    assert re.search(r'<button type="submit" id="key-save">Save</button>', form)
    assert re.search(r'<button type="button" id="key-forget"[^>]*>Forget</button>', form)
    # the 401 notice starts hidden and is announced when shown
    assert re.search(r'<div id="key-needed" [^>]*role="alert" hidden>', html)
    assert 'id="key-detail"' in html


def test_every_call_of_the_script_can_carry_the_key() -> None:
    script = (static_dir() / "dashboard.js").read_text()
    # one fetch and one XMLHttpRequest, both with the key's header
    assert _functions_calling(script, "fetch(") == {"send"}
    assert "headers: withKey(headers)" in script
    assert _functions_calling(script, "new XMLHttpRequest()") == {"sendForm"}
    assert 'Object.entries(withKey({ Accept: "application/json" }))' in script
    # URLs of the API go to links that fetch with the key when one is set, never to a bare <img src>
    assert _functions_calling(script, "routeUrl(") == {"send", "sendForm", "downloadLink", "viewLink"}
    assert not re.search(r"\bsrc:", script)
    # 401s are shown beside the key field, not as toasts, and stop the polling
    assert "if (response.status === 401) throw keyNeeded(detail);" in script
    assert "if (pollBusy || document.hidden || auth.locked) return;" in script
    assert "document.cookie" not in script


@needs_node
def test_key_is_stored_per_tab_or_remembered() -> None:
    stored = run_script("""(() => {
      const seen = [storedKey()];
      storeKey("esk_tab", false);
      seen.push(storedKey(), window.localStorage.getItem(KEY_STORAGE));
      storeKey("esk_browser", true);
      seen.push(storedKey(), window.sessionStorage.getItem(KEY_STORAGE));
      forgetStoredKey();
      seen.push(storedKey(), window.localStorage.getItem(KEY_STORAGE));
      return seen;
    })()""")
    assert stored == [
        {"key": "", "remembered": False},
        {"key": "esk_tab", "remembered": False}, None,
        {"key": "esk_browser", "remembered": True}, None,
        {"key": "", "remembered": False}, None,
    ]  # fmt: skip


@needs_node
def test_requests_carry_the_key_once_set() -> None:
    headers = run_script("""(() => {
      const before = withKey({ Accept: "application/json" });
      auth.key = "esk_abc";
      return [before, withKey({ Accept: "application/json" })];
    })()""")
    assert headers == [{"Accept": "application/json"},
                       {"Accept": "application/json", "Authorization": "Bearer esk_abc"}]  # fmt: skip


@needs_node
@pytest.mark.parametrize(
    ("header", "name"),
    [
        ('attachment; filename="cells.tif"', "cells.tif"),
        ("attachment; filename=model.pt", "model.pt"),
        ('attachment; filename="a \\"quoted\\" name.tif"', 'a "quoted" name.tif'),
        ("attachment; filename*=utf-8''z%C3%BCrich%20cells.tif", "zürich cells.tif"),
        ("attachment; filename=\"old.tif\"; filename*=UTF-8''new.tif", "new.tif"),
        ("attachment; filename*=UTF-8''%E0%A4%A; filename=\"fallback.tif\"", "fallback.tif"),
        ('attachment; filename="../../etc/passwd"', "passwd"),
        ("attachment", ""),
        (None, ""),
    ],
)
def test_download_names_come_from_content_disposition(header: str | None, name: str) -> None:
    assert run_script(f"dispositionName({json.dumps(header)})") == name


@needs_node
def test_download_name_of_the_server_is_read_back(tmp_path) -> None:
    from embedseg_service.api.app import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path, _env_file=None), migrate=True)) as client:
        response = upload(client, tiff_bytes(np.zeros((8, 8), np.uint8)), filename="x.tif", name="zürich 1")
        assert response.status_code == 201, response.text
        download = client.get(f"/api/v1/volumes/{response.json()['id']}/download")
    assert download.status_code == 200
    assert run_script(f"dispositionName({json.dumps(download.headers['content-disposition'])})") == "zürich 1.tif"


@needs_node
def test_script_parses() -> None:
    result = subprocess.run(["node", "--check", str(static_dir() / "dashboard.js")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_prediction_detail_has_the_object_table_and_the_planes() -> None:
    from embedseg_service.api.objects import ObjectSort

    script = (static_dir() / "dashboard.js").read_text()
    html = (static_dir() / "index.html").read_text()
    # the object table is read page by page from the API, sorted by the server, and the CSV is a
    # download link (fetched with the key when one is set)
    assert '"GET /api/v1/jobs/{job_id}/objects"' in script and '"GET /api/v1/jobs/{job_id}/objects.csv"' in script
    assert 'downloadLink("jobObjectsCsv", { job_id: job.id }, "Download CSV"' in script
    assert re.search(r'api\("jobObjects", \{ params: \{ job_id: job\.id \}, query: \{\s*volume_id: view\.labelsId, '
                     r"sort: view\.sort, descending: view\.descending", script)  # fmt: skip
    sorts = re.search(r"const OBJECT_SORTS = \{(.*?)\};", script).group(1)
    assert set(re.findall(r'(\w+): "', sorts)) == {sort.value for sort in ObjectSort}
    assert '"aria-sort"' in script and 'class: "sort"' in script
    assert 'parts.push(el("h3", {}, "Objects"), objectsSection(job, releases));' in script
    # planes: the preview route with plane=xy|xz|yz through z|y|x, fetched with the key, one slider each
    assert 'fetchFile("volumePreview", { volume_id: volume.id }, query)' in script
    for plane, axis in (("xy", "z"), ("xz", "y"), ("yz", "x")):
        assert f'{{ plane: "{plane}", axis: "{axis}"' in script
    assert 'el("input", { type: "range"' in script
    # the volumes card's viewer, opened by a 3D volume's "Planes" button
    assert re.search(r'<section class="card" id="viewer-card" aria-labelledby="viewer-title" hidden>', html)
    assert '<button type="button" class="ghost" id="viewer-close">Close</button>' in html
    assert 'onclick: () => openViewer(volume) }, "Planes")' in script
    # the training chart draws the validation mean AP that picks the saved model, and marks that model
    assert 'line("val_map", yIou, "ap")' in script and "lossChart(history, job.metrics.best_epoch)" in script


@needs_node
def test_volume_axes_give_the_planes_and_epochs_keep_the_mean_ap() -> None:
    sizes = run_script("""[spatialSize({ axes: "ZYX", shape: [5, 16, 24] }),
                         spatialSize({ axes: "YX", shape: [16, 24] }),
                         spatialSize({ axes: "CZYX", shape: [2, 5, 16, 24] })]""")
    assert sizes == [{"z": 5, "y": 16, "x": 24}, {"z": None, "y": 16, "x": 24}, {"z": 5, "y": 16, "x": 24}]
    history = run_script("""trainingHistory({ epochs: [{ epoch: 1, loss: 0.9, val_iou: 0.2, val_ap: 0.5, val_map: 0.3 },
                                                       { epoch: 2, val_map: 0.4 }, { epoch: 3 }] })""")
    assert history == [
        {"epoch": 1, "loss": 0.9, "val_iou": 0.2, "val_map": 0.3},
        {"epoch": 2, "val_map": 0.4},
    ]
