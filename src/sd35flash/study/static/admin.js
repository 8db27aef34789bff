// Admin page: live counts and the CSV export, fetched with the bearer token.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  let token = "";
  let timer = null;

  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = String(c);
      tr.appendChild(td);
    }
    return tr;
  }

  async function refresh() {
    const r = await fetch("/api/admin/summary", { headers: { Authorization: "Bearer " + token } });
    if (!r.ok) {
      $("admin-error").textContent = r.status === 401 ? "Wrong admin token." : "Error " + r.status;
      $("admin-data").classList.add("hidden");
      if (timer) clearInterval(timer);
      return;
    }
    const s = await r.json();
    $("admin-error").textContent = "";
    $("total-votes").textContent = String(s.votes);
    $("pair-rows").replaceChildren(...s.pairs.map((p) => row([p.models[0], p.models[1], p.votes, p.ties])));
    $("annotator-rows").replaceChildren(
      ...s.annotators.map((a) => row([a.annotator.slice(0, 8), a.votes, a.total, a.gold, a.gold_failed])));
    $("admin-data").classList.remove("hidden");
  }

  $("csv-link").addEventListener("click", async (ev) => {
    ev.preventDefault();
    const r = await fetch("/api/admin/votes.csv", { headers: { Authorization: "Bearer " + token } });
    if (!r.ok) return;
    const url = URL.createObjectURL(await r.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = "votes.csv";
    a.click();
    URL.revokeObjectURL(url);
  });

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    if (timer) clearInterval(timer);
    refresh();
    timer = setInterval(refresh, 5000);
  });
})();
