// The inventory tree (left pane): Datacenter, clusters, hosts, VMs, then Datastores and Networks.

import { $, $$, h, icon, morph } from "./dom.js";
import { POWER_LABEL } from "./format.js";
import { activeTaskFor, DATACENTER, MAINTENANCE_LABEL, state } from "./state.js";
import { navigate } from "./router.js";

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
    maintenance: x.maintenance || null,
    title: `${x.name}: ${x.connection}${x.maintenance === "in" ? ", in maintenance mode (takes no new VMs)"
      : x.maintenance === "entering" ? ", entering maintenance mode (its VMs are moving off)" : ""}`,
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

export function renderTree() {
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
    dataset: node.group ? { group: node.group, key }
      : { kind: node.kind, name: node.name, key, ...(node.maintenance ? { maintenance: node.maintenance } : {}) },
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
  node.maintenance ? h("span", {
    class: `maint-mark ${node.maintenance}`, role: "img", title: node.title,
    "aria-label": MAINTENANCE_LABEL[node.maintenance] || node.maintenance,
  }, icon("maintenance")) : null,
  node.group ? h("span", { class: "count" }, String(node.children.length)) : null);
  return h("li", { role: "none" }, h("span", props, row,
    hasChildren && !collapsed
      ? h("ul", { class: "tree-list", role: "group" }, node.children.map((c) => treeItem(c, depth + 1)))
      : null));
}

/** One listener for the whole tree: a click anywhere in an item's own box (its row, or the
 * item's inline box around it) opens that item; a click in a child's row opens the child. */
export function treeClick(ev) {
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

export function markSelection() {
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
