// Router and main pane: navigation between #/... addresses and rendering the current one.

import { $, clear, h } from "./dom.js";
import { EVENTS_REFRESH_MS, parseHash, routeHash, state } from "./state.js";
import { errorText } from "./api.js";
import { showInMain } from "./widgets.js";
import { markSelection } from "./tree.js";
import { datacenterView, datastoreView, networkView } from "./datacenter.js";
import { clusterView } from "./cluster.js";
import { hostView } from "./host.js";
import { vmView } from "./vm.js";
import { renderTaskDetail } from "./task-detail.js";
import { maintenanceSig } from "./maintenance.js";
import { loadEvents, renderEvents } from "./events.js";

// ---------------------------------------------------------------------------------------------
// Router: #/, #/<kind>/<name>, #/task/<id>, #/events. Navigation renders at once (pushState);
// the back button re-renders from the address.

/** The summary of each kind of inventory item: `find(name)` in the inventory, `sig(item)` (the
 * pane is rebuilt only when it changes), `render(item)`, and `live(item)` (optional: updates in
 * place). Looked up when rendering, not gathered at load time: views import this module too. */
function itemView(kind) {
  return {
    datacenter: datacenterView,
    cluster: clusterView,
    host: hostView,
    vm: vmView,
    datastore: datastoreView,
    network: networkView,
  }[kind];
}

export function navigate(route) {
  const hash = routeHash(route);
  if (state.actionMessage && state.actionMessage.route !== hash) state.actionMessage = null;
  state.route = route;
  if (route.view === "item") state.lastItem = route;
  if (location.hash !== hash) history.pushState(null, "", hash);
  renderMain(true);
  markSelection();
}

/** The back and forward buttons: render the address (main.js registers this on `popstate`). */
export function onPopState() {
  if (!state.token) return;
  state.route = parseHash(location.hash);
  renderMain(true);
  markSelection();
}

// ---------------------------------------------------------------------------------------------
// Main pane

export function renderMainLoading() {
  clear($("#main")).append(h("div", { class: "placeholder" }, "Loading the inventory..."));
}

export function renderMainError(err) {
  clear($("#main")).append(h("div", { class: "panel-error" },
    h("strong", null, "The inventory could not be read. "), errorText(err),
    h("p", null, "The client retries every 5 seconds; check that the center runs.")));
}

/** Render the main pane for the current route; skipped when nothing it shows changed. */
export function renderMain(force = false) {
  const r = state.route;
  document.querySelectorAll(".topnav a").forEach((a) => a.classList.remove("active"));
  $(r.view === "events" ? "#nav-events" : "#nav-inventory").classList.add("active");
  clearInterval(state.eventsTimer);
  if (r.view === "events") {
    if (force || state.mainSig !== "events") {
      state.mainSig = "events";
      renderEvents();
    }
    state.eventsTimer = setInterval(() => loadEvents(false), EVENTS_REFRESH_MS);
    return;
  }
  if (r.view === "task") {
    const task = state.tasks.get(r.id);
    const sig = JSON.stringify(["task", r.id, task || null,
      task && task.kind === "maintenance" ? maintenanceSig(task) : null]);
    if (force || sig !== state.mainSig) {
      state.mainSig = sig;
      showInMain(renderTaskDetail(r.id, task), force);
    }
    return;
  }
  if (!state.data) return;
  const view = itemView(r.kind);
  const subject = view && view.find(r.name);
  const sig = JSON.stringify(["item", r.kind, r.name, subject ? view.sig(subject) : null]);
  if (!force && sig === state.mainSig) {
    if (subject && view.live) view.live(subject);
    return;
  }
  state.mainSig = sig;
  if (!subject) {
    showInMain(h("div", { id: "missing-item", class: "placeholder" },
      h("p", null, `${r.kind} ${r.name} is not in the inventory (any more).`),
      h("p", null, "It may have been removed or renamed. ",
        h("a", { href: "#/" }, "Show the datacenter"), ".")), true);
    return;
  }
  showInMain(view.render(subject), force);
  if (view.live) view.live(subject);
}
