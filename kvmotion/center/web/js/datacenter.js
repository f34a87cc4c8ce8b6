// The datacenter, datastore and network summaries.

import { h } from "./dom.js";
import { fmtBytes } from "./format.js";
import { DATACENTER, evcText, FINAL_STATES, state, vmDatastores, vmNetworks } from "./state.js";
import {
  card, hostsTable, itemLink, stateBadge, summaryHeader, table, usageBar, vmsTable,
} from "./widgets.js";

export const datacenterView = {
  find: (name) => (name === DATACENTER ? { name } : null),
  sig: () => {
    const d = state.data;
    return [d.clusters.map((c) => [c.name, c.hosts, c.evc_mode]),
      d.hosts.map((x) => [x.name, x.connection, x.maintenance]), d.vms.map((v) => [v.name, v.host, v.power_state]),
      d.datastores.map((x) => [x.name, x.free_bytes]), [...state.idx.network.keys()],
      [...state.tasks.values()].filter((t) => !FINAL_STATES.has(t.state)).length];
  },
  render: renderDatacenter,
};

function renderDatacenter() {
  const d = state.data;
  const on = d.vms.filter((v) => v.power_state === "poweredOn").length;
  const connected = d.hosts.filter((x) => x.connection === "connected").length;
  const running = [...state.tasks.values()].filter((t) => t.kind !== "maintenance" && !FINAL_STATES.has(t.state)).length;
  const held = d.hosts.filter((x) => x.maintenance === "in").length;
  const entering = d.hosts.filter((x) => x.maintenance === "entering").length;
  return h("div", { id: "datacenter-summary", class: "summary" },
    summaryHeader("datacenter", DATACENTER, "Datacenter"),
    h("div", { class: "cards" },
      card("Summary", [
        ["Clusters", String(d.clusters.length), "clusters"],
        ["Hosts", `${d.hosts.length} (${connected} connected)`, "hosts"],
        held || entering ? ["Hosts in maintenance", `${held} in maintenance mode, ${entering} entering`, "maintenance"] : null,
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

// -- datastore & network -------------------------------------------------------------------------

export const datastoreView = {
  find: (name) => state.idx.datastore.get(name),
  sig: (d) => [d, state.data.vms.filter((v) => vmDatastores(v).includes(d.name)).map((v) => [v.name, v.host])],
  render: renderDatastore,
};

export const networkView = {
  find: (name) => state.idx.network.get(name),
  sig: (n) => [n, state.data.vms.filter((v) => vmNetworks(v).includes(n.name)).map((v) => [v.name, v.host])],
  render: renderNetwork,
};

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
