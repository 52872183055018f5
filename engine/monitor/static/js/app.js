// The monitor page: sign in with an API key, then the calls in progress and the recent calls.

import { Api, forgetKey, storedKey, storeKey } from "./api.js";
import { byId, say } from "./dom.js";
import { LiveCalls } from "./live.js";
import { RecentCalls } from "./recent.js";

let live = null;
let recent = null;

function show(view) {
  byId("signin-view").hidden = view !== "signin";
  byId("live-view").hidden = view !== "live";
  byId("recent-view").hidden = view !== "recent";
  byId("tabs").hidden = view === "signin";
  byId("session").hidden = view === "signin";
  byId("tab-live").setAttribute("aria-selected", String(view === "live"));
  byId("tab-recent").setAttribute("aria-selected", String(view === "recent"));
}

/**
 * Forget the key and start the tab afresh, `message` shown on the sign-in form: a reload, so that nothing of the
 * session survives for the next key signed in here — its views' listeners (which would act with the forgotten key),
 * its requests in flight and what it drew (its organization's calls).
 */
function signOut(message) {
  forgetKey();
  if (live) live.stop();
  history.replaceState({ signedOut: message || "" }, "");
  location.reload();
}

/** The sign-in form, with why the last session ended (if it did). */
function showSignIn() {
  const ended = history.state && history.state.signedOut;
  history.replaceState(null, "");
  say(byId("signin-error"), ended || "");
  show("signin");
  byId("key").focus();
}

/** Check the key against the API, then open the monitor with it. */
async function signIn(key) {
  const api = new Api(key);
  const submit = byId("signin-submit");
  submit.disabled = true;
  submit.textContent = "Signing in…";
  say(byId("signin-error"), "");
  try {
    // What the key may do comes from the engine (GET /v1/me), which enforces the same rules on each request.
    const [organization, me] = await Promise.all([
      api.get("/organization", {}, "Signing in"),
      api.get("/me", {}, "Signing in"),
    ]);
    storeKey(key);
    byId("org-name").textContent = organization.name;
    live = new LiveCalls(api, {
      refusals: { listen: me.listenRefusal, write: me.writeRefusal },
      onSignedOut: signOut,
      onCount: (count) => { byId("live-count").textContent = String(count); },
    });
    recent = new RecentCalls(api, { onSignedOut: signOut });
    show("live");
    await live.start();
  } catch (error) {
    forgetKey();
    show("signin");
    say(byId("signin-error"), error.message);
  } finally {
    submit.disabled = false;
    submit.textContent = "Sign in";
  }
}

byId("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = byId("key").value.trim();
  if (!key) {
    say(byId("signin-error"), "Paste an API key first.");
    return;
  }
  signIn(key);
});
byId("sign-out").addEventListener("click", () => signOut(""));
byId("tab-live").addEventListener("click", () => show("live"));
byId("tab-recent").addEventListener("click", () => {
  show("recent");
  if (recent) recent.load(); // from the top each time: calls may have ended since
});

const key = storedKey();
if (key) signIn(key);
else showSignIn();
