// The rating page. Model output is only ever put in the page with textContent: it shows as text and never runs.
"use strict";
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
let current = null;
let busy = false;
let loadedFor = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

function reviewer() {
  return $("reviewer").value.trim();
}

function newId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function show(data) {
  $("progress").textContent = `${data.done} / ${data.total} rated`;
  current = data.item;
  const box = $("candidates");
  box.replaceChildren();
  $("comment").value = "";
  if (!current) {
    $("prompt").textContent = data.total ? "All items rated. Thank you!" : "No items yet.";
    return;
  }
  $("prompt").textContent = current.prompt;
  current.candidates.forEach((text, i) => {
    const card = document.createElement("article");
    card.className = "candidate";
    const title = document.createElement("h3");
    title.textContent = `Answer ${i + 1}`;
    const body = document.createElement("pre");
    body.className = "candidate-text";
    body.textContent = text;
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "pick";
    pick.dataset.index = String(i);
    pick.textContent = `Best (${i + 1})`;
    pick.addEventListener("click", () => submit("best", i));
    const score = document.createElement("select");
    score.className = "score";
    score.setAttribute("aria-label", `score for answer ${i + 1}`);
    ["", "1", "2", "3", "4", "5"].forEach((v) => {
      const option = document.createElement("option");
      option.value = v;
      option.textContent = v ? `${v} / 5` : "score";
      score.appendChild(option);
    });
    card.append(title, body, pick, score);
    box.appendChild(card);
  });
}

async function load() {
  if (!reviewer()) {
    $("status").textContent = "Enter your name to start.";
    return;
  }
  localStorage.setItem("tunesmith-reviewer", reviewer());
  const response = await fetch(`/api/next?reviewer=${encodeURIComponent(reviewer())}`, { headers: headers() });
  const data = await response.json();
  if (!response.ok) {
    $("status").textContent = data.error || "error";
    return;
  }
  $("status").textContent = "";
  loadedFor = reviewer();
  show(data);
}

async function submit(verdict, best) {
  if (!current || busy) return;
  busy = true;
  const scores = Array.from(document.querySelectorAll(".score"), (s) => (s.value ? Number(s.value) : null));
  const rating = {
    id: newId(), item_id: current.id, reviewer: reviewer(), verdict,
    best: verdict === "best" ? best : null,
    scores: scores.some((s) => s !== null) ? scores : null,
    comment: $("comment").value.trim() || null,
  };
  try {
    // The same id is sent again on a retry, so a rating is stored once even if a reply was lost.
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        const response = await fetch("/api/ratings", { method: "POST", headers: headers(), body: JSON.stringify(rating) });
        const data = await response.json();
        if (!response.ok) {
          $("status").textContent = data.error || "error";
          return;
        }
        $("status").textContent = "saved";
        await load();
        return;
      } catch (e) {
        $("status").textContent = "connection lost; retrying";
        await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
      }
    }
  } finally {
    busy = false;
  }
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (!current) return;
  const digit = Number(event.key);
  if (Number.isInteger(digit) && digit >= 1 && digit <= current.candidates.length) submit("best", digit - 1);
  else if (event.key === "t" || event.key === "T") submit("tie", null);
  else if (event.key === "s" || event.key === "S") submit("skip", null);
  else if (event.key === "c" || event.key === "C") { event.preventDefault(); $("comment").focus(); }
});

window.addEventListener("DOMContentLoaded", () => {
  $("reviewer").value = localStorage.getItem("tunesmith-reviewer") || "";
  $("reviewer").addEventListener("change", () => { if (reviewer() !== loadedFor) load(); });
  $("tie").addEventListener("click", () => submit("tie", null));
  $("skip").addEventListener("click", () => submit("skip", null));
  load();
});
