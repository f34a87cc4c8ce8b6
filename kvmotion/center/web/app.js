// kvmotion web client: one page, no build step, no dependencies.
//
// Layout as the vSphere Client's: an inventory tree on the left, the selected item's summary in
// the main pane, Recent Tasks at the bottom. Everything comes from the center's REST API (same
// origin, `Authorization: Bearer <token>`); tasks arrive live over /v1/tasks-stream (server-sent
// events read with fetch(), since EventSource cannot send the header).
//
// Sections: helpers (DOM, formatting) · API · state · sign-in · inventory · tree · router ·
// summaries · power · EVC dialog · migrate wizard · tasks (panel, stream, detail, chart) · events.

// ---------------------------------------------------------------------------------------------
// Constants

const TOKEN_KEY = "kvmotion.token";
const REFRESH_MS = 5000;
const EVENTS_REFRESH_MS = 5000;
const TASK_LIMIT = 30;
const FINAL_STATES = new Set(["success", "error", "cancelled"]);
const DATACENTER = "Datacenter"; // the center has one datacenter (inventory.DEFAULT_DATACENTER)

// What each timeline step means (kvmotion/cli/progress.py STEP_TEXT and center/tasks.py STEPS).
const STEP_TEXT = {
  requested: "1. migration requested; the VM runs, its user connected, on the source",
  prepared: "destination QEMU started, listening on its migration address",
  disk_copy: "disks being copied while the VM runs (guest writes go to both)",
  disks_ready: "every disk copy caught up; it now tracks each guest write",
  precopy: "2. memory pre-copied to the destination; dirty pages re-sent in passes",
  stunned: "3. VM stunned on the source; last dirty pages and device state sent",
  resumed: "4. VM resumed on the destination and announced on the VM network",
  disks_switched: "VM switched to its copied disks; old files removed",
  source_removed: "5. VM removed from the source host",
};

const MIGRATION_TYPES = [
  {
    value: "compute",
    label: "Change compute resource only",
    help: "Move the running VM to another host (vMotion). Its disks stay where they are, so the "
      + "destination must see the VM's datastores.",
  },
  {
    value: "storage",
    label: "Change storage only",
    help: "Move the VM's disks to another datastore of its host while it runs (Storage vMotion).",
  },
  {
    value: "both",
    label: "Change both compute resource and storage",
    help: "Move the VM to another host and its disks to a datastore of that host at once; works "
      + "without shared storage.",
  },
];
const TYPE_LABEL = Object.fromEntries(MIGRATION_TYPES.map((t) => [t.value, t.label]));

// ---------------------------------------------------------------------------------------------
// DOM helpers

/** h("div", {class: "x", onclick: fn, dataset: {...}}, child, "text", [more]) */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  applyProps(el, props);
  appendChildren(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) el.setAttribute(k, String(v));
  }
  appendChildren(el, children);
  return el;
}

function applyProps(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "text") el.textContent = value;
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function appendChildren(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/**
 * Make `from` (in the page) look like `to` (just built), keeping the elements that stay the
 * same kind in the same place: a refresh then changes text and attributes, not elements, so
 * focus, open <details>, scroll and references held by scripts or tests survive. Elements with
 * another tag or id are replaced. Listeners stay those of the kept element, so views attach
 * only listeners that depend on the route (which a morph never changes) and links are
 * handled by delegation.
 */
function morph(from, to) {
  if (from.nodeType !== to.nodeType || from.nodeName !== to.nodeName
      || from.namespaceURI !== to.namespaceURI || (from.nodeType === 1 && from.id !== to.id)) {
    from.replaceWith(to);
    return;
  }
  if (from.nodeType !== 1) {
    if (from.nodeValue !== to.nodeValue) from.nodeValue = to.nodeValue;
    return;
  }
  for (const { name } of [...from.attributes]) {
    if (!to.hasAttribute(name) && !(name === "open" && from.nodeName === "DETAILS")) from.removeAttribute(name);
  }
  for (const { name, value } of [...to.attributes]) {
    if (from.getAttribute(name) !== value) from.setAttribute(name, value);
  }
  const olds = [...from.childNodes];
  const news = [...to.childNodes];
  news.forEach((node, i) => (i < olds.length ? morph(olds[i], node) : from.appendChild(node)));
  for (const node of olds.slice(news.length)) node.remove();
}

/** Show `view` as the main pane's content: morphed into the one there when it is the same
 * view (same id), else put in its place. */
function showInMain(view, force) {
  const main = $("#main");
  const current = main.firstElementChild;
  if (!force && current && main.children.length === 1 && current.id && current.id === view.id) {
    morph(current, view);
  } else {
    clear(main).append(view);
    main.scrollTop = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Formatting

function fmtBytes(value) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "—";
  let v = Number(value);
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (Math.abs(v) < 1024 || unit === "TiB") {
      return unit === "B" ? `${v.toFixed(0)} B` : `${v.toFixed(1)} ${unit}`;
    }
    v /= 1024;
  }
  return "—";
}

function fmtMiB(mib) {
  if (mib === null || mib === undefined) return "—";
  return mib >= 1024 ? `${(mib / 1024).toFixed(mib % 1024 ? 1 : 0)} GiB` : `${mib} MiB`;
}

/** Bytes per second as MB/s (10^6, as the CLI prints). */
function fmtRate(bps) {
  if (bps === null || bps === undefined || Number.isNaN(Number(bps))) return "—";
  return `${(Number(bps) / 1e6).toFixed(1)} MB/s`;
}

function fmtLink(bps) {
  if (!bps) return "—";
  const mbit = (Number(bps) * 8) / 1e6;
  return mbit >= 1000 ? `${(mbit / 1000).toFixed(mbit % 1000 ? 1 : 0)} Gbit/s` : `${mbit.toFixed(0)} Mbit/s`;
}

function fmtMs(ms) {
  return ms === null || ms === undefined ? "—" : `${Math.round(Number(ms)).toLocaleString("en-US")} ms`;
}

function fmtSeconds(sec) {
  if (sec === null || sec === undefined) return "—";
  const v = Number(sec);
  if (v < 60) return `${v.toFixed(v < 10 ? 1 : 0)} s`;
  const m = Math.floor(v / 60);
  return `${m} min ${Math.round(v - m * 60)} s`;
}

/** The center writes times as ISO strings; SQLite drops the zone, and they are UTC. */
function parseTime(text) {
  if (!text) return null;
  const zoned = /([zZ]|[+-]\d\d:?\d\d)$/.test(text) ? text : `${text}Z`;
  const d = new Date(zoned);
  return Number.isNaN(d.getTime()) ? null : d;
}

function fmtClock(date) {
  if (!date) return "—";
  const pad = (n) => String(n).padStart(2, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function fmtDateTime(date) {
  if (!date) return "—";
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${fmtClock(date)}`;
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined || ms < 0) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return fmtSeconds(ms / 1000);
}

function vendorName(vendor) {
  const v = String(vendor || "").toLowerCase();
  if (v.includes("intel")) return "Intel";
  if (v.includes("amd")) return "AMD";
  return vendor || "unknown";
}

const POWER_LABEL = {
  poweredOn: "Powered on",
  poweredOff: "Powered off",
  incoming: "Incoming (migration)",
  suspended: "Suspended",
};

function plural(n, word, many = `${word}s`) {
  return `${n} ${n === 1 ? word : many}`;
}

// ---------------------------------------------------------------------------------------------
// API

class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

/** "error (code): message", as the CLI prints a refusal. */
function errorText(err) {
  if (err instanceof ApiError) return `error (${err.code}): ${err.message}`;
  return `error (client): ${err && err.message ? err.message : String(err)}`;
}

async function api(path, { method = "GET", body, signal, token } = {}) {
  const headers = { Authorization: `Bearer ${token ?? state.token}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, "unreachable",
      `cannot reach the center at ${location.origin} (${exc.message}): check that it runs`);
  }
  if (resp.status === 204) return null;
  let data = null;
  const text = await resp.text();
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const e = (data && data.error) || {};
    const err = new ApiError(resp.status, e.code || `http_${resp.status}`,
      e.message || `the center answered ${resp.status} ${resp.statusText}`, e.details);
    if (resp.status === 401 && state.token && token === undefined) sessionExpired(err);
    throw err;
  }
  return data;
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------------
// State

const state = {
  token: null,
  data: null, // {hosts, vms, datastores, clusters}
  idx: null, // lookups built from data
  route: { view: "item", kind: "datacenter", name: DATACENTER },
  collapsed: new Set(), // tree keys "kind:name" the user collapsed
  tasks: new Map(), // id -> task
  taskRows: new Map(), // id -> <tr>
  refreshTimer: null,
  refreshSoonTimer: null,
  eventsTimer: null,
  stream: null, // {controller}
  mainSig: null,
  treeSig: null,
  modal: null,
  generation: 0, // bumped at sign-out: late answers of an old session are dropped
};

// ---------------------------------------------------------------------------------------------
// Sign-in and sign-out

async function signIn(token, { silent = false } = {}) {
  const error = $("#signin-error");
  error.hidden = true;
  if (!token) {
    showSigninError("Enter the center's API token (the \"token\" of its center.json, or the lab's).");
    return;
  }
  const button = $("#signin");
  button.disabled = true;
  button.textContent = "Signing in...";
  try {
    await api("/v1/hosts", { token });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      showSigninError(`${errorText(err)}. The token was refused: check it and try again.`);
    } else {
      showSigninError(`${errorText(err)}. Try again once the center answers.`);
    }
    sessionStorage.removeItem(TOKEN_KEY);
    if (silent) $("#token").focus();
    return;
  } finally {
    button.disabled = false;
    button.textContent = "Sign in";
  }
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#token").value = "";
  $("#signin-view").hidden = true;
  $("#app").hidden = false;
  startSession();
}

function showSigninError(text) {
  const error = $("#signin-error");
  error.textContent = text;
  error.hidden = false;
}

function signOut(message) {
  state.generation += 1;
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  stopStream();
  clearInterval(state.refreshTimer);
  clearTimeout(state.refreshSoonTimer);
  clearInterval(state.eventsTimer);
  closeModal();
  state.data = state.idx = null;
  state.tasks.clear();
  state.taskRows.clear();
  state.mainSig = state.treeSig = null;
  clear($("#tree"));
  clear($("#main"));
  clear($("#tasks-rows"));
  $("#app").hidden = true;
  $("#signin-view").hidden = false;
  if (message) showSigninError(message);
  else $("#signin-error").hidden = true;
  history.replaceState(null, "", "#/");
  $("#token").focus();
}

function sessionExpired(err) {
  signOut(`${errorText(err)}. The center no longer accepts this token: sign in again.`);
}

function startSession() {
  state.route = parseHash(location.hash);
  renderMainLoading();
  refreshInventory();
  state.refreshTimer = setInterval(refreshInventory, REFRESH_MS);
  startStream();
}

// ---------------------------------------------------------------------------------------------
// Inventory: load, index, refresh

async function refreshInventory() {
  const gen = state.generation;
  const status = $("#refresh-status");
  try {
    const [hosts, vms, datastores, clusters] = await Promise.all([
      api("/v1/hosts"), api("/v1/vms"), api("/v1/datastores"), api("/v1/clusters"),
    ]);
    if (gen !== state.generation) return;
    state.data = { hosts, vms, datastores, clusters };
    state.idx = buildIndex(state.data);
    status.textContent = `Updated ${fmtClock(new Date())}`;
    status.classList.remove("bad");
    status.title = "The inventory is re-read every 5 seconds and after each task";
    kickStream();
    renderTree();
    renderMain();
  } catch (err) {
    if (gen !== state.generation || (err instanceof ApiError && err.status === 401)) return;
    status.textContent = "Refresh failed";
    status.classList.add("bad");
    status.title = `${errorText(err)}; retrying every 5 seconds`;
    // The center is gone: a stream that still looks open is held by a center shutting down
    // (it waits for its clients to leave). Let go of it and reconnect.
    if (err instanceof ApiError && err.code === "unreachable") restartStream("the center does not answer");
    if (!state.data) renderMainError(err);
  }
}

/** Refresh shortly (a task ended, a VM was powered on...), at most once per burst. */
function refreshSoon(delay = 250) {
  clearTimeout(state.refreshSoonTimer);
  state.refreshSoonTimer = setTimeout(refreshInventory, delay);
}

function buildIndex(data) {
  const host = new Map(data.hosts.map((x) => [x.name, x]));
  const vm = new Map(data.vms.map((x) => [x.name, x]));
  const cluster = new Map(data.clusters.map((x) => [x.name, x]));
  const datastore = new Map(data.datastores.map((x) => [x.name, x]));
  const clusterOfHost = new Map();
  for (const c of data.clusters) for (const name of c.hosts) clusterOfHost.set(name, c.name);
  const vmsOnHost = new Map(data.hosts.map((x) => [x.name, []]));
  const orphanVms = [];
  for (const v of data.vms) {
    if (v.host && vmsOnHost.has(v.host)) vmsOnHost.get(v.host).push(v);
    else orphanVms.push(v);
  }
  for (const list of vmsOnHost.values()) list.sort((a, b) => a.name.localeCompare(b.name));
  const network = new Map();
  for (const x of data.hosts) {
    for (const n of (x.facts && x.facts.networks) || []) {
      if (!network.has(n.name)) network.set(n.name, { name: n.name, hosts: [] });
      network.get(n.name).hosts.push({ host: x.name, bridge: n.bridge, present: n.present });
    }
  }
  for (const v of data.vms) {
    for (const nic of (v.config && v.config.nics) || []) {
      if (!network.has(nic.network)) network.set(nic.network, { name: nic.network, hosts: [] });
    }
  }
  return { host, vm, cluster, datastore, clusterOfHost, vmsOnHost, orphanVms, network };
}

function vmDatastores(v) {
  const names = ((v.config && v.config.disks) || []).map((d) => d.datastore);
  return [...new Set(names.length ? names : [v.config && v.config.datastore].filter(Boolean))];
}

function vmNetworks(v) {
  return [...new Set(((v.config && v.config.nics) || []).map((n) => n.network))];
}

function activeTaskFor(vmName) {
  let found = null;
  for (const t of state.tasks.values()) {
    if (t.target === vmName && !FINAL_STATES.has(t.state) && (!found || t.id > found.id)) found = t;
  }
  return found;
}

function evcLabel(key) {
  if (!key) return null;
  for (const c of state.data ? state.data.clusters : []) {
    for (const m of c.evc_modes || []) if (m.key === key) return m.label;
  }
  for (const x of state.data ? state.data.hosts : []) {
    for (const m of (x.facts && x.facts.cpu_model && x.facts.cpu_model.evc_modes) || []) {
      if (m.key === key) return m.label;
    }
  }
  return key;
}

/** 'Intel® "Nehalem" Generation' -> 'Nehalem' (for narrow columns). */
function shortMode(key) {
  const label = evcLabel(key) || "";
  const quoted = label.match(/"([^"]+)"/);
  return quoted ? quoted[1] : label.replace(/ Generation$/, "").replace(/^(Intel®|AMD) /, "");
}

function evcText(key) {
  if (!key) return "Disabled";
  const label = evcLabel(key);
  return label === key ? key : `${label} (${key})`;
}

// ---------------------------------------------------------------------------------------------
// Icons (inline SVG, 16 px)

const ICON_PATHS = {
  datacenter: "M2 14V5l6-3 6 3v9H2zm2-2h2V9H4v3zm3 0h2V9H7v3zm3 0h2V9h-2v3zM4 7.5h8",
  cluster: "M1.5 6.5h6v3h-6zM8.5 6.5h6v3h-6zM1.5 11h6v3h-6zM8.5 11h6v3h-6zM4 2h8v3H4z",
  host: "M2 2.5h12v4H2zM2 9.5h12v4H2zM4 4.5h1M4 11.5h1M8 4.5h4M8 11.5h4",
  vm: "M1.5 2.5h13v9h-13zM5 14h6M8 11.5V14",
  datastore: "M2.5 4c0-1.2 2.5-2 5.5-2s5.5.8 5.5 2v8c0 1.2-2.5 2-5.5 2s-5.5-.8-5.5-2V4zm0 0c0 1.2 2.5 2 5.5 2s5.5-.8 5.5-2M2.5 8c0 1.2 2.5 2 5.5 2s5.5-.8 5.5-2",
  network: "M8 2v4M3 10V8h10v2M8 6v2M1.5 10h3v3.5h-3zM6.5 10h3v3.5h-3zM11.5 10h3v3.5h-3zM6.5 1h3v3h-3z",
  folder: "M1.5 3.5h5l1.5 1.5h6.5v8.5h-13z",
  events: "M8 1.5l6.5 12h-13zM8 6v4M8 11.5v.5",
  task: "M3 2.5h10v11H3zM5.5 6h5M5.5 9h5M5.5 12h3",
};

function icon(kind, cls = "") {
  return s("svg", { class: `icon icon-${kind} ${cls}`, viewBox: "0 0 16 16", "aria-hidden": "true" },
    s("path", { d: ICON_PATHS[kind] || ICON_PATHS.folder }));
}

// ---------------------------------------------------------------------------------------------
// Inventory tree
//
// Each item is <span class="node" data-kind data-name> (display: inline) holding its row and the
// <ul> of its children: a block inside an inline, so the item's first box is its own row, and a
// click aimed at the item (by a person or a WebDriver) lands on that row, never on a child's.

function treeModel() {
  const { idx, data } = state;
  const vmNode = (v) => {
    const task = activeTaskFor(v.name);
    return {
      kind: "vm", name: v.name,
      badge: task ? "migrating" : v.power_state === "poweredOn" ? "on" : "off",
      title: `${v.name}: ${POWER_LABEL[v.power_state] || v.power_state}${task ? `, migrating (task ${task.id})` : ""}`,
    };
  };
  const hostNode = (x) => ({
    kind: "host", name: x.name,
    badge: x.connection === "connected" ? null : "bad",
    title: `${x.name}: ${x.connection}`,
    children: idx.vmsOnHost.get(x.name).map(vmNode),
  });
  const clustered = new Set(idx.clusterOfHost.keys());
  const children = [
    ...data.clusters.map((c) => ({
      kind: "cluster", name: c.name, title: `cluster ${c.name}`,
      children: c.hosts.filter((n) => idx.host.has(n)).map((n) => hostNode(idx.host.get(n))),
    })),
    ...data.hosts.filter((x) => !clustered.has(x.name)).map(hostNode),
    ...idx.orphanVms.map(vmNode),
    {
      group: "datastores", name: "Datastores", title: "every datastore a host reported",
      children: data.datastores.map((d) => ({
        kind: "datastore", name: d.name, title: `${d.name}: ${d.shared ? "shared" : "local"}`,
      })),
    },
    {
      group: "networks", name: "Networks", title: "VM networks (a bridge of that name on each host)",
      children: [...idx.network.values()]
        .sort((a, b) => a.name.localeCompare(b.name))
        .map((n) => ({ kind: "network", name: n.name, title: `network ${n.name}` })),
    },
  ];
  return [{ kind: "datacenter", name: DATACENTER, title: `datacenter ${DATACENTER}`, children }];
}

function nodeKey(node) {
  return node.group ? `group:${node.group}` : `${node.kind}:${node.name}`;
}

function renderTree() {
  if (!state.data) return;
  const model = treeModel();
  const sig = JSON.stringify([model, [...state.collapsed].sort()]);
  if (sig !== state.treeSig) {
    state.treeSig = sig;
    const tree = $("#tree");
    const scroll = tree.scrollTop;
    const focusedKey = document.activeElement && document.activeElement.closest
      ? document.activeElement.closest("#tree .node")?.dataset.key : null;
    const list = h("ul", { class: "tree-list", role: "group" }, model.map((n) => treeItem(n, 0)));
    if (tree.firstElementChild) morph(tree.firstElementChild, list);
    else tree.append(list);
    tree.scrollTop = scroll;
    if (focusedKey) $(`#tree .node[data-key="${CSS.escape(focusedKey)}"] > .row`)?.focus();
  }
  markSelection();
}

function treeItem(node, depth) {
  const key = nodeKey(node);
  const hasChildren = Boolean(node.children && node.children.length);
  const collapsed = state.collapsed.has(key);
  const props = {
    class: `node${node.group ? " group" : ""}`,
    role: "treeitem",
    "aria-expanded": hasChildren ? String(!collapsed) : null,
    dataset: node.group ? { group: node.group, key } : { kind: node.kind, name: node.name, key },
  };
  const twisty = h("span", {
    class: `twisty${hasChildren ? "" : " leaf"}${collapsed ? " collapsed" : ""}`,
    "aria-hidden": "true",
  });
  const row = h("span", {
    class: "row",
    tabindex: "-1",
    title: node.title || node.name,
    style: { paddingLeft: `${6 + depth * 16}px` },
    onkeydown: treeKeydown,
  },
  twisty,
  icon(node.group ? node.group === "datastores" ? "datastore" : "network" : node.kind,
    node.group ? "muted" : ""),
  node.badge ? h("span", { class: `badge-dot ${node.badge}`, "aria-hidden": "true" }) : null,
  h("span", { class: "label" }, node.name),
  node.group ? h("span", { class: "count" }, String(node.children.length)) : null);
  return h("li", { role: "none" }, h("span", props, row,
    hasChildren && !collapsed
      ? h("ul", { class: "tree-list", role: "group" }, node.children.map((c) => treeItem(c, depth + 1)))
      : null));
}

/** One listener for the whole tree: a click anywhere in an item's own box (its row, or the
 * item's inline box around it) opens that item; a click in a child's row opens the child. */
function treeClick(ev) {
  const node = ev.target.closest("#tree .node");
  if (!node) return;
  if (node.dataset.group || ev.target.closest(".twisty:not(.leaf)")) toggleNode(node.dataset.key);
  else navigate({ view: "item", kind: node.dataset.kind, name: node.dataset.name });
}

function toggleNode(key) {
  if (state.collapsed.has(key)) state.collapsed.delete(key);
  else state.collapsed.add(key);
  renderTree();
}

function markSelection() {
  const r = state.route;
  for (const el of $$("#tree .node.selected")) el.classList.remove("selected");
  for (const el of $$("#tree .row[tabindex='0']")) el.tabIndex = -1;
  if (r.view !== "item") return;
  const el = $(`#tree .node[data-kind="${r.kind}"][data-name="${CSS.escape(r.name)}"]`);
  if (el) {
    el.classList.add("selected");
    el.firstElementChild.tabIndex = 0;
  }
}

function treeKeydown(ev) {
  const rows = $$("#tree .row");
  const i = rows.indexOf(ev.currentTarget);
  const node = ev.currentTarget.parentElement;
  const move = (j) => {
    if (j >= 0 && j < rows.length) rows[j].focus();
  };
  if (ev.key === "ArrowDown") move(i + 1);
  else if (ev.key === "ArrowUp") move(i - 1);
  else if (ev.key === "Enter" || ev.key === " ") ev.currentTarget.click();
  else if (ev.key === "ArrowLeft" && node.getAttribute("aria-expanded") === "true") toggleNode(node.dataset.key);
  else if (ev.key === "ArrowRight" && node.getAttribute("aria-expanded") === "false") toggleNode(node.dataset.key);
  else return;
  ev.preventDefault();
}

// ---------------------------------------------------------------------------------------------
// Router: #/, #/<kind>/<name>, #/task/<id>, #/events. Navigation renders at once (pushState);
// the back button re-renders from the address.

function parseHash(hash) {
  const parts = (hash || "").replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "events") return { view: "events" };
  if (parts[0] === "task" && parts[1]) return { view: "task", id: Number(parts[1]) };
  const kinds = ["datacenter", "cluster", "host", "vm", "datastore", "network"];
  if (kinds.includes(parts[0]) && parts[1]) return { view: "item", kind: parts[0], name: parts[1] };
  return { view: "item", kind: "datacenter", name: DATACENTER };
}

function routeHash(r) {
  if (r.view === "events") return "#/events";
  if (r.view === "task") return `#/task/${r.id}`;
  return `#/${r.kind}/${enc(r.name)}`;
}

function navigate(route) {
  state.route = route;
  if (route.view === "item") state.lastItem = route;
  const hash = routeHash(route);
  if (location.hash !== hash) history.pushState(null, "", hash);
  renderMain(true);
  markSelection();
}

window.addEventListener("popstate", () => {
  if (!state.token) return;
  state.route = parseHash(location.hash);
  renderMain(true);
  markSelection();
});

// ---------------------------------------------------------------------------------------------
// Main pane

function renderMainLoading() {
  clear($("#main")).append(h("div", { class: "placeholder" }, "Loading the inventory..."));
}

function renderMainError(err) {
  clear($("#main")).append(h("div", { class: "panel-error" },
    h("strong", null, "The inventory could not be read. "), errorText(err),
    h("p", null, "The client retries every 5 seconds; check that the center runs.")));
}

/** Render the main pane for the current route; skipped when nothing it shows changed. */
function renderMain(force = false) {
  const r = state.route;
  document.querySelectorAll(".topnav a").forEach((a) => a.classList.remove("active"));
  $(r.view === "events" ? "#nav-events" : "#nav-inventory").classList.add("active");
  clearInterval(state.eventsTimer);
  if (r.view === "events") {
    if (force || state.mainSig !== "events") {
      state.mainSig = "events";
      renderEvents();
    }
    state.eventsTimer = setInterval(() => loadEvents(false), EVENTS_REFRESH_MS);
    return;
  }
  if (r.view === "task") {
    const task = state.tasks.get(r.id);
    const sig = JSON.stringify(["task", r.id, task || null]);
    if (force || sig !== state.mainSig) {
      state.mainSig = sig;
      showInMain(renderTaskDetail(r.id, task), force);
    }
    return;
  }
  if (!state.data) return;
  const view = ITEM_VIEWS[r.kind];
  const subject = view && view.find(r.name);
  const sig = JSON.stringify(["item", r.kind, r.name, subject ? view.sig(subject) : null]);
  if (!force && sig === state.mainSig) {
    if (subject && view.live) view.live(subject);
    return;
  }
  state.mainSig = sig;
  if (!subject) {
    showInMain(h("div", { id: "missing-item", class: "placeholder" },
      h("p", null, `${r.kind} ${r.name} is not in the inventory (any more).`),
      h("p", null, "It may have been removed or renamed. ",
        h("a", { href: "#/" }, "Show the datacenter"), ".")), true);
    return;
  }
  showInMain(view.render(subject), force);
  if (view.live) view.live(subject);
}

// Building blocks of a summary

function summaryHeader(kind, title, subtitle, actions, status) {
  return h("div", { class: "summary-header" },
    h("div", { class: "summary-title" }, icon(kind, "big"),
      h("div", null, h("h1", null, title), subtitle ? h("div", { class: "subtitle" }, subtitle) : null),
      status || null),
    actions && actions.length ? h("div", { class: "actions" }, actions) : null);
}

/** A card of label/value rows; each row: [label, value, field, hint, raw]. `field` sets
 * data-field; `raw` (the API's value, when the text is a person's version of it) data-value. */
function card(title, rows, extra) {
  return h("section", { class: "card" }, h("h2", null, title),
    rows.length ? h("dl", { class: "props" }, rows.filter(Boolean).map(([label, value, field, hint, raw]) => [
      h("dt", null, label),
      h("dd", {
        dataset: field ? { field, ...(raw === undefined || raw === null ? {} : { value: String(raw) }) } : undefined,
        title: hint || null,
      }, value),
    ])) : null,
    extra || null);
}

function table(headers, rows, { field, empty, cls } = {}) {
  if (!rows.length && empty) {
    return h("p", { class: "empty", dataset: field ? { field } : undefined }, empty);
  }
  return h("table", { class: `grid ${cls || ""}`, dataset: field ? { field } : undefined },
    h("thead", null, h("tr", null, headers.map((x) => h("th", null, x)))),
    h("tbody", null, rows));
}

function itemLink(kind, name, text) {
  return h("a", { href: routeHash({ view: "item", kind, name }), class: "item-link" }, text || name);
}

function usageBar(used, total) {
  const pct = total ? Math.min(100, Math.max(0, (100 * used) / total)) : 0;
  return h("div", { class: `usage${pct > 90 ? " high" : pct > 75 ? " mid" : ""}`, title: `${pct.toFixed(0)} % used` },
    h("div", { class: "usage-fill", style: { width: `${pct}%` } }));
}

function stateBadge(text, kind) {
  return h("span", { class: `badge ${kind}` }, text);
}

function powerBadge(p) {
  return stateBadge(POWER_LABEL[p] || p, p === "poweredOn" ? "ok" : p === "incoming" ? "info" : "muted");
}

function connectionBadge(c) {
  return stateBadge(c === "connected" ? "Connected" : c, c === "connected" ? "ok" : "bad");
}

function actionMessage() {
  return h("div", { id: "action-message", class: "action-message", role: "status", hidden: true });
}

function showActionMessage(text, kind = "info") {
  const el = $("#action-message");
  if (!el) return;
  el.className = `action-message ${kind}`;
  el.textContent = text;
  el.hidden = false;
}

// -- datacenter --------------------------------------------------------------------------------

const ITEM_VIEWS = {
  datacenter: {
    find: (name) => (name === DATACENTER ? { name } : null),
    sig: () => {
      const d = state.data;
      return [d.clusters.map((c) => [c.name, c.hosts, c.evc_mode]),
        d.hosts.map((x) => [x.name, x.connection]), d.vms.map((v) => [v.name, v.host, v.power_state]),
        d.datastores.map((x) => [x.name, x.free_bytes]), [...state.idx.network.keys()],
        [...state.tasks.values()].filter((t) => !FINAL_STATES.has(t.state)).length];
    },
    render: renderDatacenter,
  },
  cluster: {
    find: (name) => state.idx.cluster.get(name),
    sig: (c) => [c, c.hosts.map((n) => {
      const x = state.idx.host.get(n);
      return x && [x.connection, x.facts && x.facts.cpu, x.facts && x.facts.cpu_model && x.facts.cpu_model.highest_evc_mode];
    }), state.data.vms.filter((v) => c.vms.includes(v.name)).map((v) => [v.name, v.power_state, v.host])],
    render: renderCluster,
  },
  host: {
    find: (name) => state.idx.host.get(name),
    sig: (x) => {
      const { last_seen: _seen, facts, ...rest } = x;
      const f = { ...(facts || {}), memory: { total_bytes: facts && facts.memory && facts.memory.total_bytes } };
      return [rest, f, state.idx.clusterOfHost.get(x.name),
        state.idx.vmsOnHost.get(x.name).map((v) => [v.name, v.power_state, v.config.memory_mib, v.cpu && v.cpu.model])];
    },
    live: (x) => {
      const mem = $("#main [data-field='memory']");
      if (mem) mem.replaceChildren(...memoryValue(x));
      const seen = $("#main [data-field='last_seen']");
      if (seen) seen.textContent = fmtDateTime(parseTime(x.last_seen));
    },
    render: renderHost,
  },
  vm: {
    find: (name) => state.idx.vm.get(name),
    sig: (v) => {
      const host = v.host && state.idx.host.get(v.host);
      const t = activeTaskFor(v.name);
      return [v, host && host.connection, state.idx.clusterOfHost.get(v.host),
        t && [t.id, FINAL_STATES.has(t.state)]];
    },
    live: (v) => updateVmTaskBanner(v),
    render: renderVm,
  },
  datastore: {
    find: (name) => state.idx.datastore.get(name),
    sig: (d) => [d, state.data.vms.filter((v) => vmDatastores(v).includes(d.name)).map((v) => [v.name, v.host])],
    render: renderDatastore,
  },
  network: {
    find: (name) => state.idx.network.get(name),
    sig: (n) => [n, state.data.vms.filter((v) => vmNetworks(v).includes(n.name)).map((v) => [v.name, v.host])],
    render: renderNetwork,
  },
};

function renderDatacenter() {
  const d = state.data;
  const on = d.vms.filter((v) => v.power_state === "poweredOn").length;
  const connected = d.hosts.filter((x) => x.connection === "connected").length;
  const running = [...state.tasks.values()].filter((t) => !FINAL_STATES.has(t.state)).length;
  return h("div", { id: "datacenter-summary", class: "summary" },
    summaryHeader("datacenter", DATACENTER, "Datacenter"),
    h("div", { class: "cards" },
      card("Summary", [
        ["Clusters", String(d.clusters.length), "clusters"],
        ["Hosts", `${d.hosts.length} (${connected} connected)`, "hosts"],
        ["Virtual machines", `${d.vms.length} (${on} powered on)`, "vms"],
        ["Datastores", String(d.datastores.length), "datastores"],
        ["Networks", String(state.idx.network.size), "networks"],
        ["Migrations running", String(running), "running_tasks"],
      ]),
      h("section", { class: "card wide" }, h("h2", null, "Clusters"),
        table(["Cluster", "Hosts", "VMs", "EVC mode"], d.clusters.map((c) => h("tr", null,
          h("td", null, itemLink("cluster", c.name)),
          h("td", null, String(c.hosts.length)),
          h("td", null, String(c.vms.length)),
          h("td", null, evcText(c.evc_mode)))), { empty: "No clusters." })),
      h("section", { class: "card wide" }, h("h2", null, "Hosts"), hostsTable(d.hosts))));
}

function hostsTable(hosts, field) {
  return table(["Host", "State", "Cluster", "CPU", "Memory free", "VMs", "Highest EVC mode"],
    hosts.map((x) => {
      const f = x.facts || {};
      const cpu = f.cpu || {};
      return h("tr", { dataset: { host: x.name } },
        h("td", null, itemLink("host", x.name)),
        h("td", null, connectionBadge(x.connection)),
        h("td", null, state.idx.clusterOfHost.has(x.name)
          ? itemLink("cluster", state.idx.clusterOfHost.get(x.name)) : "—"),
        h("td", null, `${vendorName(cpu.vendor)} · ${cpu.count ?? "?"} CPUs`),
        h("td", null, f.memory ? `${fmtBytes(f.memory.available_bytes)} of ${fmtBytes(f.memory.total_bytes)}` : "—"),
        h("td", null, String(state.idx.vmsOnHost.get(x.name).length)),
        h("td", null, evcText(f.cpu_model && f.cpu_model.highest_evc_mode)));
    }), { field, empty: "No hosts. Add one with `kvmotion host add <address>`." });
}

// -- cluster -------------------------------------------------------------------------------------

function renderCluster(c) {
  const hosts = c.hosts.map((n) => state.idx.host.get(n)).filter(Boolean);
  const common = (c.evc_modes || []).filter((m) => c.hosts.every((n) => m.hosts[n] && m.hosts[n].supported));
  const vms = state.data.vms.filter((v) => c.vms.includes(v.name));
  const on = vms.filter((v) => v.power_state === "poweredOn").length;
  return h("div", { id: "cluster-summary", class: "summary" },
    summaryHeader("cluster", c.name, "Cluster", [
      h("button", {
        id: "evc-btn", class: "btn", type: "button", onclick: () => openEvcDialog(c.name),
        title: "Choose the CPU baseline every VM powered on in this cluster gets",
      }, "Configure EVC..."),
    ]),
    h("div", { class: "cards" },
      card("Summary", [
        ["Hosts", String(hosts.length), "host_count"],
        ["Virtual machines", `${vms.length} (${on} powered on)`, "vms"],
        ["EVC mode", evcText(c.evc_mode), "evc_mode",
          "VMs powered on in this cluster get this CPU baseline, so they can move to any of its hosts", c.evc_mode || ""],
        ["EVC modes every host supports", common.length ? evcText(common[common.length - 1].key) + " and below" : "none", "common_evc",
          "the highest mode all member hosts support"],
      ]),
      h("section", { class: "card wide" }, h("h2", null, "Hosts"), hostsTable(hosts, "hosts")),
      h("section", { class: "card wide" }, h("h2", null, "Virtual machines"), vmsTable(vms, "vm_list"))));
}

function vmsTable(vms, field) {
  return table(["VM", "State", "Host", "Memory", "vCPUs", "Datastores", "CPU"], vms.map((v) => h("tr", { dataset: { vm: v.name } },
    h("td", null, itemLink("vm", v.name)),
    h("td", null, powerBadge(v.power_state)),
    h("td", null, v.host ? itemLink("host", v.host) : "—"),
    h("td", null, fmtMiB(v.config.memory_mib)),
    h("td", null, String(v.config.vcpus ?? "—")),
    h("td", null, vmDatastores(v).join(", ")),
    h("td", null, cpuText(v)))), { field, empty: "No virtual machines." });
}

function cpuText(v) {
  const model = (v.cpu && v.cpu.model) || v.config.cpu_model || "—";
  const mode = (v.cpu && v.cpu.evc_mode) || null;
  return mode ? `${model} (EVC ${evcLabel(mode)})` : model;
}

// -- host ----------------------------------------------------------------------------------------

function memoryValue(x) {
  const m = (x.facts && x.facts.memory) || {};
  if (!m.total_bytes) return ["—"];
  const used = m.total_bytes - (m.available_bytes || 0);
  return [`${fmtBytes(m.available_bytes)} free of ${fmtBytes(m.total_bytes)}`, usageBar(used, m.total_bytes)];
}

function renderHost(x) {
  const f = x.facts || {};
  const cpu = f.cpu || {};
  const model = f.cpu_model || {};
  const modes = model.evc_modes || [];
  const supported = modes.filter((m) => m.supported);
  const unsupported = modes.filter((m) => !m.supported);
  const vms = state.idx.vmsOnHost.get(x.name);
  const cluster = state.idx.clusterOfHost.get(x.name);
  const dsTotal = new Map(state.data.datastores.map((d) => [d.name, d]));
  return h("div", { id: "host-summary", class: "summary" },
    summaryHeader("host", x.name, `Host${f.hostname ? ` · ${f.hostname}` : ""}`, [],
      connectionBadge(x.connection)),
    x.connection !== "connected" ? h("div", { class: "panel-error" },
      "The center cannot reach this host's agent: the facts below are the last it reported. ",
      "Check that `kvmotion host serve` runs there and that the management network reaches it.") : null,
    h("div", { class: "cards" },
      card("General", [
        ["Cluster", cluster ? itemLink("cluster", cluster) : "none (standalone)", "cluster"],
        ["Management address", f.management_address || "—", "management_address",
          "the center talks to the agent here"],
        ["Migration (vMotion) address", f.migration_address
          || h("span", { class: "warn-text" }, "none: this host cannot send or receive migrations"),
        "migration_address", "memory streams cross the migration network only"],
        ["Migration link", fmtLink(f.migration_link_bps), "migration_link"],
        ["Agent", x.url || "—", "url"],
        ["Last seen", fmtDateTime(parseTime(x.last_seen)), "last_seen"],
      ]),
      card("Hardware", [
        ["CPU vendor", vendorName(cpu.vendor), "cpu_vendor"],
        ["CPU model", cpu.model_name || "—", "cpu_model_name"],
        ["Logical CPUs", String(cpu.count ?? "—"), "cpu_count"],
        ["Memory", memoryValue(x), "memory"],
        ["Accelerator", `${(f.accel || "unknown").toUpperCase()}${f.accel_reason ? ` (${f.accel_reason})` : ""}`, "accel"],
        ["QEMU", `${f.qemu_version || "—"} · machine ${f.machine_type || "—"}`, "qemu_version"],
      ]),
      card("CPU compatibility (EVC)", [
        ["CPU vendor given to VMs", model.vendor ? vendorName(model.vendor) : "any (emulated)", "cpu_family"],
        ["Simulated generation", model.generation ? evcText(model.generation) : "none (the real CPU)", "cpu_generation"],
        ["Highest EVC mode", evcText(model.highest_evc_mode), "highest_evc_mode"],
        ["Supported EVC modes", supported.length
          ? h("ul", { class: "plain-list" }, supported.map((m) => h("li", { dataset: { mode: m.key } }, `${m.label} (${m.key})`)))
          : model.probe_error ? `unknown: ${model.probe_error}` : "none", "evc_modes"],
      ], unsupported.length ? h("details", { class: "more" },
        h("summary", null, `${plural(unsupported.length, "mode")} not supported`),
        h("ul", { class: "plain-list small" }, unsupported.map((m) => h("li", null,
          h("strong", null, m.label), ` (${m.key}): ${m.reason || "not supported"}`)))) : null),
      h("section", { class: "card wide" }, h("h2", null, "Datastores"),
        table(["Datastore", "Type", "Capacity", "Free", "Usage", "Path"], (f.datastores || []).map((d) => {
          const known = dsTotal.get(d.name);
          return h("tr", { dataset: { datastore: d.name } },
            h("td", null, itemLink("datastore", d.name)),
            h("td", null, (known ? known.shared : d.shared) ? "shared" : "local"),
            h("td", null, fmtBytes(d.capacity_bytes)),
            h("td", null, fmtBytes(d.free_bytes)),
            h("td", null, usageBar(d.capacity_bytes - d.free_bytes, d.capacity_bytes)),
            h("td", { class: "mono" }, d.accessible === false ? "not accessible" : d.path || "—"));
        }), { field: "datastores", empty: "This host reports no datastores." })),
      h("section", { class: "card wide" }, h("h2", null, "Networks"),
        table(["Network", "Bridge", "State"], (f.networks || []).map((n) => h("tr", { dataset: { network: n.name } },
          h("td", null, itemLink("network", n.name)),
          h("td", { class: "mono" }, n.bridge || "—"),
          h("td", null, n.present ? stateBadge("present", "ok") : stateBadge("bridge missing", "bad")))),
        { field: "networks", empty: "This host reports no VM networks." })),
      h("section", { class: "card wide" }, h("h2", null, "Virtual machines"), vmsTable(vms, "vms"))));
}

// -- VM --------------------------------------------------------------------------------------------

function renderVm(v) {
  const cfg = v.config || {};
  const host = v.host && state.idx.host.get(v.host);
  const cluster = v.host && state.idx.clusterOfHost.get(v.host);
  const clusterObj = cluster && state.idx.cluster.get(cluster);
  const task = activeTaskFor(v.name);
  const on = v.power_state === "poweredOn";
  const effective = v.evc_mode || (clusterObj && clusterObj.evc_mode) || null;
  const features = (v.cpu && v.cpu.features) || [];
  const actions = [
    h("button", {
      id: "migrate-btn", class: "btn btn-primary", type: "button", disabled: Boolean(task),
      title: task ? `task ${task.id} is migrating this VM` : "Move this VM to another host or datastore",
      onclick: () => openWizard(v.name),
    }, "Migrate..."),
    h("button", {
      id: "power-on-btn", class: "btn", type: "button", disabled: on || Boolean(task),
      title: on ? "the VM is already powered on" : "Start the VM on its host",
      onclick: () => powerAction(v.name, "power-on"),
    }, "Power on"),
    h("button", {
      id: "power-off-btn", class: "btn", type: "button", disabled: !on || Boolean(task),
      title: on ? "Stop the VM at once, as pulling its power" : "the VM is not running",
      onclick: () => confirmPowerOff(v.name),
    }, "Power off"),
  ];
  return h("div", { id: "vm-summary", class: "summary" },
    summaryHeader("vm", v.name, `Virtual machine${host ? ` on ${host.name}` : ""}`, actions, powerBadge(v.power_state)),
    actionMessage(),
    h("div", { id: "vm-task-banner", class: "task-banner", hidden: true }),
    h("div", { class: "cards" },
      card("Summary", [
        ["Power state", POWER_LABEL[v.power_state] || v.power_state, "power_state", null, v.power_state],
        ["Host", v.host ? itemLink("host", v.host) : "none", "host", null, v.host || ""],
        ["Cluster", cluster ? itemLink("cluster", cluster) : "—", "cluster"],
        ["Datastores", vmDatastores(v).map((d, i) => [i ? ", " : "", itemLink("datastore", d)]), "datastores"],
        ["Networks", vmNetworks(v).map((n, i) => [i ? ", " : "", itemLink("network", n)]), "networks"],
        v.qemu_status ? ["QEMU status", v.qemu_status, "qemu_status"] : null,
      ]),
      card("Hardware", [
        ["vCPUs", String(cfg.vcpus ?? "—"), "vcpus"],
        ["Memory", fmtMiB(cfg.memory_mib), "memory"],
        ["CPU", cpuText(v), "cpu", "the CPU the VM runs with (QEMU's -cpu)"],
        ["Configured CPU model", cfg.cpu_model || "—", "cpu_model"],
        ["EVC mode", v.evc_mode ? `${evcText(v.evc_mode)} (this VM's own)`
          : effective ? `${evcText(effective)} (from cluster ${cluster})` : "none", "evc_mode",
        "the baseline the VM gets at its next power-on"],
        ["Machine type", cfg.machine_type || "—", "machine_type"],
      ], features.length ? h("details", { class: "more" },
        h("summary", null, `${plural(features.length, "CPU feature")} the guest was started with`),
        h("p", { class: "mono small wrap" }, features.join(" "))) : null),
      h("section", { class: "card wide" }, h("h2", null, "Disks"),
        table(["Disk", "Datastore", "File", "Size", "Format"], (cfg.disks || []).map((d, i) => h("tr", null,
          h("td", null, `Hard disk ${i + 1}`),
          h("td", null, itemLink("datastore", d.datastore)),
          h("td", { class: "mono" }, d.path),
          h("td", null, fmtMiB(d.size_mib)),
          h("td", null, d.format || "—"))), { field: "disks", empty: "No disks." })),
      card("Files", [
        ["UUID", h("span", { class: "mono" }, v.uuid), "uuid"],
        ["Configuration", h("span", { class: "mono" }, v.config_path || "—"), "config_path"],
        ["Created", fmtDateTime(parseTime(cfg.created_at)), "created_at"],
      ])));
}

/** The "migrating now" line of a VM summary, updated in place as task events arrive. */
function updateVmTaskBanner(v) {
  const el = $("#vm-task-banner");
  if (!el) return;
  const t = activeTaskFor(v.name);
  if (!t) {
    el.hidden = true;
    return;
  }
  el.hidden = false;
  el.replaceChildren(
    h("strong", null, `Migrating (task ${t.id}): `), `${routeText(t)} · ${TYPE_LABEL[(t.request || {}).type] || "migration"} · `,
    `${t.state}${t.phase ? `, phase ${t.phase}` : ""}, ${Math.round(t.progress || 0)} %. `,
    h("a", { href: `#/task/${t.id}` }, "Show the task"));
}

// -- datastore & network -------------------------------------------------------------------------

function renderDatastore(d) {
  const vms = state.data.vms.filter((v) => vmDatastores(v).includes(d.name));
  return h("div", { id: "datastore-summary", class: "summary" },
    summaryHeader("datastore", d.name, `Datastore · ${d.shared ? "shared" : "local"}`),
    h("div", { class: "cards" },
      card("Summary", [
        ["Type", d.shared ? "shared (seen by several hosts)" : "local (one host)", "type"],
        ["Capacity", fmtBytes(d.capacity_bytes), "capacity"],
        ["Free", fmtBytes(d.free_bytes), "free"],
        ["Used", [`${fmtBytes(d.capacity_bytes - d.free_bytes)}`, usageBar(d.capacity_bytes - d.free_bytes, d.capacity_bytes)], "used"],
        ["Hosts", d.hosts.map((n, i) => [i ? ", " : "", itemLink("host", n)]), "hosts"],
      ]),
      h("section", { class: "card wide" }, h("h2", null, "Virtual machines with disks here"), vmsTable(vms, "vms"))));
}

function renderNetwork(n) {
  const vms = state.data.vms.filter((v) => vmNetworks(v).includes(n.name));
  return h("div", { id: "network-summary", class: "summary" },
    summaryHeader("network", n.name, "VM network"),
    h("div", { class: "cards" },
      h("section", { class: "card wide" }, h("h2", null, "Hosts"),
        table(["Host", "Bridge", "State"], n.hosts.map((x) => h("tr", null,
          h("td", null, itemLink("host", x.host)),
          h("td", { class: "mono" }, x.bridge || "—"),
          h("td", null, x.present ? stateBadge("present", "ok") : stateBadge("bridge missing", "bad")))),
        { field: "hosts", empty: "No host reports this network." })),
      h("section", { class: "card wide" }, h("h2", null, "Connected virtual machines"), vmsTable(vms, "vms"))));
}

// ---------------------------------------------------------------------------------------------
// Power

async function powerAction(vm, action) {
  const label = action === "power-on" ? "Powering on" : "Powering off";
  showActionMessage(`${label} ${vm}...`, "info");
  $$("#vm-summary .actions .btn").forEach((b) => { b.disabled = true; });
  try {
    await api(`/v1/vms/${enc(vm)}/${action}`, { method: "POST" });
    showActionMessage(`${vm} is ${action === "power-on" ? "powered on" : "powered off"}.`, "ok");
    state.mainSig = null;
    await refreshInventory();
    showActionMessage(`${vm} is ${action === "power-on" ? "powered on" : "powered off"}.`, "ok");
  } catch (err) {
    state.mainSig = null;
    renderMain(true);
    showActionMessage(`${errorText(err)}`, "bad");
  }
}

function confirmPowerOff(vm) {
  openModal({
    id: "confirm-dialog",
    title: `Power off ${vm}?`,
    body: h("p", null, "The VM stops at once, as if its power were pulled: unsaved guest data is lost. ",
      "The guest is not asked to shut down."),
    buttons: [
      h("button", { id: "confirm-cancel", class: "btn", type: "button", onclick: closeModal }, "Cancel"),
      h("button", {
        id: "confirm-ok", class: "btn btn-danger", type: "button",
        onclick: () => { closeModal(); powerAction(vm, "power-off"); },
      }, "Power off"),
    ],
  });
}

// ---------------------------------------------------------------------------------------------
// Modals

function openModal({ id, title, body, buttons, wide, onClose }) {
  closeModal();
  const dialog = h("div", {
    id, class: `modal${wide ? " wide" : ""}`, role: "dialog", "aria-modal": "true", "aria-labelledby": `${id}-title`,
  },
  h("div", { class: "modal-head" }, h("h2", { id: `${id}-title` }, title),
    h("button", { class: "modal-x", type: "button", "aria-label": "Close", onclick: () => closeModal() }, "×")),
  h("div", { class: "modal-body" }, body),
  buttons ? h("div", { class: "modal-foot" }, buttons) : null);
  const overlay = h("div", { class: "overlay" }, dialog);
  $("#modal-root").append(overlay);
  state.modal = { overlay, onClose };
  const first = dialog.querySelector("input:not([disabled]), select, button.btn-primary, button.btn");
  if (first) first.focus();
  return dialog;
}

function closeModal() {
  if (!state.modal) return;
  const { overlay, onClose } = state.modal;
  state.modal = null;
  overlay.remove();
  if (onClose) onClose();
}

document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && state.modal) closeModal();
});

// ---------------------------------------------------------------------------------------------
// EVC dialog: modes (rows) x hosts (columns), the current mode, a select and Apply.

async function openEvcDialog(clusterName) {
  const body = h("div", { class: "evc-body" }, h("p", { class: "placeholder" }, "Reading the hosts' EVC modes..."));
  openModal({
    id: "evc-dialog",
    title: `Configure EVC: cluster ${clusterName}`,
    wide: true,
    body,
    buttons: [h("button", { id: "evc-close", class: "btn", type: "button", onclick: closeModal }, "Close")],
  });
  try {
    const cluster = await api(`/v1/clusters/${enc(clusterName)}`);
    if (!$("#evc-dialog")) return;
    renderEvcBody(body, cluster);
  } catch (err) {
    clear(body).append(h("p", { id: "evc-error", class: "form-error" }, errorText(err)));
  }
}

function renderEvcBody(body, cluster, message) {
  const hosts = cluster.hosts;
  const modes = cluster.evc_modes || [];
  const current = cluster.evc_mode;
  const select = h("select", { id: "evc-select", "aria-label": "EVC mode" },
    h("option", { value: "" }, "Disable EVC"),
    modes.map((m) => {
      const ok = hosts.every((n) => m.hosts[n] && m.hosts[n].supported);
      return h("option", { value: m.key }, `${m.label}${ok ? "" : "  (not supported by every host)"}`);
    }));
  select.value = current || "";
  const explain = h("p", { id: "evc-explain", class: "evc-explain" });
  const error = h("p", { id: "evc-error", class: "form-error", role: "alert", hidden: true });
  const ok = h("p", { id: "evc-result", class: "form-ok", role: "status", hidden: !message }, message || "");
  const apply = h("button", { id: "evc-apply", class: "btn btn-primary", type: "button" }, "Apply");

  const describe = () => {
    const key = select.value;
    apply.disabled = (key || null) === (current || null);
    if (!key) {
      explain.textContent = current
        ? "Disabling EVC: VMs powered on from now get their own CPU model; VMs already running keep theirs."
        : "EVC is disabled: each VM runs with its configured CPU model.";
      return;
    }
    const m = modes.find((x) => x.key === key);
    const lacking = hosts.filter((n) => !(m.hosts[n] && m.hosts[n].supported));
    if (!lacking.length) {
      explain.textContent = `${m.label}: every host supports it (${plural(m.feature_count, "CPU feature")}). `
        + "Powered-on VMs using features beyond it would have to be power-cycled; the center checks that on Apply.";
    } else {
      explain.textContent = `${m.label} is not supported by ${lacking.map((n) => {
        const miss = (m.hosts[n] && m.hosts[n].missing) || [];
        return miss.length ? `${n} (lacks ${miss.join(", ")})` : n;
      }).join("; ")}: the center will refuse it. Choose a mode with "yes" in every column.`;
    }
  };
  select.addEventListener("change", () => {
    describe();
    error.hidden = true;
    ok.hidden = true;
  });

  apply.addEventListener("click", async () => {
    const key = select.value || null;
    apply.disabled = true;
    apply.textContent = "Applying...";
    error.hidden = true;
    ok.hidden = true;
    try {
      const updated = await api(`/v1/clusters/${enc(cluster.name)}/evc`, { method: "PUT", body: { mode: key } });
      refreshSoon(0);
      renderEvcBody(body, updated, key
        ? `EVC mode set to ${evcText(key)}. VMs get it at their next power-on.`
        : "EVC disabled for this cluster.");
    } catch (err) {
      apply.textContent = "Apply";
      apply.disabled = false;
      error.textContent = `${errorText(err)}${evcHint(err)}`;
      error.hidden = false;
    }
  });

  const headRow = h("tr", null, h("th", null, "EVC mode"), hosts.map((n) => h("th", { class: "host-col" }, n)));
  const rows = modes.map((m) => h("tr", {
    class: m.key === current ? "current" : "",
    dataset: { mode: m.key },
    onclick: () => { select.value = m.key; select.dispatchEvent(new Event("change")); },
  },
  h("th", { scope: "row", class: "mode-label" }, m.label,
    h("span", { class: "mode-key" }, m.key),
    m.key === current ? h("span", { class: "badge info" }, "current") : null),
  hosts.map((n) => {
    const cell = m.hosts[n];
    const yes = Boolean(cell && cell.supported);
    const missing = (cell && cell.missing) || [];
    return h("td", {
      class: yes ? "yes" : "no",
      dataset: { host: n },
      title: yes ? `${n} supports ${m.label}` : `${n} lacks ${missing.join(", ") || "this mode"}`,
    }, yes ? "yes" : "no");
  })));
  clear(body).append(
    h("p", { class: "evc-current-line" }, "Current EVC mode: ",
      h("strong", { id: "evc-current" }, current ? `${evcLabel(current)} (${current})` : "Disabled")),
    h("p", { class: "hint" },
      "EVC gives every VM powered on in the cluster the same baseline CPU, so any VM can move to any host. "
      + "A mode is possible when every host supports it (\"yes\" in every column)."),
    modes.length
      ? h("div", { class: "evc-table-wrap" }, h("table", { class: "grid evc-table" }, h("thead", null, headRow), h("tbody", null, rows)))
      : h("p", { class: "empty" }, "The hosts report no EVC modes (their CPU probe failed, or the cluster has no hosts)."),
    h("div", { class: "evc-controls" }, h("label", { for: "evc-select" }, "EVC mode"), select, apply),
    explain, error, ok);
  describe();
}

function evcHint(err) {
  if (!(err instanceof ApiError)) return "";
  if (err.code === "evc_mode_refused" && /power/.test(err.message)) {
    return " — power the named VMs off and on again later, or choose a mode they already fit.";
  }
  if (err.code === "evc_mode_refused") return " — choose a mode every host supports.";
  return "";
}

// ---------------------------------------------------------------------------------------------
// Migrate wizard

const WIZ_STEPS = ["Select a migration type", "Select the destination", "Select options", "Ready to complete"];

function openWizard(vmName) {
  const vm = state.idx.vm.get(vmName);
  if (!vm) return;
  const wiz = {
    vm: vmName,
    source: vm.host,
    step: 1,
    type: "compute",
    host: null,
    datastore: null,
    priority: "normal",
    downtime: 100,
    hostChecks: new Map(), // "type|host" -> {status, result|error}
    dsChecks: new Map(), // "type|host|ds" -> ...
    review: null, // {key, status, result|error}
    busy: false,
  };
  const dialog = openModal({
    id: "wizard",
    title: `Migrate ${vmName}`,
    wide: true,
    body: h("div", { class: "wizard" },
      h("ol", { class: "wizard-steps" }, WIZ_STEPS.map((t, i) => h("li", { dataset: { step: String(i + 1) } }, t))),
      h("div", { class: "wizard-content" },
        h("div", { class: "wizard-page", id: "wizard-page" }),
        h("p", { id: "wizard-error", class: "form-error", role: "alert", hidden: true }))),
    buttons: [
      h("button", { id: "wizard-cancel", class: "btn btn-link", type: "button", onclick: closeModal }, "Cancel"),
      h("span", { class: "spacer" }),
      h("button", { id: "wizard-back", class: "btn", type: "button", onclick: () => wizardGo(wiz, -1) }, "Back"),
      h("button", { id: "wizard-next", class: "btn btn-primary", type: "button", onclick: () => wizardGo(wiz, 1) }, "Next"),
      h("button", { id: "wizard-finish", class: "btn btn-primary", type: "button", onclick: () => wizardFinish(wiz) }, "Finish"),
    ],
    onClose: () => { wiz.closed = true; },
  });
  wiz.dialog = dialog;
  renderWizard(wiz);
}

function wizardGo(wiz, delta) {
  if (delta > 0 && !wizardValid(wiz).ok) return;
  wiz.step = Math.min(4, Math.max(1, wiz.step + delta));
  wizardError(null);
  renderWizard(wiz);
}

function wizardError(text) {
  const el = $("#wizard-error");
  if (!el) return;
  el.textContent = text || "";
  el.hidden = !text;
}

function needsHost(type) {
  return type === "compute" || type === "both";
}

function needsDatastore(type) {
  return type === "storage" || type === "both";
}

/** Can the user go on from this step? {ok, why} */
function wizardValid(wiz) {
  if (wiz.step === 1) return { ok: Boolean(wiz.type), why: "Choose a migration type." };
  if (wiz.step === 2) {
    if (needsHost(wiz.type)) {
      if (!wiz.host) return { ok: false, why: "Select a destination host." };
      const c = wiz.hostChecks.get(`${wiz.type}|${wiz.host}`);
      if (!c || c.status === "checking") return { ok: false, why: `Checking ${wiz.host}...` };
      if (c.level === "error") {
        return { ok: false, why: `${wiz.host} cannot take this VM (see its errors): choose another host${wiz.type === "compute" ? ", or change both compute resource and storage" : ""}.` };
      }
    }
    if (needsDatastore(wiz.type)) {
      if (!wiz.datastore) return { ok: false, why: "Select a destination datastore." };
      const c = wiz.dsChecks.get(dsKey(wiz, wiz.datastore));
      if (!c || c.status === "checking") return { ok: false, why: `Checking datastore ${wiz.datastore}...` };
      if (c.level === "error") return { ok: false, why: `Datastore ${wiz.datastore} cannot take the disks (see its errors): choose another.` };
    }
    return { ok: true };
  }
  if (wiz.step === 3) {
    const d = Number(wiz.downtime);
    if (!Number.isInteger(d) || d < 1 || d > 60000) {
      return { ok: false, why: "The downtime limit is a whole number of milliseconds from 1 to 60000." };
    }
    return { ok: true };
  }
  return { ok: true };
}

function renderWizard(wiz) {
  if (wiz.closed) return;
  $$(".wizard-steps li", wiz.dialog).forEach((li) => {
    const n = Number(li.dataset.step);
    li.className = n === wiz.step ? "current" : n < wiz.step ? "done" : "";
  });
  const page = $("#wizard-page");
  clear(page);
  if (wiz.step === 1) page.append(wizardTypePage(wiz));
  else if (wiz.step === 2) page.append(wizardDestPage(wiz));
  else if (wiz.step === 3) page.append(wizardOptionsPage(wiz));
  else page.append(wizardReviewPage(wiz));
  updateWizardButtons(wiz);
}

function updateWizardButtons(wiz) {
  if (wiz.closed) return;
  const valid = wizardValid(wiz);
  $("#wizard-back").disabled = wiz.step === 1 || wiz.busy;
  $("#wizard-next").disabled = wiz.step === 4 || !valid.ok || wiz.busy;
  const review = wiz.review;
  const reviewBlocked = !review || review.status === "checking" || (review.result && !review.result.ok);
  $("#wizard-finish").disabled = wiz.step !== 4 || wiz.busy || reviewBlocked;
  const hint = $("#wizard-hint");
  if (hint) {
    hint.textContent = valid.ok ? "" : valid.why;
    hint.hidden = valid.ok;
  }
}

function wizardTypePage(wiz) {
  return h("div", null,
    h("h3", null, "Select a migration type"),
    h("p", { class: "hint" }, `VM ${wiz.vm} runs on ${wiz.source || "no host"}. Change the compute resource, the storage, or both.`),
    h("div", { class: "radio-list" }, MIGRATION_TYPES.map((t) => h("label", { class: "radio-card" },
      h("input", {
        type: "radio", name: "mtype", value: t.value, checked: wiz.type === t.value,
        onchange: () => {
          wiz.type = t.value;
          wiz.host = null;
          wiz.datastore = null;
          wiz.review = null;
          updateWizardButtons(wiz);
        },
      }),
      h("span", null, h("strong", null, t.label), h("span", { class: "radio-help" }, t.help))))));
}

function dsKey(wiz, ds) {
  return `${wiz.type}|${wiz.type === "storage" ? wiz.source : wiz.host}|${ds}`;
}

function wizardDestPage(wiz) {
  const wrap = h("div", null);
  if (needsHost(wiz.type)) {
    const hosts = state.data.hosts.filter((x) => x.name !== wiz.source);
    wrap.append(
      h("h3", null, "Select a compute resource"),
      h("p", { class: "hint" }, wiz.type === "both"
        ? "Each host is checked for this VM's memory and CPU (migration network, CPU compatibility, networks, memory); the disks move too, so shared storage is not needed."
        : "Each host is checked as vMotion requires: shared storage, a migration network on both hosts, CPU compatibility, the VM's networks and enough memory."),
      hosts.length ? h("table", { class: "grid candidates", id: "host-candidates" },
        h("thead", null, h("tr", null, h("th", null, ""), h("th", null, "Host"), h("th", null, "Cluster"),
          h("th", null, "CPU"), h("th", null, "Memory free"), h("th", null, "Compatibility"))),
        h("tbody", null, hosts.map((x) => hostCandidate(wiz, x))))
        : h("p", { class: "empty" }, "There is no other host to move to."));
    for (const x of hosts) runHostCheck(wiz, x.name);
  }
  if (needsDatastore(wiz.type)) {
    const on = wiz.type === "storage" ? wiz.source : wiz.host;
    const section = h("div", { id: "ds-section" });
    wrap.append(section);
    renderDsSection(wiz, section, on);
  }
  wrap.append(h("p", { id: "wizard-hint", class: "hint wizard-hint", hidden: true }));
  return wrap;
}

function hostCandidate(wiz, x) {
  const f = x.facts || {};
  const cpu = f.cpu || {};
  const radio = h("input", {
    type: "radio", name: "dest-host", value: x.name, checked: wiz.host === x.name,
    "aria-label": `host ${x.name}`,
    onchange: () => {
      wiz.host = x.name;
      wiz.datastore = null;
      wiz.review = null;
      $$("#host-candidates tr.chosen").forEach((r) => r.classList.remove("chosen"));
      radio.closest("tr").classList.add("chosen");
      if (wiz.type === "both") renderDsSection(wiz, $("#ds-section"), x.name);
      updateWizardButtons(wiz);
    },
  });
  return h("tr", {
    class: wiz.host === x.name ? "chosen" : "",
    dataset: { candidateHost: x.name },
    onclick: (ev) => { if (ev.target !== radio && !ev.target.closest("a")) radio.click(); },
  },
  h("td", { class: "pick" }, radio),
  h("td", null, h("strong", null, x.name), x.connection !== "connected" ? [" ", connectionBadge(x.connection)] : null),
  h("td", null, state.idx.clusterOfHost.get(x.name) || "—"),
  h("td", null, vendorName(cpu.vendor), f.cpu_model && f.cpu_model.highest_evc_mode
    ? h("div", { class: "muted small" }, `EVC up to ${shortMode(f.cpu_model.highest_evc_mode)}`) : null),
  h("td", null, f.memory ? fmtBytes(f.memory.available_bytes) : "—"),
  h("td", { class: "compat-cell" }, compatView(wiz.hostChecks.get(`${wiz.type}|${x.name}`))));
}

function renderDsSection(wiz, section, hostName) {
  if (!section) return;
  clear(section);
  section.append(h("h3", null, wiz.type === "both" ? "Select storage on the destination" : "Select storage"));
  if (!hostName) {
    section.append(h("p", { class: "hint" }, "Select a host first: its datastores are listed here."));
    return;
  }
  const host = state.idx.host.get(hostName);
  const sources = new Set(vmDatastores(state.idx.vm.get(wiz.vm) || { config: {} }));
  const list = ((host && host.facts && host.facts.datastores) || []).filter((d) => d.accessible !== false);
  section.append(h("p", { class: "hint" }, `Datastores of ${hostName}. Every disk of ${wiz.vm} (now on ${[...sources].join(", ") || "no datastore"}) moves to the one you choose; it needs the disks' size plus 10 % free.`));
  if (!list.length) {
    section.append(h("p", { class: "empty" }, `${hostName} reports no datastores.`));
    return;
  }
  const shared = new Map(state.data.datastores.map((d) => [d.name, d.shared]));
  section.append(h("table", { class: "grid candidates", id: "ds-candidates" },
    h("thead", null, h("tr", null, h("th", null, ""), h("th", null, "Datastore"), h("th", null, "Type"),
      h("th", null, "Capacity"), h("th", null, "Free"), h("th", null, "Compatibility"))),
    h("tbody", null, list.map((d) => {
      const radio = h("input", {
        type: "radio", name: "dest-ds", value: d.name, checked: wiz.datastore === d.name,
        "aria-label": `datastore ${d.name}`,
        onchange: () => {
          wiz.datastore = d.name;
          wiz.review = null;
          $$("#ds-candidates tr.chosen").forEach((r) => r.classList.remove("chosen"));
          radio.closest("tr").classList.add("chosen");
          updateWizardButtons(wiz);
        },
      });
      return h("tr", {
        class: wiz.datastore === d.name ? "chosen" : "",
        dataset: { candidateDs: d.name },
        onclick: (ev) => { if (ev.target !== radio) radio.click(); },
      },
      h("td", { class: "pick" }, radio),
      h("td", null, h("strong", null, d.name), sources.has(d.name) ? h("span", { class: "tag" }, "current") : null),
      h("td", null, (shared.get(d.name) ?? d.shared) ? "shared" : "local"),
      h("td", null, fmtBytes(d.capacity_bytes)),
      h("td", null, fmtBytes(d.free_bytes)),
      h("td", { class: "compat-cell" }, compatView(wiz.dsChecks.get(dsKey(wiz, d.name)))));
    }))));
  for (const d of list) runDsCheck(wiz, hostName, d.name);
}

/** The compatibility cell: "Compatible" / "Warnings" / "Errors" then the reasons. */
function compatView(check) {
  if (!check || check.status === "checking") {
    return h("div", { class: "compat checking" }, h("span", { class: "spinner", "aria-hidden": "true" }), "Checking...");
  }
  const level = check.level;
  const label = level === "ok" ? "Compatible" : level === "warn" ? "Warnings" : "Errors";
  return h("div", { class: `compat ${level}` },
    h("span", { class: "compat-status" }, label),
    check.reasons.length ? h("ul", { class: "compat-reasons" }, check.reasons.map((r) => h("li", { class: r.level },
      h("span", { class: "reason-text" }, r.message), r.code ? [" ", h("code", null, r.code)] : null))) : null);
}

function precheckBody(wiz, { host, datastore, predict = false, type = wiz.type } = {}) {
  const body = {
    type,
    downtime_ms: Number(wiz.downtime) || 100,
    priority: wiz.priority,
  };
  if (host) body.host = host;
  if (datastore) body.datastore = datastore;
  if (predict) body.predict = true;
  return body;
}

/** A precheck's answer (or its refusal) as a compatibility level and reasons. */
function toCheck(result, { ignore = [] } = {}) {
  const errors = (result.errors || []).filter((e) => !ignore.includes(e.code));
  const warnings = result.warnings || [];
  return {
    status: "done",
    result,
    level: errors.length ? "error" : warnings.length ? "warn" : "ok",
    reasons: [
      ...errors.map((e) => ({ level: "error", code: e.code, message: e.message })),
      ...warnings.map((w) => ({ level: "warn", code: w.code, message: w.message })),
    ],
  };
}

function failedCheck(err) {
  return {
    status: "done",
    level: "error",
    reasons: [{ level: "error", code: err.code || "client", message: errorText(err) }],
  };
}

async function runHostCheck(wiz, hostName) {
  const key = `${wiz.type}|${hostName}`;
  if (wiz.hostChecks.has(key)) return;
  wiz.hostChecks.set(key, { status: "checking" });
  // "Both" has no host-only check: the compute check stands in, without its shared-storage
  // finding (the disks move with the VM); each datastore is then checked as "both".
  const type = wiz.type === "both" ? "compute" : wiz.type;
  const ignore = wiz.type === "both" ? ["datastore_not_shared"] : [];
  let check;
  try {
    const result = await api(`/v1/vms/${enc(wiz.vm)}/migrate/precheck`, {
      method: "POST", body: precheckBody(wiz, { host: hostName, type }),
    });
    check = toCheck(result, { ignore });
  } catch (err) {
    check = failedCheck(err);
  }
  wiz.hostChecks.set(key, check);
  if (wiz.closed || wiz.step !== 2) return;
  const cell = $(`#host-candidates [data-candidate-host="${CSS.escape(hostName)}"] .compat-cell`);
  if (cell && key === `${wiz.type}|${hostName}`) cell.replaceChildren(compatView(check));
  updateWizardButtons(wiz);
}

async function runDsCheck(wiz, hostName, ds) {
  const key = dsKey(wiz, ds);
  if (wiz.dsChecks.has(key)) return;
  wiz.dsChecks.set(key, { status: "checking" });
  let check;
  try {
    const body = precheckBody(wiz, { host: wiz.type === "storage" ? undefined : hostName, datastore: ds });
    const result = await api(`/v1/vms/${enc(wiz.vm)}/migrate/precheck`, { method: "POST", body });
    check = toCheck(result);
  } catch (err) {
    check = failedCheck(err);
  }
  wiz.dsChecks.set(key, check);
  if (wiz.closed || wiz.step !== 2 || key !== dsKey(wiz, ds)) return;
  const cell = $(`#ds-candidates [data-candidate-ds="${CSS.escape(ds)}"] .compat-cell`);
  if (cell) cell.replaceChildren(compatView(check));
  updateWizardButtons(wiz);
}

function wizardOptionsPage(wiz) {
  const storageOnly = wiz.type === "storage";
  const priority = h("select", {
    id: "priority",
    onchange: () => { wiz.priority = priority.value; wiz.review = null; },
  },
  h("option", { value: "normal" }, "Normal: brake the guest only as much as convergence needs"),
  h("option", { value: "high" }, "High: brake the guest harder to finish sooner"));
  priority.value = wiz.priority;
  const downtime = h("input", {
    id: "downtime", type: "number", min: "1", max: "60000", step: "1", value: String(wiz.downtime),
    oninput: () => {
      wiz.downtime = downtime.value === "" ? "" : Number(downtime.value);
      wiz.review = null;
      updateWizardButtons(wiz);
    },
  });
  return h("div", null,
    h("h3", null, "Select options"),
    storageOnly ? h("p", { class: "hint" }, "A storage-only migration copies disks while the VM runs; it has no switchover, so these settings change little.") : null,
    h("div", { class: "form-grid" },
      h("label", { for: "priority" }, "vMotion priority"),
      h("div", null, priority, h("p", { class: "hint" }, "How hard kvmotion may slow the guest's CPU (its brake) when the guest dirties memory faster than the link carries.")),
      h("label", { for: "downtime" }, "Downtime limit (ms)"),
      h("div", null, downtime, h("p", { class: "hint" }, "The longest stun QEMU may choose at switchover (1 to 60000 ms; 100 ms is unnoticeable for most users)."))),
    h("p", { id: "wizard-hint", class: "hint wizard-hint", hidden: true }));
}

function wizardReviewPage(wiz) {
  const vm = state.idx.vm.get(wiz.vm);
  const rows = [
    ["VM", wiz.vm],
    ["Migration type", TYPE_LABEL[wiz.type]],
    ["Source host", wiz.source || "—"],
    ["Destination host", needsHost(wiz.type) ? wiz.host : `${wiz.source} (unchanged)`],
    ["Disks", needsDatastore(wiz.type)
      ? `to datastore ${wiz.datastore} (now on ${vm ? vmDatastores(vm).join(", ") : "?"})`
      : `stay on ${vm ? vmDatastores(vm).join(", ") : "?"}`],
    ["Priority", wiz.priority],
    ["Downtime limit", `${wiz.downtime} ms`],
  ];
  const review = h("dl", { id: "review", class: "props review" }, rows.map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
  const prediction = h("div", { id: "prediction", class: "prediction" });
  runReview(wiz, prediction);
  return h("div", null,
    h("h3", null, "Ready to complete"),
    h("p", { class: "hint" }, "Review your choices. Finish starts the migration; it then shows in Recent Tasks, where you can follow or cancel it."),
    review,
    h("h4", null, "Prediction"),
    prediction);
}

async function runReview(wiz, el) {
  const predict = needsHost(wiz.type);
  const body = precheckBody(wiz, {
    host: needsHost(wiz.type) ? wiz.host : undefined,
    datastore: needsDatastore(wiz.type) ? wiz.datastore : undefined,
    predict,
  });
  const key = JSON.stringify(body);
  if (wiz.review && wiz.review.key === key && wiz.review.status === "done") {
    showReview(wiz, el, wiz.review);
    return;
  }
  wiz.review = { key, status: "checking" };
  el.replaceChildren(h("span", { class: "spinner", "aria-hidden": "true" }),
    predict ? "Checking again and predicting (the guest's dirty rate is sampled for about a second)..." : "Checking again...");
  updateWizardButtons(wiz);
  let review;
  try {
    review = { key, status: "done", result: await api(`/v1/vms/${enc(wiz.vm)}/migrate/precheck`, { method: "POST", body }) };
  } catch (err) {
    review = { key, status: "done", error: err, result: { ok: false, errors: [] } };
  }
  if (wiz.closed || !wiz.review || wiz.review.key !== key) return;
  wiz.review = review;
  if (wiz.step === 4) showReview(wiz, el, review);
  updateWizardButtons(wiz);
}

function showReview(wiz, el, review) {
  const r = review.result || {};
  const parts = [];
  if (review.error) {
    wizardError(`${errorText(review.error)}. Go back and change your choices, or cancel.`);
  } else if (!r.ok) {
    wizardError(`The precheck now refuses this migration: ${(r.errors || []).map((e) => `error (${e.code}): ${e.message}`).join("; ")}. Go back and choose again.`);
  } else {
    wizardError(null);
  }
  for (const w of r.warnings || []) parts.push(h("p", { class: "warn-text" }, `warning (${w.code}): ${w.message}`));
  const p = r.prediction;
  if (p) {
    const brake = p.needs_brake ? `, braking the guest's CPU to ${p.brake_pct} %` : "";
    parts.push(h("dl", { class: "props prediction-figures" },
      h("dt", null, "Predicted total time"), h("dd", { dataset: { field: "predicted_total" } }, `about ${fmtSeconds(p.total_s)} over ${plural(p.passes, "pass", "passes")}`),
      h("dt", null, "Predicted downtime"), h("dd", { dataset: { field: "predicted_downtime" } }, p.downtime_ms === null || p.downtime_ms === undefined ? "—" : `about ${Math.round(p.downtime_ms)} ms (limit ${wiz.downtime} ms)`),
      h("dt", null, "Converges"), h("dd", null, `${p.converges ? "yes" : "NO"}${brake}`),
      h("dt", null, "Measured"), h("dd", null, `the guest dirties ${fmtBytes(p.sampled_dirty_bps)}/s; link ${fmtLink(p.link_bps)}`)),
    h("p", { class: "hint" }, p.reason || ""));
  } else if (r.prediction_error) {
    parts.push(h("p", null, `No prediction: ${r.prediction_error}. The migration can still run.`));
  } else if (!needsHost(wiz.type)) {
    parts.push(h("p", null, "No prediction for a storage-only migration: the copy's time depends on the disks' size and the datastores' speed."));
  } else if (r.ok) {
    parts.push(h("p", null, "No prediction was returned."));
  }
  if (r.ok && !parts.length) parts.push(h("p", null, "The precheck passed."));
  el.replaceChildren(...parts);
}

async function wizardFinish(wiz) {
  if (wiz.busy || wiz.step !== 4) return;
  wiz.busy = true;
  updateWizardButtons(wiz);
  $("#wizard-finish").textContent = "Starting...";
  const body = precheckBody(wiz, {
    host: needsHost(wiz.type) ? wiz.host : undefined,
    datastore: needsDatastore(wiz.type) ? wiz.datastore : undefined,
  });
  try {
    const task = await api(`/v1/vms/${enc(wiz.vm)}/migrate`, { method: "POST", body });
    closeModal();
    upsertTask(task);
    flashTask(task.id);
    setTasksMessage(`Task ${task.id} started: ${TYPE_LABEL[wiz.type].toLowerCase()} for ${wiz.vm}.`, "ok");
  } catch (err) {
    wiz.busy = false;
    if (!wiz.closed) {
      $("#wizard-finish").textContent = "Finish";
      wizardError(`${errorText(err)}. Nothing was changed: go back and choose again, or cancel.`);
      updateWizardButtons(wiz);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Recent Tasks: rows updated in place from the stream

function routeText(t) {
  const req = t.request || {};
  const ds = req.datastore ? `, disks to ${req.datastore}` : "";
  if (req.type === "storage") return `on ${req.source || "?"}${ds}`;
  if (req.source || req.dest) return `${req.source || "?"} → ${req.dest || "?"}${ds}`;
  return ds.slice(2);
}

function upsertTask(task) {
  const old = state.tasks.get(task.id);
  state.tasks.set(task.id, task);
  renderTaskRow(task);
  const ended = old && !FINAL_STATES.has(old.state) && FINAL_STATES.has(task.state);
  const started = !old || old.state !== task.state;
  if (ended || started) {
    renderTree();
    refreshSoon(ended ? 100 : 400);
  }
  if (state.route.view === "item" && state.route.kind === "vm" && state.route.name === task.target) {
    renderMain();
    updateVmTaskBanner(state.idx ? state.idx.vm.get(task.target) || { name: task.target } : { name: task.target });
  }
  if (state.route.view === "task" && state.route.id === task.id) renderMain();
  if (state.route.view === "item" && state.route.kind === "datacenter" && (ended || started)) renderMain();
}

function renderTaskRow(t) {
  const tbody = $("#tasks-rows");
  let row = state.taskRows.get(t.id);
  if (!row) {
    row = h("tr", {
      class: "task-row",
      tabindex: "0",
      dataset: { taskId: String(t.id) },
      title: "Show this task's timeline, figures and chart",
      onclick: (ev) => {
        if (ev.target.closest("button")) return;
        navigate({ view: "task", id: t.id });
      },
      onkeydown: (ev) => {
        if (ev.key === "Enter" && ev.target === row) navigate({ view: "task", id: t.id });
      },
    },
    h("td", { class: "col-id" }, String(t.id)),
    h("td", { class: "vm" }),
    h("td", { class: "type" }),
    h("td", { class: "route" }),
    h("td", null, h("span", { class: "state" })),
    h("td", { class: "phase" }),
    h("td", { class: "col-progress" }, h("div", { class: "progress" },
      h("div", { class: "bar" }, h("div", { class: "fill" })),
      h("span", { class: "progress-text" }))),
    h("td", { class: "started" }),
    h("td", { class: "duration" }),
    h("td", { class: "task-actions" }));
    state.taskRows.set(t.id, row);
    // Newest first.
    const after = [...state.taskRows.entries()].filter(([id]) => id < t.id).sort((a, b) => b[0] - a[0])[0];
    const before = [...state.taskRows.entries()].filter(([id]) => id > t.id).sort((a, b) => a[0] - b[0])[0];
    if (before) before[1].after(row);
    else if (after) after[1].before(row);
    else tbody.prepend(row);
  }
  const req = t.request || {};
  const created = parseTime(t.created_at);
  const finished = parseTime(t.finished_at);
  const running = !FINAL_STATES.has(t.state);
  $(".vm", row).textContent = t.target || req.vm || "—";
  $(".type", row).textContent = req.type || t.kind || "—";
  $(".route", row).textContent = routeText(t) || "—";
  const stateEl = $(".state", row);
  stateEl.textContent = t.state;
  stateEl.className = `state badge ${stateClass(t.state)}`;
  stateEl.title = t.error ? `error (${t.error_code}): ${t.error}` : t.state;
  $(".phase", row).textContent = t.phase || "—";
  const pct = Math.max(0, Math.min(100, Number(t.progress) || 0));
  const fill = $(".fill", row);
  fill.style.width = `${pct}%`;
  fill.className = `fill ${stateClass(t.state)}`;
  $(".progress-text", row).textContent = `${Math.round(pct)} %`;
  $(".started", row).textContent = fmtClock(created);
  $(".duration", row).textContent = created
    ? fmtDuration(((finished || (running ? new Date() : null)) || created) - created) : "—";
  const actions = $(".task-actions", row);
  const want = running ? (t.cancel_requested ? "cancelling" : "cancel") : "none";
  if (actions.dataset.mode !== want) {
    actions.dataset.mode = want;
    clear(actions);
    if (want === "cancel") {
      actions.append(h("button", {
        class: "btn btn-small cancel-btn", type: "button",
        title: "Cancel: the VM keeps running where it was, on its disks (possible until switchover)",
        onclick: (ev) => { ev.stopPropagation(); cancelTask(t.id, ev.currentTarget); },
      }, "Cancel"));
    } else if (want === "cancelling") {
      actions.append(h("span", { class: "muted" }, "cancelling..."));
    }
  }
  $("#tasks-empty").hidden = state.taskRows.size > 0;
}

function stateClass(st) {
  return { success: "ok", error: "bad", cancelled: "warn", running: "info", queued: "muted" }[st] || "muted";
}

function flashTask(id) {
  const row = state.taskRows.get(id);
  if (!row) return;
  row.classList.add("flash");
  setTimeout(() => row.classList.remove("flash"), 2000);
  row.scrollIntoView({ block: "nearest" });
}

let tasksMessageTimer = null;
function setTasksMessage(text, kind = "info") {
  const el = $("#tasks-message");
  el.textContent = text;
  el.className = `tasks-message ${kind}`;
  clearTimeout(tasksMessageTimer);
  tasksMessageTimer = setTimeout(() => { el.textContent = ""; }, kind === "bad" ? 15000 : 6000);
}

async function cancelTask(id, button) {
  if (button) {
    button.disabled = true;
    button.textContent = "Cancelling...";
  }
  try {
    const task = await api(`/v1/tasks/${id}/cancel`, { method: "POST" });
    upsertTask(task);
    setTasksMessage(`Cancelling task ${id}: the VM stays where it was.`, "info");
  } catch (err) {
    if (button) {
      button.disabled = false;
      button.textContent = "Cancel";
    }
    setTasksMessage(`Task ${id}: ${errorText(err)}`, "bad");
  }
}

// Keep the durations of running tasks ticking.
setInterval(() => {
  for (const t of state.tasks.values()) if (!FINAL_STATES.has(t.state)) renderTaskRow(t);
}, 1000);

// -- the stream: fetch() + a reader, SSE parsed by hand, reconnect with backoff --------------------

function startStream() {
  stopStream();
  const ctl = { controller: new AbortController(), backoff: 1000, timer: null, gen: state.generation };
  state.stream = ctl;
  // Fill the panel at once, then follow the stream.
  api(`/v1/tasks?limit=${TASK_LIMIT}`).then((tasks) => {
    if (ctl === state.stream) for (const t of tasks.slice().reverse()) upsertTask(t);
  }).catch(() => {});
  connectStream(ctl);
}

/** The center answers again: a stream waiting out its backoff reconnects now. */
function kickStream() {
  const ctl = state.stream;
  if (!ctl || !ctl.waiting) return;
  clearTimeout(ctl.timer);
  ctl.waiting = false;
  ctl.backoff = 1000;
  connectStream(ctl);
}

/** Drop the current stream connection and connect again (with the usual backoff). */
function restartStream(why) {
  const ctl = state.stream;
  if (!ctl || ctl.waiting) return;
  ctl.restartWhy = why;
  ctl.reader?.cancel().catch(() => {});
}

function stopStream() {
  const ctl = state.stream;
  state.stream = null;
  if (ctl) {
    clearTimeout(ctl.timer);
    ctl.controller.abort();
  }
}

function setStreamStatus(text, kind) {
  const el = $("#stream-status");
  el.textContent = text;
  el.className = `stream-status ${kind}`;
}

async function connectStream(ctl) {
  if (ctl !== state.stream) return;
  setStreamStatus("connecting...", "muted");
  let why = "the stream ended";
  try {
    const resp = await fetch(`/v1/tasks-stream?limit=${TASK_LIMIT}`, {
      headers: { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" },
      signal: ctl.controller.signal,
      cache: "no-store",
    });
    if (resp.status === 401) {
      const data = await resp.json().catch(() => ({}));
      const e = (data && data.error) || {};
      sessionExpired(new ApiError(401, e.code || "unauthorized", e.message || "token refused"));
      return;
    }
    if (!resp.ok || !resp.body) throw new Error(`the center answered ${resp.status}`);
    setStreamStatus("live", "ok");
    const reader = resp.body.getReader();
    ctl.reader = reader;
    // The center writes at least a comment every 15 s: 45 s of silence is a dead connection.
    let heard = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - heard > 45000) restartStream("no data for 45 s");
    }, 5000);
    try {
      await readServerSentEvents(reader, () => { heard = Date.now(); }, (type, data) => {
        ctl.backoff = 1000;
        dispatchStreamEvent(type, data);
      });
    } finally {
      clearInterval(watchdog);
      ctl.reader = null;
    }
    if (ctl.restartWhy) why = ctl.restartWhy;
  } catch (err) {
    if (err.name === "AbortError" || ctl !== state.stream) return;
    why = err.message || String(err);
  }
  if (ctl !== state.stream) return;
  const wait = ctl.backoff;
  ctl.backoff = Math.min(ctl.backoff * 2, 30000);
  ctl.restartWhy = null;
  ctl.waiting = true;
  setStreamStatus(`disconnected (${why}); reconnecting in ${Math.round(wait / 1000)} s`, "bad");
  ctl.timer = setTimeout(() => {
    ctl.waiting = false;
    connectStream(ctl);
  }, wait);
}

/** Read a text/event-stream until it ends: `onEvent(type, data)` per event; comments (the
 * center's keep-alives) and every chunk count as signs of life (`onBytes`). */
async function readServerSentEvents(reader, onBytes, onEvent) {
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { type: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onBytes();
    buffer += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") {
        if (event.data.length) onEvent(event.type, event.data.join("\n"));
        event = { type: "message", data: [] };
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") event.type = val;
        else if (field === "data") event.data.push(val);
      }
    }
  }
}

function dispatchStreamEvent(type, data) {
  if (type !== "task") return;
  let task;
  try {
    task = JSON.parse(data);
  } catch {
    return;
  }
  if (task && typeof task.id === "number") upsertTask(task);
}

// ---------------------------------------------------------------------------------------------
// Task detail: timeline, figures, error, chart

function timelineSteps(task) {
  const entries = (task.timeline || []).slice().sort((a, b) => Number(a.time) - Number(b.time));
  if (!entries.length) return [];
  const req = entries.find((e) => e.step === "requested");
  const start = Number((req || entries[0]).time);
  return entries.map((e) => {
    let text = STEP_TEXT[e.step] || "";
    if (e.detail) text = text ? `${text} (${e.detail})` : String(e.detail);
    return { step: e.step, offset: Math.round((Number(e.time) - start) * 1000), text, time: Number(e.time) };
  });
}

function summaryRows(task) {
  const s = task.summary || {};
  const steps = timelineSteps(task);
  let taskMs = s.task_time_ms;
  if ((taskMs === null || taskMs === undefined) && steps.length) taskMs = steps[steps.length - 1].offset;
  const rows = [["Total task time", fmtMs(taskMs), "task_time_ms"]];
  const disks = s.disk_copy;
  if (disks) {
    rows.push(
      ["Disks copied", `${fmtBytes(disks.copied_bytes)} of ${fmtBytes(disks.total_bytes)} to ${disks.datastore}`, "disk_copied"],
      ["Disk copy time (to ready)", fmtMs(disks.copy_time_ms), "disk_copy_time_ms"],
      ["Disk copy throughput", disks.throughput_bps ? fmtRate(disks.throughput_bps) : "—", "disk_throughput"],
    );
    if ((task.request || {}).type === "storage") return rows;
  }
  const mbit = s.throughput_mbps;
  rows.push(
    ["QEMU downtime (VM stunned)", fmtMs(s.downtime_ms), "downtime_ms"],
    ["Stunned → resumed", fmtMs(s.stun_to_resume_ms), "stun_to_resume_ms"],
    ["Memory transferred", fmtBytes(s.transferred_bytes), "transferred_bytes"],
    ["Memory of the VM", fmtBytes(s.ram_total_bytes), "ram_total_bytes"],
    ["Passes", s.passes === null || s.passes === undefined ? "—" : String(s.passes), "passes"],
    ["QEMU setup time", fmtMs(s.setup_time_ms), "setup_time_ms"],
    ["QEMU migration time", fmtMs(s.total_time_ms), "total_time_ms"],
    ["Request → first byte", fmtMs(s.request_to_first_byte_ms), "request_to_first_byte_ms"],
    ["Resume → done", fmtMs(s.resume_to_done_ms), "resume_to_done_ms"],
    ["Throughput", mbit ? `${(Number(mbit) / 8).toFixed(1)} MB/s` : "—", "throughput"],
    ["Migration link", fmtLink(s.link_bps), "link"],
  );
  return rows;
}

/** The task's page; a task not in the panel (older) is fetched, and shown when it comes. */
function renderTaskDetail(id, task) {
  if (!task) {
    api(`/v1/tasks/${id}`).then((t) => {
      state.tasks.set(t.id, t);
      renderTaskRow(t);
      if (state.route.view === "task" && state.route.id === id) renderMain(true);
    }).catch((err) => {
      if (state.route.view !== "task" || state.route.id !== id) return;
      showInMain(h("div", { id: "task-detail", class: "summary" },
        summaryHeader("task", `Task ${id}`, "Migration task"),
        h("p", { class: "form-error" }, `${errorText(err)}. Choose a task in Recent Tasks.`),
        taskChart([])), true);
    });
    return h("div", { id: "task-detail", class: "summary" },
      summaryHeader("task", `Task ${id}`, "Migration task"),
      h("p", { class: "placeholder" }, "Loading the task..."));
  }
  const req = task.request || {};
  const running = !FINAL_STATES.has(task.state);
  const s = task.summary || {};
  const steps = timelineSteps(task);
  const actions = running && !task.cancel_requested ? [h("button", {
    id: "task-cancel-btn", class: "btn", type: "button",
    title: "The VM keeps running where it was, on its disks (possible until switchover)",
    onclick: (ev) => cancelTask(task.id, ev.currentTarget),
  }, "Cancel task")] : [];
  const pct = Math.max(0, Math.min(100, Number(task.progress) || 0));
  const predicted = s.predicted;
  return h("div", { id: "task-detail", class: "summary", dataset: { task: String(task.id) } },
    summaryHeader("task", `Task ${task.id}: migrate ${task.target}`,
      `${TYPE_LABEL[req.type] || task.kind} · ${routeText(task)}`, actions,
      stateBadge(task.state, stateClass(task.state))),
    h("div", { class: "task-progress" },
      h("div", { class: "progress big" }, h("div", { class: "bar" }, h("div", { class: `fill ${stateClass(task.state)}`, style: { width: `${pct}%` } })),
        h("span", { class: "progress-text" }, `${Math.round(pct)} %`)),
      h("span", { class: "muted" }, `phase ${task.phase || "—"}${task.cancel_requested && running ? " · cancel requested" : ""}`)),
    task.error ? h("div", { class: "panel-error", id: "task-error" },
      h("strong", null, task.state === "cancelled" ? "Cancelled: " : "Failed: "),
      `error (${task.error_code || "failed"}): ${task.error}`,
      h("p", null, task.state === "cancelled"
        ? "The VM keeps running where it was, on its disks."
        : "Nothing moved: the VM runs where it was, unless the message says otherwise. Fix the cause it names and migrate again.")) : null,
    (task.warnings || []).length ? h("div", { class: "panel-warn" },
      (task.warnings || []).map((w) => h("div", null, `warning (${w.code}): ${w.message}`))) : null,
    h("div", { class: "cards" },
      h("section", { class: "card wide" }, h("h2", null, "Timeline"),
        h("table", { id: "task-timeline", class: "grid timeline" },
          h("thead", null, h("tr", null, h("th", null, "Step"), h("th", { class: "num" }, "At"), h("th", null, "What happened"))),
          h("tbody", null, steps.map((st) => h("tr", { dataset: { step: st.step } },
            h("td", { class: "mono" }, st.step),
            h("td", { class: "num mono" }, `+${st.offset.toLocaleString("en-US")} ms`),
            h("td", null, st.text))))),
        !steps.length ? h("p", { class: "empty" }, "No steps yet.") : null),
      h("section", { class: "card wide" }, h("h2", null, "Memory pre-copy, pass by pass"),
        taskChart(task.samples || []),
        h("p", { class: "hint" }, `${plural((task.samples || []).length, "pass", "passes")} recorded.`)),
      card("Figures", summaryRows(task)),
      card("Request", [
        ["VM", itemLink("vm", task.target), "vm"],
        ["Type", TYPE_LABEL[req.type] || req.type || "—", "type"],
        ["Source", req.source ? itemLink("host", req.source) : "—", "source"],
        ["Destination", req.type === "storage" ? "the same host" : req.dest ? itemLink("host", req.dest) : "—", "dest"],
        ["Datastore", req.datastore ? itemLink("datastore", req.datastore) : "unchanged", "datastore"],
        ["Downtime limit", fmtMs(req.downtime_ms), "downtime_limit"],
        ["Created", fmtDateTime(parseTime(task.created_at)), "created_at"],
        ["Finished", fmtDateTime(parseTime(task.finished_at)), "finished_at"],
      ]),
      predicted ? card("Prediction beside actual", [
        ["Total time", `predicted ${fmtSeconds(predicted.total_s)} · actual ${fmtMs(s.task_time_ms ?? s.total_time_ms)}`, "predicted_total"],
        ["Downtime", `predicted ${predicted.downtime_ms === null ? "—" : `${Math.round(predicted.downtime_ms)} ms`} · actual ${fmtMs(s.downtime_ms)}`, "predicted_downtime"],
        ["Passes", `predicted ${predicted.passes} · actual ${s.passes ?? "—"}`, "predicted_passes"],
        ["Brake", predicted.needs_brake ? `${predicted.brake_pct} %` : "none needed", "predicted_brake"],
      ]) : null,
      (s.decisions || []).length ? h("section", { class: "card wide" }, h("h2", null, "Convergence decisions"),
        table(["At", "Action", "Downtime limit", "Bandwidth", "Brake", "Why"], s.decisions.map((d) => h("tr", null,
          h("td", { class: "num mono" }, `${Number(d.t_s).toFixed(2)} s`),
          h("td", null, d.action),
          h("td", null, fmtMs(d.downtime_limit_ms)),
          h("td", null, fmtLink(d.max_bandwidth_bps)),
          h("td", null, d.throttle_pct ? `${d.throttle_pct} %` : "—"),
          h("td", { class: "small" }, d.reason))))) : null));
}

// -- the chart ---------------------------------------------------------------------------------------

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
}

function ticks(max, count = 5) {
  const top = max > 0 ? max : 1;
  const step = niceStep(top, count);
  const out = [];
  for (let v = 0; v <= top + step * 1e-9; v += step) out.push(Number(v.toFixed(10)));
  if (out[out.length - 1] < top) out.push(Number((out[out.length - 1] + step).toFixed(10)));
  return out;
}

function tickLabel(v) {
  if (v === 0) return "0";
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(Number.isInteger(v) ? 0 : 1);
  return Number.isInteger(v) ? String(v) : v.toFixed(v < 1 ? 2 : 1);
}

/** Remaining memory (MiB, left axis), dirty rate and throughput (MB/s, right axis) per pass,
 * and the CPU brake (% of the plot's height, shaded), against time since the stream started. */
function taskChart(samples) {
  const W = 760;
  const H = 320;
  const m = { l: 64, r: 64, t: 58, b: 44 };
  const pw = W - m.l - m.r;
  const ph = H - m.t - m.b;
  const svg = s("svg", {
    id: "task-chart", class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "Remaining memory, dirty rate and throughput per pre-copy pass",
    preserveAspectRatio: "xMidYMid meet",
  });
  const pts = samples.filter((x) => x && x.t !== undefined && x.t !== null);
  const MiB = 2 ** 20;
  const tMax = Math.max(...pts.map((x) => Number(x.t)), 0);
  const remMax = Math.max(...pts.map((x) => Number(x.remaining_bytes || 0) / MiB), 0);
  const rateMax = Math.max(...pts.map((x) => Math.max(Number(x.dirty_rate_bps || 0), Number(x.throughput_bps || 0)) / 1e6), 0);
  const xt = ticks(tMax || 1, 6);
  const lt = ticks(remMax || 1, 5);
  const rt = ticks(rateMax || 1, 5);
  const xMax = xt[xt.length - 1];
  const lMax = lt[lt.length - 1];
  const rMax = rt[rt.length - 1];
  const X = (t) => m.l + (pw * t) / xMax;
  const YL = (v) => m.t + ph - (ph * v) / lMax;
  const YR = (v) => m.t + ph - (ph * v) / rMax;
  const COLORS = { rem: "#1f6fb2", dirty: "#d9534f", thr: "#2e9e44", brake: "#8e6cc4" };

  // Grid and axes.
  const grid = s("g", { class: "grid-lines" });
  for (const v of lt) grid.append(s("line", { x1: m.l, x2: m.l + pw, y1: YL(v), y2: YL(v) }));
  svg.append(grid);
  const axes = s("g", { class: "axes" });
  axes.append(s("line", { x1: m.l, x2: m.l + pw, y1: m.t + ph, y2: m.t + ph }));
  axes.append(s("line", { x1: m.l, x2: m.l, y1: m.t, y2: m.t + ph }));
  axes.append(s("line", { x1: m.l + pw, x2: m.l + pw, y1: m.t, y2: m.t + ph }));
  for (const v of xt) {
    axes.append(s("line", { x1: X(v), x2: X(v), y1: m.t + ph, y2: m.t + ph + 5 }));
    axes.append(s("text", { x: X(v), y: m.t + ph + 18, "text-anchor": "middle" }, tickLabel(v)));
  }
  for (const v of lt) {
    axes.append(s("line", { x1: m.l - 5, x2: m.l, y1: YL(v), y2: YL(v) }));
    axes.append(s("text", { x: m.l - 8, y: YL(v) + 4, "text-anchor": "end" }, tickLabel(v)));
  }
  for (const v of rt) {
    axes.append(s("line", { x1: m.l + pw, x2: m.l + pw + 5, y1: YR(v), y2: YR(v) }));
    axes.append(s("text", { x: m.l + pw + 8, y: YR(v) + 4, "text-anchor": "start" }, tickLabel(v)));
  }
  axes.append(s("text", { class: "axis-title", x: m.l + pw / 2, y: H - 6, "text-anchor": "middle" }, "time since the memory copy started (s)"));
  axes.append(s("text", {
    class: "axis-title", x: 14, y: m.t + ph / 2, "text-anchor": "middle",
    transform: `rotate(-90 14 ${m.t + ph / 2})`, fill: COLORS.rem,
  }, "remaining memory (MiB)"));
  axes.append(s("text", {
    class: "axis-title", x: W - 12, y: m.t + ph / 2, "text-anchor": "middle",
    transform: `rotate(90 ${W - 12} ${m.t + ph / 2})`,
  }, "rate (MB/s)"));
  svg.append(axes);

  // Legend, above the plot: two rows of two.
  const legend = s("g", { class: "legend" });
  const items = [
    ["rem", "Remaining memory (MiB, left axis)", "line"],
    ["dirty", "Dirty rate (MB/s, right axis)", "line"],
    ["thr", "Throughput (MB/s, right axis)", "line"],
    ["brake", "CPU brake (shaded, 0–100 % of the height)", "area"],
  ];
  items.forEach(([key, label, kind], i) => {
    const lx = m.l + (i % 2) * 300;
    const ly = 14 + Math.floor(i / 2) * 18;
    const g = s("g", { class: `legend-item legend-${key}` });
    if (kind === "line") g.append(s("line", { x1: lx, x2: lx + 22, y1: ly, y2: ly, stroke: COLORS[key], "stroke-width": 2.5 }));
    else g.append(s("rect", { x: lx, y: ly - 6, width: 22, height: 12, fill: COLORS[key], "fill-opacity": 0.2, stroke: COLORS[key], "stroke-opacity": 0.5 }));
    g.append(s("text", { x: lx + 28, y: ly + 4 }, label));
    legend.append(g);
  });
  svg.append(legend);

  if (!pts.length) {
    svg.append(s("text", { class: "chart-empty", x: m.l + pw / 2, y: m.t + ph / 2, "text-anchor": "middle" },
      "No pre-copy passes recorded (yet): a storage-only move, or memory has not started copying."));
    return svg;
  }

  const plot = s("g", { class: "plot" });
  // Brake as a shaded step area.
  if (pts.some((x) => Number(x.throttle_pct || 0) > 0)) {
    let d = `M${X(Number(pts[0].t))},${m.t + ph}`;
    for (const x of pts) d += ` L${X(Number(x.t))},${m.t + ph - (ph * Number(x.throttle_pct || 0)) / 100}`;
    d += ` L${X(Number(pts[pts.length - 1].t))},${m.t + ph} Z`;
    plot.append(s("path", { d, fill: COLORS.brake, "fill-opacity": 0.16, stroke: COLORS.brake, "stroke-opacity": 0.4 }));
  }
  const series = [
    ["rem", (x) => YL(Number(x.remaining_bytes || 0) / MiB)],
    ["dirty", (x) => YR(Number(x.dirty_rate_bps || 0) / 1e6)],
    ["thr", (x) => YR(Number(x.throughput_bps || 0) / 1e6)],
  ];
  for (const [key, y] of series) {
    const d = pts.map((x, i) => `${i ? "L" : "M"}${X(Number(x.t)).toFixed(1)},${y(x).toFixed(1)}`).join(" ");
    plot.append(s("path", { class: `series series-${key}`, d, fill: "none", stroke: COLORS[key], "stroke-width": 2.2, "stroke-linejoin": "round" }));
    for (const x of pts) {
      const c = s("circle", { cx: X(Number(x.t)).toFixed(1), cy: y(x).toFixed(1), r: 3, fill: COLORS[key] });
      c.append(s("title", null,
        `pass ${x.pass_no ?? "?"} at ${Number(x.t).toFixed(2)} s: remaining ${fmtBytes(x.remaining_bytes)}, `
        + `dirty ${fmtRate(x.dirty_rate_bps)}, throughput ${fmtRate(x.throughput_bps)}, brake ${x.throttle_pct ?? 0} %`));
      plot.append(c);
    }
  }
  svg.append(plot);
  return svg;
}

// ---------------------------------------------------------------------------------------------
// Events

function renderEvents() {
  const main = $("#main");
  clear(main).append(h("div", { id: "events-view", class: "summary" },
    summaryHeader("events", "Events", "What the center recorded: hosts added, migrations, refusals, alarms", [
      h("button", { id: "events-refresh", class: "btn", type: "button", onclick: () => loadEvents(true) }, "Refresh"),
    ]),
    h("div", { class: "events-tools" },
      h("label", { for: "events-severity" }, "Severity "),
      h("select", { id: "events-severity", onchange: () => loadEvents(false) },
        h("option", { value: "" }, "All"), h("option", { value: "info" }, "Info"),
        h("option", { value: "warning" }, "Warning"), h("option", { value: "error" }, "Error")),
      h("span", { id: "events-status", class: "muted" })),
    h("table", { id: "events", class: "grid events-table" },
      h("thead", null, h("tr", null, ["Time", "Severity", "Message", "VM", "Host", "Task"].map((x) => h("th", null, x)))),
      h("tbody", { id: "events-rows" }))));
  loadEvents(true);
}

async function loadEvents(showLoading) {
  const status = $("#events-status");
  if (!status) return;
  if (showLoading) status.textContent = "Loading...";
  try {
    const events = await api("/v1/events?limit=300");
    const tbody = $("#events-rows");
    if (!tbody) return;
    const want = $("#events-severity").value;
    const shown = events.filter((e) => !want || e.severity === want);
    const sig = JSON.stringify([want, shown.map((e) => e.id)]);
    if (tbody.dataset.sig !== sig) {
      tbody.dataset.sig = sig;
      tbody.replaceChildren(...shown.map((e) => h("tr", { dataset: { eventId: String(e.id) }, class: `sev-${e.severity}` },
        h("td", { class: "nowrap" }, fmtDateTime(parseTime(e.time))),
        h("td", null, stateBadge(e.severity, e.severity === "info" ? "muted" : e.severity === "warning" ? "warn" : "bad")),
        h("td", null, e.message),
        h("td", null, e.vm ? itemLink("vm", e.vm) : "—"),
        h("td", null, e.host ? itemLink("host", e.host) : "—"),
        h("td", null, e.task_id ? h("a", { href: `#/task/${e.task_id}` }, String(e.task_id)) : "—"))));
      if (!shown.length) tbody.append(h("tr", null, h("td", { colspan: "6", class: "empty" }, "No events.")));
    }
    status.textContent = `${plural(shown.length, "event")} · updated ${fmtClock(new Date())}`;
  } catch (err) {
    status.textContent = `${errorText(err)} (retrying every 5 seconds)`;
  }
}

// ---------------------------------------------------------------------------------------------
// Boot

function boot() {
  $("#signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("#token").value.trim());
  });
  $("#signout").addEventListener("click", (ev) => {
    ev.preventDefault();
    signOut();
  });
  $("#nav-events").addEventListener("click", (ev) => {
    ev.preventDefault();
    navigate({ view: "events" });
  });
  $("#nav-inventory").addEventListener("click", (ev) => {
    ev.preventDefault();
    const r = state.route.view === "item" ? state.route : state.lastItem || parseHash("#/");
    navigate(r);
  });
  $("#tree").addEventListener("click", treeClick);
  // Links in the main pane (and in dialogs) to "#/..." navigate in place.
  document.addEventListener("click", (ev) => {
    const a = ev.target.closest && ev.target.closest('a[href^="#/"]');
    if (!a || !a.closest("#main, #modal-root") || ev.defaultPrevented) return;
    ev.preventDefault();
    if (a.closest("#modal-root")) closeModal();
    navigate(parseHash(a.getAttribute("href")));
  });
  $("#tasks-toggle").addEventListener("click", () => {
    const panel = $("#tasks");
    const hidden = panel.classList.toggle("collapsed");
    $("#tasks-toggle").textContent = hidden ? "Show" : "Hide";
    $("#tasks-toggle").setAttribute("aria-expanded", String(!hidden));
  });
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved, { silent: true });
  else $("#token").focus();
}

boot();
