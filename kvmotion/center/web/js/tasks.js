// Recent Tasks (bottom panel): rows updated in place from the center's server-sent event stream.

import { $, clear, h } from "./dom.js";
import { fmtClock, fmtDuration, parseTime } from "./format.js";
import { FINAL_STATES, state, TASK_LIMIT } from "./state.js";
import { api, ApiError, errorText } from "./api.js";
import { refreshSoon, sessionExpired } from "./session.js";
import { navigate, renderMain } from "./router.js";
import { renderTree } from "./tree.js";
import { updateVmTaskBanner } from "./vm.js";
import { maintenanceRouteText, taskTouchesHost } from "./maintenance.js";

export function routeText(t) {
  if (t.kind === "maintenance") return maintenanceRouteText(t);
  const req = t.request || {};
  const ds = req.datastore ? `, disks to ${req.datastore}` : "";
  if (req.type === "storage") return `on ${req.source || "?"}${ds}`;
  if (req.source || req.dest) return `${req.source || "?"} → ${req.dest || "?"}${ds}`;
  return ds.slice(2);
}

export function upsertTask(task) {
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
  if (state.route.view === "item" && state.route.kind === "host" && taskTouchesHost(task, state.route.name)) {
    renderMain();
  }
  // A task's page; a maintenance task's shows the migrations it started too (renderMain
  // rebuilds the page only when what it shows changed).
  if (state.route.view === "task" && (state.route.id === task.id
      || (state.tasks.get(state.route.id) || {}).kind === "maintenance")) renderMain();
  if (state.route.view === "item" && state.route.kind === "datacenter" && (ended || started)) renderMain();
  // A cluster's page follows the migrations its balancing card started (live() when unchanged).
  if (state.route.view === "item" && state.route.kind === "cluster") renderMain();
}

export function renderTaskRow(t) {
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
  $(".type", row).textContent = t.kind === "maintenance" ? "enter maintenance" : req.type || t.kind || "—";
  $(".route", row).textContent = routeText(t) || "—";
  const stateEl = $(".state", row);
  stateEl.textContent = t.state;
  stateEl.className = `state badge ${stateClass(t.state)}`;
  stateEl.title = t.error ? `error (${t.error_code}): ${t.error}` : t.state;
  $(".phase", row).textContent = t.phase || "—";
  $(".phase", row).className = `phase${t.phase === "blocked" && running ? " blocked" : ""}`;
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
        title: t.kind === "maintenance"
          ? "Cancel: stop moving VMs off the host; those moved stay, and the host stays entering maintenance mode until you exit it"
          : "Cancel: the VM keeps running where it was, on its disks (possible until switchover)",
        onclick: (ev) => { ev.stopPropagation(); cancelTask(t.id, ev.currentTarget); },
      }, "Cancel"));
    } else if (want === "cancelling") {
      actions.append(h("span", { class: "muted" }, "cancelling..."));
    }
  }
  $("#tasks-empty").hidden = state.taskRows.size > 0;
}

export function stateClass(st) {
  return { success: "ok", error: "bad", cancelled: "warn", running: "info", queued: "muted" }[st] || "muted";
}

export function flashTask(id) {
  const row = state.taskRows.get(id);
  if (!row) return;
  row.classList.add("flash");
  setTimeout(() => row.classList.remove("flash"), 2000);
  row.scrollIntoView({ block: "nearest" });
}

let tasksMessageTimer = null;
export function setTasksMessage(text, kind = "info") {
  const el = $("#tasks-message");
  el.textContent = text;
  el.className = `tasks-message ${kind}`;
  clearTimeout(tasksMessageTimer);
  tasksMessageTimer = setTimeout(() => { el.textContent = ""; }, kind === "bad" ? 15000 : 6000);
}

/** Keep the durations of running tasks ticking (main.js runs this every second). */
export function tickRunningTasks() {
  for (const t of state.tasks.values()) if (!FINAL_STATES.has(t.state)) renderTaskRow(t);
}

export async function cancelTask(id, button) {
  if (button) {
    button.disabled = true;
    button.textContent = "Cancelling...";
  }
  try {
    const task = await api(`/v1/tasks/${id}/cancel`, { method: "POST" });
    upsertTask(task);
    setTasksMessage(task.kind === "maintenance"
      ? `Cancelling task ${id}: the VMs moved stay where they are; host ${task.target} stays entering maintenance mode until you exit it.`
      : `Cancelling task ${id}: the VM stays where it was.`, "info");
  } catch (err) {
    if (button) {
      button.disabled = false;
      button.textContent = "Cancel";
    }
    setTasksMessage(`Task ${id}: ${errorText(err)}`, "bad");
  }
}

// -- the stream: fetch() + a reader, SSE parsed by hand, reconnect with backoff --------------------

export function startStream() {
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
export function kickStream() {
  const ctl = state.stream;
  if (!ctl || !ctl.waiting) return;
  clearTimeout(ctl.timer);
  ctl.waiting = false;
  ctl.backoff = 1000;
  connectStream(ctl);
}

/** Drop the current stream connection and connect again (with the usual backoff). */
export function restartStream(why) {
  const ctl = state.stream;
  if (!ctl || ctl.waiting) return;
  ctl.restartWhy = why;
  ctl.reader?.cancel().catch(() => {});
}

export function stopStream() {
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
