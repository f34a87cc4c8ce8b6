// The host summary, with its maintenance mode buttons and panel (maintenance.js).

import { $, h } from "./dom.js";
import { fmtBytes, fmtDateTime, fmtLink, parseTime, plural, vendorName } from "./format.js";
import { evcText, maintenanceTaskFor, state } from "./state.js";
import {
  actionMessage, card, connectionBadge, haBadge, itemLink, maintenanceBadge, stateBadge, summaryHeader, table,
  usageBar, vmsTable,
} from "./widgets.js";
import { maintenanceButtons, maintenancePanel, maintenanceSig } from "./maintenance.js";

export const hostView = {
  find: (name) => state.idx.host.get(name),
  sig: (x) => {
    const { last_seen: _seen, facts, ha, ...rest } = x;
    const f = { ...(facts || {}), memory: { total_bytes: facts && facts.memory && facts.memory.total_bytes } };
    return [rest, f, ha && [ha.state, ha.state === "connected" ? "" : ha.reason], state.idx.clusterOfHost.get(x.name),
      state.idx.vmsOnHost.get(x.name).map((v) => [v.name, v.power_state, v.config.memory_mib, v.cpu && v.cpu.model]),
      maintenanceSig(maintenanceTaskFor(x.name))];
  },
  live: (x) => {
    const mem = $("#main [data-field='memory']");
    if (mem) mem.replaceChildren(...memoryValue(x));
    const seen = $("#main [data-field='last_seen']");
    if (seen) seen.textContent = fmtDateTime(parseTime(x.last_seen));
  },
  render: renderHost,
};

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
    summaryHeader("host", x.name, `Host${f.hostname ? ` · ${f.hostname}` : ""}`, maintenanceButtons(x),
      h("span", { class: "badges" }, connectionBadge(x.connection), maintenanceBadge(x.maintenance, "maintenance-badge"),
        haBadge(x.ha))),
    actionMessage(),
    x.connection !== "connected" ? h("div", { class: "panel-error" },
      "The center cannot reach this host's agent: the facts below are the last it reported. ",
      "Check that `kvmotion host serve` runs there and that the management network reaches it.") : null,
    maintenancePanel(x),
    x.ha && x.ha.state && x.ha.state !== "connected" ? h("div", { id: "ha-reason", class: "panel-error" },
      `HA: ${x.ha.state}. ${x.ha.reason}`) : null,
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
