// The Migrate wizard: type, destination (each candidate prechecked), options, review and Finish.

import { $, $$, clear, h } from "./dom.js";
import { fmtBytes, fmtLink, fmtSeconds, plural, vendorName } from "./format.js";
import { MIGRATION_TYPES, shortMode, state, TYPE_LABEL, vmDatastores } from "./state.js";
import { api, enc, errorText } from "./api.js";
import { closeModal, connectionBadge, maintenanceBadge, openModal } from "./widgets.js";
import { flashTask, setTasksMessage, upsertTask } from "./tasks.js";

const WIZ_STEPS = ["Select a migration type", "Select the destination", "Select options", "Ready to complete"];

export function openWizard(vmName) {
  const vm = state.idx.vm.get(vmName);
  if (!vm) return;
  const wiz = {
    vm: vmName,
    source: vm.host,
    step: 1,
    type: "compute",
    host: null,
    datastore: null,
    priority: "normal",
    downtime: 100,
    hostChecks: new Map(), // "type|host" -> {status, result|error}
    dsChecks: new Map(), // "type|host|ds" -> ...
    review: null, // {key, status, result|error}
    busy: false,
  };
  const dialog = openModal({
    id: "wizard",
    title: `Migrate ${vmName}`,
    wide: true,
    body: h("div", { class: "wizard" },
      h("ol", { class: "wizard-steps" }, WIZ_STEPS.map((t, i) => h("li", { dataset: { step: String(i + 1) } }, t))),
      h("div", { class: "wizard-content" },
        h("div", { class: "wizard-page", id: "wizard-page" }),
        h("p", { id: "wizard-error", class: "form-error", role: "alert", hidden: true }))),
    buttons: [
      h("button", { id: "wizard-cancel", class: "btn btn-link", type: "button", onclick: closeModal }, "Cancel"),
      h("span", { class: "spacer" }),
      h("button", { id: "wizard-back", class: "btn", type: "button", onclick: () => wizardGo(wiz, -1) }, "Back"),
      h("button", { id: "wizard-next", class: "btn btn-primary", type: "button", onclick: () => wizardGo(wiz, 1) }, "Next"),
      h("button", { id: "wizard-finish", class: "btn btn-primary", type: "button", onclick: () => wizardFinish(wiz) }, "Finish"),
    ],
    onClose: () => { wiz.closed = true; },
  });
  wiz.dialog = dialog;
  renderWizard(wiz);
}

function wizardGo(wiz, delta) {
  if (delta > 0 && !wizardValid(wiz).ok) return;
  wiz.step = Math.min(4, Math.max(1, wiz.step + delta));
  wizardError(null);
  renderWizard(wiz);
}

function wizardError(text) {
  const el = $("#wizard-error");
  if (!el) return;
  el.textContent = text || "";
  el.hidden = !text;
}

function needsHost(type) {
  return type === "compute" || type === "both";
}

function needsDatastore(type) {
  return type === "storage" || type === "both";
}

/** Can the user go on from this step? {ok, why} */
function wizardValid(wiz) {
  if (wiz.step === 1) return { ok: Boolean(wiz.type), why: "Choose a migration type." };
  if (wiz.step === 2) {
    if (needsHost(wiz.type)) {
      if (!wiz.host) return { ok: false, why: "Select a destination host." };
      const c = wiz.hostChecks.get(`${wiz.type}|${wiz.host}`);
      if (!c || c.status === "checking") return { ok: false, why: `Checking ${wiz.host}...` };
      if (c.level === "error" && c.reasons.some((r) => r.code === "host_in_maintenance")) {
        return { ok: false, why: `${wiz.host} is in maintenance mode (or entering it): it takes no new VMs. Choose another host, or exit maintenance mode on ${wiz.host} first.` };
      }
      if (c.level === "error") {
        return { ok: false, why: `${wiz.host} cannot take this VM (see its errors): choose another host${wiz.type === "compute" ? ", or change both compute resource and storage" : ""}.` };
      }
    }
    if (needsDatastore(wiz.type)) {
      if (!wiz.datastore) return { ok: false, why: "Select a destination datastore." };
      const c = wiz.dsChecks.get(dsKey(wiz, wiz.datastore));
      if (!c || c.status === "checking") return { ok: false, why: `Checking datastore ${wiz.datastore}...` };
      if (c.level === "error") return { ok: false, why: `Datastore ${wiz.datastore} cannot take the disks (see its errors): choose another.` };
    }
    return { ok: true };
  }
  if (wiz.step === 3) {
    const d = Number(wiz.downtime);
    if (!Number.isInteger(d) || d < 1 || d > 60000) {
      return { ok: false, why: "The downtime limit is a whole number of milliseconds from 1 to 60000." };
    }
    return { ok: true };
  }
  return { ok: true };
}

function renderWizard(wiz) {
  if (wiz.closed) return;
  $$(".wizard-steps li", wiz.dialog).forEach((li) => {
    const n = Number(li.dataset.step);
    li.className = n === wiz.step ? "current" : n < wiz.step ? "done" : "";
  });
  const page = $("#wizard-page");
  clear(page);
  if (wiz.step === 1) page.append(wizardTypePage(wiz));
  else if (wiz.step === 2) page.append(wizardDestPage(wiz));
  else if (wiz.step === 3) page.append(wizardOptionsPage(wiz));
  else page.append(wizardReviewPage(wiz));
  updateWizardButtons(wiz);
}

function updateWizardButtons(wiz) {
  if (wiz.closed) return;
  const valid = wizardValid(wiz);
  $("#wizard-back").disabled = wiz.step === 1 || wiz.busy;
  $("#wizard-next").disabled = wiz.step === 4 || !valid.ok || wiz.busy;
  const review = wiz.review;
  const reviewBlocked = !review || review.status === "checking" || (review.result && !review.result.ok);
  $("#wizard-finish").disabled = wiz.step !== 4 || wiz.busy || reviewBlocked;
  const hint = $("#wizard-hint");
  if (hint) {
    hint.textContent = valid.ok ? "" : valid.why;
    hint.hidden = valid.ok;
  }
}

function wizardTypePage(wiz) {
  return h("div", null,
    h("h3", null, "Select a migration type"),
    h("p", { class: "hint" }, `VM ${wiz.vm} runs on ${wiz.source || "no host"}. Change the compute resource, the storage, or both.`),
    h("div", { class: "radio-list" }, MIGRATION_TYPES.map((t) => h("label", { class: "radio-card" },
      h("input", {
        type: "radio", name: "mtype", value: t.value, checked: wiz.type === t.value,
        onchange: () => {
          wiz.type = t.value;
          wiz.host = null;
          wiz.datastore = null;
          wiz.review = null;
          updateWizardButtons(wiz);
        },
      }),
      h("span", null, h("strong", null, t.label), h("span", { class: "radio-help" }, t.help))))));
}

function dsKey(wiz, ds) {
  return `${wiz.type}|${wiz.type === "storage" ? wiz.source : wiz.host}|${ds}`;
}

function wizardDestPage(wiz) {
  const wrap = h("div", null);
  if (needsHost(wiz.type)) {
    const hosts = state.data.hosts.filter((x) => x.name !== wiz.source);
    wrap.append(
      h("h3", null, "Select a compute resource"),
      h("p", { class: "hint" }, wiz.type === "both"
        ? "Each host is checked for this VM's memory and CPU (migration network, CPU compatibility, networks, memory); the disks move too, so shared storage is not needed."
        : "Each host is checked as vMotion requires: shared storage, a migration network on both hosts, CPU compatibility, the VM's networks and enough memory."),
      hosts.length ? h("table", { class: "grid candidates", id: "host-candidates" },
        h("thead", null, h("tr", null, h("th", null, ""), h("th", null, "Host"), h("th", null, "Cluster"),
          h("th", null, "CPU"), h("th", null, "Memory free"), h("th", null, "Compatibility"))),
        h("tbody", null, hosts.map((x) => hostCandidate(wiz, x))))
        : h("p", { class: "empty" }, "There is no other host to move to."));
    for (const x of hosts) runHostCheck(wiz, x.name);
  }
  if (needsDatastore(wiz.type)) {
    const on = wiz.type === "storage" ? wiz.source : wiz.host;
    const section = h("div", { id: "ds-section" });
    wrap.append(section);
    renderDsSection(wiz, section, on);
  }
  wrap.append(h("p", { id: "wizard-hint", class: "hint wizard-hint", hidden: true }));
  return wrap;
}

function hostCandidate(wiz, x) {
  const f = x.facts || {};
  const cpu = f.cpu || {};
  const radio = h("input", {
    type: "radio", name: "dest-host", value: x.name, checked: wiz.host === x.name,
    "aria-label": `host ${x.name}`,
    onchange: () => {
      wiz.host = x.name;
      wiz.datastore = null;
      wiz.review = null;
      $$("#host-candidates tr.chosen").forEach((r) => r.classList.remove("chosen"));
      radio.closest("tr").classList.add("chosen");
      if (wiz.type === "both") renderDsSection(wiz, $("#ds-section"), x.name);
      updateWizardButtons(wiz);
    },
  });
  return h("tr", {
    class: wiz.host === x.name ? "chosen" : "",
    dataset: { candidateHost: x.name },
    onclick: (ev) => { if (ev.target !== radio && !ev.target.closest("a")) radio.click(); },
  },
  h("td", { class: "pick" }, radio),
  h("td", null, h("strong", null, x.name), x.connection !== "connected" ? [" ", connectionBadge(x.connection)] : null,
    x.maintenance ? [" ", maintenanceBadge(x.maintenance)] : null),
  h("td", null, state.idx.clusterOfHost.get(x.name) || "—"),
  h("td", null, vendorName(cpu.vendor), f.cpu_model && f.cpu_model.highest_evc_mode
    ? h("div", { class: "muted small" }, `EVC up to ${shortMode(f.cpu_model.highest_evc_mode)}`) : null),
  h("td", null, f.memory ? fmtBytes(f.memory.available_bytes) : "—"),
  h("td", { class: "compat-cell" }, compatView(wiz.hostChecks.get(`${wiz.type}|${x.name}`))));
}

function renderDsSection(wiz, section, hostName) {
  if (!section) return;
  clear(section);
  section.append(h("h3", null, wiz.type === "both" ? "Select storage on the destination" : "Select storage"));
  if (!hostName) {
    section.append(h("p", { class: "hint" }, "Select a host first: its datastores are listed here."));
    return;
  }
  const host = state.idx.host.get(hostName);
  const sources = new Set(vmDatastores(state.idx.vm.get(wiz.vm) || { config: {} }));
  const list = ((host && host.facts && host.facts.datastores) || []).filter((d) => d.accessible !== false);
  section.append(h("p", { class: "hint" }, `Datastores of ${hostName}. Every disk of ${wiz.vm} (now on ${[...sources].join(", ") || "no datastore"}) moves to the one you choose; it needs the disks' size plus 10 % free.`));
  if (!list.length) {
    section.append(h("p", { class: "empty" }, `${hostName} reports no datastores.`));
    return;
  }
  const shared = new Map(state.data.datastores.map((d) => [d.name, d.shared]));
  section.append(h("table", { class: "grid candidates", id: "ds-candidates" },
    h("thead", null, h("tr", null, h("th", null, ""), h("th", null, "Datastore"), h("th", null, "Type"),
      h("th", null, "Capacity"), h("th", null, "Free"), h("th", null, "Compatibility"))),
    h("tbody", null, list.map((d) => {
      const radio = h("input", {
        type: "radio", name: "dest-ds", value: d.name, checked: wiz.datastore === d.name,
        "aria-label": `datastore ${d.name}`,
        onchange: () => {
          wiz.datastore = d.name;
          wiz.review = null;
          $$("#ds-candidates tr.chosen").forEach((r) => r.classList.remove("chosen"));
          radio.closest("tr").classList.add("chosen");
          updateWizardButtons(wiz);
        },
      });
      return h("tr", {
        class: wiz.datastore === d.name ? "chosen" : "",
        dataset: { candidateDs: d.name },
        onclick: (ev) => { if (ev.target !== radio) radio.click(); },
      },
      h("td", { class: "pick" }, radio),
      h("td", null, h("strong", null, d.name), sources.has(d.name) ? h("span", { class: "tag" }, "current") : null),
      h("td", null, (shared.get(d.name) ?? d.shared) ? "shared" : "local"),
      h("td", null, fmtBytes(d.capacity_bytes)),
      h("td", null, fmtBytes(d.free_bytes)),
      h("td", { class: "compat-cell" }, compatView(wiz.dsChecks.get(dsKey(wiz, d.name)))));
    }))));
  for (const d of list) runDsCheck(wiz, hostName, d.name);
}

/** The compatibility cell: "Compatible" / "Warnings" / "Errors" then the reasons. */
function compatView(check) {
  if (!check || check.status === "checking") {
    return h("div", { class: "compat checking" }, h("span", { class: "spinner", "aria-hidden": "true" }), "Checking...");
  }
  const level = check.level;
  const label = level === "ok" ? "Compatible" : level === "warn" ? "Warnings" : "Errors";
  return h("div", { class: `compat ${level}` },
    h("span", { class: "compat-status" }, label),
    check.reasons.length ? h("ul", { class: "compat-reasons" }, check.reasons.map((r) => h("li", { class: r.level },
      h("span", { class: "reason-text" }, r.message), r.code ? [" ", h("code", null, r.code)] : null))) : null);
}

function precheckBody(wiz, { host, datastore, predict = false, type = wiz.type } = {}) {
  const body = {
    type,
    downtime_ms: Number(wiz.downtime) || 100,
    priority: wiz.priority,
  };
  if (host) body.host = host;
  if (datastore) body.datastore = datastore;
  if (predict) body.predict = true;
  return body;
}

/** A precheck's answer (or its refusal) as a compatibility level and reasons. */
function toCheck(result, { ignore = [] } = {}) {
  const errors = (result.errors || []).filter((e) => !ignore.includes(e.code));
  const warnings = result.warnings || [];
  return {
    status: "done",
    result,
    level: errors.length ? "error" : warnings.length ? "warn" : "ok",
    reasons: [
      ...errors.map((e) => ({ level: "error", code: e.code, message: e.message })),
      ...warnings.map((w) => ({ level: "warn", code: w.code, message: w.message })),
    ],
  };
}

function failedCheck(err) {
  return {
    status: "done",
    level: "error",
    reasons: [{ level: "error", code: err.code || "client", message: errorText(err) }],
  };
}

async function runHostCheck(wiz, hostName) {
  const key = `${wiz.type}|${hostName}`;
  if (wiz.hostChecks.has(key)) return;
  wiz.hostChecks.set(key, { status: "checking" });
  // "Both" has no host-only check: the compute check stands in, without its shared-storage
  // finding (the disks move with the VM); each datastore is then checked as "both".
  const type = wiz.type === "both" ? "compute" : wiz.type;
  const ignore = wiz.type === "both" ? ["datastore_not_shared"] : [];
  let check;
  try {
    const result = await api(`/v1/vms/${enc(wiz.vm)}/migrate/precheck`, {
      method: "POST", body: precheckBody(wiz, { host: hostName, type }),
    });
    check = toCheck(result, { ignore });
  } catch (err) {
    check = failedCheck(err);
  }
  wiz.hostChecks.set(key, check);
  if (wiz.closed || wiz.step !== 2) return;
  const cell = $(`#host-candidates [data-candidate-host="${CSS.escape(hostName)}"] .compat-cell`);
  if (cell && key === `${wiz.type}|${hostName}`) cell.replaceChildren(compatView(check));
  updateWizardButtons(wiz);
}

async function runDsCheck(wiz, hostName, ds) {
  const key = dsKey(wiz, ds);
  if (wiz.dsChecks.has(key)) return;
  wiz.dsChecks.set(key, { status: "checking" });
  let check;
  try {
    const body = precheckBody(wiz, { host: wiz.type === "storage" ? undefined : hostName, datastore: ds });
    const result = await api(`/v1/vms/${enc(wiz.vm)}/migrate/precheck`, { method: "POST", body });
    check = toCheck(result);
  } catch (err) {
    check = failedCheck(err);
  }
  wiz.dsChecks.set(key, check);
  if (wiz.closed || wiz.step !== 2 || key !== dsKey(wiz, ds)) return;
  const cell = $(`#ds-candidates [data-candidate-ds="${CSS.escape(ds)}"] .compat-cell`);
  if (cell) cell.replaceChildren(compatView(check));
  updateWizardButtons(wiz);
}

function wizardOptionsPage(wiz) {
  const storageOnly = wiz.type === "storage";
  const priority = h("select", {
    id: "priority",
    onchange: () => { wiz.priority = priority.value; wiz.review = null; },
  },
  h("option", { value: "normal" }, "Normal: brake the guest only as much as convergence needs"),
  h("option", { value: "high" }, "High: brake the guest harder to finish sooner"));
  priority.value = wiz.priority;
  const downtime = h("input", {
    id: "downtime", type: "number", min: "1", max: "60000", step: "1", value: String(wiz.downtime),
    oninput: () => {
      wiz.downtime = downtime.value === "" ? "" : Number(downtime.value);
      wiz.review = null;
      updateWizardButtons(wiz);
    },
  });
  return h("div", null,
    h("h3", null, "Select options"),
    storageOnly ? h("p", { class: "hint" }, "A storage-only migration copies disks while the VM runs; it has no switchover, so these settings change little.") : null,
    h("div", { class: "form-grid" },
      h("label", { for: "priority" }, "vMotion priority"),
      h("div", null, priority, h("p", { class: "hint" }, "How hard kvmotion may slow the guest's CPU (its brake) when the guest dirties memory faster than the link carries.")),
      h("label", { for: "downtime" }, "Downtime limit (ms)"),
      h("div", null, downtime, h("p", { class: "hint" }, "The longest stun QEMU may choose at switchover (1 to 60000 ms; 100 ms is unnoticeable for most users)."))),
    h("p", { id: "wizard-hint", class: "hint wizard-hint", hidden: true }));
}

function wizardReviewPage(wiz) {
  const vm = state.idx.vm.get(wiz.vm);
  const rows = [
    ["VM", wiz.vm],
    ["Migration type", TYPE_LABEL[wiz.type]],
    ["Source host", wiz.source || "—"],
    ["Destination host", needsHost(wiz.type) ? wiz.host : `${wiz.source} (unchanged)`],
    ["Disks", needsDatastore(wiz.type)
      ? `to datastore ${wiz.datastore} (now on ${vm ? vmDatastores(vm).join(", ") : "?"})`
      : `stay on ${vm ? vmDatastores(vm).join(", ") : "?"}`],
    ["Priority", wiz.priority],
    ["Downtime limit", `${wiz.downtime} ms`],
  ];
  const review = h("dl", { id: "review", class: "props review" }, rows.map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
  const prediction = h("div", { id: "prediction", class: "prediction" });
  runReview(wiz, prediction);
  return h("div", null,
    h("h3", null, "Ready to complete"),
    h("p", { class: "hint" }, "Review your choices. Finish starts the migration; it then shows in Recent Tasks, where you can follow or cancel it."),
    review,
    h("h4", null, "Prediction"),
    prediction);
}

async function runReview(wiz, el) {
  const predict = needsHost(wiz.type);
  const body = precheckBody(wiz, {
    host: needsHost(wiz.type) ? wiz.host : undefined,
    datastore: needsDatastore(wiz.type) ? wiz.datastore : undefined,
    predict,
  });
  const key = JSON.stringify(body);
  if (wiz.review && wiz.review.key === key && wiz.review.status === "done") {
    showReview(wiz, el, wiz.review);
    return;
  }
  wiz.review = { key, status: "checking" };
  el.replaceChildren(h("span", { class: "spinner", "aria-hidden": "true" }),
    predict ? "Checking again and predicting (the guest's dirty rate is sampled for about a second)..." : "Checking again...");
  updateWizardButtons(wiz);
  let review;
  try {
    review = { key, status: "done", result: await api(`/v1/vms/${enc(wiz.vm)}/migrate/precheck`, { method: "POST", body }) };
  } catch (err) {
    review = { key, status: "done", error: err, result: { ok: false, errors: [] } };
  }
  if (wiz.closed || !wiz.review || wiz.review.key !== key) return;
  wiz.review = review;
  if (wiz.step === 4) showReview(wiz, el, review);
  updateWizardButtons(wiz);
}

function showReview(wiz, el, review) {
  const r = review.result || {};
  const parts = [];
  if (review.error) {
    wizardError(`${errorText(review.error)}. Go back and change your choices, or cancel.`);
  } else if (!r.ok) {
    wizardError(`The precheck now refuses this migration: ${(r.errors || []).map((e) => `error (${e.code}): ${e.message}`).join("; ")}. Go back and choose again.`);
  } else {
    wizardError(null);
  }
  for (const w of r.warnings || []) parts.push(h("p", { class: "warn-text" }, `warning (${w.code}): ${w.message}`));
  const p = r.prediction;
  if (p) {
    const brake = p.needs_brake ? `, braking the guest's CPU to ${p.brake_pct} %` : "";
    parts.push(h("dl", { class: "props prediction-figures" },
      h("dt", null, "Predicted total time"), h("dd", { dataset: { field: "predicted_total" } }, `about ${fmtSeconds(p.total_s)} over ${plural(p.passes, "pass", "passes")}`),
      h("dt", null, "Predicted downtime"), h("dd", { dataset: { field: "predicted_downtime" } }, p.downtime_ms === null || p.downtime_ms === undefined ? "—" : `about ${Math.round(p.downtime_ms)} ms (limit ${wiz.downtime} ms)`),
      h("dt", null, "Converges"), h("dd", null, `${p.converges ? "yes" : "NO"}${brake}`),
      h("dt", null, "Measured"), h("dd", null, `the guest dirties ${fmtBytes(p.sampled_dirty_bps)}/s; link ${fmtLink(p.link_bps)}`)),
    h("p", { class: "hint" }, p.reason || ""));
  } else if (r.prediction_error) {
    parts.push(h("p", null, `No prediction: ${r.prediction_error}. The migration can still run.`));
  } else if (!needsHost(wiz.type)) {
    parts.push(h("p", null, "No prediction for a storage-only migration: the copy's time depends on the disks' size and the datastores' speed."));
  } else if (r.ok) {
    parts.push(h("p", null, "No prediction was returned."));
  }
  if (r.ok && !parts.length) parts.push(h("p", null, "The precheck passed."));
  el.replaceChildren(...parts);
}

async function wizardFinish(wiz) {
  if (wiz.busy || wiz.step !== 4) return;
  wiz.busy = true;
  updateWizardButtons(wiz);
  $("#wizard-finish").textContent = "Starting...";
  const body = precheckBody(wiz, {
    host: needsHost(wiz.type) ? wiz.host : undefined,
    datastore: needsDatastore(wiz.type) ? wiz.datastore : undefined,
  });
  try {
    const task = await api(`/v1/vms/${enc(wiz.vm)}/migrate`, { method: "POST", body });
    closeModal();
    upsertTask(task);
    flashTask(task.id);
    setTasksMessage(`Task ${task.id} started: ${TYPE_LABEL[wiz.type].toLowerCase()} for ${wiz.vm}.`, "ok");
  } catch (err) {
    wiz.busy = false;
    if (!wiz.closed) {
      $("#wizard-finish").textContent = "Finish";
      wizardError(`${errorText(err)}. Nothing was changed: go back and choose again, or cancel.`);
      updateWizardButtons(wiz);
    }
  }
}
