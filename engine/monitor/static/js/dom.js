// Building DOM nodes from data without ever parsing data as HTML: text goes in as text nodes.

/** The element with that id; throws when the page lacks it (a broken page should fail loudly). */
export function byId(id) {
  const node = document.getElementById(id);
  if (node === null) throw new Error(`monitor page: no element #${id}`);
  return node;
}

/**
 * A new element: `props` sets `class`, `text` (textContent), `dataset`, `on<event>` listeners and plain
 * attributes; children are nodes or strings (added as text).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = String(value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "style") Object.assign(node.style, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** Show `message` in `node` (or hide it when the message is empty). */
export function say(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

/** Whether a scrolled box is at (or within a few pixels of) its bottom. */
export function atBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 24;
}
