// Recent calls: GET /v1/call-logs with its filters and pages; the selected call's facts, recording (fetched with
// the key into a blob: URL), turn timeline with latency bars, and transcript.

import { byId, el, say } from "./dom.js";
import { clock, millis, party, reason, status, when } from "./format.js";
import { headlineLatency, itemFromTurn, latencyGrade, transcriptNode } from "./transcript.js";

const PAGE_SIZE = 25;

export class RecentCalls {
  constructor(api, { onSignedOut }) {
    this.api = api;
    this.onSignedOut = onSignedOut;
    this.cursor = null;
    this.selected = null;
    this.recordingUrl = null;
    this.audio = null;
    this.loading = null;
    this.shown = 0;
    for (const id of ["filter-status", "filter-type", "filter-since", "filter-until"]) {
      byId(id).addEventListener("change", () => this.load());
    }
    byId("recent-more").addEventListener("click", () => this.load({ more: true }));
  }

  query() {
    const day = (id, end) => {
      const value = byId(id).value;
      if (!value) return undefined;
      const local = new Date(`${value}T${end ? "23:59:59.999" : "00:00:00"}`);
      return local.toISOString();
    };
    return {
      limit: PAGE_SIZE,
      status: byId("filter-status").value,
      callType: byId("filter-type").value,
      since: day("filter-since", false),
      until: day("filter-until", true),
    };
  }

  /** The first page for the filters, or (more) the next page. */
  async load({ more = false } = {}) {
    const list = byId("recent-list");
    const query = this.query();
    if (more) query.cursor = this.cursor;
    const token = Symbol("load");
    this.loading = token;
    byId("recent-more").disabled = true;
    try {
      const page = await this.api.get("/call-logs", query, "Listing recent calls");
      if (this.loading !== token) return; // filters changed meanwhile
      say(byId("recent-error"), "");
      if (!more) {
        list.replaceChildren();
        this.shown = 0;
      }
      list.append(...page.data.map((entry) => this.row(entry)));
      this.shown += page.data.length;
      this.cursor = page.nextCursor;
      byId("recent-empty").hidden = this.shown > 0;
      const filtered = ["filter-status", "filter-type", "filter-since", "filter-until"].some((id) => byId(id).value);
      byId("recent-empty-title").textContent = filtered ? "No calls match" : "No calls yet";
      byId("recent-empty-hint").textContent = filtered
        ? "Try another status, direction or date range."
        : "Finished calls are listed here, newest first.";
      byId("recent-more").hidden = !page.nextCursor;
    } catch (error) {
      if (error.status === 401) this.onSignedOut(error.message);
      else say(byId("recent-error"), error.message);
    } finally {
      byId("recent-more").disabled = false;
    }
  }

  row(entry) {
    const inbound = entry.callType === "INBOUND";
    const ending = entry.metadata && entry.metadata.endReason;
    return el(
      "li",
      {
        class: `call-card${entry.id === this.selected ? " selected" : ""}`,
        dataset: { callId: entry.id },
        tabindex: "0",
        role: "button",
        onclick: () => this.select(entry),
        onkeydown: (event) => {
          if (event.key === "Enter" || event.key === " ") this.select(entry);
        },
      },
      el(
        "div",
        { class: "card-top" },
        el("span", { class: `direction ${inbound ? "inbound" : "outbound"}`, text: inbound ? "Inbound" : "Outbound" }),
        el("span", { class: "when", text: when(entry.timestamp) }),
      ),
      el("div", { class: "card-party", text: party(entry.customer || entry.phoneNumber) }),
      el(
        "div",
        { class: "card-meta" },
        el("span", { class: `status-dot ${String(entry.status).toLowerCase()}`, "aria-hidden": "true" }),
        `${status(entry.status)}${ending ? ` · ${reason(ending)}` : ""}`,
        typeof entry.duration === "number" ? ` · ${clock(entry.duration)}` : "",
      ),
    );
  }

  async select(entry) {
    this.selected = entry.id;
    for (const card of byId("recent-list").children) {
      card.classList.toggle("selected", card.dataset.callId === entry.id);
    }
    byId("recent-detail-empty").hidden = true;
    byId("recent-detail-body").hidden = false;
    const title = party(entry.customer || entry.phoneNumber);
    byId("recent-title").textContent = title;
    byId("recent-subtitle").textContent = [
      entry.callType === "INBOUND" ? "Inbound call" : "Outbound call",
      entry.phoneNumber !== title ? entry.phoneNumber : null,
      entry.agentName,
      entry.campaignBatchName ? `campaign ${entry.campaignBatchName}` : null,
      when(entry.timestamp),
    ].filter(Boolean).join(" · ");
    const badge = byId("recent-state");
    badge.textContent = status(entry.status);
    badge.dataset.state = String(entry.status).toLowerCase();
    this.facts(entry);
    this.recording(entry);
    byId("recent-timeline").replaceChildren(el("p", { class: "muted", text: "Loading turns…" }));
    byId("recent-transcript").replaceChildren();
    try {
      const turns = await this.api.get(`/call-logs/${encodeURIComponent(entry.id)}/turns`, {}, "Loading the turns");
      if (this.selected !== entry.id) return;
      this.timeline(entry, turns.data);
      this.transcript(entry, turns.data);
    } catch (error) {
      if (error.status === 401) this.onSignedOut(error.message);
      else byId("recent-timeline").replaceChildren(el("p", { class: "error", text: error.message }));
    }
  }

  facts(entry) {
    const meta = entry.metadata || {};
    const latency = meta.latencyMs || {};
    const rows = [
      ["Duration", typeof entry.duration === "number" ? clock(entry.duration) : "–"],
      ["Ended by", reason(meta.endReason) || "–"],
      ["Median latency", millis(latency.p50 ?? latency.median ?? null)],
      ["Slowest turn", millis(latency.max ?? null)],
    ];
    if (meta.endDetail) rows.push(["Detail", String(meta.endDetail)]);
    byId("recent-facts").replaceChildren(
      ...rows.map(([name, value]) => el("div", { class: "fact" }, el("dt", { text: name }), el("dd", { text: value }))),
    );
  }

  async recording(entry) {
    const box = byId("recent-recording");
    if (this.recordingUrl) URL.revokeObjectURL(this.recordingUrl);
    this.recordingUrl = null;
    this.audio = null;
    if (!entry.recordingUrl) {
      box.replaceChildren(el("p", { class: "muted", text: "No recording for this call." }));
      return;
    }
    box.replaceChildren(el("p", { class: "muted", text: "Loading the recording…" }));
    try {
      const blob = await this.api.recording(entry.id);
      if (this.selected !== entry.id) return;
      this.recordingUrl = URL.createObjectURL(blob);
      this.audio = el("audio", { controls: true, preload: "metadata", src: this.recordingUrl });
      box.replaceChildren(this.audio, el("p", { class: "hint", text: "Caller on the left, agent on the right." }));
    } catch (error) {
      if (this.selected === entry.id) box.replaceChildren(el("p", { class: "error", text: error.message }));
    }
  }

  /** Turns on one time axis (caller above, agent below), then each agent turn's latency as a bar. */
  timeline(entry, turns) {
    const box = byId("recent-timeline");
    if (turns.length === 0) {
      box.replaceChildren(el("p", { class: "muted", text: "No turns were recorded for this call." }));
      return;
    }
    const endMs = Math.max(...turns.map((turn) => turn.endMs), (entry.duration || 0) * 1000, 1);
    const lane = (speaker) => el(
      "div",
      { class: `lane ${speaker}` },
      el("span", { class: "lane-label", text: speaker === "agent" ? "Agent" : "Caller" }),
      el(
        "div",
        { class: "lane-track" },
        turns.filter((turn) => turn.speaker === speaker).map((turn) => el("button", {
          type: "button",
          class: `span${turn.interrupted ? " interrupted" : ""}`,
          title: `${clock(turn.startMs / 1000)} ${turn.text}`,
          style: {
            left: `${(100 * turn.startMs) / endMs}%`,
            width: `${Math.max(0.4, (100 * (turn.endMs - turn.startMs)) / endMs)}%`,
          },
          onclick: () => this.seek(turn.startMs),
        })),
      ),
    );
    const latencyOf = (turn) => turn.latencyMs ?? headlineLatency(turn.latency);
    const agentTurns = turns.filter((turn) => turn.speaker === "agent" && typeof latencyOf(turn) === "number");
    const worst = Math.max(1500, ...agentTurns.map(latencyOf));
    const bars = el(
      "ol",
      { class: "latency-bars" },
      agentTurns.map((turn) => {
        const ms = latencyOf(turn);
        return el(
          "li",
          { title: turn.text },
          el("span", { class: "bar-label", text: `Turn ${turn.index + 1}` }),
          el("span", { class: "bar-track" }, el("span", {
            class: `bar ${latencyGrade(ms)}`, style: { width: `${(100 * ms) / worst}%` },
          })),
          el("span", { class: "bar-value", text: millis(ms) }),
        );
      }),
    );
    const parts = [
      el("div", { class: "lanes" }, lane("caller"), lane("agent"),
        el("div", { class: "axis" }, el("span", { text: "0:00" }), el("span", { text: clock(endMs / 1000) }))),
    ];
    if (agentTurns.length) parts.push(el("h4", { text: "Reply latency (the caller stops → the agent's first audio)" }), bars);
    box.replaceChildren(...parts);
  }

  seek(startMs) {
    if (this.audio) {
      this.audio.currentTime = startMs / 1000;
      this.audio.play();
    }
  }

  transcript(entry, turns) {
    const box = byId("recent-transcript");
    if (turns.length > 0) {
      box.replaceChildren(...turns.map((turn) => transcriptNode(itemFromTurn(turn))));
    } else if (entry.transcript) {
      box.replaceChildren(...entry.transcript.split("\n").map((line) => el("li", { class: "note", text: line })));
    } else {
      box.replaceChildren(el("li", { class: "note", text: "Nothing was said on this call." }));
    }
  }
}
