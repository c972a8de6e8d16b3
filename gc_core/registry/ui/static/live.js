// Live refresh without reloading: fetch this page again every few seconds and swap in its
// changing part (#live). Forms and filters outside it keep what the user typed.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) { return; }
  var period = 1000 * Number(live.getAttribute("data-refresh") || "3");

  function refresh() {
    if (document.hidden) { setTimeout(refresh, period); return; }
    fetch(window.location.href, { credentials: "same-origin", redirect: "manual" })
      .then(function (answer) { return answer.ok ? answer.text() : null; })
      .then(function (html) {
        if (html === null) { return; }  // signed out, or the registry is away: keep the page
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        if (fresh) { live.innerHTML = fresh.innerHTML; }
      })
      .catch(function () { /* try again next period */ })
      .then(function () { setTimeout(refresh, period); });
  }
  setTimeout(refresh, period);
})();
