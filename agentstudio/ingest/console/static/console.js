// Live updates of the calls page: the server sends an event when one of the tenant's calls is queued
// or changes; the page then fetches its own call list again, rendered (and escaped) by the server,
// and swaps it in. Nothing from a call is ever turned into markup here.
"use strict";

(function () {
  const status = document.getElementById("live-status");
  const region = () => document.getElementById("calls-region");
  if (!status || !region() || !window.EventSource) return;
  if (status.dataset.paused) {
    status.textContent = "Live updates show on the newest page.";
    return;
  }
  let pending = null;

  async function refresh() {
    pending = null;
    const url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (response.redirected || response.status === 401) {
      window.location.reload();
      return;
    }
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html").getElementById("calls-region");
    if (fresh) {
      region().replaceWith(document.importNode(fresh, true));
      status.textContent = "Live · updated " + new Date().toLocaleTimeString();
    }
  }

  const events = new EventSource(status.dataset.liveUrl);
  events.addEventListener("open", () => { status.textContent = "Live"; status.classList.add("on"); });
  events.addEventListener("error", () => { status.textContent = "Reconnecting…"; status.classList.remove("on"); });
  events.addEventListener("call", () => {
    if (pending === null) pending = setTimeout(refresh, 250);  // a burst of changes, one refresh
  });
  events.addEventListener("signed-out", () => {
    events.close();
    window.location.assign(document.querySelector("a.brand").href);
  });
})();
