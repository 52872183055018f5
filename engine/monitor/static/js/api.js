// The /v1 API over fetch, with the key as a Bearer header; failures become errors that read as sentences.

const KEY_STORAGE = "dialtone.monitor.apiKey";

/** An answer of the API that was not a success, or a request that never got one; `reason`: the API's own words. */
export class ApiError extends Error {
  constructor(status, code, message, reason = message) {
    super(message);
    this.status = status;
    this.code = code;
    this.reason = reason;
  }
}

/** The key this tab signed in with, if any. */
export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** The error a failed response stands for, with the API's own message when it sent one. */
export async function responseError(response, what) {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    const detail = body && body.error;
    if (detail && typeof detail === "object") {
      code = detail.code || code;
      message = detail.message || message;
    } else if (typeof detail === "string") {
      message = detail;
    }
  } catch {
    // Not JSON: keep the status line.
  }
  if (response.status === 401) return new ApiError(401, code, `The API key was refused: ${message}.`, message);
  if (response.status === 429) return new ApiError(429, code, `Too many requests: ${message}.`, message);
  return new ApiError(response.status, code, `${what} failed: ${message}.`, message);
}

/** The error a fetch that got no response stands for. */
export function networkError(what, error) {
  if (error && error.name === "AbortError") return error;
  return new ApiError(0, "network", `${what} failed: the engine at ${location.host} could not be reached.`);
}

/** A client of this engine's API for one key. */
export class Api {
  constructor(key) {
    this.key = key;
  }

  headers(extra = {}) {
    return { Authorization: `Bearer ${this.key}`, ...extra };
  }

  async request(method, path, { body, query, what, signal } = {}) {
    const url = new URL(`/v1${path}`, location.origin);
    for (const [name, value] of Object.entries(query || {})) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
    }
    const init = { method, headers: this.headers({ Accept: "application/json" }), cache: "no-store", signal };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const label = what || `${method} ${path}`;
    let response;
    try {
      response = await fetch(url, init);
    } catch (error) {
      throw networkError(label, error);
    }
    if (!response.ok) throw await responseError(response, label);
    return response.status === 204 ? null : response.json();
  }

  get(path, query, what) {
    return this.request("GET", path, { query, what });
  }

  post(path, body, what) {
    return this.request("POST", path, { body, what });
  }

  /** A call's recording as a Blob (the engine, or the object store it redirects to, serves the WAV). */
  async recording(callLogId) {
    const what = "Loading the recording";
    let response;
    try {
      response = await fetch(`/recordings/${encodeURIComponent(callLogId)}.wav`, {
        headers: this.headers(), cache: "no-store",
      });
    } catch (error) {
      throw networkError(what, error);
    }
    if (response.status === 404) throw new ApiError(404, "not_found", "No recording was kept for this call.");
    if (!response.ok) throw await responseError(response, what);
    return response.blob();
  }
}
