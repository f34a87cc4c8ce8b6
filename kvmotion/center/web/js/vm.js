// The VM summary, its "migrating now" banner, the power buttons and the Console button.

import { $, $$, h } from "./dom.js";
import { fmtDateTime, fmtMiB, parseTime, plural, POWER_LABEL } from "./format.js";
import {
  activeTaskFor, evcText, FINAL_STATES, state, TYPE_LABEL, vmDatastores, vmNetworks,
} from "./state.js";
import { api, enc, errorText } from "./api.js";
import {
  actionMessage, card, closeModal, cpuText, itemLink, openModal, powerBadge, showActionMessage,
  summaryHeader, table,
} from "./widgets.js";
import { refreshInventory } from "./session.js";
import { renderMain } from "./router.js";
import { openWizard } from "./wizard.js";
import { openConsole } from "./console.js";
import { routeText } from "./tasks.js";

export const vmView = {
  find: (name) => state.idx.vm.get(name),
  sig: (v) => {
    const host = v.host && state.idx.host.get(v.host);
    const t = activeTaskFor(v.name);
    return [v, host && host.connection, host && host.maintenance, state.idx.clusterOfHost.get(v.host),
      t && [t.id, FINAL_STATES.has(t.state)]];
  },
  live: (v) => updateVmTaskBanner(v),
  render: renderVm,
};

function renderVm(v) {
  const cfg = v.config || {};
  const host = v.host && state.idx.host.get(v.host);
  const cluster = v.host && state.idx.clusterOfHost.get(v.host);
  const clusterObj = cluster && state.idx.cluster.get(cluster);
  const task = activeTaskFor(v.name);
  const on = v.power_state === "poweredOn";
  const effective = v.evc_mode || (clusterObj && clusterObj.evc_mode) || null;
  const features = (v.cpu && v.cpu.features) || [];
  // A host in (or entering) maintenance mode powers nothing on: the center registers the VM on
  // another host first (one that sees its datastores and has room), or refuses if none fits.
  const held = !on && host && host.maintenance;
  const actions = [
    h("button", {
      id: "console-btn", class: "btn", type: "button", disabled: !on,
      title: on ? `Open the VM's console: its serial port${cfg.graphics ? " and its screen" : ""}`
        : "the VM is not running: power it on to open its console",
      onclick: () => openConsole(v.name),
    }, "Console"),
    h("button", {
      id: "migrate-btn", class: "btn btn-primary", type: "button", disabled: Boolean(task),
      title: task ? `task ${task.id} is migrating this VM` : "Move this VM to another host or datastore",
      onclick: () => openWizard(v.name),
    }, "Migrate..."),
    h("button", {
      id: "power-on-btn", class: "btn", type: "button", disabled: on || Boolean(task),
      title: on ? "the VM is already powered on" : held ? heldText(v, host)
        : "Start the VM on its host",
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
    held ? h("div", { id: "vm-maintenance-note", class: "panel-warn", dataset: { maintenance: host.maintenance } },
      `${heldText(v, host)}.`) : null,
    h("div", { id: "vm-task-banner", class: "task-banner", hidden: true }),
    h("div", { class: "cards" },
      card("Summary", [
        ["Power state", POWER_LABEL[v.power_state] || v.power_state, "power_state", null, v.power_state],
        ["Host", v.host ? itemLink("host", v.host) : "none", "host", null, v.host || ""],
        ["Cluster", cluster ? itemLink("cluster", cluster) : "—", "cluster"],
        ["Datastores", vmDatastores(v).map((d, i) => [i ? ", " : "", itemLink("datastore", d)]), "datastores"],
        ["Networks", vmNetworks(v).map((n, i) => [i ? ", " : "", itemLink("network", n)]), "networks"],
        ["IP addresses", (v.addresses || []).length
          ? `${v.addresses.join(", ")} (from ${v.addresses_source === "guest-agent" ? "the guest agent" : "DHCP"})`
          : on ? "not known yet" : "—", "addresses",
        "what the guest agent in the VM reports, else what the network's DHCP server gave it"],
        cfg.image ? ["OS image", cfg.image, "image"] : null,
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
        ["Screen", cfg.graphics ? "VGA (in the console's Screen tab)" : "none (serial console only)", "graphics",
          null, String(Boolean(cfg.graphics))],
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

/** What powering on a VM whose host is in maintenance does. */
function heldText(v, host) {
  const mode = host.maintenance === "in" ? "is in maintenance mode" : "is entering maintenance mode";
  return `Host ${host.name} ${mode}: nothing new is powered on there, so powering ${v.name} on `
    + `registers it on another host first (one that sees its datastores and has room), or is `
    + `refused if none can take it`;
}

/** The "migrating now" line of a VM summary, updated in place as task events arrive. */
export function updateVmTaskBanner(v) {
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

// ---------------------------------------------------------------------------------------------
// Power

async function powerAction(vm, action) {
  const label = action === "power-on" ? "Powering on" : "Powering off";
  const route = state.route;
  showActionMessage(`${label} ${vm}...`, "info", route);
  $$("#vm-summary .actions .btn").forEach((b) => { b.disabled = true; });
  try {
    const done = await api(`/v1/vms/${enc(vm)}/${action}`, { method: "POST" });
    const placed = done && done.placed ? ` Its host is in maintenance, so it was placed first: ${done.placed}.` : "";
    showActionMessage(`${vm} is ${action === "power-on" ? "powered on" : "powered off"}.${placed}`, "ok", route);
    state.mainSig = null;
    await refreshInventory();
  } catch (err) {
    // The refusal as the center said it (host_in_maintenance, vm_migrating...); kept by the
    // summary's rebuilds (widgets.actionMessage) until the next action or page.
    showActionMessage(errorText(err), "bad", route);
    state.mainSig = null;
    renderMain(true);
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
