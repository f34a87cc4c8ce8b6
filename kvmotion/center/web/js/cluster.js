// The cluster summary, its balancing (balancing.js), its HA (ha.js) and its Configure EVC dialog.

import { $, clear, h } from "./dom.js";
import { plural } from "./format.js";
import { evcLabel, evcText, state } from "./state.js";
import { api, ApiError, enc, errorText } from "./api.js";
import { card, closeModal, hostsTable, openModal, summaryHeader, vmsTable } from "./widgets.js";
import { refreshSoon } from "./session.js";
import { balancingCard, updateBalancingTasks } from "./balancing.js";
import { haCard, haLive } from "./ha.js";

export const clusterView = {
  find: (name) => state.idx.cluster.get(name),
  sig: (c) => [c, c.hosts.map((n) => {
    const x = state.idx.host.get(n);
    return x && [x.connection, x.maintenance, x.facts && x.facts.cpu, x.facts && x.facts.cpu_model && x.facts.cpu_model.highest_evc_mode];
  }), state.data.vms.filter((v) => c.vms.includes(v.name)).map((v) => [v.name, v.power_state, v.host])],
  live: (c) => {
    updateBalancingTasks();
    haLive(c.name);
  },
  render: renderCluster,
};

function renderCluster(c) {
  const hosts = c.hosts.map((n) => state.idx.host.get(n)).filter(Boolean);
  const common = (c.evc_modes || []).filter((m) => c.hosts.every((n) => m.hosts[n] && m.hosts[n].supported));
  const vms = state.data.vms.filter((v) => c.vms.includes(v.name));
  const on = vms.filter((v) => v.power_state === "poweredOn").length;
  return h("div", { id: "cluster-summary", class: "summary" },
    summaryHeader("cluster", c.name, "Cluster", [
      h("button", {
        id: "evc-btn", class: "btn", type: "button", onclick: () => openEvcDialog(c.name),
        title: "Choose the CPU baseline every VM powered on in this cluster gets",
      }, "Configure EVC..."),
    ]),
    h("div", { class: "cards" },
      card("Summary", [
        ["Hosts", String(hosts.length), "host_count"],
        ["Virtual machines", `${vms.length} (${on} powered on)`, "vms"],
        ["EVC mode", evcText(c.evc_mode), "evc_mode",
          "VMs powered on in this cluster get this CPU baseline, so they can move to any of its hosts", c.evc_mode || ""],
        ["EVC modes every host supports", common.length ? evcText(common[common.length - 1].key) + " and below" : "none", "common_evc",
          "the highest mode all member hosts support"],
      ]),
      h("section", { class: "card wide" }, h("h2", null, "Hosts"), hostsTable(hosts, "hosts")),
      balancingCard(c.name),
      haCard(c.name),
      h("section", { class: "card wide" }, h("h2", null, "Virtual machines"), vmsTable(vms, "vm_list"))));
}

// ---------------------------------------------------------------------------------------------
// EVC dialog: modes (rows) x hosts (columns), the current mode, a select and Apply.

async function openEvcDialog(clusterName) {
  const body = h("div", { class: "evc-body" }, h("p", { class: "placeholder" }, "Reading the hosts' EVC modes..."));
  openModal({
    id: "evc-dialog",
    title: `Configure EVC: cluster ${clusterName}`,
    wide: true,
    body,
    buttons: [h("button", { id: "evc-close", class: "btn", type: "button", onclick: closeModal }, "Close")],
  });
  try {
    const cluster = await api(`/v1/clusters/${enc(clusterName)}`);
    if (!$("#evc-dialog")) return;
    renderEvcBody(body, cluster);
  } catch (err) {
    clear(body).append(h("p", { id: "evc-error", class: "form-error" }, errorText(err)));
  }
}

function renderEvcBody(body, cluster, message) {
  const hosts = cluster.hosts;
  const modes = cluster.evc_modes || [];
  const current = cluster.evc_mode;
  const select = h("select", { id: "evc-select", "aria-label": "EVC mode" },
    h("option", { value: "" }, "Disable EVC"),
    modes.map((m) => {
      const ok = hosts.every((n) => m.hosts[n] && m.hosts[n].supported);
      return h("option", { value: m.key }, `${m.label}${ok ? "" : "  (not supported by every host)"}`);
    }));
  select.value = current || "";
  const explain = h("p", { id: "evc-explain", class: "evc-explain" });
  const error = h("p", { id: "evc-error", class: "form-error", role: "alert", hidden: true });
  const ok = h("p", { id: "evc-result", class: "form-ok", role: "status", hidden: !message }, message || "");
  const apply = h("button", { id: "evc-apply", class: "btn btn-primary", type: "button" }, "Apply");

  const describe = () => {
    const key = select.value;
    apply.disabled = (key || null) === (current || null);
    if (!key) {
      explain.textContent = current
        ? "Disabling EVC: VMs powered on from now get their own CPU model; VMs already running keep theirs."
        : "EVC is disabled: each VM runs with its configured CPU model.";
      return;
    }
    const m = modes.find((x) => x.key === key);
    const lacking = hosts.filter((n) => !(m.hosts[n] && m.hosts[n].supported));
    if (!lacking.length) {
      explain.textContent = `${m.label}: every host supports it (${plural(m.feature_count, "CPU feature")}). `
        + "Powered-on VMs using features beyond it would have to be power-cycled; the center checks that on Apply.";
    } else {
      explain.textContent = `${m.label} is not supported by ${lacking.map((n) => {
        const miss = (m.hosts[n] && m.hosts[n].missing) || [];
        return miss.length ? `${n} (lacks ${miss.join(", ")})` : n;
      }).join("; ")}: the center will refuse it. Choose a mode with "yes" in every column.`;
    }
  };
  select.addEventListener("change", () => {
    describe();
    error.hidden = true;
    ok.hidden = true;
  });

  apply.addEventListener("click", async () => {
    const key = select.value || null;
    apply.disabled = true;
    apply.textContent = "Applying...";
    error.hidden = true;
    ok.hidden = true;
    try {
      const updated = await api(`/v1/clusters/${enc(cluster.name)}/evc`, { method: "PUT", body: { mode: key } });
      refreshSoon(0);
      renderEvcBody(body, updated, key
        ? `EVC mode set to ${evcText(key)}. VMs get it at their next power-on.`
        : "EVC disabled for this cluster.");
    } catch (err) {
      apply.textContent = "Apply";
      apply.disabled = false;
      error.textContent = `${errorText(err)}${evcHint(err)}`;
      error.hidden = false;
    }
  });

  const headRow = h("tr", null, h("th", null, "EVC mode"), hosts.map((n) => h("th", { class: "host-col" }, n)));
  const rows = modes.map((m) => h("tr", {
    class: m.key === current ? "current" : "",
    dataset: { mode: m.key },
    onclick: () => { select.value = m.key; select.dispatchEvent(new Event("change")); },
  },
  h("th", { scope: "row", class: "mode-label" }, m.label,
    h("span", { class: "mode-key" }, m.key),
    m.key === current ? h("span", { class: "badge info" }, "current") : null),
  hosts.map((n) => {
    const cell = m.hosts[n];
    const yes = Boolean(cell && cell.supported);
    const missing = (cell && cell.missing) || [];
    return h("td", {
      class: yes ? "yes" : "no",
      dataset: { host: n },
      title: yes ? `${n} supports ${m.label}` : `${n} lacks ${missing.join(", ") || "this mode"}`,
    }, yes ? "yes" : "no");
  })));
  clear(body).append(
    h("p", { class: "evc-current-line" }, "Current EVC mode: ",
      h("strong", { id: "evc-current" }, current ? `${evcLabel(current)} (${current})` : "Disabled")),
    h("p", { class: "hint" },
      "EVC gives every VM powered on in the cluster the same baseline CPU, so any VM can move to any host. "
      + "A mode is possible when every host supports it (\"yes\" in every column)."),
    modes.length
      ? h("div", { class: "evc-table-wrap" }, h("table", { class: "grid evc-table" }, h("thead", null, headRow), h("tbody", null, rows)))
      : h("p", { class: "empty" }, "The hosts report no EVC modes (their CPU probe failed, or the cluster has no hosts)."),
    h("div", { class: "evc-controls" }, h("label", { for: "evc-select" }, "EVC mode"), select, apply),
    explain, error, ok);
  describe();
}

function evcHint(err) {
  if (!(err instanceof ApiError)) return "";
  if (err.code === "evc_mode_refused" && /power/.test(err.message)) {
    return " — power the named VMs off and on again later, or choose a mode they already fit.";
  }
  if (err.code === "evc_mode_refused") return " — choose a mode every host supports.";
  return "";
}
