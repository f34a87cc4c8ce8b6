// The event log, with a severity filter.

import { $, clear, h } from "./dom.js";
import { fmtClock, fmtDateTime, parseTime, plural } from "./format.js";
import { api, errorText } from "./api.js";
import { itemLink, stateBadge, summaryHeader } from "./widgets.js";

export function renderEvents() {
  const main = $("#main");
  clear(main).append(h("div", { id: "events-view", class: "summary" },
    summaryHeader("events", "Events", "What the center recorded: hosts added, migrations, refusals, alarms", [
      h("button", { id: "events-refresh", class: "btn", type: "button", onclick: () => loadEvents(true) }, "Refresh"),
    ]),
    h("div", { class: "events-tools" },
      h("label", { for: "events-severity" }, "Severity "),
      h("select", { id: "events-severity", onchange: () => loadEvents(false) },
        h("option", { value: "" }, "All"), h("option", { value: "info" }, "Info"),
        h("option", { value: "warning" }, "Warning"), h("option", { value: "error" }, "Error")),
      h("span", { id: "events-status", class: "muted" })),
    h("table", { id: "events", class: "grid events-table" },
      h("thead", null, h("tr", null, ["Time", "Severity", "Message", "VM", "Host", "Task"].map((x) => h("th", null, x)))),
      h("tbody", { id: "events-rows" }))));
  loadEvents(true);
}

export async function loadEvents(showLoading) {
  const status = $("#events-status");
  if (!status) return;
  if (showLoading) status.textContent = "Loading...";
  try {
    const events = await api("/v1/events?limit=300");
    const tbody = $("#events-rows");
    if (!tbody) return;
    const want = $("#events-severity").value;
    const shown = events.filter((e) => !want || e.severity === want);
    const sig = JSON.stringify([want, shown.map((e) => e.id)]);
    if (tbody.dataset.sig !== sig) {
      tbody.dataset.sig = sig;
      tbody.replaceChildren(...shown.map((e) => h("tr", { dataset: { eventId: String(e.id) }, class: `sev-${e.severity}` },
        h("td", { class: "nowrap" }, fmtDateTime(parseTime(e.time))),
        h("td", null, stateBadge(e.severity, e.severity === "info" ? "muted" : e.severity === "warning" ? "warn" : "bad")),
        h("td", null, e.message),
        h("td", null, e.vm ? itemLink("vm", e.vm) : "—"),
        h("td", null, e.host ? itemLink("host", e.host) : "—"),
        h("td", null, e.task_id ? h("a", { href: `#/task/${e.task_id}` }, String(e.task_id)) : "—"))));
      if (!shown.length) tbody.append(h("tr", null, h("td", { colspan: "6", class: "empty" }, "No events.")));
    }
    status.textContent = `${plural(shown.length, "event")} · updated ${fmtClock(new Date())}`;
  } catch (err) {
    status.textContent = `${errorText(err)} (retrying every 5 seconds)`;
  }
}
