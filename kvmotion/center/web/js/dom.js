// DOM helpers: the element builders h() and s(), queries, clear(), morph(), the inline SVG icons.

/** h("div", {class: "x", onclick: fn, dataset: {...}}, child, "text", [more]) */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  applyProps(el, props);
  appendChildren(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) el.setAttribute(k, String(v));
  }
  appendChildren(el, children);
  return el;
}

function applyProps(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "text") el.textContent = value;
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function appendChildren(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/**
 * Make `from` (in the page) look like `to` (just built), keeping the elements that stay the
 * same kind in the same place: a refresh then changes text and attributes, not elements, so
 * focus, open <details>, scroll and references held by scripts or tests survive. Elements with
 * another tag or id are replaced. Listeners stay those of the kept element, so views attach
 * only listeners that depend on the route (which a morph never changes) and links are
 * handled by delegation.
 */
export function morph(from, to) {
  if (from.nodeType !== to.nodeType || from.nodeName !== to.nodeName
      || from.namespaceURI !== to.namespaceURI || (from.nodeType === 1 && from.id !== to.id)) {
    from.replaceWith(to);
    return;
  }
  if (from.nodeType !== 1) {
    if (from.nodeValue !== to.nodeValue) from.nodeValue = to.nodeValue;
    return;
  }
  for (const { name } of [...from.attributes]) {
    if (!to.hasAttribute(name) && !(name === "open" && from.nodeName === "DETAILS")) from.removeAttribute(name);
  }
  for (const { name, value } of [...to.attributes]) {
    if (from.getAttribute(name) !== value) from.setAttribute(name, value);
  }
  const olds = [...from.childNodes];
  const news = [...to.childNodes];
  news.forEach((node, i) => (i < olds.length ? morph(olds[i], node) : from.appendChild(node)));
  for (const node of olds.slice(news.length)) node.remove();
}

// ---------------------------------------------------------------------------------------------
// Icons (inline SVG, 16 px)

const ICON_PATHS = {
  datacenter: "M2 14V5l6-3 6 3v9H2zm2-2h2V9H4v3zm3 0h2V9H7v3zm3 0h2V9h-2v3zM4 7.5h8",
  cluster: "M1.5 6.5h6v3h-6zM8.5 6.5h6v3h-6zM1.5 11h6v3h-6zM8.5 11h6v3h-6zM4 2h8v3H4z",
  host: "M2 2.5h12v4H2zM2 9.5h12v4H2zM4 4.5h1M4 11.5h1M8 4.5h4M8 11.5h4",
  vm: "M1.5 2.5h13v9h-13zM5 14h6M8 11.5V14",
  datastore: "M2.5 4c0-1.2 2.5-2 5.5-2s5.5.8 5.5 2v8c0 1.2-2.5 2-5.5 2s-5.5-.8-5.5-2V4zm0 0c0 1.2 2.5 2 5.5 2s5.5-.8 5.5-2M2.5 8c0 1.2 2.5 2 5.5 2s5.5-.8 5.5-2",
  network: "M8 2v4M3 10V8h10v2M8 6v2M1.5 10h3v3.5h-3zM6.5 10h3v3.5h-3zM11.5 10h3v3.5h-3zM6.5 1h3v3h-3z",
  folder: "M1.5 3.5h5l1.5 1.5h6.5v8.5h-13z",
  events: "M8 1.5l6.5 12h-13zM8 6v4M8 11.5v.5",
  task: "M3 2.5h10v11H3zM5.5 6h5M5.5 9h5M5.5 12h3",
  // a wrench: maintenance mode
  maintenance: "M13.6 4.4l-2.1 2.1-2-2 2.1-2.1a3.2 3.2 0 0 0-4.2 4.1L2.3 11.6a1.4 1.4 0 0 0 2.1 2.1l5.1-5.1a3.2 3.2 0 0 0 4.1-4.2z",
};

export function icon(kind, cls = "") {
  return s("svg", { class: `icon icon-${kind} ${cls}`, viewBox: "0 0 16 16", "aria-hidden": "true" },
    s("path", { d: ICON_PATHS[kind] || ICON_PATHS.folder }));
}
