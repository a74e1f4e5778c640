// Outpost console: live updates without a reload. The element #live (if a page has
// one) names in data-live the address of its fresh content; it is fetched every 5 s
// and replaces the element's content. When the agent stops answering, #contact says
// since when; when the session has ended, it says so.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var contact = document.getElementById("contact");
  if (!live || !contact) { return; }
  var url = live.getAttribute("data-live");
  var lostSince = null;
  function two(n) { return (n < 10 ? "0" : "") + n; }
  function clock(d) { return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds()); }
  function lost(why) {
    if (lostSince === null) { lostSince = new Date(); }
    var s = Math.round((Date.now() - lostSince.getTime()) / 1000);
    contact.textContent = "Lost contact with the agent at " + clock(lostSince) +
      " (" + s + " s ago): " + why + ". The values below are from then.";
    contact.hidden = false;
  }
  function tick() {
    var req = new XMLHttpRequest();
    req.open("GET", url, true);
    req.timeout = 4000;
    req.onload = function () {
      if (req.status === 200) {
        lostSince = null;
        contact.hidden = true;
        live.innerHTML = req.responseText;
      } else if (req.status === 401 || req.status === 303) {
        contact.textContent = "Your session has ended: reload the page to log in again.";
        contact.hidden = false;
      } else {
        lost("it answered " + req.status);
      }
    };
    req.onerror = function () { lost("no answer"); };
    req.ontimeout = function () { lost("no answer within 4 s"); };
    req.send();
  }
  setInterval(tick, 5000);
}());
