// EmbedSeg dashboard: volumes, models and jobs, through the service's REST routes only.
"use strict";

// Every route the page calls, as "METHOD path" (checked against the OpenAPI schema by the tests).
const ROUTES = {
  health: "GET /api/v1/health",
  listVolumes: "GET /api/v1/volumes",
  uploadVolume: "POST /api/v1/volumes",
  uploadModel: "POST /api/v1/models",
  deleteVolume: "DELETE /api/v1/volumes/{volume_id}",
  volumePreview: "GET /api/v1/volumes/{volume_id}/preview.png",
  volumeDownload: "GET /api/v1/volumes/{volume_id}/download",
  getVolume: "GET /api/v1/volumes/{volume_id}",
  listModels: "GET /api/v1/models",
  deleteModel: "DELETE /api/v1/models/{model_id}",
  modelDownload: "GET /api/v1/models/{model_id}/download",
  listJobs: "GET /api/v1/jobs",
  getJob: "GET /api/v1/jobs/{job_id}",
  startTrain: "POST /api/v1/jobs/train",
  startPredict: "POST /api/v1/jobs/predict",
  startEvaluate: "POST /api/v1/jobs/evaluate",
  cancelJob: "POST /api/v1/jobs/{job_id}/cancel",
  jobObjects: "GET /api/v1/jobs/{job_id}/objects",
  jobObjectsCsv: "GET /api/v1/jobs/{job_id}/objects.csv",
};

const POLL_MS = 2000;
const CHOICES_LIMIT = 200;  // volumes and models offered in the job forms
const PAGE = { volumes: 24, jobs: 15, models: 10 };
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

const state = {
  offsets: { volumes: 0, jobs: 0, models: 0 },
  allVolumes: [],  // every volume (up to CHOICES_LIMIT), for the job forms and names
  models: [],
  selectedJob: null,
  jobStatus: {},  // last seen status per job id, to notice jobs that just finished
  detailDrawn: "",  // the job body the job detail shows
  detailReleases: [],  // what the drawn job detail holds (plane viewers): released when it is replaced
  viewer: null,  // the plane viewer of the volumes card
};

// ------------------------------------------------------------------ HTTP

function routeUrl(name, params = {}, query = null) {
  const [, template] = ROUTES[name].split(" ");
  let path = template.replace(/\{(\w+)\}/g, (_, key) => {
    if (!(key in params)) throw new Error(`missing ${key} for ${name}`);
    return encodeURIComponent(params[key]);
  });
  if (query) {
    const search = new URLSearchParams();
    for (const [key, value] of Object.entries(query)) {
      if (value !== null && value !== undefined && value !== "") search.set(key, value);
    }
    const text = search.toString();
    if (text) path += "?" + text;
  }
  return path;
}

function errorText(body, status) {
  if (body && body.detail !== undefined) {
    const detail = body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((item) => {
        const where = Array.isArray(item.loc) ? item.loc.filter((part) => part !== "body").join(".") : "";
        return (where ? where + ": " : "") + (item.msg || JSON.stringify(item));
      }).join("\n");
    }
    return JSON.stringify(detail);
  }
  return `HTTP ${status}`;
}

// Answers to requests sent before the key changed are dropped, so nothing of another key's owner is shown.
class StaleAnswer extends Error {}

// The server answered 401: the page shows its detail beside the key field (not in a toast).
class KeyNeeded extends Error {}

// Errors worth a toast: not 401s (shown beside the key field) nor dropped stale answers.
function report(error) {
  if (!(error instanceof KeyNeeded) && !(error instanceof StaleAnswer)) toast(error.message);
}

async function jsonOf(response) {
  const type = response.headers.get("content-type") || "";
  if (!type.includes("json")) return null;
  try {
    return await response.json();
  } catch (_) {
    return null;
  }
}

// fetch a route with the API key; resolves with the Response when it is 2xx, rejects with the server's
// detail otherwise (KeyNeeded on 401, StaleAnswer when the key changed meanwhile).
async function send(name, { params = {}, query = null, headers = {}, body = undefined } = {}) {
  const [method] = ROUTES[name].split(" ");
  const epoch = auth.epoch;
  const response = await fetch(routeUrl(name, params, query), { method, headers: withKey(headers), body });
  if (epoch !== auth.epoch) throw new StaleAnswer(`${name}: the API key changed`);
  if (response.ok) return response;
  const detail = errorText(await jsonOf(response), response.status);
  if (epoch !== auth.epoch) throw new StaleAnswer(`${name}: the API key changed`);
  if (response.status === 401) throw keyNeeded(detail);
  throw new Error(detail);
}

async function api(name, { params = {}, query = null, json = undefined, form = undefined } = {}) {
  const headers = { Accept: "application/json" };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  const response = await send(name, { params, query, headers, body });
  return jsonOf(response);
}

// A file of the API as { blob, filename } (filename: from Content-Disposition, "" when absent).
async function fetchFile(name, params, query = null) {
  const response = await send(name, { params, query });
  const filename = dispositionName(response.headers.get("content-disposition"));
  return { blob: await response.blob(), filename };
}

// The file name of a Content-Disposition header (RFC 6266: filename* first, then filename), "" if none.
function dispositionName(header) {
  if (!header) return "";
  const extended = /filename\*\s*=\s*([\w!#$%&+.^`|~-]*)'[^']*'([^;\s]+)/i.exec(header);
  if (extended) {
    try {
      return baseName(decodeURIComponent(extended[2]));
    } catch (_) {
      // malformed percent-encoding: fall back to the plain filename parameter
    }
  }
  const plain = /(?:^|;)\s*filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))/i.exec(header);
  if (!plain) return "";
  return baseName(plain[1] !== undefined ? plain[1].replace(/\\(.)/g, "$1") : plain[2]);
}

function baseName(name) {
  return name.split(/[\\/]/).pop().trim();
}

// ------------------------------------------------------------------ API key

// The key lives in sessionStorage (this tab, until it is closed), or in localStorage when "remember on
// this browser" is ticked. Never in a cookie: other sites cannot make the browser send it.
const KEY_STORAGE = "embedseg.apiKey";
const REVOKE_AFTER_MS = 60000;  // object URLs handed to a download or a new tab live this long

const auth = {
  key: "",
  locked: false,  // a 401 came back: polling stops until a key is saved
  epoch: 0,  // bumped on every key change
};

function storage(kind) {
  try {
    return kind === "local" ? window.localStorage : window.sessionStorage;
  } catch (_) {
    return null;  // storage disabled by the browser's settings
  }
}

function storedKey() {
  for (const kind of ["session", "local"]) {
    const store = storage(kind);
    const key = store ? store.getItem(KEY_STORAGE) : null;
    if (key) return { key, remembered: kind === "local" };
  }
  return { key: "", remembered: false };
}

// Keep `key` in one storage (localStorage when `remember`), removing it from the other; false if refused.
function storeKey(key, remember) {
  forgetStoredKey();
  const store = storage(remember ? "local" : "session");
  try {
    store.setItem(KEY_STORAGE, key);
    return true;
  } catch (_) {
    return false;
  }
}

function forgetStoredKey() {
  for (const kind of ["session", "local"]) {
    const store = storage(kind);
    if (store) store.removeItem(KEY_STORAGE);
  }
}

function withKey(headers) {
  return auth.key ? { ...headers, Authorization: `Bearer ${auth.key}` } : headers;
}

// A 401: show the server's detail, empty the lists (they belong to the key that no longer works),
// stop polling and put the focus on the key field. Returns the error to throw.
function keyNeeded(detail) {
  const first = !auth.locked;
  auth.locked = true;
  document.getElementById("key-detail").textContent = detail;
  document.getElementById("key-needed").hidden = false;
  clearData("Enter an API key above.");
  if (first) document.getElementById("api-key").focus();
  return new KeyNeeded(detail);
}

function showKeyState(remembered) {
  const status = document.getElementById("key-status");
  const input = document.getElementById("api-key");
  if (auth.key) {
    // The first characters name a key (embedseg keys list shows them); the rest stays hidden.
    status.textContent = `${auth.key.slice(0, 12)}… ${remembered ? "(this browser)" : "(this tab)"}`;
    input.placeholder = "replace the key";
  } else {
    status.textContent = "no key";
    input.placeholder = "API key";
  }
  document.getElementById("key-forget").disabled = !auth.key;
  document.getElementById("key-remember").checked = remembered;
}

function setKey(key, remembered) {
  auth.key = key;
  auth.epoch += 1;
  auth.locked = false;
  document.getElementById("key-needed").hidden = true;
  clearData("Loading…");
  showKeyState(remembered);
  reloadAll();
}

function saveKey(event) {
  event.preventDefault();
  const input = document.getElementById("api-key");
  const key = input.value.trim();
  if (!key) {
    toast("Type or paste an API key first.");
    input.focus();
    return;
  }
  const remember = document.getElementById("key-remember").checked;
  if (!storeKey(key, remember)) toast("The browser refused to store the key: it is kept for this page only.");
  input.value = "";
  setKey(key, remember);
}

function forgetKey() {
  forgetStoredKey();
  document.getElementById("api-key").value = "";
  setKey("", false);
}

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------ files

// Save a blob as a download named `filename`.
function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), REVOKE_AFTER_MS);
}

// A download link to a file route. Without a key it is a plain link (the browser streams the file);
// with a key a click fetches the file with it and saves it under the server's file name
// (Content-Disposition), else `fallbackName`.
function downloadLink(route, params, text, fallbackName) {
  const link = el("a", { href: routeUrl(route, params), download: fallbackName }, text);
  link.addEventListener("click", async (event) => {
    if (!auth.key) return;
    event.preventDefault();
    try {
      const { blob, filename } = await fetchFile(route, params);
      saveBlob(blob, filename || fallbackName);
    } catch (error) {
      report(error);
    }
  });
  return link;
}

// A link opening a route's image in a new tab: a plain link without a key; with one, the image is
// fetched with the key and the tab shows it through an object URL.
function viewLink(route, params, ...children) {
  const link = el("a", { href: routeUrl(route, params), target: "_blank", rel: "noopener" }, ...children);
  link.addEventListener("click", async (event) => {
    if (!auth.key) return;
    event.preventDefault();
    const tab = window.open("", "_blank");  // opened now, while the click still allows it
    try {
      const { blob } = await fetchFile(route, params);
      const url = URL.createObjectURL(blob);
      setTimeout(() => URL.revokeObjectURL(url), REVOKE_AFTER_MS);
      if (!tab) throw new Error("the browser blocked the new tab; allow pop-ups for this page");
      tab.location.href = url;
    } catch (error) {
      if (tab) tab.close();
      report(error);
    }
  });
  return link;
}

// Preview images are fetched with the key and shown through object URLs: one per volume whose tile is
// on the page, reused when the tiles are drawn again, revoked when its tile leaves or the key changes.
const previews = new Map();  // volume id -> { url: object URL once fetched, promise }

function showPreview(img, volumeId) {
  let entry = previews.get(volumeId);
  if (!entry) {
    const made = { url: null };
    made.promise = fetchFile("volumePreview", { volume_id: volumeId }).then(({ blob }) => {
      const url = URL.createObjectURL(blob);
      if (previews.get(volumeId) !== made) {  // its tile left the page meanwhile
        URL.revokeObjectURL(url);
        return null;
      }
      made.url = url;
      return url;
    });
    made.promise.catch(() => { if (previews.get(volumeId) === made) previews.delete(volumeId); });
    previews.set(volumeId, made);
    entry = made;
  }
  entry.promise.then((url) => { if (url) img.src = url; }, (error) => {
    img.alt = error instanceof KeyNeeded ? "preview needs an API key" : `no preview: ${error.message}`;
    img.classList.add("missing");
  });
}

// Revoke the object URLs of the previews of every volume not in `keep` (a Set of ids).
function releasePreviews(keep) {
  for (const [volumeId, entry] of previews) {
    if (keep.has(volumeId)) continue;
    if (entry.url) URL.revokeObjectURL(entry.url);
    previews.delete(volumeId);
  }
}

// ------------------------------------------------------------------ planes (XY, XZ, YZ)

const PLANE_DEBOUNCE_MS = 250;

// Spatial sizes of a volume from its axes and shape: { z, y, x } (z null for a 2D volume).
function spatialSize(volume) {
  const size = { z: null, y: null, x: null };
  [...volume.axes].forEach((axis, i) => {
    const key = axis.toLowerCase();
    if (key in size) size[key] = volume.shape[i];
  });
  return size;
}

// The planes of a volume, drawn by the server with labels overlaid (a label volume over its image, an
// image under its latest labels) and fetched with the key: XY of a 2D volume; XY, XZ and YZ of a 3D one,
// each with a slider for the slice, row or column it passes through (XZ and YZ are scaled along Z by the
// voxel size). Returns { node, centreOn(centroid), release() }: centreOn moves the planes through a point
// (array order), release revokes the images' object URLs.
function planeViewer(volume) {
  const size = spatialSize(volume);
  const specs = size.z === null ? [{ plane: "xy", axis: null, title: "XY" }] : [
    { plane: "xy", axis: "z", title: "XY", across: "slice z" },
    { plane: "xz", axis: "y", title: "XZ", across: "row y" },
    { plane: "yz", axis: "x", title: "YZ", across: "column x" },
  ];
  let released = false;
  const views = specs.map((spec) => planeView(volume, spec, size, () => released));
  const node = el("div", { class: "planes", "data-planes-for": volume.id }, views.map((view) => view.node));
  for (const view of views) view.load();
  return {
    node,
    centreOn(centroid) {
      const point = size.z === null ? { y: centroid[0], x: centroid[1] } : { z: centroid[0], y: centroid[1], x: centroid[2] };
      for (const view of views) view.moveTo(point);
    },
    release() {
      released = true;
      for (const view of views) view.release();
    },
  };
}

// One plane of a plane viewer: its image, caption and (3D) slider.
function planeView(volume, spec, size, isReleased) {
  const img = el("img", { alt: `${spec.title} plane of ${volume.name}` });
  let url = null;
  let seq = 0;
  let timer = null;
  let slider = null;
  let value = null;
  if (spec.axis) {
    const max = size[spec.axis] - 1;
    slider = el("input", { type: "range", min: 0, max, step: 1, value: Math.floor(size[spec.axis] / 2),
      "aria-label": `${spec.title} plane: ${spec.across} (0–${max})`, "data-axis": spec.axis });
    value = el("output", { class: "mono" }, slider.value);
  }
  const view = {
    load() {
      const mine = ++seq;
      const query = { plane: spec.plane };
      if (slider) query[spec.axis] = slider.value;
      fetchFile("volumePreview", { volume_id: volume.id }, query).then(({ blob }) => {
        if (mine !== seq || isReleased()) return;
        if (url) URL.revokeObjectURL(url);
        url = URL.createObjectURL(blob);
        img.src = url;
        img.classList.remove("missing");
      }, (error) => {
        if (mine !== seq || isReleased()) return;
        img.alt = error instanceof KeyNeeded ? "preview needs an API key" : `no preview: ${error.message}`;
        img.classList.add("missing");
      });
    },
    moveTo(point) {
      if (!slider || point[spec.axis] === undefined) return;
      slider.value = String(Math.round(point[spec.axis]));
      value.textContent = slider.value;
      view.load();
    },
    release() {
      clearTimeout(timer);
      if (url) URL.revokeObjectURL(url);
      url = null;
    },
  };
  if (slider) {
    slider.addEventListener("input", () => {
      value.textContent = slider.value;
      clearTimeout(timer);
      timer = setTimeout(view.load, PLANE_DEBOUNCE_MS);
    });
  }
  view.node = el("figure", { class: "plane", "data-plane": spec.plane }, img,
    el("figcaption", {}, el("strong", {}, spec.title),
      slider ? el("label", { class: "compact" }, `${spec.axis} `, slider, value) : null));
  return view;
}

// The plane viewer card of the volumes list (a volume's "Planes" button opens it).
function openViewer(volume) {
  closeViewer();
  state.viewer = planeViewer(volume);
  document.getElementById("viewer-title").textContent = `Planes of ${volume.name}`;
  document.getElementById("viewer-body").replaceChildren(state.viewer.node);
  const card = document.getElementById("viewer-card");
  card.hidden = false;
  card.scrollIntoView({ block: "nearest" });
  document.getElementById("viewer-close").focus();
}

function closeViewer() {
  if (state.viewer) state.viewer.release();
  state.viewer = null;
  document.getElementById("viewer-body").replaceChildren();
  document.getElementById("viewer-card").hidden = true;
}

// ------------------------------------------------------------------ objects of a prediction

const OBJECTS_PAGE = 100;
const OBJECT_SORTS = { label: "Label", voxel_count: "Voxels", iou: "IoU" };

// The per-object table of a succeeded predict job, with the planes of the label volume it shows: a volume
// choice, sortable columns (sorted by the server, within the volume), pages and a CSV download of all.
function objectsSection(job, releases) {
  const tables = ((job.result || {}).object_tables || {}).volumes || [];
  const view = { sort: "label", descending: false, offset: 0, seq: 0, viewer: null, labelsId: tables.length ? tables[0].labels_id : null };
  const status = el("p", { class: "muted", role: "status" }, "Loading objects…");
  const planes = el("div", { class: "objects-planes" });
  const body = el("tbody", {});
  const head = el("tr", {});
  const pager = el("div", { class: "pager" });
  const table = el("table", { class: "list objects-table" },
    el("caption", { class: "muted" }, "Centroids and boxes in pixels, z,y,x (3D) or y,x (2D); boxes inclusive"),
    el("thead", {}, head), body);
  const csv = downloadLink("jobObjectsCsv", { job_id: job.id }, "Download CSV", `${shortId(job.id)}-objects.csv`);
  const controls = [csv];
  if (tables.length > 1) {
    const choice = el("select", { "aria-label": "label volume" },
      tables.map((t) => volumeNameNode(t.volume_id, ` (${t.n_objects} objects)`, "option", { value: t.labels_id })));
    choice.addEventListener("change", () => { view.labelsId = choice.value; view.offset = 0; showPlanes(); load(); });
    controls.unshift(el("label", { class: "compact" }, "Volume", choice));
  }
  const releaseViewer = () => { if (view.viewer) view.viewer.release(); view.viewer = null; };
  releases.push(releaseViewer);

  async function showPlanes() {
    releaseViewer();
    planes.replaceChildren();
    if (!view.labelsId) return;
    const wanted = view.labelsId;
    let volume = state.allVolumes.find((v) => v.id === wanted);
    try {
      if (!volume) volume = await api("getVolume", { params: { volume_id: wanted } });
    } catch (error) {
      planes.replaceChildren(el("p", { class: "muted" }, `no planes: ${error.message}`));
      return;
    }
    if (wanted !== view.labelsId || !planes.isConnected) return;
    releaseViewer();
    view.viewer = planeViewer(volume);
    planes.replaceChildren(view.viewer.node);
  }

  function drawHead() {
    const sortable = (key) => {
      const active = view.sort === key;
      const button = el("button", { type: "button", class: "sort", "data-sort": key,
        title: `Sort by ${OBJECT_SORTS[key].toLowerCase()}` }, OBJECT_SORTS[key], active ? (view.descending ? " ▼" : " ▲") : "");
      button.addEventListener("click", () => {
        view.descending = active ? !view.descending : key !== "label";
        view.sort = key;
        view.offset = 0;
        load();
      });
      return el("th", { "aria-sort": active ? (view.descending ? "descending" : "ascending") : "none" }, button);
    };
    head.replaceChildren(sortable("label"), sortable("voxel_count"), el("th", {}, "Centroid"),
      el("th", {}, "Physical"), el("th", {}, "Bounding box"), el("th", {}, "GT"), sortable("iou"));
  }

  function row(item) {
    const numbers = (values, digits) => (values ? values.map((v) => formatNumber(v, digits)).join(", ") : "—");
    const label = item.centroid.length === 3
      ? el("button", { type: "button", class: "ghost small", title: "Show the planes through this object",
        onclick: () => { if (view.viewer) view.viewer.centreOn(item.centroid); } }, String(item.label))
      : String(item.label);
    return el("tr", { "data-label": item.label },
      el("td", {}, label),
      el("td", {}, String(item.voxel_count)),
      el("td", { class: "mono" }, numbers(item.centroid, 1)),
      el("td", { class: "mono" }, numbers(item.centroid_physical, 2)),
      el("td", { class: "mono" }, `${item.bbox_min.join(",")} – ${item.bbox_max.join(",")}`),
      el("td", {}, item.gt_label !== null ? String(item.gt_label) : (item.gt_volume_id ? "unmatched" : "—")),
      el("td", {}, item.iou !== null ? formatNumber(item.iou, 3) : "—"));
  }

  async function load() {
    const mine = ++view.seq;
    drawHead();
    status.textContent = "Loading objects…";
    status.className = "muted";
    try {
      const page = await api("jobObjects", { params: { job_id: job.id }, query: {
        volume_id: view.labelsId, sort: view.sort, descending: view.descending, limit: OBJECTS_PAGE, offset: view.offset } });
      if (mine !== view.seq) return;
      body.replaceChildren(...page.items.map(row));
      if (!page.items.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "empty" }, "No objects in this volume.")));
      status.textContent = `${page.total} object${page.total === 1 ? "" : "s"}`;
      drawPager(page);
    } catch (error) {
      if (mine !== view.seq || error instanceof StaleAnswer) return;
      body.replaceChildren();
      status.textContent = error.message;
      status.className = "error";
    }
  }

  function drawPager(page) {
    pager.replaceChildren();
    if (page.total <= page.limit) return;
    const last = Math.min(page.offset + page.items.length, page.total);
    const prev = el("button", { type: "button", class: "ghost small", disabled: page.offset === 0 }, "‹ Prev");
    const next = el("button", { type: "button", class: "ghost small", disabled: last >= page.total }, "Next ›");
    prev.addEventListener("click", () => { view.offset = Math.max(0, page.offset - page.limit); load(); });
    next.addEventListener("click", () => { view.offset = page.offset + page.limit; load(); });
    pager.append(prev, `${page.offset + 1}–${last} of ${page.total}`, next);
  }

  const node = el("div", { class: "objects", "data-objects-for": job.id },
    el("div", { class: "links" }, controls), planes, status, el("div", { class: "scroll-x" }, table), pager);
  showPlanes();
  load();
  return node;
}

// ------------------------------------------------------------------ small helpers (text)

function shortId(id) {
  return id ? id.slice(0, 8) : "";
}

function formatDate(text) {
  if (!text) return "";
  const date = new Date(text);
  if (Number.isNaN(date.getTime())) return text;
  const today = new Date();
  const sameDay = date.toDateString() === today.toDateString();
  return sameDay ? date.toLocaleTimeString() : date.toLocaleString();
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  const h = Math.floor(m / 60);
  return `${h} h ${m % 60} min`;
}

function formatBytes(n) {
  if (!Number.isFinite(n)) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function formatNumber(value, digits = 3) {
  if (typeof value !== "number" || !Number.isFinite(value)) return value === null || value === undefined ? "" : String(value);
  if (Number.isInteger(value)) return String(value);
  return value.toFixed(digits);
}

let toastTimer = null;
function toast(message, kind = "bad") {
  const node = document.getElementById("toast");
  node.textContent = message;
  node.className = `toast ${kind}`;
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { node.hidden = true; }, kind === "bad" ? 9000 : 3500);
}

function progressBar(fraction, status, big = false) {
  const pct = Math.round(Math.min(1, Math.max(0, fraction || 0)) * 100);
  const cls = ["bar", big ? "big" : "", status === "succeeded" ? "done" : "", status === "failed" ? "failed" : ""];
  return el("div", { class: cls.filter(Boolean).join(" "), title: `${pct} %` }, el("span", { style: `width:${pct}%` }));
}

function statusBadge(status) {
  return el("span", { class: `status status-${status}` }, status);
}

function renderPager(kind, page) {
  const node = document.querySelector(`[data-pager="${kind}"]`);
  node.replaceChildren();
  if (!page || page.total <= page.limit) return;
  const first = page.offset + 1;
  const last = Math.min(page.offset + page.items.length, page.total);
  const prev = el("button", { type: "button", class: "ghost small", disabled: page.offset === 0 }, "‹ Prev");
  const next = el("button", { type: "button", class: "ghost small", disabled: last >= page.total }, "Next ›");
  prev.addEventListener("click", () => { state.offsets[kind] = Math.max(0, page.offset - page.limit); refresh(kind); });
  next.addEventListener("click", () => { state.offsets[kind] = page.offset + page.limit; refresh(kind); });
  node.append(prev, `${first}–${last} of ${page.total}`, next);
}

// ------------------------------------------------------------------ volumes

function volumeLabel(volume) {
  return `${volume.name} · ${volume.shape.join("×")} ${volume.dtype}${volume.kind === "labels" ? " · labels" : ""}`;
}

async function loadVolumes() {
  const page = await api("listVolumes", { query: { limit: PAGE.volumes, offset: state.offsets.volumes } });
  document.getElementById("volumes-total").textContent = `(${page.total})`;
  renderPager("volumes", page);
  const grid = document.getElementById("volumes");
  releasePreviews(new Set(page.items.map((volume) => volume.id)));
  grid.replaceChildren();
  if (!page.items.length) {
    grid.append(el("p", { class: "empty" }, "No volumes yet: upload a TIFF above."));
  }
  for (const volume of page.items) grid.append(volumeTile(volume));
  await loadVolumeChoices();
}

function volumeTile(volume) {
  const image = el("img", { alt: `preview of ${volume.name}` });
  showPreview(image, volume.id);
  const remove = el("button", { type: "button", class: "danger small", title: "Delete this volume" }, "Delete");
  remove.addEventListener("click", async () => {
    if (!confirm(`Delete volume ${volume.name}?`)) return;
    try {
      await api("deleteVolume", { params: { volume_id: volume.id } });
      toast(`Deleted ${volume.name}`, "ok");
      await refresh("volumes");
    } catch (error) {
      report(error);
    }
  });
  const voxel = volume.voxel_size ? `voxel ${volume.voxel_size.map((v) => formatNumber(v, 3)).join("×")}` : "";
  const planes = spatialSize(volume).z === null ? null
    : el("button", { type: "button", class: "ghost small", title: "Show the XY, XZ and YZ planes",
      onclick: () => openViewer(volume) }, "Planes");
  return el("div", { class: "tile", "data-volume-id": volume.id },
    viewLink("volumePreview", { volume_id: volume.id }, image),
    el("div", { class: "meta" },
      el("span", { class: "name", title: volume.name }, volume.name),
      el("span", {}, el("span", { class: `kind kind-${volume.kind}` }, volume.kind), " ",
        `${volume.axes} ${volume.shape.join("×")}`),
      el("span", { class: "muted" }, `${volume.dtype} · ${formatBytes(volume.size_bytes)}`),
      voxel ? el("span", { class: "muted" }, voxel) : null,
      el("span", { class: "muted mono", title: volume.id }, shortId(volume.id))),
    el("div", { class: "actions" },
      downloadLink("volumeDownload", { volume_id: volume.id }, "Download", `${volume.name}.tif`),
      planes, remove));
}

// All volumes (up to a few hundred) for the job forms' choices.
async function loadVolumeChoices() {
  const page = await api("listVolumes", { query: { limit: CHOICES_LIMIT, offset: 0 } });
  state.allVolumes = page.items;
  refreshVolumeNames();
  for (const select of document.querySelectorAll("select[data-kind]")) fillVolumeSelect(select);
}

function fillVolumeSelect(select) {
  const keep = select.value;
  const wanted = select.dataset.kind;
  const optional = select.hasAttribute("data-optional");
  const options = [];
  options.push(el("option", { value: "" }, optional ? "— none —" : "— choose —"));
  const preferred = state.allVolumes.filter((v) => v.kind === wanted);
  const others = state.allVolumes.filter((v) => v.kind !== wanted);
  for (const volume of preferred.concat(others)) {
    options.push(el("option", { value: volume.id }, volumeLabel(volume)));
  }
  select.replaceChildren(...options);
  if ([...select.options].some((option) => option.value === keep)) select.value = keep;
}

// POST a multipart form with XMLHttpRequest (not fetch) to show upload progress; the browser
// streams the body from the file. Resolves with the JSON answer, rejects with its detail.
function sendForm(route, data, bar) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    const [method] = ROUTES[route].split(" ");
    const epoch = auth.epoch;
    request.open(method, routeUrl(route));
    for (const [name, value] of Object.entries(withKey({ Accept: "application/json" }))) request.setRequestHeader(name, value);
    request.upload.addEventListener("progress", (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; });
    request.addEventListener("load", () => {
      let parsed = null;
      try { parsed = JSON.parse(request.responseText); } catch (_) { parsed = null; }
      if (epoch !== auth.epoch) reject(new StaleAnswer(`${route}: the API key changed`));
      else if (request.status >= 200 && request.status < 300) resolve(parsed);
      else if (request.status === 401) reject(keyNeeded(errorText(parsed, request.status)));
      else reject(new Error(errorText(parsed, request.status)));
    });
    request.addEventListener("error", () => reject(new Error("upload failed: the server could not be reached")));
    request.send(data);
  });
}

// Submit handler of an upload form: checks a file was chosen, drops empty optional fields.
function uploadHandler(route, describe, after) {
  return async (event) => {
    event.preventDefault();
    const formNode = event.target;
    const data = new FormData(formNode);
    const file = data.get("file");
    if (!file || !file.size) {
      toast("Choose a file first.");
      return;
    }
    for (const [key, value] of [...data.entries()]) {
      if (key !== "file" && !String(value).trim()) data.delete(key);
    }
    const button = formNode.querySelector("button[type=submit]");
    const bar = formNode.querySelector("progress");
    button.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    try {
      const body = await sendForm(route, data, bar);
      toast(describe(body), "ok");
      formNode.reset();
      await after();
    } catch (error) {
      report(error);
    } finally {
      button.disabled = false;
      bar.hidden = true;
    }
  };
}

// The upload form's image choice links labels to their image: offered only when the kind is labels
// (a disabled field is left out of the form).
function syncUploadKind() {
  const form = document.getElementById("upload-form");
  const labels = form.elements.kind.value === "labels";
  form.elements.image_id.disabled = !labels;
  if (!labels) form.elements.image_id.value = "";
}

// ------------------------------------------------------------------ models

async function loadModels() {
  const page = await api("listModels", { query: { limit: PAGE.models, offset: state.offsets.models } });
  document.getElementById("models-total").textContent = `(${page.total})`;
  renderPager("models", page);
  const body = document.getElementById("models");
  body.replaceChildren();
  if (!page.items.length) {
    body.append(el("tr", {}, el("td", { colspan: 5, class: "empty" }, "No models yet: train one.")));
  }
  for (const model of page.items) body.append(modelRow(model));
  const all = await api("listModels", { query: { limit: CHOICES_LIMIT, offset: 0 } });
  state.models = all.items;
  fillModelSelects();
}

function modelSummary(model) {
  const metrics = model.metrics || {};
  const best = metrics.best || {};
  const parts = [];
  if (Number.isFinite(best.val_iou)) parts.push(`val IoU ${formatNumber(best.val_iou)}`);
  if (Number.isFinite(best.val_ap)) parts.push(`val AP0.5 ${formatNumber(best.val_ap)}`);
  if (Number.isFinite(best.val_map)) parts.push(`val mAP ${formatNumber(best.val_map)}`);
  if (Number.isFinite(metrics.epochs_completed)) parts.push(`${metrics.epochs_completed} epochs`);
  return parts.join(" · ");
}

function modelRow(model) {
  const remove = el("button", { type: "button", class: "danger small" }, "Delete");
  remove.addEventListener("click", async () => {
    if (!confirm(`Delete model ${model.name}?`)) return;
    try {
      await api("deleteModel", { params: { model_id: model.id } });
      toast(`Deleted model ${model.name}`, "ok");
      await refresh("models");
    } catch (error) {
      report(error);
    }
  });
  const use = el("button", { type: "button", class: "ghost small", title: "Use in a prediction job" }, "Predict");
  use.addEventListener("click", () => {
    selectTab("predict");
    document.querySelector("#predict-form select[name=model_id]").value = model.id;
  });
  return el("tr", {},
    el("td", {}, el("div", {}, model.name), el("div", { class: "muted mono", title: model.id }, shortId(model.id))),
    el("td", {}, `${model.spatial_dims}D`),
    el("td", { class: "muted" }, modelSummary(model),
      model.source_job_id ? el("div", {}, el("a", { href: `#job=${model.source_job_id}`, onclick: (e) => { e.preventDefault(); selectJob(model.source_job_id); } },
        `job ${shortId(model.source_job_id)}`)) : null),
    el("td", { class: "muted" }, formatDate(model.created_at)),
    el("td", {}, downloadLink("modelDownload", { model_id: model.id }, "Download", `${model.name}.pt`), " ", use, " ",
      remove));
}

function fillModelSelects() {
  for (const select of document.querySelectorAll("select[data-options=models]")) {
    const keep = select.value;
    const options = [el("option", { value: "" }, state.models.length ? "— choose —" : "— no model yet —")];
    for (const model of state.models) {
      options.push(el("option", { value: model.id }, `${model.name} (${model.spatial_dims}D, ${shortId(model.id)})`));
    }
    select.replaceChildren(...options);
    if ([...select.options].some((option) => option.value === keep)) select.value = keep;
  }
}

// ------------------------------------------------------------------ jobs

async function loadJobs() {
  const status = document.getElementById("jobs-status").value;
  const page = await api("listJobs", { query: { limit: PAGE.jobs, offset: state.offsets.jobs, status } });
  document.getElementById("jobs-total").textContent = `(${page.total})`;
  renderPager("jobs", page);
  const body = document.getElementById("jobs");
  body.replaceChildren();
  if (!page.items.length) {
    body.append(el("tr", {}, el("td", { colspan: 5, class: "empty" }, status ? `No ${status} jobs.` : "No jobs yet.")));
  }
  let finishedNow = false;
  for (const job of page.items) {
    const before = state.jobStatus[job.id];
    if (before && !TERMINAL.has(before) && TERMINAL.has(job.status)) finishedNow = true;
    state.jobStatus[job.id] = job.status;
    const row = el("tr", { class: job.id === state.selectedJob ? "selected" : null, "data-job-id": job.id },
      el("td", { class: "mono", title: job.id }, shortId(job.id)),
      el("td", {}, job.kind),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, progressBar(job.progress, job.status)),
      el("td", { class: "muted" }, formatDate(job.created_at)));
    row.addEventListener("click", () => selectJob(job.id));
    body.append(row);
  }
  if (finishedNow) {
    // A job just produced label volumes or a model: show them.
    await Promise.all([loadVolumes(), loadModels()]);
  }
}

function selectJob(jobId) {
  state.selectedJob = jobId;
  history.replaceState(null, "", jobId ? `#job=${jobId}` : location.pathname + location.search);
  for (const row of document.querySelectorAll("#jobs tr[data-job-id]")) {
    row.classList.toggle("selected", row.dataset.jobId === jobId);
  }
  loadJobDetail().catch(report);
}

async function loadJobDetail() {
  const node = document.getElementById("job-detail");
  if (!state.selectedJob) {
    releaseDetail();
    node.hidden = true;
    return;
  }
  let job;
  try {
    job = await api("getJob", { params: { job_id: state.selectedJob } });
  } catch (error) {
    if (error instanceof KeyNeeded || error instanceof StaleAnswer) throw error;
    releaseDetail();
    node.hidden = false;
    node.replaceChildren(el("p", { class: "error" }, error.message));
    return;
  }
  // A finished job's detail stays as drawn (its object table keeps its page, sort and planes) until the
  // job changes; the names of volumes in it follow the volume list (refreshVolumeNames).
  const drawn = JSON.stringify(job);
  if (drawn === state.detailDrawn && !node.hidden) return;
  releaseDetail();
  state.detailDrawn = drawn;
  node.hidden = false;
  node.replaceChildren(...jobDetail(job, state.detailReleases));
}

// Release what the drawn job detail holds (the object URLs of its planes).
function releaseDetail() {
  for (const release of state.detailReleases.splice(0)) release();
  state.detailDrawn = "";
}

function jobDetail(job, releases) {
  const parts = [];
  const close = el("button", { type: "button", class: "ghost small" }, "Close");
  close.addEventListener("click", () => { selectJob(null); loadJobs(); });
  const cancel = TERMINAL.has(job.status) ? null
    : el("button", { type: "button", class: "danger small", disabled: job.cancel_requested }, job.cancel_requested ? "Cancelling…" : "Cancel");
  if (cancel) {
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api("cancelJob", { params: { job_id: job.id } });
        toast(`Cancel requested for job ${shortId(job.id)}`, "ok");
      } catch (error) {
        report(error);
      }
      await Promise.all([loadJobs(), loadJobDetail()]).catch(report);
    });
  }
  parts.push(el("div", { class: "detail-head" },
    el("h2", {}, `${job.kind} job `, el("span", { class: "mono muted" }, shortId(job.id))),
    statusBadge(job.status),
    el("span", { class: "grow" }), cancel, close));

  parts.push(el("div", { style: "margin-top:10px" }, progressBar(job.progress, job.status, true)));
  const pct = `${Math.round((job.progress || 0) * 100)} %`;
  const eta = !TERMINAL.has(job.status) && job.eta_s !== null && job.eta_s !== undefined ? formatDuration(job.eta_s) : "";
  const facts = [
    ["Stage", job.stage || "—"],
    ["Progress", eta ? `${pct} · ETA ${eta}` : pct],
    ["Worker", job.worker || "—"],
    ["Created", formatDate(job.created_at)],
  ];
  if (job.started_at) facts.push(["Started", formatDate(job.started_at)]);
  if (job.finished_at) facts.push(["Finished", formatDate(job.finished_at)]);
  if (job.started_at) {
    const end = job.finished_at ? new Date(job.finished_at) : new Date();
    facts.push(["Run time", formatDuration((end - new Date(job.started_at)) / 1000)]);
  }
  if (job.attempts > 1) facts.push(["Attempts", String(job.attempts)]);
  parts.push(el("dl", { class: "facts" }, facts.map(([key, value]) => [el("dt", {}, key), el("dd", {}, value)])));

  if (job.error) {
    parts.push(el("h3", {}, "Error"), el("div", { class: "error" }, job.error));
  }
  const warnings = (job.metrics && Array.isArray(job.metrics.warnings)) ? job.metrics.warnings : [];
  if (warnings.length) {
    parts.push(el("h3", {}, "Warnings"), el("ul", { class: "warnings" }, warnings.map((text) => el("li", {}, text))));
  }
  const history = trainingHistory(job.metrics);
  if (history.length) {
    parts.push(el("h3", {}, "Training"), lossChart(history, job.metrics.best_epoch));
    const latest = (key) => [...history].reverse().find((row) => Number.isFinite(row[key]));
    const last = history[history.length - 1];
    const total = job.metrics.epochs_total;
    const summary = [Number.isFinite(total) ? `epoch ${last.epoch}/${total}` : `epoch ${last.epoch}`];
    const loss = latest("loss");
    const valLoss = latest("val_loss");
    const valIou = latest("val_iou");
    const valAp = latest("val_map");
    if (loss) summary.push(`loss ${formatNumber(loss.loss, 4)}`);
    if (valLoss) summary.push(`val loss ${formatNumber(valLoss.val_loss, 4)} (epoch ${valLoss.epoch})`);
    if (valIou) summary.push(`val IoU ${formatNumber(valIou.val_iou, 3)} (epoch ${valIou.epoch})`);
    if (valAp) summary.push(`val mean AP ${formatNumber(valAp.val_map, 3)} (epoch ${valAp.epoch})`);
    if (Number.isFinite(job.metrics.best_epoch)) summary.push(`best epoch ${job.metrics.best_epoch}`);
    parts.push(el("div", { class: "muted" }, summary.join(" · ")));
  }
  const ap = apTable(job.metrics);
  if (ap) parts.push(el("h3", {}, "Average precision"), ap);
  const links = resultLinks(job);
  if (links.length) parts.push(el("h3", {}, "Results"), el("div", { class: "links" }, links));
  if (job.kind === "predict" && job.status === "succeeded") {
    parts.push(el("h3", {}, "Objects"), objectsSection(job, releases));
  }
  parts.push(el("details", {}, el("summary", { class: "muted" }, "Job parameters"),
    el("pre", { class: "spec" }, JSON.stringify(job.spec, null, 2))));
  return parts;
}

// Per-epoch records [{epoch, loss, val_loss, val_iou, val_map}] from a job's metrics. val_map, the
// validation AP averaged over the IoU thresholds, is what picks the saved model (selection_metric
// mean_ap, the service's training default).
function trainingHistory(metrics) {
  if (!metrics) return [];
  const rows = metrics.epochs;
  if (!Array.isArray(rows)) return [];
  return rows.map((row, index) => ({
    epoch: Number.isFinite(row.epoch) ? row.epoch : index + 1,
    loss: row.loss,
    val_loss: row.val_loss,
    val_iou: row.val_iou,
    val_map: row.val_map,
  })).filter((row) => Number.isFinite(row.loss) || Number.isFinite(row.val_iou) || Number.isFinite(row.val_map));
}

// Loss (left axis), validation IoU and mean AP (right axis, 0–1) per epoch; `bestEpoch`: the saved model's.
function lossChart(history, bestEpoch = null) {
  const width = 560;
  const height = 200;
  const pad = { left: 46, right: 42, top: 10, bottom: 32 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const epochs = history.map((row) => row.epoch);
  const e0 = Math.min(...epochs);
  const e1 = Math.max(...epochs);
  const losses = history.flatMap((row) => [row.loss, row.val_loss]).filter(Number.isFinite);
  const lossMax = losses.length ? Math.max(...losses) : 1;
  const lossMin = losses.length ? Math.min(0, Math.min(...losses)) : 0;
  const lossSpan = lossMax - lossMin || 1;
  const x = (epoch) => pad.left + (e1 === e0 ? plotW / 2 : ((epoch - e0) / (e1 - e0)) * plotW);
  const yLoss = (value) => pad.top + plotH - ((value - lossMin) / lossSpan) * plotH;
  const yIou = (value) => pad.top + plotH - Math.min(1, Math.max(0, value)) * plotH;

  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "loss, validation IoU and validation mean AP per epoch" });
  for (let i = 0; i <= 4; i += 1) {
    const y = pad.top + (plotH * i) / 4;
    chart.append(svg("line", { class: "grid", x1: pad.left, x2: pad.left + plotW, y1: y, y2: y }));
    chart.append(svg("text", { x: pad.left - 6, y: y + 3, "text-anchor": "end" }, formatNumber(lossMax - (lossSpan * i) / 4, 3)));
    chart.append(svg("text", { x: pad.left + plotW + 6, y: y + 3 }, formatNumber(1 - i / 4, 2)));
  }
  chart.append(svg("line", { class: "axis", x1: pad.left, x2: pad.left + plotW, y1: pad.top + plotH, y2: pad.top + plotH }));
  chart.append(svg("line", { class: "axis", x1: pad.left, x2: pad.left, y1: pad.top, y2: pad.top + plotH }));
  chart.append(svg("line", { class: "axis", x1: pad.left + plotW, x2: pad.left + plotW, y1: pad.top, y2: pad.top + plotH }));
  const step = Math.max(1, Math.ceil((e1 - e0) / 6));
  for (let epoch = e0; epoch <= e1; epoch += step) {
    if (epoch !== e0 && e1 - epoch < step / 2 && epoch !== e1) continue;
    chart.append(svg("text", { x: x(epoch), y: pad.top + plotH + 13, "text-anchor": "middle" }, String(epoch)));
  }
  if ((e1 - e0) % step !== 0) {
    chart.append(svg("text", { x: x(e1), y: pad.top + plotH + 13, "text-anchor": "middle" }, String(e1)));
  }
  chart.append(svg("text", { x: pad.left + plotW / 2, y: height - 2, "text-anchor": "middle" }, "epoch"));

  const line = (key, y, cls) => {
    const points = history.filter((row) => Number.isFinite(row[key])).map((row) => `${x(row.epoch).toFixed(1)},${y(row[key]).toFixed(1)}`);
    if (!points.length) return false;
    if (points.length === 1) {
      const [px, py] = points[0].split(",");
      chart.append(svg("circle", { cx: px, cy: py, r: 3, class: cls }));
    } else {
      chart.append(svg("polyline", { class: cls, points: points.join(" ") }));
    }
    return true;
  };
  const hasLoss = line("loss", yLoss, "loss");
  const hasValLoss = line("val_loss", yLoss, "val-loss");
  const hasIou = line("val_iou", yIou, "iou");
  const hasAp = line("val_map", yIou, "ap");
  const saved = Number.isFinite(bestEpoch) && bestEpoch >= e0 && bestEpoch <= e1;
  if (saved) {
    chart.append(svg("line", { class: "best", x1: x(bestEpoch), x2: x(bestEpoch), y1: pad.top, y2: pad.top + plotH }));
    chart.append(svg("text", { x: x(bestEpoch) + 3, y: pad.top + 9 }, "saved"));
  }

  const legend = el("div", { class: "legend" },
    hasLoss ? el("span", {}, el("i", { style: "background:var(--loss)" }), "train loss (left)") : null,
    hasValLoss ? el("span", {}, el("i", { style: "background:repeating-linear-gradient(90deg,var(--loss) 0 4px,transparent 4px 7px)" }), "val loss (left)") : null,
    hasIou ? el("span", {}, el("i", { style: "background:var(--iou)" }), "val IoU (right, 0–1)") : null,
    hasAp ? el("span", { "data-series": "val_map" }, el("i", { style: "background:var(--ap)" }), "val mean AP, picks the saved model (right, 0–1)") : null,
    saved ? el("span", {}, el("i", { style: "background:repeating-linear-gradient(90deg,var(--muted) 0 3px,transparent 3px 6px)" }), `saved model (epoch ${bestEpoch})`) : null);
  return el("div", {}, chart, legend);
}

function volumeName(volumeId) {
  const volume = state.allVolumes.find((v) => v.id === volumeId);
  return volume ? volume.name : shortId(volumeId);
}

// A volume's name as text that follows the volume list (`suffix` after it); `tag` for an <option>.
function volumeNameNode(volumeId, suffix = "", tag = "span", attrs = {}) {
  return el(tag, { ...attrs, "data-volume-name": volumeId, "data-suffix": suffix || null, title: volumeId },
    volumeName(volumeId) + suffix);
}

// Write the current names into every volumeNameNode on the page.
function refreshVolumeNames() {
  for (const node of document.querySelectorAll("[data-volume-name]")) {
    node.textContent = volumeName(node.dataset.volumeName) + (node.dataset.suffix || "");
  }
}

// AP table of a prediction/evaluation job. metrics.ap = {thresholds, ap (mean over volumes)};
// metrics.volumes (predict) or metrics.pairs (evaluate) = [{volume_id | pred_id, n_gt, n_pred, ap}].
function apTable(metrics) {
  const summary = metrics && metrics.ap;
  if (!summary || !Array.isArray(summary.thresholds) || !Array.isArray(summary.ap)) return null;
  const thresholds = summary.thresholds;
  const head = el("tr", {}, el("th", {}, "volume"), el("th", {}, "GT"), el("th", {}, "pred"),
    thresholds.map((t) => el("th", {}, formatNumber(t, 2))));
  const cells = (ap) => thresholds.map((_, i) => {
    const value = (ap || [])[i];
    return el("td", {}, Number.isFinite(value) ? value.toFixed(3) : "");
  });
  const items = (metrics.volumes || metrics.pairs || []).filter((item) => Array.isArray(item.ap));
  const rows = items.map((item) => {
    const volumeId = item.volume_id || item.pred_id;
    return el("tr", {}, el("td", {}, volumeNameNode(volumeId)), el("td", {}, formatNumber(item.n_gt)),
      el("td", {}, formatNumber(item.n_pred)), cells(item.ap));
  });
  rows.push(el("tr", { class: "total" }, el("td", {}, items.length > 1 ? "mean" : "overall"),
    el("td", {}, ""), el("td", {}, ""), cells(summary.ap)));
  return el("div", { class: "scroll-x" },
    el("table", { class: "ap" }, el("caption", {}, "AP at IoU threshold"), el("thead", {}, head), el("tbody", {}, rows)));
}

// Links to what a job produced or used: label volumes (preview, download) and the model.
function resultLinks(job) {
  const result = job.result;
  if (!result) return [];
  const links = [];
  if (result.model_id) {
    links.push(el("span", {}, job.kind === "train" ? "trained model " : "model ",
      el("span", { class: "mono", title: result.model_id }, shortId(result.model_id)), " · ",
      downloadLink("modelDownload", { model_id: result.model_id }, "download checkpoint", `model-${shortId(result.model_id)}.pt`)));
  }
  for (const volumeId of result.label_volume_ids || []) {
    links.push(el("span", {}, "labels ", volumeNameNode(volumeId, "", "span", { class: "mono" }), " · ",
      viewLink("volumePreview", { volume_id: volumeId }, "preview"),
      " · ", downloadLink("volumeDownload", { volume_id: volumeId }, "download labels", `${volumeName(volumeId)}.tif`)));
  }
  return links;
}

// ------------------------------------------------------------------ job forms

function selectTab(name) {
  for (const tab of document.querySelectorAll("[data-tab]")) tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== name;
}

function addPair(container) {
  const left = el("select", { "data-kind": container.dataset.left, "data-side": "left" });
  const rightAttrs = { "data-kind": container.dataset.right, "data-side": "right" };
  if (container.hasAttribute("data-optional-right")) rightAttrs["data-optional"] = true;
  const right = el("select", rightAttrs);
  fillVolumeSelect(left);
  fillVolumeSelect(right);
  const remove = el("button", { type: "button", class: "ghost small", title: "Remove this row" }, "✕");
  const row = el("div", { class: "pair" }, left, el("span", { class: "arrow" }, "→"), right, remove);
  remove.addEventListener("click", () => {
    if (container.children.length > 1) row.remove();
  });
  container.append(row);
}

function pairs(name) {
  return [...document.querySelectorAll(`[data-pairs="${name}"] .pair`)].map((row) => [
    row.querySelector("[data-side=left]").value,
    row.querySelector("[data-side=right]").value,
  ]).filter(([left, right]) => left || right);
}

function numbers(text) {
  return String(text).split(",").map((part) => part.trim()).filter(Boolean).map(Number);
}

function optionalNumber(form, name) {
  const value = form.get(name);
  return value === null || String(value).trim() === "" ? undefined : Number(value);
}

function trainBody(form) {
  const chosen = pairs("train");
  const crop = String(form.get("crop_size") || "auto").trim();
  const voxel = String(form.get("voxel_size") || "").trim();
  const body = {
    image_ids: chosen.map(([image]) => image),
    mask_ids: chosen.map(([, mask]) => mask),
    dims: Number(form.get("dims")),
    epochs: Number(form.get("epochs")),
    max_time_minutes: optionalNumber(form, "max_time_minutes"),
    batch_size: optionalNumber(form, "batch_size"),
    crop_size: crop === "auto" ? "auto" : Number(crop),
    lr: Number(form.get("lr")),
    center: form.get("center"),
    val_fraction: optionalNumber(form, "val_fraction"),
    voxel_size: voxel ? numbers(voxel) : undefined,
    seed: Number(form.get("seed") || 0),
    amp: form.get("amp") === "on",
    min_object_size: optionalNumber(form, "min_object_size"),
    foreground_weight: optionalNumber(form, "foreground_weight"),
    name: String(form.get("name") || "").trim() || undefined,
  };
  return body;
}

function predictBody(form) {
  const chosen = pairs("predict");
  const tile = String(form.get("tile") || "auto").trim();
  const gt = chosen.map(([, mask]) => mask);
  return {
    model_id: form.get("model_id"),
    volume_ids: chosen.map(([volume]) => volume),
    tta: form.get("tta") === "on",
    tile: tile === "auto" ? "auto" : numbers(tile),
    min_size: optionalNumber(form, "min_size"),
    gt_ids: gt.some(Boolean) ? gt : undefined,
  };
}

function evaluateBody(form) {
  const thresholds = String(form.get("thresholds") || "").trim();
  return {
    pairs: pairs("evaluate").map(([gt, pred]) => ({ gt_id: gt, pred_id: pred })),
    thresholds: thresholds ? numbers(thresholds) : undefined,  // undefined: the server's defaults
  };
}

const JOB_FORMS = {
  train: { route: "startTrain", body: trainBody },
  predict: { route: "startPredict", body: predictBody },
  evaluate: { route: "startEvaluate", body: evaluateBody },
};

async function submitJob(event, kind) {
  event.preventDefault();
  const form = new FormData(event.target);
  const button = event.target.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const job = await api(JOB_FORMS[kind].route, { json: JOB_FORMS[kind].body(form) });
    toast(`Started ${kind} job ${shortId(job.id)}`, "ok");
    state.offsets.jobs = 0;
    document.getElementById("jobs-status").value = "";
    selectJob(job.id);
    await loadJobs();
  } catch (error) {
    report(error);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ refresh and polling

async function loadHealth() {
  const pill = document.getElementById("health");
  try {
    await api("health");
    pill.textContent = "online";
    pill.className = "pill pill-ok";
  } catch (error) {
    pill.textContent = "unreachable";
    pill.className = "pill pill-bad";
    pill.title = error.message;
  }
}

const LOADERS = { volumes: loadVolumes, models: loadModels, jobs: loadJobs };

async function refresh(kind) {
  try {
    await LOADERS[kind]();
  } catch (error) {
    report(error);
  }
}

function reloadAll() {
  loadHealth();
  return Promise.all([refresh("volumes"), refresh("models"), refresh("jobs"), loadJobDetail().catch(report)]);
}

// Empty every list (on a 401 or a key change: they may belong to another key's owner).
function clearData(message) {
  releasePreviews(new Set());
  state.allVolumes = [];
  state.models = [];
  for (const select of document.querySelectorAll("select[data-kind]")) fillVolumeSelect(select);
  fillModelSelects();
  for (const kind of ["volumes", "jobs", "models"]) {
    document.getElementById(`${kind}-total`).textContent = "";
    document.querySelector(`[data-pager="${kind}"]`).replaceChildren();
  }
  document.getElementById("volumes").replaceChildren(el("p", { class: "empty" }, message));
  for (const id of ["jobs", "models"]) {
    document.getElementById(id).replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "empty" }, message)));
  }
  releaseDetail();
  closeViewer();
  document.getElementById("job-detail").hidden = true;
}

let pollBusy = false;
async function poll() {
  if (pollBusy || document.hidden || auth.locked) return;
  pollBusy = true;
  try {
    await Promise.all([loadJobs(), loadJobDetail()]);
  } catch (error) {
    if (!(error instanceof KeyNeeded || error instanceof StaleAnswer)) await loadHealth();
  } finally {
    pollBusy = false;
  }
}

function init() {
  document.getElementById("upload-form").addEventListener("submit", uploadHandler("uploadVolume",
    (body) => `Uploaded ${body.name}: ${body.axes} ${body.shape.join("×")} ${body.dtype}`,
    () => { syncUploadKind(); state.offsets.volumes = 0; return refresh("volumes"); }));
  document.querySelector("#upload-form select[name=kind]").addEventListener("change", syncUploadKind);
  document.getElementById("model-upload-form").addEventListener("submit", uploadHandler("uploadModel",
    (body) => `Uploaded model ${body.name} (${body.spatial_dims}D)`,
    () => { state.offsets.models = 0; return refresh("models"); }));
  for (const button of document.querySelectorAll("[data-refresh]")) {
    button.addEventListener("click", () => refresh(button.dataset.refresh));
  }
  document.getElementById("jobs-status").addEventListener("change", () => { state.offsets.jobs = 0; refresh("jobs"); });
  for (const tab of document.querySelectorAll("[data-tab]")) tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  for (const container of document.querySelectorAll("[data-pairs]")) addPair(container);
  for (const button of document.querySelectorAll("[data-add-pair]")) {
    button.addEventListener("click", () => addPair(document.querySelector(`[data-pairs="${button.dataset.addPair}"]`)));
  }
  for (const kind of Object.keys(JOB_FORMS)) {
    document.getElementById(`${kind}-form`).addEventListener("submit", (event) => submitJob(event, kind));
  }
  document.getElementById("key-form").addEventListener("submit", saveKey);
  document.getElementById("key-forget").addEventListener("click", forgetKey);
  document.getElementById("viewer-close").addEventListener("click", closeViewer);
  const stored = storedKey();
  auth.key = stored.key;
  showKeyState(stored.remembered);
  const linked = /^#job=([\w-]+)$/.exec(location.hash);
  if (linked) state.selectedJob = linked[1];
  reloadAll();
  setInterval(poll, POLL_MS);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
}

document.addEventListener("DOMContentLoaded", init);
