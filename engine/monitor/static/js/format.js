// How times, durations, numbers and reasons read on the page.

const timeOfDay = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const conjunction = new Intl.ListFormat("en", { type: "conjunction" });
const dateAndTime = new Intl.DateTimeFormat(undefined, {
  month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
});

/** "1:07" or "1:02:07" for a number of seconds. */
export function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${rest}` : `${m}:${rest}`;
}

/** Seconds since an ISO time, for a call still running. */
export function secondsSince(iso) {
  return (Date.now() - Date.parse(iso)) / 1000;
}

/** "14:03:21" */
export function time(iso) {
  return iso ? timeOfDay.format(new Date(iso)) : "";
}

/** "Dec 6, 14:03" */
export function when(iso) {
  return iso ? dateAndTime.format(new Date(iso)) : "";
}

/** "640 ms" or "1.2 s" */
export function millis(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

/** "Hang up and Say" for ["Hang up", "Say"]. */
export function listed(names) {
  return conjunction.format(names);
}

/** "caller_hangup" reads "caller hangup". */
export function reason(code) {
  return code ? String(code).replaceAll("_", " ") : "";
}

/** "In progress" for IN_PROGRESS. */
export function status(code) {
  const text = String(code || "").replaceAll("_", " ").toLowerCase();
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** Who the other party of a call is: the customer's number, else "Unknown caller". */
export function party(number) {
  return number || "Unknown number";
}
