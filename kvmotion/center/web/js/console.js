// The VM console: one dialog with the VM's serial port (xterm.js) and, for a VM with a screen
// (`config.graphics`), its display (noVNC), as vSphere's web console and Proxmox's are.
//
// Every connection, the first and each reconnect, asks the center for a one-use ticket (POST
// /v1/vms/{vm}/console, good for 30 s) and opens the websocket its answer names: a browser's
// websocket cannot carry the bearer token. A serial console follows its VM through a move by
// itself (the center says so in a line); a screen's socket ends with the move, so a link that was
// open reconnects on its own, a few times, with a new ticket each time. Closing the dialog
// closes both sockets.
//
// The libraries are vendored (web/vendor/, see its README.md) and imported when the dialog
// first opens, so the rest of the client never loads them.

import { $, h } from "./dom.js";
import { state } from "./state.js";
import { api, ApiError, enc, errorText } from "./api.js";
import { closeModal, openModal } from "./widgets.js";

const TAB_LABEL = { serial: "Serial", vnc: "Screen" };
const OPEN_TEXT = {
  serial: "Connected: what you type goes to the VM's serial port",
  vnc: "Connected: the keyboard and mouse go to the VM's screen",
};
// Automatic reconnects of a link that was open and ended (the screen after a move, the center
// restarted), at most this many, each with a new ticket; a refusal of the ticket (the VM is off,
// the user may only look) stops them.
const RETRY_DELAYS_MS = [500, 1000, 2000, 4000, 8000];
const STABLE_MS = 30000; // a link open this long that ends gets all its tries again
const CLOSE_NORMAL = 1000;
// Ends worth another try: the center going away, lost or failing, 4409 (the VM moved and the
// center could not follow it), and for a screen a normal end too (its VM moved: a screen does not
// follow, while a serial console that ends normally says why, the VM stopped). Other codes are
// the center's refusals (4000 + the HTTP status: 4401 ticket, 4403 role, 4404 VM not running).
const TROUBLE = [1001, 1006, 1011, 4409];
const RETRY_CODES = { serial: new Set(TROUBLE), vnc: new Set([CLOSE_NORMAL, ...TROUBLE]) };

// A link's lifecycle and the moves it may make ("stopped" is final: the dialog closed).
const NEXT = {
  idle: ["connecting", "stopped"],
  connecting: ["open", "closed", "waiting", "stopped"],
  open: ["closed", "waiting", "stopped"],
  waiting: ["connecting", "stopped"],
  closed: ["connecting", "stopped"],
  stopped: [],
};

/** One console's connection (serial or screen): its ticket, its websocket, its state and its
 * reconnects. `attach(ws, opened)` wires a new socket to the terminal or the screen, calls
 * `opened()` once the console shows, and returns what undoes it; `render(link)` shows the state. */
class ConsoleLink {
  constructor(vm, kind, { attach, render }) {
    this.vm = vm;
    this.kind = kind;
    this.attach = attach;
    this.render = render;
    this.state = "idle";
    this.text = "";
    this.ws = null;
    this.detach = null;
    this.retries = 0;
    this.opens = 0; // connections that opened, the first and every reconnect
    this.timer = null;
    this.note = null; // why the library itself ended the connection, when it knows better
  }

  to(next, text) {
    if (!NEXT[this.state].includes(next)) throw new Error(`console link: ${this.state} -> ${next}`);
    this.state = next;
    this.text = text;
    this.render(this);
  }

  /** Connect now (the first time, or the user's Reconnect: the retries start again). */
  connect() {
    this.retries = 0;
    return this.dial();
  }

  async dial() {
    clearTimeout(this.timer);
    this.to("connecting", this.retries ? `Reconnecting (attempt ${this.retries} of ${RETRY_DELAYS_MS.length})...` : "Connecting...");
    let ticket;
    try {
      ticket = await api(`/v1/vms/${enc(this.vm)}/console`, { method: "POST", body: { kind: this.kind } });
    } catch (err) {
      if (this.state !== "stopped") this.ended(errorText(err), transient(err));
      return;
    }
    if (this.state !== "stopped") this.open(ticket.url);
  }

  open(url) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${url}`, this.kind === "vnc" ? ["binary"] : []);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.note = null;
    let openedAt = null;
    ws.addEventListener("close", (ev) => {
      if (this.ws !== ws || this.state === "stopped") return;
      const why = closeText(ev.code, ev.reason, this.note);
      this.drop(why);
      if (openedAt !== null && Date.now() - openedAt >= STABLE_MS) this.retries = 0;
      this.ended(why, openedAt !== null && RETRY_CODES[this.kind].has(ev.code));
    });
    try {
      this.detach = this.attach(ws, () => {
        if (this.ws !== ws || this.state !== "connecting") return;
        openedAt = Date.now();
        this.opens += 1;
        this.to("open", OPEN_TEXT[this.kind]);
      });
    } catch (err) {
      this.drop(null);
      this.ended(`the console could not start: ${err.message}`, false);
    }
  }

  /** The connection ended (or was refused) for `why`; try again later if `again` and tries
   * are left, else wait for the user's Reconnect. */
  ended(why, again) {
    if (again && this.retries < RETRY_DELAYS_MS.length) {
      const delay = RETRY_DELAYS_MS[this.retries];
      this.retries += 1;
      this.to("waiting", `Closed: ${why}. Reconnecting in ${Math.ceil(delay / 1000)} s...`);
      this.timer = setTimeout(() => this.dial(), delay);
      return;
    }
    this.to("closed", `Closed: ${why}`);
  }

  send(bytes) {
    if (this.state === "open" && this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(bytes);
  }

  /** Let go of the socket; `why` it ended, or null when the viewer ends it. */
  drop(why) {
    const { ws, detach } = this;
    this.ws = this.detach = null;
    if (detach) detach(why);
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(CLOSE_NORMAL, "the viewer closed the console");
  }

  stop() {
    if (this.state === "stopped") return;
    clearTimeout(this.timer);
    this.drop(null);
    this.to("stopped", "Closed");
  }
}

/** A refusal worth asking again: the center or the network failed, not a decision. */
function transient(err) {
  return !(err instanceof ApiError) || err.status === 0 || err.status >= 500;
}

function closeText(code, reason, note) {
  if (note) return note;
  if (reason) return reason;
  if (code === CLOSE_NORMAL) return "the center ended the console";
  if (code === 1006) return "the connection to the center was lost";
  return `the console closed (code ${code})`;
}

// ---------------------------------------------------------------------------------------------
// The dialog

let libs = null; // the vendored libraries, imported once

function loadLibs() {
  if (!libs) {
    libs = Promise.all([
      import("../vendor/xterm/xterm.mjs"),
      import("../vendor/xterm-addon-fit/addon-fit.mjs"),
      import("../vendor/novnc/core/rfb.js"),
    ]).then(([xterm, fit, novnc]) => ({ Terminal: xterm.Terminal, FitAddon: fit.FitAddon, RFB: novnc.default }))
      .catch((err) => {
        libs = null;
        throw err;
      });
  }
  return libs;
}

/** Open the console of VM `vmName` on its Serial tab. */
export async function openConsole(vmName) {
  const v = state.idx && state.idx.vm.get(vmName);
  const kinds = v && v.config && v.config.graphics ? ["serial", "vnc"] : ["serial"];
  const panes = Object.fromEntries(kinds.map((kind) => [kind, pane(kind)]));
  const view = { links: {}, stopped: false, cleanup: [] };
  const dialog = openModal({
    id: "console-dialog",
    title: `Console: ${vmName}`,
    wide: true,
    body: h("div", { class: "console" },
      h("div", { class: "console-tabs", role: "tablist" }, kinds.map((kind) => h("button", {
        id: `console-tab-${kind}`, class: "console-tab", type: "button", role: "tab",
        "aria-controls": `console-pane-${kind}`, onclick: () => showTab(view, kind),
      }, h("span", { class: "console-dot", dataset: { state: "idle" } }), TAB_LABEL[kind]))),
      kinds.map((kind) => panes[kind].el)),
    buttons: [
      h("span", { class: "console-hint" }, "Esc and every other key go to the VM: close with the button."),
      h("span", { class: "spacer" }),
      h("button", { id: "console-close", class: "btn", type: "button", onclick: closeModal }, "Close"),
    ],
    onClose: () => stopConsole(view),
  });
  dialog.classList.add("console-modal");
  // The modal closes on Escape (main.js); in the terminal and on the screen it is the VM's key.
  dialog.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && ev.target.closest && ev.target.closest(".console-io")) ev.stopPropagation();
  });
  view.vm = vmName;
  view.panes = panes;
  showTab(view, "serial");
  let lib;
  try {
    lib = await loadLibs();
  } catch (err) {
    for (const kind of kinds) {
      showState(panes[kind], "closed", `The console's libraries did not load (web/vendor/): ${err.message}`);
    }
    return;
  }
  if (view.stopped) return;
  view.lib = lib;
  startSerial(view);
}

function pane(kind) {
  const status = h("span", { id: `console-state-${kind}`, class: "console-state", role: "status", dataset: { state: "idle" } },
    "Loading...");
  const reconnect = h("button", {
    id: `console-reconnect-${kind}`, class: "btn btn-small", type: "button", hidden: true,
  }, "Reconnect");
  const extra = kind === "vnc" ? h("button", {
    id: "console-cad", class: "btn btn-small", type: "button", disabled: true,
    title: "Send Ctrl-Alt-Del to the VM (the browser would keep it for itself)",
  }, "Ctrl-Alt-Del") : null;
  const io = h("div", {
    id: kind === "serial" ? "console-terminal" : "console-screen", class: `console-io console-io-${kind}`,
  });
  const el = h("div", { id: `console-pane-${kind}`, class: "console-pane", role: "tabpanel", hidden: true },
    h("div", { class: "console-bar" }, status, h("span", { class: "spacer" }), extra, reconnect), io);
  return { kind, el, status, reconnect, extra, io };
}

function showState(p, st, text) {
  p.status.dataset.state = st;
  p.status.textContent = text;
  p.reconnect.hidden = st !== "closed" && st !== "waiting";
  if (p.extra) p.extra.disabled = st !== "open";
  const dot = $(`#console-tab-${p.kind} .console-dot`);
  if (dot) dot.dataset.state = st;
}

function showTab(view, kind) {
  for (const [k, p] of Object.entries(view.panes)) {
    p.el.hidden = k !== kind;
    const tab = $(`#console-tab-${k}`);
    if (tab) tab.setAttribute("aria-selected", String(k === kind));
  }
  view.current = kind;
  if (!view.lib) return;
  if (kind === "vnc" && !view.links.vnc) startScreen(view);
  focusCurrent(view);
}

function focusCurrent(view) {
  if (view.current === "serial" && view.term) view.term.focus();
  if (view.current === "vnc" && view.rfb) view.rfb.focus();
}

function stopConsole(view) {
  view.stopped = true;
  for (const link of Object.values(view.links)) link.stop();
  for (const undo of view.cleanup) undo();
  if (view.term) view.term.dispose();
}

function makeLink(view, kind, attach) {
  const p = view.panes[kind];
  const link = new ConsoleLink(view.vm, kind, {
    attach,
    render: (l) => {
      if (l.state === "stopped") return;
      showState(p, l.state, l.text);
      p.status.dataset.opens = String(l.opens);
      if (l.state === "open" && view.current === kind) focusCurrent(view);
    },
  });
  p.reconnect.addEventListener("click", () => link.connect());
  view.links[kind] = link;
  return link;
}

// ---------------------------------------------------------------------------------------------
// Serial: xterm.js, fitted to its box. The bytes are the guest's (UTF-8 with VT100 escapes);
// what the user types goes back as binary frames.

function startSerial(view) {
  const { Terminal, FitAddon } = view.lib;
  const p = view.panes.serial;
  const term = new Terminal({
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: '"DejaVu Sans Mono", "Liberation Mono", monospace',
    fontSize: 13,
    theme: { background: "#000000", foreground: "#d0d4d8" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(p.io);
  view.term = term;
  const refit = () => {
    if (!p.el.hidden) fit.fit();
  };
  const observer = new ResizeObserver(refit);
  observer.observe(p.io);
  view.cleanup.push(() => observer.disconnect());
  refit();
  const encoder = new TextEncoder();
  const link = makeLink(view, "serial", (ws, opened) => {
    // Each connection starts with the recent output again (the center replays it): start clean.
    term.reset();
    ws.addEventListener("open", opened);
    ws.addEventListener("message", (ev) => {
      term.write(typeof ev.data === "string" ? ev.data : new Uint8Array(ev.data));
    });
    return (why) => {
      if (why) term.write(`\r\n[console closed: ${why}]\r\n`);
    };
  });
  term.onData((data) => link.send(encoder.encode(data)));
  // Bytes that are not text (some mouse reports): one byte per character.
  term.onBinary((data) => link.send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));
  link.connect();
  focusCurrent(view);
}

// ---------------------------------------------------------------------------------------------
// Screen: noVNC's RFB on the socket (RFB over binary frames), scaled to fit its box.

function startScreen(view) {
  const { RFB } = view.lib;
  const p = view.panes.vnc;
  const link = makeLink(view, "vnc", (ws, opened) => {
    const rfb = new RFB(p.io, ws, { shared: true });
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.background = "#000";
    rfb.addEventListener("connect", opened);
    rfb.addEventListener("securityfailure", (ev) => {
      link.note = `the VM's screen refused the connection: ${ev.detail.reason || `status ${ev.detail.status}`}`;
    });
    rfb.addEventListener("credentialsrequired", () => {
      link.note = "the VM's screen asks for a password, which this console does not have";
      rfb.disconnect();
    });
    // RFB's own end ('disconnect') comes after the socket's close, which undoes this first:
    // disconnect() on an RFB that already ended would only log an error.
    let ended = false;
    rfb.addEventListener("disconnect", () => { ended = true; });
    view.rfb = rfb;
    return () => {
      if (view.rfb === rfb) view.rfb = null;
      if (!ended) rfb.disconnect();
    };
  });
  p.extra.addEventListener("click", () => {
    if (view.rfb) {
      view.rfb.sendCtrlAltDel();
      view.rfb.focus();
    }
  });
  link.connect();
}
