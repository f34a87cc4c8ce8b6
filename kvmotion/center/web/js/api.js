// The center's REST API: api() (same origin, `Authorization: Bearer <token>`), its errors, and
// errorText(), which reads them as the CLI does.

import { state } from "./state.js";

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

/** "error (code): message", as the CLI prints a refusal. */
export function errorText(err) {
  if (err instanceof ApiError) return `error (${err.code}): ${err.message}`;
  return `error (client): ${err && err.message ? err.message : String(err)}`;
}

export async function api(path, { method = "GET", body, signal, token } = {}) {
  const headers = { Authorization: `Bearer ${token ?? state.token}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, "unreachable",
      `cannot reach the center at ${location.origin} (${exc.message}): check that it runs`);
  }
  if (resp.status === 204) return null;
  let data = null;
  const text = await resp.text();
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const e = (data && data.error) || {};
    const err = new ApiError(resp.status, e.code || `http_${resp.status}`,
      e.message || `the center answered ${resp.status} ${resp.statusText}`, e.details);
    if (resp.status === 401 && state.token && token === undefined) onSessionExpired(err);
    throw err;
  }
  return data;
}

export const enc = encodeURIComponent;

// What a refusal of the session's token does: sign out (session.js, set by main.js). A hook, so
// that this module, which every view uses, imports none of them.
let onSessionExpired = () => {};

export function setSessionExpiredHandler(fn) {
  onSessionExpired = fn;
}
