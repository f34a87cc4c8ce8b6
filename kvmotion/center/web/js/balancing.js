// Balancing (DRS) on a cluster's page: its settings (mode, migration threshold), the latest
// pass (each host's CPU and memory load, the imbalance against the threshold's tolerance, the
// recommended moves with their reasons and costs, or why there are none) and applying them. The
// balancer is the center's (center/balancing.py): GET/PUT /v1/clusters/{c}/balancing, POST
// .../recommendations (a pass now), POST .../recommendations/apply {ids}.
//
// What the card shows lives in `cards` (per cluster), and the card is rebuilt from it and morphed
// into the page; so an inventory refresh that rebuilds the cluster's page shows the same thing,
// and listeners use only the cluster's name (the route) and what the DOM says at the click.

import { $, h, morph } from "./dom.js";
import { fmtClock, fmtMiB, fmtMs, fmtSeconds, parseTime } from "./format.js";
import { FINAL_STATES, routeHash, state } from "./state.js";
import { api, enc, errorText } from "./api.js";
import { stateBadge, usageBar } from "./widgets.js";
import { flashTask, stateClass, upsertTask } from "./tasks.js";

// vSphere's migration threshold, as the center's levels (migration/balance.py LEVELS) use it.
const LEVELS = [
  [1, "1: mandatory moves only (rules)"],
  [2, "2: conservative (large imbalances)"],
  [3, "3: default"],
  [4, "4: more moves, smaller gains"],
  [5, "5: aggressive"],
];
const MODES = [
  ["off", "Off"],
  ["manual", "Manual: recommend moves"],
  ["automatic", "Automatic: make the moves"],
];
const MODE_BADGE = { off: "muted", manual: "info", automatic: "ok" };
const REREAD_MS = 10000; // a rebuilt page reads the settings and latest pass again after this

/** cluster -> {gen, settings, latest, draft, readAt, reading, saving, running, applying, message,
 * error}: `draft` is the user's unsaved {mode, threshold}; `message` {text, kind} says how the
 * last action went. */
const cards = new Map();

function entry(name) {
  let e = cards.get(name);
  if (!e || e.gen !== state.generation) {
    e = { gen: state.generation, settings: null, latest: null, draft: null, readAt: 0 };
    cards.set(name, e);
  }
  return e;
}

/** The balancing card of cluster `name`; reads the settings and the latest pass when the page
 * opens (the pass is shown as it was, not run again). */
export function balancingCard(name) {
  const e = entry(name);
  if (!e.reading && Date.now() - e.readAt > REREAD_MS) load(name);
  return cardView(name, e);
}

/** Update the applied moves' task states in place (the cluster view's `live`). */
export function updateBalancingTasks() {
  for (const el of document.querySelectorAll("#balancing [data-task-state]")) {
    const fresh = taskState(Number(el.dataset.taskState));
    if (fresh.textContent !== el.textContent || fresh.className !== el.className) morph(el, fresh);
  }
}

async function load(name) {
  const e = entry(name);
  e.reading = true;
  try {
    const got = await api(`/v1/clusters/${enc(name)}/balancing`);
    if (e.gen !== state.generation) return;
    if (!e.saving) e.settings = got.settings;
    // A pass run from this page meanwhile is newer than what the read says.
    if (got.latest && (!e.latest || parseTime(got.latest.at) > parseTime(e.latest.at))) e.latest = got.latest;
    e.readError = null;
  } catch (err) {
    e.readError = errorText(err);
  } finally {
    e.reading = false;
    e.readAt = Date.now();
  }
  refresh(name);
}

/** Re-render the card in place (if its cluster's page is open). */
function refresh(name) {
  const el = $("#balancing");
  if (!el || el.dataset.cluster !== name) return;
  const e = entry(name);
  morph(el, cardView(name, e));
  // A morph keeps the selects (and what the user chose): set them to the draft or the settings.
  const want = e.draft || e.settings;
  if (want) {
    const mode = $("#balancing-mode");
    const threshold = $("#balancing-threshold");
    if (mode) mode.value = want.mode;
    if (threshold) threshold.value = String(want.threshold);
  }
}

function say(e, text, kind) {
  e.message = text ? { text, kind } : null;
}

// ---------------------------------------------------------------------------------------------
// Actions

function onSettingChange(name) {
  const e = entry(name);
  if (!e.settings) return;
  const draft = { mode: $("#balancing-mode").value, threshold: Number($("#balancing-threshold").value) };
  const same = draft.mode === e.settings.mode && draft.threshold === e.settings.threshold;
  e.draft = same ? null : draft;
  say(e, null);
  refresh(name);
}

async function save(name) {
  const e = entry(name);
  if (!e.draft || e.saving) return;
  e.saving = true;
  say(e, null);
  refresh(name);
  try {
    e.settings = await api(`/v1/clusters/${enc(name)}/balancing`, { method: "PUT", body: e.draft });
    e.draft = null;
    const s = e.settings;
    say(e, `Saved: balancing ${s.mode}, migration threshold ${s.threshold}.`
      + (s.mode === "automatic" ? " The center now makes the moves it recommends (a pass every minute)." : ""), "ok");
  } catch (err) {
    say(e, errorText(err), "error");
  } finally {
    e.saving = false;
  }
  refresh(name);
}

async function runPass(name) {
  const e = entry(name);
  if (e.running) return;
  e.running = true;
  say(e, null);
  refresh(name);
  try {
    e.latest = await api(`/v1/clusters/${enc(name)}/recommendations`, { method: "POST" });
  } catch (err) {
    say(e, errorText(err), "error");
  } finally {
    e.running = false;
  }
  refresh(name);
}

/** Apply recommendations `ids` (null: every pending one) of the latest pass. */
async function apply(name, ids) {
  const e = entry(name);
  if (e.applying || !e.latest) return;
  e.applying = true;
  say(e, null);
  refresh(name);
  try {
    const result = await api(`/v1/clusters/${enc(name)}/recommendations/apply`, { method: "POST", body: { ids } });
    for (const done of result.applied) {
      const rec = e.latest.recommendations.find((r) => r.id === done.id);
      if (rec) Object.assign(rec, done);
    }
    const started = result.applied.filter((r) => r.task && !r.error);
    const failed = result.applied.filter((r) => r.error);
    say(e, [
      started.length ? `Started ${started.map((r) => `${r.vm} → ${r.dest} (task ${r.task})`).join(", ")}.` : "",
      failed.length ? `Not applied: ${failed.map((r) => `${r.vm}: ${r.error}`).join("; ")}.` : "",
      !result.applied.length ? "Nothing was pending any more." : "",
    ].filter(Boolean).join(" "), failed.length ? "error" : "ok");
    // Recent Tasks hears of the migrations over the stream; showing them at once is quicker.
    await Promise.all(started.map(async (r) => {
      try {
        upsertTask(await api(`/v1/tasks/${r.task}`));
        flashTask(r.task);
      } catch {
        // the stream brings it
      }
    }));
  } catch (err) {
    say(e, errorText(err), "error");
  } finally {
    e.applying = false;
  }
  refresh(name);
}

// ---------------------------------------------------------------------------------------------
// The card

function cardView(name, e) {
  const s = e.settings;
  const head = h("h2", null, "Balancing (DRS)",
    s ? [" ", h("span", { id: "balancing-mode-badge", class: `badge ${MODE_BADGE[s.mode] || "muted"}`, dataset: { mode: s.mode } },
      s.mode === "off" ? "Off" : s.mode === "manual" ? "Manual" : "Automatic")] : null);
  let body;
  if (!s) {
    body = e.readError
      ? h("p", { class: "form-error" }, e.readError)
      : h("p", { class: "placeholder" }, "Reading the cluster's balancing...");
  } else {
    body = [
      h("p", { class: "hint" },
        "Moves running VMs between the cluster's hosts to even their CPU and memory load, as measured "
        + `by their agents over the last ${span(s.window_s)}. Off: nothing; manual: recommended moves, `
        + "each with its reason and cost, made when you apply them; automatic: a pass every minute "
        + `makes them. `
        + (s.hold_s ? `A VM moved stays where it is for ${span(s.hold_s)}.` : "A VM just moved may move again.")),
      settingsRow(name, e),
      e.message ? h("p", {
        id: e.message.kind === "error" ? "balancing-error" : "balancing-result",
        class: e.message.kind === "error" ? "form-error" : "form-ok",
        role: e.message.kind === "error" ? "alert" : "status",
      }, e.message.text) : null,
      e.latest ? passView(name, e) : h("p", { id: "balancing-none", class: "empty" },
        "No pass yet: Get recommendations reads the hosts' loads and says what to move, and why."),
    ];
  }
  return h("section", { id: "balancing", class: "card wide", dataset: { cluster: name } }, head, body);
}

function settingsRow(name, e) {
  const want = e.draft || e.settings;
  const mode = h("select", { id: "balancing-mode", onchange: () => onSettingChange(name) },
    MODES.map(([value, text]) => h("option", { value }, text)));
  mode.value = want.mode;
  const threshold = h("select", { id: "balancing-threshold", onchange: () => onSettingChange(name) },
    LEVELS.map(([value, text]) => h("option", { value: String(value) }, text)));
  threshold.value = String(want.threshold);
  return h("div", { class: "balancing-settings" },
    h("label", { for: "balancing-mode" }, "Mode"), mode,
    h("label", { for: "balancing-threshold" }, "Migration threshold"), threshold,
    h("button", {
      id: "balancing-save", class: "btn", type: "button", disabled: !e.draft || Boolean(e.saving),
      title: e.draft ? "Save the mode and threshold (administrators only)" : "Nothing changed",
      onclick: () => save(name),
    }, e.saving ? "Saving..." : "Save"),
    h("button", {
      id: "balancing-run", class: "btn btn-primary", type: "button", disabled: Boolean(e.running),
      title: "Run a pass now, whatever the mode: read the hosts' loads and recommend moves, each "
        + "with the predictor's cost from a fresh sample of the VM's memory (a few seconds)",
      onclick: () => runPass(name),
    }, e.running ? "Reading the loads..." : "Get recommendations"));
}

function passView(name, e) {
  const p = e.latest;
  const threshold = p.settings ? p.settings.threshold : null;
  const balanced = p.tolerance !== null && p.imbalance <= p.tolerance;
  const imbalance = h("p", { id: "balancing-imbalance", dataset: { imbalance: String(p.imbalance) } },
    h("strong", null, `Imbalance ${p.imbalance.toFixed(3)}`), " ",
    p.tolerance === null
      ? `(threshold 1 makes only the moves rules require, whatever the imbalance)`
      : [stateBadge(balanced ? "within the tolerance" : "above the tolerance", balanced ? "ok" : "warn"),
        ` ${p.tolerance.toFixed(3)} of threshold ${threshold ?? "?"}`],
    p.recommendations.length ? `; ${p.imbalance_after.toFixed(3)} once the moves below are made` : "",
    ". ", h("span", { class: "muted" }, `Pass at ${fmtClock(parseTime(p.at))}. `
      + "The imbalance is the spread (standard deviation) of the hosts' CPU and memory loads."));
  const warnings = (p.errors || []).length ? h("div", { id: "balancing-warnings", class: "panel-warn" },
    h("strong", null, "Some hosts' load could not be read: "),
    "this pass counts their VMs with their last known load, or as idle, and does not move them for load.",
    h("ul", null, p.errors.map((x) => h("li", null, x)))) : null;
  return h("div", { class: "balancing-pass", dataset: { at: p.at } },
    imbalance, warnings, loadsTable(name, p), recommendations(name, e));
}

function loadsTable(name, p) {
  const cluster = state.idx && state.idx.cluster.get(name);
  const inPass = new Set(p.hosts.map((x) => x.host));
  const absent = ((cluster && cluster.hosts) || []).filter((n) => !inPass.has(n));
  const why = (n) => {
    const x = state.idx.host.get(n);
    if (!x) return "not balanced";
    if (x.maintenance) return "not balanced: in maintenance mode";
    if (x.connection !== "connected") return `not balanced: ${x.connection}`;
    return "not balanced in this pass (joined the cluster since, or was unreachable)";
  };
  const share = (v) => [usageBar(v, 1), h("span", { class: "share" }, pct(v))];
  return h("table", { id: "balancing-hosts", class: "grid" },
    h("thead", null, h("tr", null, h("th", null, "Host"), h("th", null, "CPU load"), h("th", null, "Memory load"))),
    h("tbody", null,
      p.hosts.map((x) => h("tr", { dataset: { host: x.host } },
        h("td", null, h("a", { href: routeHash({ view: "item", kind: "host", name: x.host }), class: "item-link" }, x.host)),
        h("td", { class: "load", dataset: { field: "cpu", value: String(x.cpu) } }, share(x.cpu)),
        h("td", { class: "load", dataset: { field: "memory", value: String(x.memory) } }, share(x.memory)))),
      absent.map((n) => h("tr", { class: "absent", dataset: { host: n } },
        h("td", null, n), h("td", { class: "muted", colspan: "2" }, why(n))))));
}

function recommendations(name, e) {
  const p = e.latest;
  const held = p.held.length ? h("p", { id: "balancing-held", class: "muted" },
    `Held where they are (moved within the last ${span(p.settings ? p.settings.hold_s : 600)}): `,
    p.held.join(", "), ".") : null;
  if (!p.recommendations.length) {
    return [h("p", { id: "balancing-why", class: "balancing-why" },
      h("strong", null, "No move recommended: "), `${p.why_no_more || "nothing to gain"}.`), held];
  }
  const pending = p.recommendations.filter((r) => r.state === "pending");
  const table = h("table", { id: "balancing-recommendations", class: "grid" },
    h("thead", null, h("tr", null, ["#", "VM", "From → to", "Cost", "Why", "State", ""].map((x) => h("th", null, x)))),
    h("tbody", null, p.recommendations.map((r) => h("tr", { dataset: { id: String(r.id), vm: r.vm, state: r.state } },
      h("td", null, String(r.id)),
      h("td", null, h("a", { href: routeHash({ view: "item", kind: "vm", name: r.vm }), class: "item-link" }, r.vm),
        r.mandatory ? [" ", stateBadge("rule", "warn")] : null,
        h("div", { class: "muted small" }, `${r.cpu.toFixed(2)} CPU, ${fmtMiB(r.memory_mib)}`)),
      h("td", { class: "nowrap" }, `${r.source} → ${r.dest}`),
      h("td", { class: "cost" }, cost(r)),
      h("td", { class: "reason" }, r.reason),
      h("td", { class: "nowrap" }, recState(r)),
      h("td", null, r.state === "pending" ? h("button", {
        class: "btn btn-small", type: "button", dataset: { apply: String(r.id) }, disabled: Boolean(e.applying),
        title: `Migrate ${r.vm} from ${r.source} to ${r.dest} now`,
        onclick: (ev) => apply(name, [Number(ev.currentTarget.dataset.apply)]),
      }, "Apply") : null)))));
  const foot = h("div", { class: "balancing-foot" },
    pending.length ? h("button", {
      id: "balancing-apply-all", class: "btn btn-primary", type: "button", disabled: Boolean(e.applying),
      title: "Start every pending recommendation's migration", onclick: () => apply(name, null),
    }, `Apply all (${pending.length})`) : null,
    h("span", { id: "balancing-why", class: "muted" }, `No more moves: ${p.why_no_more || "none left to gain"}.`));
  return [table, foot, held];
}

/** A recommendation's state, and its migration's as Recent Tasks has it. */
function recState(r) {
  const kind = { pending: "muted", applied: "info", failed: "bad", stale: "warn" }[r.state] || "muted";
  return [
    h("span", { class: `badge ${kind}`, title: r.error || null }, r.state),
    r.error ? h("div", { class: "form-error small" }, r.error) : null,
    r.task ? h("div", null,
      h("a", { href: routeHash({ view: "task", id: r.task }), class: "item-link", dataset: { task: String(r.task) } }, `task ${r.task}`),
      " ", taskState(r.task)) : null,
  ];
}

function taskState(id) {
  const t = state.tasks.get(id);
  // Not heard of yet: the stream (or the next refresh) brings it, and live() fills this in.
  if (!t) return h("span", { class: "muted", dataset: { taskState: String(id) } });
  const running = !FINAL_STATES.has(t.state) && t.state !== "queued";
  const text = running ? `${t.state} ${Math.round(Number(t.progress) || 0)} %` : t.state;
  return h("span", {
    class: `badge ${stateClass(t.state)}`, dataset: { taskState: String(id) },
    title: t.error ? `error (${t.error_code}): ${t.error}` : null,
  }, text);
}

/** The predictor's time and downtime (from a fresh sample of the VM's memory), else the pass's
 * estimate from the VM's resident memory over the hosts' link. */
function cost(r) {
  const p = r.prediction;
  const estimate = `~${fmtSeconds(r.move_s)} (estimated)`;
  if (!p) return estimate;
  if (p.error) return [estimate, h("div", { class: "muted small" }, p.error)];
  return h("span", { title: p.reason || null },
    fmtSeconds(p.total_s), p.downtime_ms === null || p.downtime_ms === undefined ? "" : `, ${fmtMs(p.downtime_ms)} down`,
    p.converges === false ? [" ", stateBadge("may not converge", "warn")] : null);
}

/** 300 -> "5 min", 45 -> "45 s". */
function span(sec) {
  return sec >= 60 && sec % 60 === 0 ? `${sec / 60} min` : fmtSeconds(sec);
}

/** A share as a percentage: small ones with a decimal (a host 0.4 % busy is not idle). */
function pct(x) {
  const v = 100 * x;
  return `${v > 0 && v < 10 ? v.toFixed(1) : Math.round(v)} %`;
}

