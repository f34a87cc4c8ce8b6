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
    if (!state.data) renderMainError(err);
  }
}

/** Refresh shortly (a task ended, a VM was powered on...), at most once per burst. */
export function refreshSoon(delay = 250) {
  clearTimeout(state.refreshSoonTimer);
  state.refreshSoonTimer = setTimeout(refreshInventory, delay);
}
