// Server-Sent Events read with fetch and a streaming body, so the key travels as a header; resumes with
// Last-Event-ID after any break, so no event is lost across a reconnect.

import { ApiError, networkError, responseError } from "./api.js";

const RETRY_MS = 1000;
const MAX_RETRY_MS = 15000;
const SILENCE_MS = 45000; // three missed keepalives (the engine sends one every 15 s): the connection is dead

/** Parses an event stream's text, chunk by chunk, into {id, type, data} events (the WHATWG rules). */
export class EventStreamParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.afterCR = false;
    this.reset();
    this.lastEventId = null;
    this.retryMs = null;
  }

  reset() {
    this.type = "";
    this.data = [];
    this.id = null;
  }

  push(text) {
    // A "\r\n" split across two chunks is one line end, not two.
    const chunk = this.afterCR && text.startsWith("\n") ? text.slice(1) : text;
    this.afterCR = chunk.endsWith("\r");
    this.buffer += chunk;
    const lines = this.buffer.split(/\r\n|\r|\n/);
    this.buffer = lines.pop(); // the start of a line whose end has not arrived yet
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment: keepalive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
  }

  dispatch() {
    if (this.id !== null) this.lastEventId = this.id;
    if (this.data.length > 0) {
      this.onEvent({ id: this.id, type: this.type || "message", data: this.data.join("\n") });
    }
    this.reset();
  }
}

/**
 * One event stream kept open: `onEvent({id, type, data})` for each event (data parsed from JSON),
 * `onState(state, detail)` with "connecting", "live", "reconnecting" (detail: why), "unavailable" (the engine
 * has no such stream) or "refused" (the key was refused).
 */
export class LiveEventStream {
  constructor(api, path, { onEvent, onState }) {
    this.api = api;
    this.path = path;
    this.onEvent = onEvent;
    this.onState = onState;
    this.lastEventId = null;
    this.controller = null;
    this.stopped = false;
  }

  start() {
    this.stopped = false;
    this.run();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async run() {
    let delay = RETRY_MS;
    this.onState("connecting");
    while (!this.stopped) {
      this.controller = new AbortController();
      try {
        await this.readOnce(this.controller.signal, () => { delay = RETRY_MS; });
        if (this.stopped) return;
        this.onState("reconnecting", "the engine closed the event stream");
      } catch (error) {
        if (this.stopped) return;
        if (error.status === 401 || error.status === 403) {
          this.onState("refused", error.message);
          return;
        }
        if (error.status === 404 || error.status === 405) {
          this.onState("unavailable", error.message);
          return;
        }
        this.onState("reconnecting", error.message);
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, MAX_RETRY_MS);
    }
  }

  async readOnce(signal, onOpen) {
    const headers = this.api.headers({ Accept: "text/event-stream" });
    if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
    const what = "The live event stream";
    let response;
    try {
      response = await fetch(`/v1${this.path}`, { headers, signal, cache: "no-store" });
    } catch (error) {
      throw networkError(what, error);
    }
    if (!response.ok) throw await responseError(response, what);
    onOpen();
    this.onState("live");
    const parser = new EventStreamParser((event) => this.deliver(event));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let silent = false;
    let watchdog = null;
    const watch = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => {
        silent = true;
        reader.cancel();
      }, SILENCE_MS);
    };
    watch();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (silent) throw new Error("silent");
        if (done) return;
        watch();
        parser.push(value);
        if (parser.lastEventId !== null) this.lastEventId = parser.lastEventId;
      }
    } catch (error) {
      if (silent) throw new ApiError(0, "silent", `${what} went silent for ${SILENCE_MS / 1000} s`);
      throw networkError(what, error);
    } finally {
      clearTimeout(watchdog);
      reader.releaseLock();
    }
  }

  deliver(event) {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      console.warn("monitor: an event whose data is not JSON was skipped", event.type);
      return;
    }
    this.onEvent({ id: event.id, type: event.type, data });
  }
}
