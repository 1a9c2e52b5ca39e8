// Warren's dashboard: the only script it runs. Progressive: every page
// works without it (times then show in UTC, live parts do not move).
"use strict";

// Times in the browser's time zone; the server writes UTC.
function localise(root) {
  for (const el of root.querySelectorAll("time[datetime]")) {
    const d = new Date(el.getAttribute("datetime"));
    if (!isNaN(d)) {
      el.title = el.getAttribute("datetime");
      el.textContent = d.toLocaleString();
    }
  }
}

// Filter forms send local times with the browser's offset from UTC.
function fillTimeZones() {
  for (const el of document.querySelectorAll("input[data-tz]")) {
    el.value = String(new Date().getTimezoneOffset());
  }
}

// A [data-live] element is replaced by each fragment its stream sends.
function goLive(el) {
  const note = document.querySelector(".live-note");
  const source = new EventSource(el.dataset.live);
  source.onmessage = (e) => {
    el.innerHTML = e.data;
    localise(el);
    el.dataset.updated = String(Date.now());
    document.body.dataset.live = "on";
    const state = el.querySelector("[data-state]");
    // A finished task stops changing: the full page shows its result.
    if (state && /^(SUCCESS|FAILURE|CANCELLED|EXPIRED)$/.test(state.dataset.state) && el.id === "status") {
      source.close();
      el.dataset.finished = state.dataset.state;
    }
  };
  source.onerror = () => {
    document.body.dataset.live = "off";
    if (note) note.classList.add("offline");
  };
  source.onopen = () => {
    document.body.dataset.live = "on";
    if (note) note.classList.remove("offline");
  };
}

document.addEventListener("DOMContentLoaded", () => {
  localise(document);
  fillTimeZones();
  for (const el of document.querySelectorAll("[data-live]")) goLive(el);
});
