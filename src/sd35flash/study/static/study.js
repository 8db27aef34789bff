// Annotator page: join with the invite code, then vote pair by pair through the HTTP API.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const KEYS = { ArrowLeft: "left", "1": "left", ArrowDown: "tie", "2": "tie", ArrowRight: "right", "3": "right" };
  let annotator = sessionStorage.getItem("sd35flash-annotator");
  let current = null;
  let busy = false;

  function show(id) {
    for (const s of ["join", "vote", "thanks"]) $(s).classList.toggle("hidden", s !== id);
  }

  function setProgress(done, total) {
    const pct = total ? Math.round((100 * done) / total) : 0;
    $("progress-fill").style.width = pct + "%";
    $("progress").setAttribute("aria-valuenow", String(pct));
    $("progress-text").textContent = done + " of " + total + " done";
  }

  async function loadNext() {
    const r = await fetch("/api/next?annotator=" + encodeURIComponent(annotator));
    if (r.status === 204) {
      sessionStorage.removeItem("sd35flash-annotator");
      show("thanks");
      return;
    }
    if (r.status === 403) {
      sessionStorage.removeItem("sd35flash-annotator");
      annotator = null;
      show("join");
      return;
    }
    if (!r.ok) throw new Error("could not load the next pair (" + r.status + ")");
    current = await r.json();
    $("prompt").textContent = current.prompt;  // text only: never parsed as HTML
    $("left").src = current.left;
    $("right").src = current.right;
    setProgress(current.done, current.total);
    show("vote");
  }

  async function vote(choice) {
    if (!current || busy) return;
    busy = true;
    $("vote-error").textContent = "";
    try {
      const r = await fetch("/api/vote", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ annotator: annotator, pair_id: current.pair_id, choice: choice }),
      });
      if (!r.ok && r.status !== 409) throw new Error("your answer was not saved (" + r.status + "); try again");
      current = null;
      await loadNext();
    } catch (e) {
      $("vote-error").textContent = e.message;
    } finally {
      busy = false;
    }
  }

  $("join-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("join-error").textContent = "";
    const r = await fetch("/api/session", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ invite: $("invite").value }),
    });
    if (!r.ok) {
      $("join-error").textContent = r.status === 403 ? "That invite code is not right." : "Could not join (" + r.status + ").";
      return;
    }
    annotator = (await r.json()).annotator;
    sessionStorage.setItem("sd35flash-annotator", annotator);
    await loadNext();
  });

  for (const b of document.querySelectorAll("[data-choice]")) {
    b.addEventListener("click", () => vote(b.dataset.choice));
  }
  document.addEventListener("keydown", (ev) => {
    if ($("vote").classList.contains("hidden") || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const choice = KEYS[ev.key];
    if (choice) {
      ev.preventDefault();
      vote(choice);
    }
  });

  if (annotator) loadNext().catch(() => show("join"));
})();
