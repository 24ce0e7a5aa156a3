// FLENwheel review page: plain JS, no build step. Keyboard first:
//   a accept · r/x reject · u/ctrl+z undo · j/k or arrows next/previous · [ ] previous/next page.
// Every value from the server is put in the page with textContent (never innerHTML).
(() => {
  "use strict";
  const cfg = JSON.parse(document.getElementById("flen-config").textContent);
  const PAGE = 120;
  const params = new URLSearchParams(location.search);
  const state = {
    // No status in the URL: the server's pick (pending, or all when nothing is pending).
    status: params.get("status") || cfg.initial_status || "pending", gate: params.get("gate") || "any", sort: params.get("sort") || "order",
    offset: 0, total: 0, items: [], cur: 0, counts: null, undo: [],
  };
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const fmt = (d) => (d === null || d === undefined ? "–" : Number(d).toFixed(3));

  // Actions run one after another, in the order they were asked for: a fast "a a a" decides three
  // images in turn instead of dropping keys while a request is in flight.
  let queue = Promise.resolve();
  function run(action) {
    queue = queue.then(action).catch((e) => say("error: " + e.message));
    return queue;
  }

  function say(text) { $("status-line").textContent = text; }

  async function api(path, body) {
    const opts = body === undefined ? {} : {
      method: "POST", headers: {"Content-Type": "application/json", "X-Flen-Token": cfg.token},
      body: JSON.stringify(body),
    };
    const res = await fetch(cfg.api + path, opts);
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(data.error || res.statusText);
    return data;
  }

  function matches(item) {
    return (state.status === "all" || item.status === state.status)
      && (state.gate === "any" || (state.gate === "failed") !== item.gate_passed);
  }

  async function load(offset, keepId) {
    const q = new URLSearchParams({status: state.status, gate: state.gate, sort: state.sort,
                                   offset: String(Math.max(0, offset)), limit: String(PAGE)});
    const data = await api("/items?" + q.toString());
    state.items = data.items; state.total = data.total; state.offset = data.offset;
    state.counts = data.counts;
    const idx = keepId ? state.items.findIndex((i) => i.id === keepId) : -1;
    state.cur = idx >= 0 ? idx : 0;
    const url = new URL(location.href);
    url.searchParams.set("status", state.status); url.searchParams.set("gate", state.gate);
    url.searchParams.set("sort", state.sort);
    history.replaceState(null, "", url);
    renderAll();
    if (!window.__flenFirstRender) {
      window.__flenFirstRender = performance.now();
      document.body.dataset.ready = "1";
    }
    document.body.dataset.loads = String(Number(document.body.dataset.loads || 0) + 1);
  }

  function renderCounts() {
    for (const k of ["pending", "accepted", "rejected", "all", "gate_failed"]) {
      $("count-" + k).textContent = state.counts ? state.counts[k] : "–";
    }
    renderApplyNote();
  }

  // Decisions are lineage rows: the published partition (and the training set) takes them only when
  // the asset is materialized again. Say so, with the command, as soon as one differs from it.
  function renderApplyNote() {
    const n = state.counts ? state.counts.unapplied || 0 : 0;
    $("apply-note").hidden = n === 0;
    $("apply-count").textContent = `${n} decision${n === 1 ? "" : "s"}`;
    $("apply-command").textContent = cfg.apply_command;
    $("apply-then").textContent = cfg.apply_then ? "— " + cfg.apply_then + "." : "";
  }

  function emptyText() {
    const where = `${cfg.character} ${cfg.iteration} · ${cfg.asset}`;
    if (state.counts && state.counts.all === 0) return `${where} has no image to review.`;
    if (state.status === "pending") return `Nothing pending in ${where}: every image is decided. Choose All, Accepted or Rejected to see them.`;
    return "No image matches these filters.";
  }

  function tile(item, i) {
    const t = el("div", "tile" + (i === state.cur ? " current" : ""));
    t.dataset.id = item.id; t.dataset.status = item.status; t.dataset.index = String(i);
    let img;
    if (item.file_missing) {  // counted by the gate, decidable here, but there is no file to show
      img = el("div", "missing", "file missing");
    } else {
      img = el("img"); img.loading = "lazy"; img.alt = item.title; img.src = "/thumb/" + item.id;
      img.width = 112; img.height = 112;
    }
    t.append(img, el("span", "badge", item.status), el("span", "dist", fmt(item.distance)),
             el("div", "label", item.title));
    t.title = item.title + " — " + item.reason;
    t.addEventListener("click", () => { state.cur = i; renderSelection(); });
    return t;
  }

  function renderGrid() {
    const grid = $("grid");
    grid.replaceChildren();
    if (!state.items.length) {
      grid.append(el("div", "empty", emptyText()));
    } else {
      const frag = document.createDocumentFragment();
      state.items.forEach((item, i) => frag.append(tile(item, i)));
      grid.append(frag);
    }
    const pages = Math.max(1, Math.ceil(state.total / PAGE), Math.ceil(state.offset / PAGE) + 1);
    const page = Math.ceil(state.offset / PAGE) + 1;  // offsets shift when decided items leave a filter
    $("page-info").textContent = `${state.total ? state.offset + 1 : 0}–${state.offset + state.items.length} of ${state.total} · page ${page}/${pages}`;
    document.querySelectorAll(".filter").forEach((b) => b.classList.toggle("active", b.dataset.status === state.status));
    $("gate-filter").value = state.gate; $("sort").value = state.sort;
  }

  function fact(dl, name, value, cls) {
    if (value === null || value === undefined || value === "") return;
    dl.append(el("dt", null, name), el("dd", cls || null, value));
  }

  function renderDetail() {
    const item = state.items[state.cur];
    const img = $("current-image"), parents = $("parents"), facts = $("facts");
    parents.replaceChildren(); facts.replaceChildren();
    $("detail").dataset.id = item ? item.id : "";
    // Never an <img> without a src (a broken-image icon): hidden until it has one.
    const empty = $("detail-empty");
    empty.hidden = !!item; empty.textContent = item ? "" : "No image in this view (see the list on the left).";
    img.parentElement.hidden = !item; parents.hidden = !item;
    if (!item) {
      img.hidden = true; img.removeAttribute("src"); $("current-caption").textContent = ""; return;
    }
    if (item.file_missing) { img.hidden = true; img.removeAttribute("src"); }
    else { img.src = "/image/" + item.id; img.hidden = false; }
    $("current-caption").textContent = item.file_missing ? item.title + " (file missing: decide by its facts)" : item.title;
    for (const p of item.parents) {
      if (p.kind === "image") {
        const f = el("figure"), pi = el("img");
        pi.src = "/image/" + p.id; pi.alt = "parent image";
        f.append(pi, el("figcaption", null, "parent: " + p.label));
        parents.append(f);
      } else {
        const box = el("div", "model-parent");
        box.append(el("b", null, "generated by " + p.label), el("div", null, "prompt: " + (item.prompt || "–")),
                   el("div", null, "seed: " + (item.seed ?? "–")));
        parents.append(box);
      }
    }
    if (!item.parents.length) parents.append(el("div", "model-parent", "no parent recorded"));
    const when = item.decided_at ? new Date(item.decided_at).toLocaleString() : "";
    fact(facts, "status", item.status + (item.decided_by === "human"
      ? ` (human${item.decided_in && item.decided_in !== cfg.iteration ? ", in " + item.decided_in : ""}, ${when})`
      : " (policy)"), "status-" + item.status);
    fact(facts, "identity distance", item.threshold !== null && item.threshold !== undefined
      ? `${fmt(item.distance)} (threshold ${fmt(item.threshold)})` : fmt(item.distance));
    fact(facts, "gates", item.gate_passed ? "passed all" : "failed: " + item.failed_gates.join(", "));
    fact(facts, "gate reasons", item.reason);
    fact(facts, "policy", item.policy_reason);
    fact(facts, "operation", item.operation);
    fact(facts, "prompt", item.prompt);
    fact(facts, "seed", item.seed);
    fact(facts, "model", item.model);
    fact(facts, "caption", item.caption);
    fact(facts, "image id", item.id);
  }

  function renderSelection() {
    document.querySelectorAll(".tile.current").forEach((t) => t.classList.remove("current"));
    const t = document.querySelector(`.tile[data-index="${state.cur}"]`);
    if (t) { t.classList.add("current"); t.scrollIntoView({block: "nearest"}); }
    renderDetail();
  }

  function renderAll() { renderCounts(); renderGrid(); renderSelection(); }

  function applyChanges(changed) {
    const byId = new Map(changed.map((c) => [c.id, c]));
    state.items.forEach((item, i) => {
      const c = byId.get(item.id);
      if (!c) return;
      Object.assign(item, c);
      const t = document.querySelector(`.tile[data-index="${i}"]`);
      if (t) { t.dataset.status = item.status; t.querySelector(".badge").textContent = item.status; }
    });
  }

  async function decide(decision) {
    const item = state.items[state.cur];
    if (!item) return;
    try {
      const data = await api("/decide", {ids: [item.id], decision});
      state.undo.push({previous: data.previous, bulk: false});
      state.counts = data.counts; applyChanges(data.items); renderCounts();
      say(`${decision}ed ${item.title}`);
      await step(1);
    } catch (e) { say("error: " + e.message); }
  }

  async function undo() {
    const last = state.undo.pop();
    if (!last) { say("nothing to undo"); return; }
    try {
      const groups = new Map();
      for (const p of last.previous) {
        const d = p.previous === "accepted" ? "accept" : p.previous === "rejected" ? "reject" : "clear";
        if (!groups.has(d)) groups.set(d, []);
        groups.get(d).push(p.id);
      }
      let data = null;
      for (const [decision, ids] of groups) data = await api("/decide", {ids, decision, undo: true});
      if (last.bulk) { await load(state.offset); }
      else if (data) {
        state.counts = data.counts; applyChanges(data.items); renderCounts();
        const i = state.items.findIndex((it) => it.id === last.previous[0].id);
        if (i >= 0) state.cur = i;
        renderSelection();
      }
      say(`undone (${last.previous.length} image${last.previous.length === 1 ? "" : "s"})`);
    } catch (e) { say("error: " + e.message); }
  }

  async function step(delta) {
    const next = state.cur + delta;
    if (next >= 0 && next < state.items.length) { state.cur = next; renderSelection(); return; }
    if (delta > 0 && state.offset + state.items.length < state.total) {
      await load(state.offset + state.items.length - countGone());
    } else if (delta < 0 && state.offset > 0) {
      await load(state.offset - PAGE);
      state.cur = state.items.length - 1; renderSelection();
    }
  }

  // Items on this page that no longer match the filter (decided while pending is shown) have left
  // the server's filtered list: the next page starts that many earlier.
  function countGone() { return state.items.filter((i) => !matches(i)).length; }

  function nextPage() {
    if (state.offset + state.items.length < state.total) return load(state.offset + state.items.length - countGone());
  }

  function prevPage() { if (state.offset > 0) return load(state.offset - PAGE); }

  async function bulk(ev) {
    ev.preventDefault();
    const body = {decision: $("bulk-decision").value, side: $("bulk-side").value,
                  score: Number($("bulk-score").value), scope: $("bulk-scope").value};
    try {
      const data = await api("/bulk", body);
      if (data.previous.length) state.undo.push({previous: data.previous, bulk: true});
      say(`${body.decision}ed ${data.previous.length} ${body.scope} image(s) with distance ${body.side === "below" ? "≤" : "≥"} ${body.score}`);
      await load(0);
    } catch (e) { say("error: " + e.message); }
  }

  document.addEventListener("keydown", (ev) => {
    const tag = (ev.target && ev.target.tagName) || "";
    if (["INPUT", "SELECT", "TEXTAREA"].includes(tag)) return;
    if ((ev.ctrlKey || ev.metaKey) && ev.key.toLowerCase() === "z") { ev.preventDefault(); run(undo); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key;
    const action = {a: () => decide("accept"), r: () => decide("reject"), x: () => decide("reject"), u: undo,
                    j: () => step(1), ArrowRight: () => step(1), ArrowDown: () => step(1),
                    k: () => step(-1), ArrowLeft: () => step(-1), ArrowUp: () => step(-1),
                    "]": nextPage, "[": prevPage}[k];
    if (action) { ev.preventDefault(); run(action); }
  });
  document.querySelectorAll(".filter").forEach((b) => b.addEventListener("click", () => {
    state.status = b.dataset.status; run(() => load(0));
  }));
  $("gate-filter").addEventListener("change", (e) => { state.gate = e.target.value; e.target.blur(); run(() => load(0)); });
  $("sort").addEventListener("change", (e) => { state.sort = e.target.value; e.target.blur(); run(() => load(0)); });
  $("bulk-form").addEventListener("submit", (ev) => { ev.preventDefault(); run(() => bulk(ev)); });
  $("accept").addEventListener("click", () => run(() => decide("accept")));
  $("reject").addEventListener("click", () => run(() => decide("reject")));
  $("undo").addEventListener("click", () => run(undo));
  $("prev-page").addEventListener("click", () => run(prevPage));
  $("apply-copy").addEventListener("click", () => {
    const done = () => say("copied: " + cfg.apply_command);
    if (navigator.clipboard) navigator.clipboard.writeText(cfg.apply_command).then(done, () => say("select the command to copy it"));
    else say("select the command to copy it");
  });
  $("next-page").addEventListener("click", () => run(nextPage));
  run(() => load(0));
})();
