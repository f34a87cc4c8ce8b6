// Sign-in, sign-out, and the inventory's load and refresh (every 5 seconds and after each task).

import { $, clear } from "./dom.js";
import { fmtClock } from "./format.js";
import { buildIndex, parseHash, REFRESH_MS, state, TOKEN_KEY } from "./state.js";
import { api, ApiError, errorText } from "./api.js";
import { closeModal } from "./widgets.js";
import { renderMain, renderMainError, renderMainLoading } from "./router.js";
import { renderTree } from "./tree.js";
import { kickStream, restartStream, startStream, stopStream } from "./tasks.js";

// ---------------------------------------------------------------------------------------------
// Sign-in and sign-out

export async function signIn(token, { silent = false } = {}) {
  const error = $("#signin-error");
  error.hidden = true;
  if (!token) {
    showSigninError("Enter the center's API token (the \"token\" of its center.json, or the lab's).");
    return;
  }
  const button = $("#signin");
  button.disabled = true;
  button.textContent = "Signing in...";
  try {
    await api("/v1/hosts", { token });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      showSigninError(`${errorText(err)}. The token was refused: check it and try again.`);
    } else {
      showSigninError(`${errorText(err)}. Try again once the center answers.`);
    }
    sessionStorage.removeItem(TOKEN_KEY);
    if (silent) $("#token").focus();
    return;
  } finally {
    button.disabled = false;
    button.textContent = "Sign in";
  }
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#token").value = "";
  $("#signin-view").hidden = true;
  $("#app").hidden = false;
  startSession();
}

function showSigninError(text) {
  const error = $("#signin-error");
  error.textContent = text;
  error.hidden = false;
}

export function signOut(message) {
  state.generation += 1;
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  stopStream();
  clearInterval(state.refreshTimer);
  clearTimeout(state.refreshSoonTimer);
  clearInterval(state.eventsTimer);
  closeModal();
  state.data = state.idx = null;
  state.tasks.clear();
  state.taskRows.clear();
  state.mainSig = state.treeSig = null;
  state.actionMessage = null;
  clear($("#tree"));
  clear($("#main"));
  clear($("#tasks-rows"));
  $("#app").hidden = true;
  $("#signin-view").hidden = false;
  if (message) showSigninError(message);
  else $("#signin-error").hidden = true;
  history.replaceState(null, "", "#/");
  $("#token").focus();
}

export function sessionExpired(err) {
  signOut(`${errorText(err)}. The center no longer accepts this token: sign in again.`);
}

function startSession() {
  state.route = parseHash(location.hash);
  learnCenters();
  renderMainLoading();
  refreshInventory();
  state.refreshTimer = setInterval(refreshInventory, REFRESH_MS);
  startStream();
}

// ---------------------------------------------------------------------------------------------
// Inventory: load, index, refresh

export async function refreshInventory() {
  const gen = state.generation;
  const status = $("#refresh-status");
  try {
    const [hosts, vms, datastores, clusters] = await Promise.all([
      api("/v1/hosts"), api("/v1/vms"), api("/v1/datastores"), api("/v1/clusters"),
    ]);
    if (gen !== state.generation) return;
    state.data = { hosts, vms, datastores, clusters };
    state.idx = buildIndex(state.data);
    status.textContent = `Updated ${fmtClock(new Date())}`;
    status.classList.remove("bad");
    status.title = "The inventory is re-read every 5 seconds and after each task";
    kickStream();
    renderTree();
    renderMain();
  } catch (err) {
    if (gen !== state.generation || (err instanceof ApiError && err.status === 401)) return;
    status.textContent = "Refresh failed";
    status.classList.add("bad");
    status.title = `${errorText(err)}; retrying every 5 seconds`;
    // The center is gone: a stream that still looks open is held by a center shutting down
    // (it waits for its clients to leave). Let go of it and reconnect.
    if (err instanceof ApiError && err.code === "unreachable") restartStream("the center does not answer");
    // A standby now (this center lost leadership), or gone: point at the center now active.
    if (err instanceof ApiError && (err.code === "standby" || err.code === "unreachable")) {
      findActiveCenter(err).then((url) => {
        if (url && gen === state.generation) showActiveCenter(status, url);
      });
    }
    if (!state.data) renderMainError(err);
  }
}

/** Refresh shortly (a task ended, a VM was powered on...), at most once per burst. */
export function refreshSoon(delay = 250) {
  clearTimeout(state.refreshSoonTimer);
  state.refreshSoonTimer = setTimeout(refreshInventory, delay);
}

// ---------------------------------------------------------------------------------------------
// Centers that share a database (docs/center-ha.md): when this one is lost, which is active

/** The other centers on this center's database, learned once per session (none: one center). */
async function learnCenters() {
  try {
    const centers = await api("/v1/centers");
    state.centers = centers.map((c) => c.url).filter((url) => url !== location.origin);
  } catch {
    state.centers = [];
  }
}

/** The URL of the active center: the one a standby names, else the first of the others whose
 * /v1/health (open to any origin) says it is active. */
async function findActiveCenter(err) {
  if (err.details && err.details.active_url) return err.details.active_url;
  for (const url of state.centers || []) {
    try {
      const resp = await fetch(`${url}/v1/health`, { cache: "no-store" });
      const health = await resp.json();
      if (health.role === "active") return url;
      if (health.active && health.active.url) return health.active.url;
    } catch {
      // that one does not answer either: ask the next
    }
  }
  return null;
}

function showActiveCenter(status, url) {
  clear(status);
  status.append("This center no longer answers; the active center is at ");
  const link = document.createElement("a");
  link.href = `${url}/${location.hash}`;
  link.textContent = url;
  link.title = "Open the active center (sign in there with the same token)";
  status.append(link);
  status.classList.add("bad");
}
