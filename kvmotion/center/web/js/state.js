// Shared state: the one `state` object every module reads and writes, the constants, lookups
// over the inventory, and the routes (#/...) as objects. Imports nothing: every module can use it.

// ---------------------------------------------------------------------------------------------
// Constants

export const TOKEN_KEY = "kvmotion.token";
export const REFRESH_MS = 5000;
export const EVENTS_REFRESH_MS = 5000;
export const TASK_LIMIT = 30;
export const FINAL_STATES = new Set(["success", "error", "cancelled"]);
export const DATACENTER = "Datacenter"; // the center has one datacenter (inventory.DEFAULT_DATACENTER)

export const MIGRATION_TYPES = [
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
export const TYPE_LABEL = Object.fromEntries(MIGRATION_TYPES.map((t) => [t.value, t.label]));

// A host's `maintenance` (GET /v1/hosts): null, "entering" (being emptied; it takes no new VMs)
// or "in" (empty of running VMs, held so).
export const MAINTENANCE_LABEL = { entering: "Entering maintenance", in: "In maintenance" };

// ---------------------------------------------------------------------------------------------
// State

export const state = {
  token: null,
  centers: [], // the URLs of the other centers on this one's database (session.js)
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
  lastItem: null, // the last inventory item shown (the Inventory link returns to it)
  actionMessage: null, // {route, text, kind}: how the last action on a summary went (widgets.js)
  generation: 0, // bumped at sign-out: late answers of an old session are dropped
};

// ---------------------------------------------------------------------------------------------
// Lookups over the inventory (state.data, state.idx)

export function buildIndex(data) {
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

export function vmDatastores(v) {
  const names = ((v.config && v.config.disks) || []).map((d) => d.datastore);
  return [...new Set(names.length ? names : [v.config && v.config.datastore].filter(Boolean))];
}

export function vmNetworks(v) {
  return [...new Set(((v.config && v.config.nics) || []).map((n) => n.network))];
}

/** The running migration of a VM (a maintenance task's target is a host, never a VM). */
export function activeTaskFor(vmName) {
  let found = null;
  for (const t of state.tasks.values()) {
    if (t.kind !== "maintenance" && t.target === vmName && !FINAL_STATES.has(t.state)
        && (!found || t.id > found.id)) found = t;
  }
  return found;
}

/** The newest maintenance task of a host that the client knows (running or ended), or null. */
export function maintenanceTaskFor(hostName) {
  let found = null;
  for (const t of state.tasks.values()) {
    if (t.kind === "maintenance" && t.target === hostName && (!found || t.id > found.id)) found = t;
  }
  return found;
}

export function evcLabel(key) {
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
export function shortMode(key) {
  const label = evcLabel(key) || "";
  const quoted = label.match(/"([^"]+)"/);
  return quoted ? quoted[1] : label.replace(/ Generation$/, "").replace(/^(Intel®|AMD) /, "");
}

export function evcText(key) {
  if (!key) return "Disabled";
  const label = evcLabel(key);
  return label === key ? key : `${label} (${key})`;
}

// ---------------------------------------------------------------------------------------------
// Routes: #/, #/<kind>/<name>, #/task/<id>, #/events (navigation is in router.js).

export function parseHash(hash) {
  const parts = (hash || "").replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "events") return { view: "events" };
  if (parts[0] === "task" && parts[1]) return { view: "task", id: Number(parts[1]) };
  const kinds = ["datacenter", "cluster", "host", "vm", "datastore", "network"];
  if (kinds.includes(parts[0]) && parts[1]) return { view: "item", kind: parts[0], name: parts[1] };
  return { view: "item", kind: "datacenter", name: DATACENTER };
}

export function routeHash(r) {
  if (r.view === "events") return "#/events";
  if (r.view === "task") return `#/task/${r.id}`;
  return `#/${r.kind}/${encodeURIComponent(r.name)}`;
}
