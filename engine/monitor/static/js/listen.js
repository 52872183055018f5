// Listening in on a call: the listen WebSocket's 16-bit PCM played through Web Audio. Nothing here runs, and no
// AudioContext exists, until the user presses Listen.

const LEAD_S = 0.25; // how far ahead of the audio clock chunks are queued, to ride out network jitter
const MAX_LAG_S = 1.0; // past this much queued audio, drop ahead to stay live

/** The key as the listen socket's subprotocol carries it: base64url, no padding. */
export function keyProtocol(key) {
  const bytes = new TextEncoder().encode(key);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return `dialtone.key.${btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "")}`;
}

/** One listening session on one call; `onState(state, detail)` reports "connecting", "playing" and "stopped". */
export class CallListener {
  constructor(key, callLogId, onState) {
    this.key = key;
    this.callLogId = callLogId;
    this.onState = onState;
    this.context = null;
    this.socket = null;
    this.sampleRate = 8000;
    this.channels = 1;
    this.playAt = 0;
    this.stopReason = null;
    this.started = false;
  }

  /** Start: call from a click handler, so the browser lets the AudioContext play. */
  start() {
    this.context = new AudioContext();
    this.context.resume();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const path = `/v1/live-calls/${encodeURIComponent(this.callLogId)}/listen?channels=mixed&encoding=pcm16`;
    this.socket = new WebSocket(`${scheme}//${location.host}${path}`, ["dialtone.listen", keyProtocol(this.key)]);
    this.socket.binaryType = "arraybuffer";
    this.onState("connecting");
    this.socket.addEventListener("message", (message) => this.receive(message.data));
    this.socket.addEventListener("close", (event) => this.closed(event));
  }

  stop(reason = "you stopped listening") {
    this.stopReason = this.stopReason || reason;
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000);
    this.finish();
  }

  receive(data) {
    if (typeof data === "string") {
      let message;
      try {
        message = JSON.parse(data);
      } catch {
        return;
      }
      if (message.event === "start") {
        this.sampleRate = message.sampleRate;
        this.channels = message.channels;
        this.started = true;
        this.onState("playing");
      } else if (message.event === "stop") {
        this.stopReason = `the engine stopped the audio (${String(message.reason || "no reason given")})`;
      }
      return;
    }
    this.play(data);
  }

  play(buffer) {
    const context = this.context;
    if (context === null || buffer.byteLength < 2 * this.channels) return;
    const view = new DataView(buffer);
    const frames = Math.floor(buffer.byteLength / (2 * this.channels));
    const audio = context.createBuffer(this.channels, frames, this.sampleRate);
    for (let channel = 0; channel < this.channels; channel += 1) {
      const samples = audio.getChannelData(channel);
      for (let i = 0; i < frames; i += 1) {
        samples[i] = view.getInt16((i * this.channels + channel) * 2, true) / 32768;
      }
    }
    const now = context.currentTime;
    if (this.playAt < now || this.playAt - now > MAX_LAG_S) this.playAt = now + LEAD_S;
    const source = context.createBufferSource();
    source.buffer = audio;
    source.connect(context.destination);
    source.start(this.playAt);
    this.playAt += audio.duration;
  }

  closed(event) {
    if (this.stopReason === null && !this.started) {
      this.stopReason = "the engine did not open the call's audio (the call may have just ended; try again)";
    } else if (this.stopReason === null) {
      this.stopReason = event.code === 1000
        ? "the call ended"
        : `the listen connection closed (${event.reason || `code ${event.code}`})`;
    }
    this.finish();
  }

  finish() {
    if (this.context !== null) {
      this.context.close();
      this.context = null;
    }
    if (this.socket !== null) {
      this.socket = null;
      this.onState("stopped", this.stopReason);
    }
  }
}
