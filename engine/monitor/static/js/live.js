// Calls in progress: the list from GET /v1/live-calls kept current by the organization's live event stream, the
// selected call's transcript as it grows, and its controls (listen, say, hang up).

import { atBottom, byId, el, say } from "./dom.js";
import { clock, listed, party, reason, secondsSince, status, time } from "./format.js";
import { CallListener } from "./listen.js";
import { LiveEventStream } from "./sse.js";
import { byOrder, interimNode, itemFromTurn, transcriptNode } from "./transcript.js";

const POLL_MS = 5000; // when the engine has no event stream
const TURNS_POLL_MS = 2000;
const ENDED_KEPT_MS = 60000; // an ended call stays listed (greyed) this long
const CONFIRM_MS = 4000;

const STREAM_LABELS = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  unavailable: "Polling",
  refused: "Signed out",
};

/**
 * The selected call's controls: the label the page says it by, the right it needs (a key of the `refusals` LiveCalls
 * is given) and the elements it is made of, all switched on and off together.
 */
const CONTROLS = {
  listen: { label: "Listen", right: "listen", ids: ["listen"] },
  hangup: { label: "Hang up", right: "write", ids: ["hangup"] },
  say: { label: "Say", right: "write", ids: ["say-text", "say-interrupt", "say-submit"] },
};

/** A call as the page knows it, from the list and from events. */
function newCall(id) {
  return {
    id, direction: null, customer: null, number: null, line: null, agentName: null, startedAt: null, state: null, ended: null,
    items: new Map(), interim: null, lastTurn: -1, seq: 0, turnsLoaded: false, endedAt: null,
  };
}

export class LiveCalls {
  /**
   * `refusals`: why the key may not use each right the controls need (`listen`, `write`: the engine's words, from
   * GET /v1/me), null for one it may use; `onSignedOut(message)` runs when the key stops working; `onCount(n)` with
   * the number of calls in progress.
   */
  constructor(api, { refusals, onSignedOut, onCount }) {
    this.api = api;
    this.onSignedOut = onSignedOut;
    this.onCount = onCount;
    this.calls = new Map();
    this.selected = null;
    this.listener = null;
    this.refusals = { ...refusals }; // a control needing a right refused here stays off (a VIEWER's key)
    this.nodes = new Map(); // transcript nodes of the selected call, by item key
    this.timers = [];
    this.stream = null;
    this.polling = false;
    this.confirmTimer = null;
    this.bind();
  }

  bind() {
    this.list = byId("live-list");
    this.transcript = byId("live-transcript");
    byId("hangup").addEventListener("click", () => this.hangUp());
    byId("listen").addEventListener("click", () => this.toggleListen());
    byId("say").addEventListener("submit", (event) => {
      event.preventDefault();
      this.say();
    });
  }

  async start() {
    this.stream = new LiveEventStream(this.api, "/live-calls/events", {
      onEvent: (event) => this.apply(event.type, event.data),
      onState: (state, detail) => this.streamState(state, detail),
    });
    await this.refresh();
    this.stream.start();
    this.timers.push(setInterval(() => this.tick(), 1000));
  }

  stop() {
    if (this.stream) this.stream.stop();
    for (const timer of this.timers) clearInterval(timer);
    this.timers = [];
    if (this.listener) this.listener.stop();
  }

  /** Load the calls in progress (every page of them). */
  async refresh() {
    try {
      const seen = new Set();
      let cursor = null;
      do {
        const page = await this.api.get("/live-calls", { limit: 100, cursor }, "Listing the calls in progress");
        for (const entry of page.data) {
          seen.add(entry.id);
          this.fromEntry(entry);
        }
        cursor = page.nextCursor;
      } while (cursor);
      if (this.polling) {
        for (const call of this.calls.values()) {
          if (!seen.has(call.id) && call.ended === null) this.end(call, { status: "ENDED" });
        }
      }
      if (!this.polling) say(byId("live-notice"), "");
    } catch (error) {
      if (error.status === 401) this.onSignedOut(error.message);
      else say(byId("live-notice"), error.message);
    }
    this.render();
  }

  fromEntry(entry) {
    const call = this.call(entry.id);
    call.direction = entry.callType === "INBOUND" ? "inbound" : "outbound";
    call.customer = entry.customer;
    call.number = entry.phoneNumber;
    call.agentName = entry.agentName;
    call.startedAt = entry.timestamp;
    call.state = call.state || "in progress";
  }

  call(id) {
    let call = this.calls.get(id);
    if (!call) {
      call = newCall(id);
      this.calls.set(id, call);
    }
    return call;
  }

  streamState(state, detail) {
    const pill = byId("stream-status");
    pill.dataset.state = state;
    pill.textContent = STREAM_LABELS[state] || state;
    pill.title = detail || "";
    const notice = byId("live-notice");
    if (state === "refused") {
      this.onSignedOut(detail);
    } else if (state === "unavailable") {
      this.polling = true;
      say(notice, "This engine has no live event stream, so the list refreshes every 5 seconds.");
      this.timers.push(setInterval(() => this.refresh(), POLL_MS));
      this.timers.push(setInterval(() => this.loadTurns(this.selectedCall()), TURNS_POLL_MS));
    } else if (state === "reconnecting") {
      say(notice, `Live updates paused: ${detail}. Reconnecting…`);
    } else if (state === "live") {
      say(notice, "");
    }
  }

  // --- events ---

  apply(type, data) {
    const handler = EVENT_HANDLERS[type];
    if (!handler || typeof data.callLogId !== "string") return;
    const known = this.calls.has(data.callLogId);
    const call = this.call(data.callLogId);
    handler(this, call, data);
    if (!known) this.describe(call);
    this.render();
  }

  /** Fill in what the events do not say of a call (its customer, its agent's name) from its call log. */
  async describe(call) {
    try {
      const entry = await this.api.get(`/call-logs/${encodeURIComponent(call.id)}`, {}, "Loading the call");
      call.customer = entry.customer;
      call.number = entry.phoneNumber || call.number;
      call.agentName = entry.agentName;
      call.startedAt = call.startedAt || entry.timestamp;
      this.render();
    } catch (error) {
      if (error.status === 401) this.onSignedOut(error.message);
    }
  }

  note(call, text, tone) {
    call.seq += 1;
    this.put(call, { key: `note-${call.seq}`, order: [call.lastTurn + 0.5, call.seq], kind: "note", text, tone });
  }

  /** Add or update an item of a call's transcript (merging into the item already there). */
  put(call, item) {
    const merged = { ...(call.items.get(item.key) || {}), ...item };
    call.items.set(item.key, merged);
    if (typeof merged.turnIndex === "number") call.lastTurn = Math.max(call.lastTurn, merged.turnIndex);
    if (call === this.selectedCall()) this.drawItem(merged);
  }

  turn(call, turnIndex, fields) {
    this.put(call, { key: `turn-${turnIndex}`, order: [turnIndex, 0], turnIndex, ...fields });
  }

  end(call, ended) {
    call.ended = ended;
    call.endedAt = Date.now();
    call.interim = null;
    if (this.listener && this.listener.callLogId === call.id) this.listener.stop("the call ended");
  }

  // --- drawing ---

  selectedCall() {
    return this.selected === null ? null : this.calls.get(this.selected) || null;
  }

  render() {
    for (const call of [...this.calls.values()]) {
      if (call.endedAt !== null && Date.now() - call.endedAt > ENDED_KEPT_MS && call.id !== this.selected) {
        this.calls.delete(call.id);
      }
    }
    const calls = [...this.calls.values()].sort(
      (a, b) => (a.ended !== null) - (b.ended !== null) || Date.parse(b.startedAt || 0) - Date.parse(a.startedAt || 0),
    );
    const running = calls.filter((call) => call.ended === null).length;
    this.onCount(running);
    byId("live-empty").hidden = calls.length > 0;
    if (this.selected === null && calls.length > 0) this.select(calls[0].id);
    this.list.replaceChildren(...calls.map((call) => this.card(call)));
    this.drawHead();
  }

  card(call) {
    const ended = call.ended !== null;
    return el(
      "li",
      {
        class: `call-card${call.id === this.selected ? " selected" : ""}${ended ? " ended" : ""}`,
        dataset: { callId: call.id },
        tabindex: "0",
        role: "button",
        "aria-pressed": call.id === this.selected ? "true" : "false",
        onclick: () => this.select(call.id),
        onkeydown: (event) => {
          if (event.key === "Enter" || event.key === " ") this.select(call.id);
        },
      },
      el(
        "div",
        { class: "card-top" },
        el("span", { class: `direction ${call.direction || ""}`, text: call.direction === "outbound" ? "Outbound" : "Inbound" }),
        el("span", { class: "elapsed", dataset: { since: call.startedAt || "" }, text: this.elapsed(call) }),
      ),
      el("div", { class: "card-party", text: party(call.customer || call.number) }),
      el(
        "div",
        { class: "card-meta" },
        ended ? `Ended · ${reason(call.ended.endReason) || status(call.ended.status)}` : call.agentName || "No agent",
        !ended && call.state ? el("span", { class: "phase", text: ` · ${call.state}` }) : null,
      ),
    );
  }

  elapsed(call) {
    if (call.ended && typeof call.ended.durationSeconds === "number") return clock(call.ended.durationSeconds);
    return call.startedAt && !call.ended ? clock(secondsSince(call.startedAt)) : "";
  }

  tick() {
    for (const node of this.list.querySelectorAll(".call-card:not(.ended) .elapsed")) {
      if (node.dataset.since) node.textContent = clock(secondsSince(node.dataset.since));
    }
  }

  select(id) {
    if (this.selected === id) return;
    if (this.listener) this.listener.stop();
    this.selected = id;
    this.resetConfirm();
    say(byId("live-call-notice"), "");
    this.nodes.clear();
    this.transcript.replaceChildren();
    const call = this.selectedCall();
    byId("live-detail-empty").hidden = call !== null;
    byId("live-detail-body").hidden = call === null;
    if (call === null) return;
    for (const item of [...call.items.values()].sort(byOrder)) this.drawItem(item);
    this.drawInterim(call);
    this.render();
    if (!call.turnsLoaded) this.loadTurns(call);
  }

  /** The turns the call has written so far: what was said before this page saw the call. */
  async loadTurns(call) {
    if (call === null || call.ended !== null) return;
    try {
      const turns = await this.api.get(`/call-logs/${encodeURIComponent(call.id)}/turns`, {}, "Loading the transcript");
      call.turnsLoaded = true;
      for (const turn of turns.data) {
        const known = call.items.get(`turn-${turn.index}`);
        if (!known || known.speaking) this.put(call, itemFromTurn(turn));
      }
    } catch (error) {
      if (error.status === 401) this.onSignedOut(error.message);
      else if (call === this.selectedCall()) say(byId("live-call-notice"), error.message);
    }
  }

  drawHead() {
    const call = this.selectedCall();
    if (call === null) return;
    const title = party(call.customer || call.number);
    byId("live-title").textContent = title;
    const kind = call.direction === "outbound" ? "Outbound call" : "Inbound call";
    byId("live-subtitle").textContent = [
      call.line ? `${kind} on ${call.line}` : kind,
      call.number !== title ? call.number : null,
      call.agentName,
      call.startedAt ? `started ${time(call.startedAt)}` : null,
    ].filter(Boolean).join(" · ");
    const badge = byId("live-state");
    const ended = call.ended !== null;
    badge.textContent = ended ? `Ended${call.ended.endReason ? ` · ${reason(call.ended.endReason)}` : ""}` : "In progress";
    badge.dataset.state = ended ? "ended" : "live";
    this.drawControls();
    if (ended) this.resetConfirm();
  }

  /** Why the key may not use `control` (a name in CONTROLS), in the engine's words; null when it may. */
  refusal(control) {
    return this.refusals[CONTROLS[control].right] || null;
  }

  /**
   * Every control of the selected call on while the call goes on, except those the key may not use: off, each with
   * the engine's reason as its title and beside the controls, one line for the controls refused for the same reason.
   */
  drawControls() {
    const call = this.selectedCall();
    const ended = call === null || call.ended !== null;
    const refused = new Map(); // reason -> the labels of the controls it switches off
    for (const [name, control] of Object.entries(CONTROLS)) {
      const refusal = this.refusal(name);
      for (const id of control.ids) {
        const node = byId(id);
        node.disabled = ended || refusal !== null;
        node.title = refusal || "";
      }
      if (refusal !== null) refused.set(refusal, [...(refused.get(refusal) || []), control.label]);
    }
    const notes = byId("control-refusals");
    notes.replaceChildren(...[...refused].map(([why, labels]) => (
      el("li", { text: `${listed(labels)} ${labels.length > 1 ? "are" : "is"} off: ${why}.` })
    )));
    notes.hidden = refused.size === 0;
  }

  /**
   * A control's request failed: say why. A 403 means the key lost the right since sign-in (its user was made a
   * VIEWER): every control needing that right goes off, with the engine's reason, and is not offered again.
   */
  failed(control, error) {
    say(byId("live-call-notice"), error.message);
    if (error.status === 403) this.refusals[CONTROLS[control].right] = error.reason;
    this.drawControls();
  }

  drawItem(item) {
    const node = transcriptNode(item);
    const stick = atBottom(this.transcript);
    const old = this.nodes.get(item.key);
    if (old) {
      old.replaceWith(node);
    } else {
      const after = [...this.nodes.entries()]
        .map(([key, existing]) => ({ key, existing, item: this.selectedCall().items.get(key) }))
        .filter((entry) => entry.item && byOrder(entry.item, item) > 0)
        .sort((a, b) => byOrder(a.item, b.item))[0];
      const interim = this.transcript.querySelector('[data-key="interim"]');
      this.transcript.insertBefore(node, after ? after.existing : interim);
    }
    this.nodes.set(item.key, node);
    if (stick) this.transcript.scrollTop = this.transcript.scrollHeight;
  }

  drawInterim(call) {
    if (call !== this.selectedCall()) return;
    const stick = atBottom(this.transcript);
    const old = this.transcript.querySelector('[data-key="interim"]');
    if (old) old.remove();
    if (call.interim) this.transcript.append(interimNode(call.interim));
    if (stick) this.transcript.scrollTop = this.transcript.scrollHeight;
  }

  // --- controls ---

  resetConfirm() {
    clearTimeout(this.confirmTimer);
    const button = byId("hangup");
    button.textContent = "Hang up";
    button.dataset.confirm = "";
  }

  async hangUp() {
    const call = this.selectedCall();
    const button = byId("hangup");
    if (call === null || call.ended !== null || this.refusal("hangup") !== null) return;
    if (button.dataset.confirm !== "yes") {
      button.dataset.confirm = "yes";
      button.textContent = "Confirm hang-up";
      this.confirmTimer = setTimeout(() => this.resetConfirm(), CONFIRM_MS);
      return;
    }
    this.resetConfirm();
    button.disabled = true;
    const notice = byId("live-call-notice");
    say(notice, "Hanging up…");
    try {
      await this.api.post(`/live-calls/${encodeURIComponent(call.id)}/hangup`, undefined, "Hanging up");
      say(notice, "Hang-up sent; the call is ending.");
      if (this.polling) this.refresh();
    } catch (error) {
      this.failed("hangup", error);
    }
  }

  async say() {
    const call = this.selectedCall();
    const input = byId("say-text");
    const text = input.value.trim();
    const notice = byId("live-call-notice");
    if (call === null || this.refusal("say") !== null) return;
    if (!text) {
      say(notice, "Type the line for the agent to say first.");
      return;
    }
    const interrupt = byId("say-interrupt").checked;
    byId("say-submit").disabled = true;
    try {
      const answer = await this.api.post(
        `/live-calls/${encodeURIComponent(call.id)}/say`, { text, interrupt }, "Sending the line",
      );
      input.value = "";
      say(notice, answer && answer.interrupted
        ? "The agent stopped and is saying your line now."
        : "Sent: the agent says your line as soon as it is not speaking.");
    } catch (error) {
      this.failed("say", error);
    } finally {
      this.drawControls();
    }
  }

  toggleListen() {
    const button = byId("listen");
    if (this.listener) {
      this.listener.stop();
      return;
    }
    const call = this.selectedCall();
    if (call === null || this.refusal("listen") !== null) return;
    const notice = byId("live-call-notice");
    this.listener = new CallListener(this.api.key, call.id, (state, detail) => {
      if (state === "connecting") {
        button.textContent = "Connecting…";
        button.setAttribute("aria-pressed", "true");
      } else if (state === "playing") {
        button.textContent = "Stop listening";
        say(notice, "Listening: the caller and the agent as the caller hears them.");
      } else if (state === "stopped") {
        const opened = this.listener !== null && this.listener.started;
        this.listener = null;
        button.textContent = "Listen";
        button.setAttribute("aria-pressed", "false");
        say(notice, `Stopped listening: ${detail}.`);
        if (!opened) this.explainListenRefusal(call.id);
      }
    });
    this.listener.start();
  }

  /**
   * The listen socket closed before any audio: a browser cannot read why a WebSocket was refused, so ask the same
   * path over plain HTTP, which answers the same refusal (or 400, "open it as a WebSocket", when listening is
   * allowed). A key that may no longer listen (its user made a VIEWER since sign-in) gets the engine's reason, and
   * Listen is not offered again.
   */
  async explainListenRefusal(callLogId) {
    try {
      await this.api.get(`/live-calls/${encodeURIComponent(callLogId)}/listen`, {}, "Listening");
    } catch (error) {
      if (error.status !== 400 && error.status !== 0) this.failed("listen", error);
    }
  }
}

/** What each event type does to the call it names. */
const EVENT_HANDLERS = {
  "call.snapshot": (live, call, data) => {
    parties(call, data);
    call.startedAt = data.startedAt || call.startedAt;
    call.state = call.state || (data.status ? status(data.status).toLowerCase() : null);
  },
  "call.started": (live, call, data) => {
    parties(call, data);
    call.startedAt = call.startedAt || data.at;
  },
  "call.state": (live, call, data) => {
    call.state = String(data.state).replaceAll("_", " ").toLowerCase();
  },
  "caller.interim": (live, call, data) => {
    call.interim = data.text;
    live.drawInterim(call);
  },
  "caller.final": (live, call, data) => {
    call.interim = null;
    live.turn(call, data.turnIndex, { kind: "caller", text: data.text });
    live.drawInterim(call);
  },
  "agent.speaking": (live, call, data) => {
    live.turn(call, data.turnIndex, { kind: "agent", text: data.text, speaking: true });
  },
  "agent.turn": (live, call, data) => {
    live.turn(call, data.turnIndex, {
      kind: "agent", text: data.text, spokenText: data.spokenText, interrupted: Boolean(data.interrupted), speaking: false,
    });
  },
  "turn.latency": (live, call, data) => {
    const key = `turn-${data.turnIndex}`;
    if (call.items.has(key)) live.turn(call, data.turnIndex, { latency: data });
    else live.turn(call, data.turnIndex, { kind: "agent", text: "", latency: data });
  },
  "tool.call": (live, call, data) => {
    live.note(call, `Tool ${data.name}: ${data.ok ? "done" : "failed"}`, data.ok ? "" : "bad");
  },
  "path.node": (live, call, data) => {
    live.note(call, `Path: now at node ${data.nodeId}`);
  },
  "call.say": (live, call, data) => {
    live.note(call, `Line sent through the API${data.interrupt ? " (interrupting)" : ""}: “${data.text}”`);
  },
  "call.transfer": (live, call, data) => {
    live.note(call, `Transferred through the API to ${data.to}`);
  },
  "call.ended": (live, call, data) => {
    live.end(call, data);
    live.note(call, `Call ended: ${reason(data.endReason) || status(data.status)}`);
  },
};

/** Who the customer is and which of our lines the call is on, from an event's direction, from and to. */
function parties(call, data) {
  const outbound = data.direction === "outbound" || data.direction === "OUTBOUND";
  if (data.direction) call.direction = outbound ? "outbound" : "inbound";
  const number = outbound ? data.to : data.from;
  const line = outbound ? data.from : data.to;
  call.number = call.number || number || null;
  call.line = line || call.line;
}
