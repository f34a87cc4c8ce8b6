// Building blocks shared by the views: the main pane, summary headers, cards, tables, links,
// badges, the host and VM tables, and modal dialogs.

import { $, clear, h, icon, morph } from "./dom.js";
import { fmtBytes, fmtMiB, POWER_LABEL, vendorName } from "./format.js";
import {
  evcLabel, evcText, MAINTENANCE_LABEL, routeHash, state, vmDatastores,
} from "./state.js";

/** Show `view` as the main pane's content: morphed into the one there when it is the same
 * view (same id), else put in its place. */
export function showInMain(view, force) {
  const main = $("#main");
  const current = main.firstElementChild;
  if (!force && current && main.children.length === 1 && current.id && current.id === view.id) {
    morph(current, view);
  } else {
    clear(main).append(view);
    main.scrollTop = 0;
  }
}

// Building blocks of a summary

export function summaryHeader(kind, title, subtitle, actions, status) {
  return h("div", { class: "summary-header" },
    h("div", { class: "summary-title" }, icon(kind, "big"),
      h("div", null, h("h1", null, title), subtitle ? h("div", { class: "subtitle" }, subtitle) : null),
      status || null),
    actions && actions.length ? h("div", { class: "actions" }, actions) : null);
}

/** A card of label/value rows; each row: [label, value, field, hint, raw]. `field` sets
 * data-field; `raw` (the API's value, when the text is a person's version of it) data-value. */
export function card(title, rows, extra) {
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

export function table(headers, rows, { field, empty, cls } = {}) {
  if (!rows.length && empty) {
    return h("p", { class: "empty", dataset: field ? { field } : undefined }, empty);
  }
  return h("table", { class: `grid ${cls || ""}`, dataset: field ? { field } : undefined },
    h("thead", null, h("tr", null, headers.map((x) => h("th", null, x)))),
    h("tbody", null, rows));
}

export function itemLink(kind, name, text) {
  return h("a", { href: routeHash({ view: "item", kind, name }), class: "item-link" }, text || name);
}

export function usageBar(used, total) {
  const pct = total ? Math.min(100, Math.max(0, (100 * used) / total)) : 0;
  return h("div", { class: `usage${pct > 90 ? " high" : pct > 75 ? " mid" : ""}`, title: `${pct.toFixed(0)} % used` },
    h("div", { class: "usage-fill", style: { width: `${pct}%` } }));
}

export function stateBadge(text, kind) {
  return h("span", { class: `badge ${kind}` }, text);
}

export function powerBadge(p) {
  return stateBadge(POWER_LABEL[p] || p, p === "poweredOn" ? "ok" : p === "incoming" ? "info" : "muted");
}

export function connectionBadge(c) {
  return stateBadge(c === "connected" ? "Connected" : c, c === "connected" ? "ok" : "bad");
}

/** A host's maintenance state as a badge (nothing when it is not in maintenance). */
export function maintenanceBadge(m, id) {
  if (!m) return null;
  return h("span", {
    id, class: `badge ${m === "in" ? "maint" : "warn"}`, dataset: { maintenance: m },
    title: m === "in" ? "In maintenance mode: no VM runs here, and nothing new is placed, created or powered on here"
      : "Entering maintenance mode: its running VMs are being moved off, and nothing new comes here",
  }, MAINTENANCE_LABEL[m] || m);
}

const HA_CLASS = { connected: "ok", "not responding": "warn", isolated: "warn", failed: "bad" };

/** A host's HA state as a badge, its reason as the tooltip (nothing outside an HA cluster). */
export function haBadge(ha) {
  if (!ha || !ha.state) return null;
  return h("span", {
    id: "ha-badge", class: `badge ${HA_CLASS[ha.state] || "warn"}`, dataset: { ha: ha.state },
    title: ha.reason || "",
  }, `HA: ${ha.state}`);
}

/** The line under a summary's header that says how an action went. What it says is kept in
 * `state.actionMessage` for the route it was said on, so that a summary rebuilt or morphed by a
 * refresh shows it still (a refusal must not vanish with the next inventory poll). */
export function actionMessage() {
  const m = state.actionMessage;
  const mine = m && m.route === routeHash(state.route);
  return h("div", {
    id: "action-message", class: `action-message${mine ? ` ${m.kind}` : ""}`, role: "status",
    hidden: !mine,
  }, mine ? m.text : null);
}

/** Say `text` on the summary of `route` (the current one unless given: an action that ends
 * after the user went elsewhere says it where it started, seen on coming back). */
export function showActionMessage(text, kind = "info", route = state.route) {
  state.actionMessage = { route: routeHash(route), text, kind };
  const el = $("#action-message");
  if (!el || routeHash(route) !== routeHash(state.route)) return;
  el.className = `action-message ${kind}`;
  el.textContent = text;
  el.hidden = false;
}

export function hostsTable(hosts, field) {
  return table(["Host", "State", "Cluster", "CPU", "Memory free", "VMs", "Highest EVC mode"],
    hosts.map((x) => {
      const f = x.facts || {};
      const cpu = f.cpu || {};
      return h("tr", { dataset: { host: x.name } },
        h("td", null, itemLink("host", x.name)),
        h("td", null, connectionBadge(x.connection), x.maintenance ? [" ", maintenanceBadge(x.maintenance)] : null),
        h("td", null, state.idx.clusterOfHost.has(x.name)
          ? itemLink("cluster", state.idx.clusterOfHost.get(x.name)) : "—"),
        h("td", null, `${vendorName(cpu.vendor)} · ${cpu.count ?? "?"} CPUs`),
        h("td", null, f.memory ? `${fmtBytes(f.memory.available_bytes)} of ${fmtBytes(f.memory.total_bytes)}` : "—"),
        h("td", null, String(state.idx.vmsOnHost.get(x.name).length)),
        h("td", null, evcText(f.cpu_model && f.cpu_model.highest_evc_mode)));
    }), { field, empty: "No hosts. Add one with `kvmotion host add <address>`." });
}

export function vmsTable(vms, field) {
  return table(["VM", "State", "Host", "Memory", "vCPUs", "Datastores", "CPU"], vms.map((v) => h("tr", { dataset: { vm: v.name } },
    h("td", null, itemLink("vm", v.name)),
    h("td", null, powerBadge(v.power_state)),
    h("td", null, v.host ? itemLink("host", v.host) : "—"),
    h("td", null, fmtMiB(v.config.memory_mib)),
    h("td", null, String(v.config.vcpus ?? "—")),
    h("td", null, vmDatastores(v).join(", ")),
    h("td", null, cpuText(v)))), { field, empty: "No virtual machines." });
}

export function cpuText(v) {
  const model = (v.cpu && v.cpu.model) || v.config.cpu_model || "—";
  const mode = (v.cpu && v.cpu.evc_mode) || null;
  return mode ? `${model} (EVC ${evcLabel(mode)})` : model;
}

// ---------------------------------------------------------------------------------------------
// Modals

export function openModal({ id, title, body, buttons, wide, onClose }) {
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

export function closeModal() {
  if (!state.modal) return;
  const { overlay, onClose } = state.modal;
  state.modal = null;
  overlay.remove();
  if (onClose) onClose();
}
