// kvmotion web client: one page, no build step; its only libraries (xterm.js and noVNC, for the
// console) are vendored in web/vendor/.
//
// Layout as the vSphere Client's: an inventory tree on the left, the selected item's summary in
// the main pane, Recent Tasks at the bottom. Everything comes from the center's REST API (same
// origin, `Authorization: Bearer <token>`); tasks arrive live over /v1/tasks-stream (server-sent
// events read with fetch(), since EventSource cannot send the header).
//
// Modules (ES modules, loaded by the browser as they are):
//   shared: dom.js (h, s, morph, icons) · format.js · state.js (the one `state` object, constants,
//     inventory lookups, routes) · api.js · widgets.js (summary blocks, host/VM tables, modals)
//   views: session.js (sign-in, inventory refresh) · router.js (main pane) · tree.js ·
//     datacenter.js (+ datastore, network) · host.js · vm.js (+ power) · cluster.js (+ EVC;
//     balancing.js, ha.js: its DRS and HA cards) ·
//     maintenance.js (a host's maintenance mode, a maintenance task's page) · wizard.js ·
//     console.js (serial terminal and screen) · tasks.js (Recent Tasks, stream) ·
//     task-detail.js (timeline, chart) · events.js
//   main.js (this): wires the page's listeners and signs in.
//
// The shared modules import no view. Views import each other's functions (the router renders
// views, views navigate), so the imports have cycles: no module calls an import while it loads,
// only this one does, from boot(), once every module has loaded.

import { $ } from "./dom.js";
import { parseHash, state, TOKEN_KEY } from "./state.js";
import { setSessionExpiredHandler } from "./api.js";
import { closeModal } from "./widgets.js";
import { sessionExpired, signIn, signOut } from "./session.js";
import { navigate, onPopState } from "./router.js";
import { treeClick } from "./tree.js";
import { tickRunningTasks } from "./tasks.js";

function boot() {
  setSessionExpiredHandler(sessionExpired);
  window.addEventListener("popstate", onPopState);
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && state.modal) closeModal();
  });
  // Keep the durations of running tasks ticking.
  setInterval(tickRunningTasks, 1000);

  $("#signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("#token").value.trim());
  });
  $("#signout").addEventListener("click", (ev) => {
    ev.preventDefault();
    signOut();
  });
  $("#nav-events").addEventListener("click", (ev) => {
    ev.preventDefault();
    navigate({ view: "events" });
  });
  $("#nav-inventory").addEventListener("click", (ev) => {
    ev.preventDefault();
    const r = state.route.view === "item" ? state.route : state.lastItem || parseHash("#/");
    navigate(r);
  });
  $("#tree").addEventListener("click", treeClick);
  // Links in the main pane (and in dialogs) to "#/..." navigate in place.
  document.addEventListener("click", (ev) => {
    const a = ev.target.closest && ev.target.closest('a[href^="#/"]');
    if (!a || !a.closest("#main, #modal-root") || ev.defaultPrevented) return;
    ev.preventDefault();
    if (a.closest("#modal-root")) closeModal();
    navigate(parseHash(a.getAttribute("href")));
  });
  $("#tasks-toggle").addEventListener("click", () => {
    const panel = $("#tasks");
    const hidden = panel.classList.toggle("collapsed");
    $("#tasks-toggle").textContent = hidden ? "Show" : "Hide";
    $("#tasks-toggle").setAttribute("aria-expanded", String(!hidden));
  });
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved, { silent: true });
  else $("#token").focus();
}

boot();
