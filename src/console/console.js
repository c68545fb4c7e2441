// The InventorySync console: reads /sync/overview, /sync/jobs, /sync/conflicts and
// /sync/dead-letters every few seconds with the API key typed in once (sessionStorage: this
// tab only, never a URL or a cookie), and drives the /sync routes. Every value from the
// server goes into the page as text, never as markup.
"use strict";

const REFRESH_MS = 5000;
const KEY = "inventorysync.key";
let timer = null;
let busy = false;

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

function seconds(s) {
  if (s === null || s === undefined) return "—";
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function when(t) {
  if (!t) return "—";
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? t : d.toLocaleString();
}

/** A sparkline of lag in bytes over the samples (an SVG polyline), with its range in words. */
function sparkline(history) {
  const points = history.filter((s) => s.lagBytes !== null && s.lagBytes !== undefined);
  const label = points.length
    ? `lag over the last ${Math.round((history.length * 10) / 60)} min: from ${bytes(Math.min(...points.map((p) => p.lagBytes)))} to ${bytes(Math.max(...points.map((p) => p.lagBytes)))}`
    : "no lag samples yet";
  const w = 120;
  const h = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = label;
  svg.append(title);
  if (points.length === 1) points.push({ ...points[0], at: points[0].at + 1 });
  if (points.length > 1) {
    const max = Math.max(1, ...points.map((p) => p.lagBytes));
    const t0 = points[0].at;
    const span = Math.max(1, points[points.length - 1].at - t0);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute(
      "points",
      points.map((p) => `${(((p.at - t0) / span) * (w - 2) + 1).toFixed(1)},${(h - 1 - (p.lagBytes / max) * (h - 2)).toFixed(1)}`).join(" "),
    );
    svg.append(line);
  }
  return svg;
}

const STATE_CLASS = {
  streaming: "good", standby: "idle", starting: "warn", retrying: "warn", failed: "bad",
  succeeded: "good", running: "warn", queued: "idle",
  reserved: "good", extended: "warn", unreserved: "bad", lost: "bad",
};

function state(word, extra) {
  return el("span", { class: `state ${STATE_CLASS[word] || "idle"}`, title: extra || undefined }, word);
}

/** Calls the API with the key; throws an Error whose message is the server's. */
async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY);
  const init = { method, headers: { Authorization: `Bearer ${key}` }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (r.status === 401) {
    signOut("That API key is not accepted (401). Sign in again.");
    throw new Error("unauthorized");
  }
  if (!r.ok) throw new Error((json && json.message) || `${r.status} ${r.statusText}`);
  return json;
}

/** Asks for confirmation (and a note) in the page's dialog; resolves to the note or null. */
function ask(title, text, { note = false, confirm = "Confirm", danger = false } = {}) {
  const d = $("ask");
  $("ask-title").textContent = title;
  $("ask-text").textContent = text;
  $("ask-note").value = "";
  $("ask-note").hidden = !note;
  $("ask-note-label").hidden = !note;
  $("ask-ok").textContent = confirm;
  $("ask-ok").className = danger ? "danger" : "";
  return new Promise((resolve) => {
    d.addEventListener("close", () => resolve(d.returnValue === "ok" ? $("ask-note").value.trim() : null), { once: true });
    d.showModal();
    if (note) $("ask-note").focus();
  });
}

function say(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

/** What the last action came to (kept until the next one). */
function notice(text, isError = false) {
  const n = $("notice");
  n.textContent = text;
  n.classList.toggle("error", isError);
}

function fill(tbody, rows, empty, columns) {
  const body = $(tbody).querySelector("tbody");
  body.replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: columns, class: "empty" }, empty))]),
  );
}

function warehouseRow(w) {
  const lag = w.now.lagBytes === null ? "—" : `${bytes(w.now.lagBytes)} · ${seconds(w.now.lagSeconds)}`;
  const owner = w.ownedHere ? `${w.owner || "?"} (this process)` : (w.owner || "nobody");
  return el("tr", { "data-warehouse": w.id },
    el("th", { scope: "row" }, w.id),
    el("td", {}, state(w.state, w.reason), w.reason ? el("div", { class: "small" }, w.reason) : null,
      (w.notices || []).map((n) => el("div", { class: "small notice", "data-notice": n.kind },
        `${n.detail}. `, el("code", {}, n.fix)))),
    el("td", { class: "small" }, owner),
    el("td", { class: "num" }, lag),
    el("td", {}, sparkline(w.history)),
    el("td", { class: "num" }, w.now.changesPerSecond.toFixed(w.now.changesPerSecond < 10 ? 1 : 0)),
    el("td", { class: "num" }, bytes(w.now.retainedWalBytes)),
    el("td", {}, w.walStatus ? state(w.walStatus) : "—"),
    el("td", {}, el("div", { class: "actions" },
      el("button", { type: "button", onclick: () => verify(w.id, false) }, "Verify"),
      el("button", { type: "button", class: "danger", onclick: () => verify(w.id, true) }, "Verify and repair"),
      el("button", {
        type: "button", class: "danger",
        onclick: () => resync(w.id),
      }, "Force resync"))),
  );
}

/** A verify's report in a few words: its verdict (or progress), rows and findings. */
function verifyText(v) {
  if (!v) return "";
  const kinds = Object.entries(v.findings || {}).map(([k, n]) => `${n} ${k.replaceAll("_", " ")}`);
  const found = kinds.length ? kinds.join(", ") : "no finding";
  const repaired = v.repaired ? `, ${v.repaired} repaired` : "";
  const unchecked = (v.unchecked || []).length ? `, ${v.unchecked.length} table(s) not checkable` : "";
  return `${v.verdict ? `central ${v.verdict === "equal" ? "equals the warehouse" : v.verdict}` : "comparing"}: ${v.compared} rows, ${found}${repaired}${unchecked}`;
}

function jobRow(j) {
  const parts = (j.warehouses || []).map((p) => p.verify
    ? `${p.warehouseId}: ${verifyText(p.verify)}`
    : `${p.warehouseId}: ${p.done ? "done" : "pending"}, ${p.changesDelivered} delivered${p.conflicts ? `, ${p.conflicts} conflicts` : ""}${p.unappliedDeadLetters ? `, ${p.unappliedDeadLetters} dead-lettered up to its target` : ""}${p.error ? ` (${p.error})` : ""}`);
  return el("tr", { "data-job": j.jobId },
    el("td", { class: "small" }, j.jobId),
    el("td", {}, j.kind),
    el("td", {}, state(j.status), j.error ? el("div", { class: "small error" }, j.error) : null),
    el("td", { class: "small" }, parts.join("; ") || "—"),
    el("td", { class: "small" }, when(j.createdAt)),
    el("td", { class: "small" }, when(j.finishedAt)),
  );
}

function conflictRow(c) {
  const entity = `${c.entity || c.tableName} ${JSON.stringify(c.entityKey)}`;
  return el("tr", { "data-conflict": c.id },
    el("td", { class: "num" }, c.id),
    el("td", {}, c.warehouseId),
    el("td", {}, c.kind, c.rule ? el("div", { class: "small" }, c.rule) : null),
    el("td", { class: "small" }, entity),
    el("td", { class: "small" }, c.reason),
    el("td", { class: "small" }, c.hint),
    el("td", {}, el("div", { class: "actions" },
      el("button", { type: "button", onclick: () => close(c, "resolved") }, "Resolve"),
      el("button", { type: "button", class: "quiet", onclick: () => close(c, "ignored") }, "Ignore"),
    )),
  );
}

function deadRow(d) {
  const last = d.replayOutcome ? `${d.replayOutcome}: ${d.replayDetail || ""} (${when(d.replayedAt)})` : "never replayed";
  return el("tr", { "data-dead-letter": d.id },
    el("td", { class: "num" }, d.id),
    el("td", {}, d.warehouseId || "—"),
    el("td", {}, d.tableName || "—"),
    el("td", {}, d.rule),
    el("td", { class: "small" }, d.reason),
    el("td", { class: "small" }, last),
    el("td", {}, el("button", { type: "button", onclick: () => replay(d) }, "Replay")),
  );
}

async function refresh() {
  if (busy || !sessionStorage.getItem(KEY)) return;
  busy = true;
  try {
    const [overview, jobs, conflicts, dead] = await Promise.all([
      api("GET", "/sync/overview"),
      api("GET", "/sync/jobs?limit=10"),
      api("GET", "/sync/conflicts?status=open&limit=100"),
      api("GET", "/sync/dead-letters?limit=100"),
    ]);
    const ws = overview.warehouses;
    $("n-warehouses").textContent = `(${ws.length})`;
    fill("warehouses", ws.map(warehouseRow), "No warehouse is configured.", 9);
    fill("jobs", jobs.items.map(jobRow), "No sync job yet.", 6);
    $("n-conflicts").textContent = `(${conflicts.items.length}${conflicts.next ? "+" : ""})`;
    fill("conflicts", conflicts.items.map(conflictRow), "No open conflict.", 7);
    $("n-dead").textContent = `(${dead.items.length}${dead.next ? "+" : ""})`;
    fill("dead", dead.items.map(deadRow), "No dead letter.", 7);
    const behind = ws.filter((w) => w.state !== "streaming" && w.state !== "standby").length;
    say(`Updated ${new Date().toLocaleTimeString()}: ${ws.length} warehouse(s), ${behind ? `${behind} not streaming` : "all streaming"}`);
  } catch (e) {
    if (e.message !== "unauthorized") say(`Could not refresh: ${e.message}`, true);
  } finally {
    busy = false;
  }
}

async function act(what, call) {
  try {
    const out = await call();
    notice(what(out));
  } catch (e) {
    if (e.message !== "unauthorized") notice(e.message, true);
  }
  await refresh();
}

async function trigger() {
  await act((j) => `Sync cycle ${j.jobId} queued`, () => api("POST", "/sync/trigger"));
}

async function resync(id) {
  const ok = await ask(`Force a resync of ${id}?`,
    `Every mapped table of ${id} is read again and sent to central; the stream goes on meanwhile.`,
    { confirm: "Resync", danger: true });
  if (ok === null) return;
  await act((j) => `Resync ${j.jobId} of ${id} queued`, () => api("POST", `/sync/warehouses/${encodeURIComponent(id)}`));
}

async function verify(id, repair) {
  if (repair) {
    const ok = await ask(`Verify and repair ${id}?`,
      `Central is compared with every mapped table of ${id}; rows missing or different at central are sent again, and rows only central holds are deleted there. The stream goes on meanwhile.`,
      { confirm: "Verify and repair", danger: true });
    if (ok === null) return;
  }
  await act((j) => `Verify${repair ? " and repair" : ""} ${j.jobId} of ${id} queued`,
    () => api("POST", "/sync/verify", { warehouses: [id], repair }));
}

async function close(c, status) {
  const note = await ask(`${status === "resolved" ? "Resolve" : "Ignore"} conflict ${c.id}?`, c.hint, {
    note: true, confirm: status === "resolved" ? "Resolve" : "Ignore",
  });
  if (note === null) return;
  await act((r) => `Conflict ${r.id} is ${r.status}`, () =>
    api("PATCH", `/sync/conflicts/${c.id}`, note ? { status, note } : { status }));
}

async function replay(d) {
  await act((r) => `Dead letter ${r.id}: ${r.replayOutcome} (${r.replayDetail})`, () =>
    api("POST", `/sync/dead-letters/${d.id}/replay`));
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  timer = null;
  $("app").hidden = true;
  $("top-actions").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  say("Not signed in");
}

function signedIn() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("top-actions").hidden = false;
  refresh();
  clearInterval(timer);
  timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = $("key").value.trim();
    $("key").value = "";
    sessionStorage.setItem(KEY, key);
    try {
      await api("GET", "/sync/overview");
      $("login-error").textContent = "";
      signedIn();
    } catch (e) {
      if (e.message !== "unauthorized") signOut(`Could not sign in: ${e.message}`);
    }
  });
  $("trigger").addEventListener("click", trigger);
  $("signout").addEventListener("click", () => signOut());
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  if (sessionStorage.getItem(KEY)) signedIn();
});
