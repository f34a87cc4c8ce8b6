// HA on a cluster's page: its settings, each member's HA state with the reason, admission
// control's reserve and the latest restarts (each with its reason and timing, linked to its
// task). Read from the center (center/ha.py): GET /v1/clusters/{c}/ha; the settings are changed
// with `kvmotion cluster ha` (docs/ha.md).
//
// What the card shows is kept per cluster and morphed into the page when a read comes back, so
// an inventory refresh that rebuilds the page shows the same thing.

import { $, h, morph } from "./dom.js";
import { fmtMiB } from "./format.js";
import { routeHash, state } from "./state.js";
import { api, enc, errorText } from "./api.js";
import { stateBadge, table } from "./widgets.js";

const REREAD_MS = 3000; // HA states change within seconds: read again at most this often
const STATE_BADGE = { connected: "ok", "not responding": "warn", isolated: "warn", failed: "bad" };

/** cluster -> {gen, ha, error, readAt, reading} */
const cards = new Map();

function entry(name) {
  let e = cards.get(name);
  if (!e || e.gen !== state.generation) {
    e = { gen: state.generation, ha: null, error: null, readAt: 0, reading: false };
    cards.set(name, e);
  }
  return e;
}

/** The HA card of cluster `name` (read again when older than a few seconds). */
export function haCard(name) {
  const e = entry(name);
  if (!e.reading && Date.now() - e.readAt > REREAD_MS) load(name);
  return cardView(name, e);
}

/** Read again if stale (the cluster view's `live`, at each inventory poll). */
export function haLive(name) {
  const e = entry(name);
  if (!e.reading && Date.now() - e.readAt > REREAD_MS) load(name);
}

async function load(name) {
  const e = entry(name);
  e.reading = true;
  try {
    const got = await api(`/v1/clusters/${enc(name)}/ha`);
    if (e.gen !== state.generation) return;
    e.ha = got;
    e.error = null;
  } catch (err) {
    e.error = errorText(err);
  } finally {
    e.reading = false;
    e.readAt = Date.now();
  }
  const el = $("#ha-card");
  if (el && el.dataset.cluster === name) morph(el, cardView(name, e));
}

function cardView(name, e) {
  const body = [];
  if (e.error) body.push(h("p", { class: "panel-error" }, e.error));
  const ha = e.ha;
  if (!ha) {
    body.push(h("p", { class: "placeholder" }, "Reading HA..."));
  } else if (!ha.settings.enabled) {
    body.push(h("p", { id: "ha-off", class: "empty" },
      `HA is off. Turn it on with: kvmotion cluster ha ${name} --enable`));
  } else {
    const s = ha.settings;
    body.push(h("p", { id: "ha-settings" },
      `A host silent for ${s.failure_s} s on the management network and its datastores is failed, `
      + `and its VMs restart on other hosts. Isolation response: ${s.isolation_response}.`));
    body.push(table(["Host", "HA state", "Why"], ha.hosts.map((x) => h("tr", { dataset: { haHost: x.host } },
      h("td", null, x.host),
      h("td", null, x.state ? stateBadge(x.state, STATE_BADGE[x.state] || "warn") : "not heard yet"),
      h("td", null, x.state === "connected" ? "" : x.reason || ""))), { field: "ha_hosts" }));
    body.push(reserveLine(ha.reserve));
    body.push(h("h3", null, "Restarts"));
    body.push(table(["Task", "VM", "From", "To", "State", "Restart", "Why"], ha.restarts.map(restartRow),
      { field: "ha_restarts", empty: "No HA restarts." }));
  }
  return h("section", { id: "ha-card", class: "card wide", dataset: { cluster: name } },
    h("h2", null, "HA"), body);
}

function reserveLine(r) {
  if (!r.failures) return h("p", { id: "ha-reserve" }, "Admission control: off (0 host failures to tolerate).");
  return h("p", { id: "ha-reserve", dataset: { reserved: String(r.reserved_mib), used: String(r.used_mib) } },
    `Admission control: ${r.failures} host failure(s) tolerated; ${fmtMiB(r.reserved_mib)} of `
    + `${fmtMiB(r.total_mib)} kept free; powered-on VMs use ${fmtMiB(r.used_mib)} of `
    + `${fmtMiB(r.usable_mib)} usable.`);
}

function restartRow(t) {
  const s = t.summary || {};
  const shown = t.state === "running" ? t.phase : t.state;
  return h("tr", { dataset: { restart: t.target } },
    h("td", null, h("a", { href: routeHash({ view: "task", id: t.id }), class: "item-link" }, `task ${t.id}`)),
    h("td", null, t.target),
    h("td", null, t.request.failed_host || ""),
    h("td", null, s.dest || ""),
    h("td", null, shown),
    h("td", null, s.restart_s !== undefined ? `${s.restart_s} s (host silent ${s.silent_s} s)` : ""),
    h("td", null, t.request.reason || ""));
}
