// A task's page: timeline, figures, error, and the pass-by-pass chart.

import { h, s } from "./dom.js";
import {
  fmtBytes, fmtDateTime, fmtLink, fmtMs, fmtRate, fmtSeconds, parseTime, plural,
} from "./format.js";
import { FINAL_STATES, state, TYPE_LABEL } from "./state.js";
import { api, errorText } from "./api.js";
import { card, itemLink, showInMain, stateBadge, summaryHeader, table } from "./widgets.js";
import { renderMain } from "./router.js";
import { cancelTask, renderTaskRow, routeText, stateClass } from "./tasks.js";
import { renderMaintenanceTask } from "./maintenance.js";

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
  traffic_taken: "the destination took the VM's traffic: frames wait there for the resume",
  mac_learned: "the VM network learned the VM on the destination (its bridge saw it)",
  source_removed: "5. VM removed from the source host",
};

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
    // The pause the user sees first: QEMU's downtime counts only the source's part of it.
    ["Guest stopped (stunned → resumed)", fmtMs(s.stun_to_resume_ms), "stun_to_resume_ms"],
    ["Resumed → VM network learned it", fmtMs(s.resume_to_mac_learned_ms), "resume_to_mac_learned_ms"],
    ["QEMU downtime (source's count)", fmtMs(s.downtime_ms), "downtime_ms"],
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
export function renderTaskDetail(id, task) {
  if (!task) {
    api(`/v1/tasks/${id}`).then((t) => {
      state.tasks.set(t.id, t);
      renderTaskRow(t);
      if (state.route.view === "task" && state.route.id === id) renderMain(true);
    }).catch((err) => {
      if (state.route.view !== "task" || state.route.id !== id) return;
      showInMain(h("div", { id: "task-detail", class: "summary" },
        summaryHeader("task", `Task ${id}`, "Task"),
        h("p", { class: "form-error" }, `${errorText(err)}. Choose a task in Recent Tasks.`),
        taskChart([])), true);
    });
    return h("div", { id: "task-detail", class: "summary" },
      summaryHeader("task", `Task ${id}`, "Task"),
      h("p", { class: "placeholder" }, "Loading the task..."));
  }
  if (task.kind === "maintenance") return renderMaintenanceTask(task);
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
