// Maintenance mode (vSphere's "Enter Maintenance Mode"): a host's Enter and Exit buttons and the
// dialog that says what entering does, the evacuation's panel on the host's page, and the page of
// a "maintenance" task. The evacuation is the center's (center/maintenance.py): its task's
// summary is {moved: [vm], moving: [{vm, task}], blockers: [{vm, reason}], failed_attempts:
// {vm: [reason]}}, pushed over the task stream as it changes.

import { $, h } from "./dom.js";
import { fmtDateTime, fmtDuration, parseTime, plural, POWER_LABEL } from "./format.js";
import { FINAL_STATES, maintenanceTaskFor, state } from "./state.js";
import { api, enc, errorText } from "./api.js";
import {
  card, closeModal, itemLink, maintenanceBadge, openModal, showActionMessage, stateBadge,
  summaryHeader,
} from "./widgets.js";
import { refreshInventory } from "./session.js";
import { renderMain } from "./router.js";
import { cancelTask, flashTask, setTasksMessage, stateClass, upsertTask } from "./tasks.js";

const BLOCKED_HELP = "The center looks again every few seconds: power the VM off, move it yourself "
  + "(Migrate..., e.g. changing both compute resource and storage) or remove the cause, and the "
  + "evacuation goes on by itself.";

function isRunning(task) {
  return Boolean(task) && !FINAL_STATES.has(task.state);
}

/** What of the client's state a maintenance task's views show (the router rebuilds a page
 * when it changes): the task, the migrations it started, where the moved VMs are now. */
export function maintenanceSig(t) {
  if (!t) return null;
  const s = t.summary || {};
  return [t.id, t.state, t.phase, t.progress, t.cancel_requested, t.error, s,
    (s.moving || []).map((m) => {
      const mt = state.tasks.get(m.task);
      return mt && [mt.state, Math.round(mt.progress || 0), (mt.request || {}).dest];
    }),
    [...(s.moved || []), ...(s.blockers || []).map((b) => b.vm)].map((vm) => {
      const v = state.idx && state.idx.vm.get(vm);
      return v && [v.host, v.power_state];
    }),
    state.idx && state.idx.host.get(t.target) && state.idx.host.get(t.target).maintenance];
}

/** Does `task` change what the page of host `hostName` shows? */
export function taskTouchesHost(task, hostName) {
  if (task.kind === "maintenance") return task.target === hostName;
  const req = task.request || {};
  return req.source === hostName || req.dest === hostName;
}

// ---------------------------------------------------------------------------------------------
// The host page's buttons

export function maintenanceButtons(x) {
  const task = maintenanceTaskFor(x.name);
  const running = isRunning(task);
  let enterTitle = "Move every running VM to other hosts, then hold this host empty so it can be serviced";
  if (x.maintenance === "in") enterTitle = "the host is already in maintenance mode";
  else if (running) enterTitle = `task ${task.id} is emptying this host`;
  else if (x.maintenance === "entering") {
    enterTitle = "No evacuation runs (it was cancelled or failed, or the center restarted): "
      + "enter again to move the VMs still running here";
  }
  return [
    h("button", {
      id: "maintenance-enter-btn", class: "btn", type: "button",
      disabled: x.maintenance === "in" || running,
      title: enterTitle,
      onclick: () => openEnterDialog(x.name),
    }, "Enter maintenance mode..."),
    h("button", {
      id: "maintenance-exit-btn", class: "btn", type: "button", disabled: !x.maintenance,
      title: !x.maintenance ? "the host is not in maintenance mode"
        : running ? "Stop emptying this host (its task is cancelled; the VMs moved stay where they are) and let it take VMs again"
          : "Let the host take VMs again; the VMs moved off stay where they are",
      onclick: (ev) => exitMaintenance(x.name, ev.currentTarget),
    }, "Exit maintenance mode"),
  ];
}

function vmList(vms) {
  return vms.length ? h("ul", { class: "plain-list" }, vms.map((v) => h("li", null, v.name,
    h("span", { class: "muted" }, ` (${POWER_LABEL[v.power_state] || v.power_state})`)))) : null;
}

export function openEnterDialog(hostName) {
  const x = state.idx.host.get(hostName);
  if (!x) return;
  const route = state.route;
  const vms = state.idx.vmsOnHost.get(hostName) || [];
  const running = vms.filter((v) => v.power_state === "poweredOn");
  const others = vms.filter((v) => v.power_state !== "poweredOn");
  const error = h("p", { id: "maintenance-error", class: "form-error", role: "alert", hidden: true });
  const ok = h("button", {
    id: "maintenance-confirm", class: "btn btn-primary", type: "button",
    onclick: () => enter(hostName, route, ok, error),
  }, "Enter maintenance mode");
  openModal({
    id: "maintenance-dialog",
    title: `Enter maintenance mode: host ${hostName}?`,
    body: h("div", { class: "maintenance-explain" },
      x.connection !== "connected" ? h("p", { class: "panel-error" },
        `The center cannot reach this host's agent (${x.connection}): its VMs cannot be moved until it can.`) : null,
      h("p", null, h("strong", null, "Every running VM is live-migrated to another host the center chooses: "),
        "one that sees the VM's datastores and networks, has a compatible CPU and room for it, and that the ",
        "placement rules allow; the one with most room wins. The VMs keep running while they move."),
      running.length
        ? [h("p", null, `${plural(running.length, "running VM")} will move:`), vmList(running)]
        : h("p", null, `No VM runs on ${hostName}: it goes into maintenance mode at once.`),
      others.length ? [h("p", null, `${plural(others.length, "VM")} not running ${others.length === 1 ? "stays" : "stay"} `
        + `on ${hostName}, and cannot be powered on until the host exits maintenance mode:`), vmList(others)] : null,
      h("p", null, h("strong", null, `${hostName} then takes no new VMs: `),
        "none is created, powered on or migrated there, from now until you exit maintenance mode."),
      h("p", { class: "hint" }, "A VM that cannot move (its disks on a datastore only this host sees, no host ",
        "with room or a compatible CPU, a rule that pins it, three failed migrations) blocks the host: its ",
        "page shows each one with the reason. ", BLOCKED_HELP, " Cancel stops the evacuation; the VMs ",
        "already moved stay where they are."),
      error),
    buttons: [
      h("button", { id: "maintenance-dismiss", class: "btn", type: "button", onclick: closeModal }, "Cancel"),
      ok,
    ],
  });
}

async function enter(hostName, route, button, error) {
  button.disabled = true;
  button.textContent = "Entering...";
  error.hidden = true;
  try {
    const task = await api(`/v1/hosts/${enc(hostName)}/maintenance/enter`, { method: "POST" });
    closeModal();
    upsertTask(task);
    flashTask(task.id);
    setTasksMessage(`Task ${task.id} started: host ${hostName} entering maintenance mode.`, "ok");
    showActionMessage(`Host ${hostName} is entering maintenance mode (task ${task.id}): `
      + "its running VMs are moving to other hosts.", "ok", route);
    await refreshInventory();
  } catch (err) {
    if (!$("#maintenance-dialog")) {
      showActionMessage(errorText(err), "bad", route);
      return;
    }
    button.disabled = false;
    button.textContent = "Enter maintenance mode";
    error.textContent = `${errorText(err)}. Nothing was changed.`;
    error.hidden = false;
  }
}

async function exitMaintenance(hostName, button) {
  const route = state.route;
  if (button) button.disabled = true;
  showActionMessage(`Host ${hostName}: exiting maintenance mode...`, "info", route);
  try {
    await api(`/v1/hosts/${enc(hostName)}/maintenance/exit`, { method: "POST" });
    showActionMessage(`Host ${hostName} exited maintenance mode: it takes VMs again. `
      + "The VMs moved off stay where they are.", "ok", route);
    state.mainSig = null;
    await refreshInventory();
  } catch (err) {
    showActionMessage(errorText(err), "bad", route);
    state.mainSig = null;
    renderMain(true);
  }
}

// ---------------------------------------------------------------------------------------------
// The host page's panel

/** The host's maintenance panel: the running evacuation (progress, moves, blockers, Cancel),
 * one that stopped, or the host held in maintenance; null when the host is not in it. */
export function maintenancePanel(x) {
  const task = maintenanceTaskFor(x.name);
  const running = isRunning(task);
  if (!x.maintenance && !running) return null;
  const props = (kind) => ({
    id: "maintenance-panel", class: `maint-panel ${kind}`,
    dataset: { maintenance: x.maintenance || "entering", ...(task ? { task: String(task.id), state: task.state } : {}) },
  });
  if (x.maintenance === "in" && !running) {
    const moved = task && task.state === "success" ? (task.summary || {}).moved || [] : null;
    return h("div", props("in"),
      h("div", { class: "maint-head" }, h("strong", null, "In maintenance mode"),
        task ? h("a", { href: `#/task/${task.id}` }, `task ${task.id}`) : null),
      h("p", null, `No VM runs on ${x.name}, and nothing new is created, powered on or migrated here. `,
        "Service the host, then exit maintenance mode to use it again."),
      moved && moved.length ? h("p", { class: "muted" }, `Moved off by task ${task.id}: `,
        moved.map((vm, i) => [i ? ", " : "", itemLink("vm", vm)]), ".") : null);
  }
  if (!task) {
    return h("div", props("stopped"),
      h("div", { class: "maint-head" }, h("strong", null, "Entering maintenance mode")),
      h("p", null, `No evacuation task of ${x.name} is known here (it may have been cancelled, or the `,
        "center restarted). The host takes no new VMs meanwhile. Enter maintenance mode again to ",
        "move the VMs still running here, or exit maintenance mode."));
  }
  const pct = Math.max(0, Math.min(100, Number(task.progress) || 0));
  return h("div", props(running ? task.phase === "blocked" ? "blocked" : "entering" : "stopped"),
    h("div", { class: "maint-head" },
      h("strong", null, running ? "Entering maintenance mode" : "Entering maintenance mode: the evacuation stopped"),
      h("a", { href: `#/task/${task.id}` }, `task ${task.id}`),
      stateBadge(task.state, stateClass(task.state)),
      h("span", { class: "spacer" }),
      running && !task.cancel_requested ? h("button", {
        id: "maintenance-cancel-btn", class: "btn btn-small", type: "button",
        title: "Stop moving VMs off this host; those moved stay where they are, and the host stays entering maintenance mode until you exit it",
        onclick: (ev) => cancelTask(task.id, ev.currentTarget),
      }, "Cancel") : null,
      running && task.cancel_requested ? h("span", { class: "muted" }, "cancelling...") : null),
    h("div", { class: "task-progress" },
      h("div", { id: "maintenance-progress", class: "progress big" },
        h("div", { class: "bar" }, h("div", { class: `fill ${stateClass(task.state)}`, style: { width: `${pct}%` } })),
        h("span", { class: "progress-text" }, `${Math.round(pct)} %`)),
      h("span", { id: "maintenance-phase", class: `muted phase-${(task.phase || "").replace(/\W+/g, "-")}` },
        phaseText(task))),
    running ? null : h("p", { id: "maintenance-stopped" }, task.state === "cancelled"
      ? "Cancelled: the VMs moved stay where they are. "
      : `Failed: error (${task.error_code || task.state}): ${task.error || "the evacuation ended"}. `,
    `${x.name} still takes no new VMs. Enter maintenance mode again to move the VMs still running `,
    "here, or exit maintenance mode."),
    evacuationView(task));
}

function phaseText(task) {
  const s = task.summary || {};
  const moved = (s.moved || []).length;
  const left = moved + (s.moving || []).length + (s.blockers || []).length;
  if (task.phase === "blocked") {
    return `Blocked: ${plural((s.blockers || []).length, "VM")} cannot move (below)${moved ? `; ${moved} moved` : ""}`;
  }
  if (task.phase === "evacuating") {
    return left ? `Evacuating: ${moved} of ${plural(left, "running VM")} moved` : "Evacuating: choosing where each VM goes";
  }
  return `phase ${task.phase || "—"}`;
}

// ---------------------------------------------------------------------------------------------
// An evacuation's moves and blockers (the host's panel and the task's page)

export function evacuationView(task) {
  const s = task.summary || {};
  const blockers = s.blockers || [];
  const moving = s.moving || [];
  const moved = s.moved || [];
  const failed = Object.entries(s.failed_attempts || {});
  const parts = [];
  if (blockers.length) {
    parts.push(h("h3", null, `Blocking the host (${blockers.length})`),
      h("table", { id: "maintenance-blockers", class: "grid blockers" },
        h("thead", null, h("tr", null, h("th", null, "VM"), h("th", null, "State"), h("th", null, "Why it cannot move"))),
        h("tbody", null, blockers.map((b) => {
          const v = state.idx && state.idx.vm.get(b.vm);
          return h("tr", { dataset: { blocker: b.vm } },
            h("td", null, itemLink("vm", b.vm)),
            h("td", null, v ? POWER_LABEL[v.power_state] || v.power_state : "—"),
            h("td", { class: "reason" }, reasonView(b.reason)));
        }))),
      h("p", { class: "hint" }, BLOCKED_HELP));
  }
  if (moving.length) {
    parts.push(h("h3", null, `Moving (${moving.length})`),
      h("table", { id: "maintenance-moving", class: "grid" },
        h("thead", null, h("tr", null, h("th", null, "VM"), h("th", null, "To"), h("th", null, "Progress"), h("th", null, "Task"))),
        h("tbody", null, moving.map((m) => {
          const mt = state.tasks.get(m.task);
          const dest = mt && (mt.request || {}).dest;
          const pct = mt ? Math.max(0, Math.min(100, Number(mt.progress) || 0)) : 0;
          return h("tr", { dataset: { moving: m.vm, task: String(m.task) } },
            h("td", null, itemLink("vm", m.vm)),
            h("td", null, dest ? itemLink("host", dest) : "—"),
            h("td", null, mt ? h("div", { class: "progress" },
              h("div", { class: "bar" }, h("div", { class: `fill ${stateClass(mt.state)}`, style: { width: `${pct}%` } })),
              h("span", { class: "progress-text" }, `${Math.round(pct)} %`)) : "—",
            mt && mt.phase ? h("div", { class: "muted small" }, `${mt.state}, phase ${mt.phase}`) : null),
            h("td", null, h("a", { href: `#/task/${m.task}` }, `task ${m.task}`)));
        }))));
  }
  if (moved.length) {
    parts.push(h("h3", null, `Moved (${moved.length})`),
      h("table", { id: "maintenance-moved", class: "grid" },
        h("thead", null, h("tr", null, h("th", null, "VM"), h("th", null, "Now on"))),
        h("tbody", null, moved.map((vm) => {
          const v = state.idx && state.idx.vm.get(vm);
          return h("tr", { dataset: { moved: vm } },
            h("td", null, itemLink("vm", vm)),
            h("td", null, v && v.host ? itemLink("host", v.host) : "—"));
        }))));
  }
  if (failed.length) {
    parts.push(h("details", { class: "more", id: "maintenance-failures" },
      h("summary", null, `Failed migrations of ${plural(failed.length, "VM")} (tried again, up to three times each)`),
      h("ul", { class: "plain-list small" }, failed.map(([vm, reasons]) => h("li", { dataset: { failedVm: vm } },
        h("strong", null, vm), ": ", [].concat(reasons).join("; "))))));
  }
  if (!parts.length) {
    parts.push(h("p", { class: "empty" }, isRunning(task)
      ? "Choosing where each running VM goes..." : "No VM was moved."));
  }
  return h("div", { class: "evacuation" }, parts);
}

/** A blocker's reason. The placement's "vm: no host fits (h1: why; h2: why)" is shown as one
 * line per host (split at the known hosts' names); anything else as the center wrote it. */
function reasonView(reason) {
  const text = String(reason || "");
  const m = /^[^:]*: no host fits \((.*)\)$/s.exec(text);
  const names = state.data ? state.data.hosts.map((x) => x.name) : [];
  if (m && names.length) {
    const body = m[1];
    const starts = [];
    for (const name of names) {
      if (body.startsWith(`${name}: `)) starts.push(0);
      for (let i = body.indexOf(`; ${name}: `); i >= 0; i = body.indexOf(`; ${name}: `, i + 1)) starts.push(i + 2);
    }
    starts.sort((a, b) => a - b);
    if (starts[0] === 0) {
      const items = starts.map((at, i) => {
        const piece = body.slice(at, i + 1 < starts.length ? starts[i + 1] - 2 : body.length);
        const colon = piece.indexOf(": ");
        return h("li", null, itemLink("host", piece.slice(0, colon)), `: ${piece.slice(colon + 2)}`);
      });
      return [h("span", { class: "reason-text" }, "No host can take it:"), h("ul", { class: "plain-list small" }, items)];
    }
  }
  return h("span", { class: "reason-text" }, text);
}

// ---------------------------------------------------------------------------------------------
// A maintenance task's page

export function renderMaintenanceTask(task) {
  const host = state.idx && state.idx.host.get(task.target);
  const running = isRunning(task);
  const pct = Math.max(0, Math.min(100, Number(task.progress) || 0));
  const created = parseTime(task.created_at);
  const finished = parseTime(task.finished_at);
  const actions = running && !task.cancel_requested ? [h("button", {
    id: "task-cancel-btn", class: "btn", type: "button",
    title: "Stop moving VMs off the host; those moved stay where they are, and the host stays entering maintenance mode until you exit it",
    onclick: (ev) => cancelTask(task.id, ev.currentTarget),
  }, "Cancel task")] : [];
  return h("div", { id: "task-detail", class: "summary", dataset: { task: String(task.id), kind: "maintenance" } },
    summaryHeader("task", `Task ${task.id}: enter maintenance mode on ${task.target}`,
      "Maintenance mode: move every running VM off the host, then hold it empty", actions,
      stateBadge(task.state, stateClass(task.state))),
    h("div", { class: "task-progress" },
      h("div", { class: "progress big" }, h("div", { class: "bar" }, h("div", { class: `fill ${stateClass(task.state)}`, style: { width: `${pct}%` } })),
        h("span", { class: "progress-text" }, `${Math.round(pct)} %`)),
      h("span", { class: "muted" }, `${phaseText(task)}${task.cancel_requested && running ? " · cancel requested" : ""}`)),
    task.error ? h("div", { class: "panel-error", id: "task-error" },
      task.state === "cancelled"
        ? [h("strong", null, "Cancelled: "), task.error.replace(/^cancelled: /, "")]
        : [h("strong", null, "Failed: "), `error (${task.error_code || task.state}): ${task.error}`],
      h("p", null, "The VMs moved stay where they are. On the host's page, exit maintenance mode to let it take "
        + "VMs again, or enter it again to move the rest.")) : null,
    h("div", { class: "cards" },
      card("Request", [
        ["Host", itemLink("host", task.target), "host"],
        ["Host's maintenance state now", host ? maintenanceBadge(host.maintenance) || "not in maintenance mode" : "—",
          "maintenance", null, host ? host.maintenance || "" : undefined],
        ["Phase", task.phase || "—", "phase"],
        ["Created", fmtDateTime(created), "created_at"],
        ["Finished", fmtDateTime(finished), "finished_at"],
        ["Duration", created ? fmtDuration((finished || new Date()) - created) : "—", "duration"],
      ]),
      h("section", { class: "card wide" }, h("h2", null, "Evacuation"), evacuationView(task))));
}

/** The Route column of Recent Tasks for a maintenance task: what its evacuation did so far. */
export function maintenanceRouteText(task) {
  const s = task.summary || {};
  const parts = [`${(s.moved || []).length} moved`];
  if ((s.moving || []).length) parts.push(`${s.moving.length} moving`);
  if ((s.blockers || []).length) parts.push(`${plural(s.blockers.length, "blocker")} (${s.blockers.map((b) => b.vm).join(", ")})`);
  return parts.join(", ");
}
