// A call's transcript as the page draws it: caller and agent turns in turn order, cut turns marked, each agent
// turn with its latency, notes (tools, path nodes, lines said through the API) where they happened.

import { el } from "./dom.js";
import { millis } from "./format.js";

const HEADLINE_STAGES = ["voiceToVoiceMs", "firstFrameSent"];
const NOT_STAGES = new Set(["callLogId", "at", "turnIndex", "speculative", "voiceToVoiceMs"]);

/** The headline latency (ms) of a turn's latency record, or null. */
export function headlineLatency(latency) {
  if (!latency) return null;
  for (const stage of HEADLINE_STAGES) {
    if (typeof latency[stage] === "number") return latency[stage];
  }
  return null;
}

/** "good", "fair" or "slow": how a voice-to-voice latency feels on a phone call. */
export function latencyGrade(ms) {
  if (ms < 800) return "good";
  return ms < 1500 ? "fair" : "slow";
}

function latencyChip(latency, fallbackMs) {
  const ms = headlineLatency(latency) ?? fallbackMs;
  if (ms === null || ms === undefined) return null;
  const stages = Object.entries(latency || {})
    .filter(([name, value]) => !NOT_STAGES.has(name) && typeof value === "number")
    .map(([name, value]) => `${name} ${millis(value)}`);
  const speculative = latency && (latency.speculative === true || latency.speculative === 1);
  return el(
    "span",
    {
      class: `chip latency ${latencyGrade(ms)}`,
      title: stages.length ? `After the caller stopped: ${stages.join(", ")}` : "Voice to voice",
    },
    `${millis(ms)}${speculative ? " · speculative" : ""}`,
  );
}

/** The text of an agent turn, with the part the caller never heard struck out when the turn was cut. */
function agentText(item) {
  const spoken = item.spokenText;
  if (item.interrupted && typeof spoken === "string" && item.text.startsWith(spoken) && item.text.length > spoken.length) {
    return [spoken, el("span", { class: "unheard", title: "Not heard: the caller cut in", text: item.text.slice(spoken.length) })];
  }
  return [item.text];
}

/** One transcript item as a list element. */
export function transcriptNode(item) {
  if (item.kind === "note") {
    return el("li", { class: `note ${item.tone || ""}`, dataset: { key: item.key } }, item.text);
  }
  const agent = item.kind === "agent";
  const badges = [
    agent ? latencyChip(item.latency, item.latencyMs) : null,
    item.speaking ? el("span", { class: "chip speaking", text: "speaking" }) : null,
    item.interrupted ? el("span", { class: "chip cut", text: "cut", title: "The caller interrupted this turn" }) : null,
  ];
  return el(
    "li",
    {
      class: `turn ${item.kind}${item.interrupted ? " interrupted" : ""}${item.speaking ? " speaking" : ""}`,
      dataset: { key: item.key, turn: item.turnIndex },
    },
    el("div", { class: "turn-head" }, el("span", { class: "speaker", text: agent ? "Agent" : "Caller" }), badges),
    el("p", { class: "turn-text" }, agent ? agentText(item) : item.text),
  );
}

/** The node of the caller's words still being recognized. */
export function interimNode(text) {
  return el(
    "li",
    { class: "turn caller interim", dataset: { key: "interim" } },
    el("div", { class: "turn-head" }, el("span", { class: "speaker", text: "Caller" }), el("span", { class: "chip", text: "hearing…" })),
    el("p", { class: "turn-text", text }),
  );
}

/** A stored turn (GET /v1/call-logs/{id}/turns) as a transcript item. */
export function itemFromTurn(turn) {
  return {
    key: `turn-${turn.index}`,
    order: [turn.index, 0],
    kind: turn.speaker === "agent" ? "agent" : "caller",
    turnIndex: turn.index,
    text: turn.text,
    interrupted: turn.interrupted,
    latencyMs: turn.latencyMs,
    latency: turn.latency,
    startMs: turn.startMs,
    endMs: turn.endMs,
  };
}

/** Compare two items' places in the transcript. */
export function byOrder(a, b) {
  return a.order[0] - b.order[0] || a.order[1] - b.order[1];
}
