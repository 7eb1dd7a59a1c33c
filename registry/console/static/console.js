// certfleet console: the one live part. The fleet page's #live block is fetched again
// (server-rendered, escaped HTML) every data-live-seconds; a 401 means the session ended.
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  const url = live.dataset.liveUrl;
  const seconds = Math.max(2, Number(live.dataset.liveSeconds) || 5);
  let busy = false;
  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) { window.location.reload(); return; }
      if (response.ok) live.innerHTML = await response.text();
    } catch (error) {
      // The registry is unreachable for a moment: keep the last figures, try again later.
    } finally {
      busy = false;
    }
  }
  window.setInterval(refresh, seconds * 1000);
})();
