// Balancing (DRS) on a cluster's page: its settings, the hosts' loads from the latest pass, and
// the recommendations with their reasons and costs, applied one by one or all at once. The
// balancer is the center's (center/balancing.py): GET/PUT /v1/clusters/{c}/balancing,
// POST .../recommendations (a pass now), POST .../recommendations/apply {ids}.

import { clear, h } from "./dom.js";
import { routeHash } from "./state.js";
import { api, enc, errorText } from "./api.js";
import { stateBadge, usageBar } from "./widgets.js";
import { flashTask, upsertTask } from "./tasks.js";

const LEVELS = {
  1: "1: mandatory moves only (rules)",
  2: "2: conservative",
  3: "3: default",
  4: "4: more moves, smaller gains",
  5: "5: aggressive",
};

const latest = new Map(); // cluster -> {settings, latest} as last read, so a re-render shows it

/** The balancing card of cluster `name` (it fills itself in, and keeps what it read when the
 * page is rebuilt). */
export function balancingCard(name) {
  const body = h("div", { id: "balancing-body" });
  const known = latest.get(name);
  if (known) render(body, name, known);
  else body.append(h("p", { class: "placeholder" }, "Reading the cluster's balancing..."));
  load(body, name);
  return h("section", { id: "balancing", class: "card wide" }, h("h2", null, "Balancing (DRS)"), body);
}

async function load(body, name) {
  try {
    const state = await api(`/v1/clusters/${enc(name)}/balancing`);
    const known = latest.get(name);
    // a pass run from this page is newer than what an older read may say
    if (known && known.latest && state.latest && known.latest.at > state.latest.at) state.latest = known.latest;
    latest.set(name, state);
    if (body.isConnected) render(body, name, state);
  } catch (err) {
    if (body.isConnected) clear(body).append(h("p", { class: "form-error" }, errorText(err)));
  }
}

function render(body, name, state, message) {
  const s = state.settings;
  const mode = h("select", { id: "balancing-mode", "aria-label": "Balancing mode" },
    [["off", "Off"], ["manual", "Manual (recommend)"], ["automatic", "Automatic (move)"]]
      .map(([value, text]) => h("option", { value }, text)));
  mode.value = s.mode;
  const threshold = h("select", { id: "balancing-threshold", "aria-label": "Migration threshold" },
    Object.entries(LEVELS).map(([value, text]) => h("option", { value }, text)));
  threshold.value = String(s.threshold);
  const error = h("p", { id: "balancing-error", class: "form-error", role: "alert", hidden: true });
  const ok = h("p", { id: "balancing-result", class: "form-ok", role: "status", hidden: !message }, message || "");
  const save = h("button", { id: "balancing-save", class: "btn", type: "button" }, "Save");
  const run = h("button", {
    id: "balancing-run", class: "btn btn-primary", type: "button",
    title: "Run a pass now: read the hosts' loads and recommend moves (each with the predictor's cost)",
  }, "Get recommendations");
  const fail = (err) => {
    error.textContent = errorText(err);
    error.hidden = false;
  };
  save.addEventListener("click", async () => {
    save.disabled = true;
    error.hidden = true;
    try {
      state.settings = await api(`/v1/clusters/${enc(name)}/balancing`, {
        method: "PUT", body: { mode: mode.value, threshold: Number(threshold.value) },
      });
      render(body, name, state, `Balancing ${state.settings.mode}, threshold ${state.settings.threshold}.`);
    } catch (err) {
      save.disabled = false;
      fail(err);
    }
  });
  run.addEventListener("click", async () => {
    run.disabled = true;
    run.textContent = "Reading the loads...";
    error.hidden = true;
    try {
      state.latest = await api(`/v1/clusters/${enc(name)}/recommendations`, { method: "POST" });
      latest.set(name, state);
      render(body, name, state);
    } catch (err) {
      run.disabled = false;
      run.textContent = "Get recommendations";
      fail(err);
    }
  });
  clear(body).append(
    h("p", { class: "hint" },
      "Moves that even the member hosts' CPU and memory load, measured by their agents. "
      + "Manual: they are recommended, each with its reason and cost, and made when you apply them; "
      + "automatic: a pass every minute makes them."),
    h("div", { class: "balancing-settings" },
      h("label", null, "Mode ", mode), h("label", null, "Migration threshold ", threshold), save, run),
    error, ok,
    state.latest ? passView(body, name, state) : h("p", { id: "balancing-none", class: "placeholder" },
      "No pass yet: get recommendations to see the hosts' loads."));
}

function passView(body, name, state) {
  const p = state.latest;
  const hosts = h("table", { id: "balancing-hosts", class: "grid" },
    h("thead", null, h("tr", null, h("th", null, "Host"), h("th", null, "CPU"), h("th", null, "Memory"))),
    h("tbody", null, p.hosts.map((x) => h("tr", { dataset: { host: x.host } },
      h("td", null, x.host),
      h("td", { dataset: { field: "cpu" } }, usageBar(x.cpu, 1), ` ${pct(x.cpu)}`),
      h("td", { dataset: { field: "memory" } }, usageBar(x.memory, 1), ` ${pct(x.memory)}`)))));
  const tolerance = p.tolerance === null ? "" : ` (tolerance ${p.tolerance.toFixed(3)})`;
  const summary = h("p", { id: "balancing-imbalance" },
    `Imbalance ${p.imbalance.toFixed(3)}${tolerance}, ${p.imbalance_after.toFixed(3)} once the moves are made. `,
    h("span", { class: "muted" }, `Pass at ${new Date(p.at).toLocaleTimeString()}.`));
  const warnings = (p.errors || []).map((e) => h("p", { class: "form-error" }, `Load not read: ${e}`));
  const pending = p.recommendations.filter((r) => r.state === "pending");
  const recs = p.recommendations.length
    ? h("table", { id: "balancing-recommendations", class: "grid" },
      h("thead", null, h("tr", null, ["#", "VM", "From", "To", "Cost", "Why", ""].map((x) => h("th", null, x)))),
      h("tbody", null, p.recommendations.map((r) => h("tr", { dataset: { id: String(r.id), vm: r.vm } },
        h("td", null, String(r.id)),
        h("td", null, r.vm, r.mandatory ? [" ", stateBadge("rule", "warn")] : null),
        h("td", null, r.source), h("td", null, r.dest),
        h("td", { class: "nowrap" }, cost(r)),
        h("td", { class: "reason" }, r.reason),
        h("td", null, applied(body, name, state, r))))))
    : h("p", { id: "balancing-why", class: "placeholder" },
      `No move recommended: ${p.why_no_more}`
      + (p.held.length ? ` (held after a recent move: ${p.held.join(", ")})` : ""));
  const all = pending.length > 1 ? h("button", {
    id: "balancing-apply-all", class: "btn", type: "button",
    onclick: (ev) => apply(body, name, state, null, ev.currentTarget),
  }, `Apply all ${pending.length}`) : null;
  return h("div", { class: "balancing-pass" }, summary, warnings, hosts, recs, all);
}

function applied(body, name, state, r) {
  if (r.state === "pending") {
    return h("button", {
      class: "btn", type: "button", dataset: { apply: String(r.id) },
      onclick: (ev) => apply(body, name, state, [r.id], ev.currentTarget),
    }, "Apply");
  }
  if (r.task) {
    return h("a", { href: routeHash({ view: "task", id: r.task }), class: "item-link" }, `task ${r.task}`);
  }
  return stateBadge(r.error ? `${r.state}: ${r.error}` : r.state, r.state === "failed" ? "bad" : "muted");
}

async function apply(body, name, state, ids, button) {
  button.disabled = true;
  try {
    const result = await api(`/v1/clusters/${enc(name)}/recommendations/apply`, { method: "POST", body: { ids } });
    for (const done of result.applied) {
      const rec = state.latest.recommendations.find((r) => r.id === done.id);
      if (rec) Object.assign(rec, done);
      if (done.task) {
        try {
          upsertTask(await api(`/v1/tasks/${done.task}`));
          flashTask(done.task);
        } catch {
          // the task list catches up by itself
        }
      }
    }
    const failed = result.applied.filter((r) => r.error);
    render(body, name, state, failed.length ? null
      : `Applied: ${result.applied.map((r) => `${r.vm} -> ${r.dest} (task ${r.task})`).join(", ")}.`);
  } catch (err) {
    button.disabled = false;
    const error = body.querySelector("#balancing-error");
    if (error) {
      error.textContent = errorText(err);
      error.hidden = false;
    }
  }
}

function cost(r) {
  const p = r.prediction;
  if (p && p.total_s !== undefined) {
    const down = p.downtime_ms === null || p.downtime_ms === undefined ? "" : `, ${Math.round(p.downtime_ms)} ms down`;
    return `${p.total_s.toFixed(1)} s${down}`;
  }
  return `~${Math.round(r.move_s)} s (estimated)`;
}

function pct(x) {
  return `${Math.round(100 * x)} %`;
}
