// autoresearch dashboard: one snapshot on load, then server-sent events. No framework, no network
// beyond this server. Every piece of text from the log (descriptions, reasons, run output) is put
// into the page as text (textContent, SVG <title>), never parsed as HTML; the one exception is the
// diff, which the server renders from escaped text with Pygments.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const OUTCOMES = ["kept", "discarded", "skipped", "crashed", "rejected"];  // report.outcome's names
const S = {
  workspace: "", header: null, rows: new Map(), timeline: [], events: [], seq: -1,
  filter: "all", sort: { key: "n", dir: -1 }, page: 0, zoom: null, detail: null, loading: false, pending: [],
  clockBase: 0, dirty: new Set(),
};

// ---------------------------------------------------------------- helpers

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) node.setAttribute(k, v);
  for (const c of children) if (c) node.append(c);
  return node;
}

function svgTitle(text) { const t = svg("title"); t.textContent = text; return t; }

const fmtMetric = (v) => (v === null || v === undefined ? "-" : v.toFixed(6));
const fmtDelta = (v) => (v === null || v === undefined ? "" : (v > 0 ? "+" : "") + v.toFixed(6));
const fmtCost = (v) => (v ? "$" + v.toFixed(4) : "");
function fmtDur(s) {
  if (s === null || s === undefined) return "";
  s = Math.max(0, Math.floor(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}
const fmtSpan = (s) => (s === null || s === undefined ? "" : s < 60 ? s.toFixed(s < 10 ? 2 : 1) + " s" : fmtDur(s));
function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleTimeString([], { hour12: false });
}
function fmtDateTime(iso) { return iso ? new Date(iso).toLocaleString([], { hour12: false }) : "-"; }
const outcomeOf = (r) => r.outcome;

function eventSummary(e) {
  const p = e.payload || {}, out = [];
  for (const k of ["description", "metric", "reason", "kind", "outcome", "request", "exit_code"]) {
    if (p[k] === undefined || p[k] === null || p[k] === "") continue;
    let v = p[k];
    if (k === "metric" && typeof v === "number") v = v.toFixed(6);
    out.push(`${k}=${String(v).replace(/\s+/g, " ").slice(0, 120)}`);
  }
  return out.join(" ");
}

// ---------------------------------------------------------------- data

async function load() {
  S.loading = true;
  try {
    const res = await fetch("/api/summary", { cache: "no-store" });
    if (!res.ok) throw new Error(res.status + " " + res.statusText);
    const data = await res.json();
    S.workspace = data.workspace;
    S.header = data.header;
    S.clockBase = performance.now();
    S.rows = new Map(data.rows.map((r) => [r.n, r]));
    S.timeline = data.timeline;
    S.events = data.events;
    S.seq = data.header.seq;
  } finally {
    S.loading = false;
  }
  const pending = S.pending;
  S.pending = [];
  for (const m of pending) apply(m);
  renderAll();
  // For bench/dashboard.py: when the first full page was on screen (ms since navigation started).
  if (!performance.getEntriesByName("autoresearch:rendered").length) {
    requestAnimationFrame(() => setTimeout(() => performance.mark("autoresearch:rendered"), 0));
  }
}

function apply(m) {
  if (m.type === "update") {
    if (m.seq <= S.seq) return;
    S.seq = m.seq;
    S.header = m.header;
    S.clockBase = performance.now();
    for (const r of m.rows) { S.rows.set(r.n, r); S.dirty.add(r.n); }
    const known = new Set(S.timeline.map((t) => t.seq));
    for (const t of m.timeline) if (!known.has(t.seq)) S.timeline.push(t);
    const fresh = m.events.filter((e) => !S.events.length || e.seq > S.events[S.events.length - 1].seq);
    S.events = S.events.concat(fresh).slice(-200);
    S.freshEvents = new Set(fresh.map((e) => e.seq));
  } else if (m.type === "header") {
    S.header = m.header;
    S.clockBase = performance.now();
  } else if (m.type === "run") {
    S.header = m.header;
    S.clockBase = performance.now();
    S.dirty.add(m.n);
  }
}

function connect() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/stream");
  const onMessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (S.loading) { S.pending.push(m); return; }
    apply(m);
    scheduleRender();
    if (S.detail !== null && S.dirty.has(S.detail)) refreshDetail();
    S.dirty.clear();
  };
  es.addEventListener("hello", () => {
    live.textContent = "live";
    live.className = "live on";
    load().catch(showError);  // (re)connected: start from a fresh snapshot, then apply what follows
  });
  es.addEventListener("update", onMessage);
  es.addEventListener("run", onMessage);
  es.addEventListener("header", onMessage);
  es.addEventListener("reset", () => load().catch(showError));
  es.onerror = () => { live.textContent = "reconnecting"; live.className = "live"; };
}

function showError(err) {
  const live = document.getElementById("live");
  live.textContent = "error: " + err.message;
  live.className = "live";
}

// What a new event changes is shown at once (header, slots, the event list: small), while the
// chart and the table, which cost the browser far more, are redrawn at most once a second: a
// fast workload's bursts of events stay live without taking CPU from the daemon on a small machine.
const HEAVY_EVERY_MS = 1000;
let lightQueued = false, heavyQueued = false, lastHeavy = 0;
function scheduleRender() {
  if (!lightQueued) {
    lightQueued = true;
    requestAnimationFrame(() => { lightQueued = false; renderLight(); });
  }
  if (!heavyQueued) {
    heavyQueued = true;
    const wait = Math.max(0, lastHeavy + HEAVY_EVERY_MS - performance.now());
    setTimeout(() => requestAnimationFrame(() => { heavyQueued = false; lastHeavy = performance.now(); renderHeavy(); }), wait);
  }
}

function renderLight() {
  if (!S.header) return;
  document.getElementById("workspace").textContent = S.workspace;
  document.title = `autoresearch · ${S.header.daemon} · best ${fmtMetric(S.header.best)}`;
  renderHeader();
  renderSlots();
  if (S.detail === null) renderEvents();
}

function renderHeavy() {
  if (!S.header || S.detail !== null) return;
  renderChart();
  renderTimeline();
  renderFilters();
  renderTable();
}

function renderAll() {
  renderLight();
  renderHeavy();
}

// ---------------------------------------------------------------- header and slots

function sinceBase() { return (performance.now() - S.clockBase) / 1000; }

function fact(key, value, extra) {
  return el("div", { class: "fact", "data-fact": key }, el("span", { class: "k", text: key }),
    el("span", { class: "v" }, value, extra || null));
}

function renderHeader() {
  const h = S.header, box = document.getElementById("facts");
  const state = h.alive || ["stopped", "exhausted"].includes(h.daemon) ? h.daemon : "down";
  const badge = el("span", { class: "badge " + state, id: "daemon-state", text: state });
  if (state === "down") badge.title = `no daemon is running (the log says ${h.daemon}); \`autoresearch run\` resumes`;
  else if (h.reason) badge.title = h.reason;
  const facts = [fact("state", badge, h.reason ? el("span", { class: "muted", text: " " + h.reason }) : null)];
  facts.push(fact("uptime", el("span", { id: "uptime", text: h.uptime_s === null ? "-" : fmtDur(h.uptime_s + sinceBase()) })));
  let best = fmtMetric(h.best);
  if (h.gain !== null) {
    // The metric's own change (its sign, whatever the direction); `gain` says whether it is better.
    const change = h.best - h.baseline, sign = change > 0 ? "+" : change < 0 ? "-" : "±";
    best += ` (${sign}${Math.abs(change).toFixed(6)}` +
      (h.gain_pct !== null ? `, ${Math.abs(h.gain_pct).toFixed(2)}%` : "") + " vs baseline)";
  }
  facts.push(fact("best", el("span", { id: "best", text: best })));
  const rate = h.keep_rate === null ? "-" : `${(100 * h.keep_rate).toFixed(1)}% (${h.counts.kept} / ${h.finished})`;
  facts.push(fact("keep rate", el("span", { id: "keep-rate", text: rate })));
  facts.push(fact("crashed", el("span", { text: String(h.counts.crashed) })));
  facts.push(fact("cost", el("span", { id: "cost", text: "$" + (h.cost_usd || 0).toFixed(4) })));
  facts.push(fact("events", el("span", { id: "seq", text: String(h.seq) })));
  box.replaceChildren(...facts);
}

function renderSlots() {
  const box = document.getElementById("slots"), h = S.header;
  const cards = h.slots.map((s) => {
    const elapsed = s.elapsed_s === null ? null : s.elapsed_s + sinceBase();
    const pct = elapsed === null || !s.budget_s ? 0 : Math.min(100, (100 * elapsed) / s.budget_s);
    const bar = el("div", { class: "bar" }, el("div"));
    bar.firstChild.style.width = pct.toFixed(1) + "%";
    const clock = elapsed === null ? s.state : `${fmtDur(elapsed)} / ${fmtDur(s.budget_s)}`;
    const where = s.slot === null || s.slot === undefined ? "" :
      ` · slot ${s.slot}` + (s.device && s.device.index !== undefined ? ` (gpu ${s.device.index})` : "");
    return el("div", { class: "slot", "data-slot": String(s.n) },
      el("div", { class: "title" }, el("a", { href: `#/exp/${s.n}`, text: `${s.kind === "baseline" ? "baseline" : "experiment"} #${s.n}` }),
        " ", el("span", { class: "badge " + s.state, text: s.state })),
      el("div", { class: "desc", text: s.description || "(proposing…)" }),
      bar,
      el("div", { class: "muted" }, el("span", { class: "clock", text: clock }), el("span", { class: "where", text: where }),
        s.loss === null || s.loss === undefined ? "" : el("span", { class: "loss", text: ` · loss ${s.loss.toFixed(4)}` })));
  });
  box.replaceChildren(...cards);
}

setInterval(() => {  // local clocks only: the server is not asked
  if (!S.header) return;
  const up = document.getElementById("uptime");
  if (up && S.header.uptime_s !== null) up.textContent = fmtDur(S.header.uptime_s + sinceBase());
  if (S.header.slots.some((s) => s.elapsed_s !== null)) renderSlots();
}, 1000);

// ---------------------------------------------------------------- chart

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1, step0 = span / count, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toFixed(12));
  return out;
}

function chartRows() {
  return [...S.rows.values()].filter((r) => r.charted).sort((a, b) => a.n - b.n);
}

function renderChart() {
  const box = document.getElementById("chart");
  const W = box.clientWidth || 900, H = box.clientHeight || 380, M = { l: 70, r: 16, t: 14, b: 30 };
  const rows = chartRows(), minimize = S.header.direction !== "maximize";
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, id: "chart-svg", "data-points": rows.length });
  if (!rows.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" }, document.createTextNode("no finished experiment yet")));
    box.replaceChildren(root);
    return;
  }
  const nMin = rows[0].n, nMax = rows[rows.length - 1].n;
  const [x0, x1] = S.zoom || [nMin - 0.5, nMax + 0.5];
  const visible = rows.filter((r) => r.n >= x0 && r.n <= x1);
  const vals = visible.filter((r) => r.metric !== null).map((r) => r.metric);
  let y0 = vals.length ? Math.min(...vals) : 0, y1 = vals.length ? Math.max(...vals) : 1;
  const pad = (y1 - y0 || Math.abs(y1) || 1) * 0.08;
  y0 -= pad; y1 += pad * 2;  // room above for crash marks and labels
  const X = (n) => M.l + ((n - x0) / (x1 - x0 || 1)) * (W - M.l - M.r);
  const Y = (v) => M.t + (1 - (v - y0) / (y1 - y0 || 1)) * (H - M.t - M.b);
  const failY = minimize ? M.t + 6 : H - M.b - 6;

  const grid = svg("g", { class: "grid" }), axis = svg("g", { class: "axis" });
  for (const v of niceTicks(y0, y1, 6)) {
    grid.append(svg("line", { x1: M.l, x2: W - M.r, y1: Y(v), y2: Y(v) }));
    axis.append(svg("text", { x: M.l - 6, y: Y(v) + 4, "text-anchor": "end" }, document.createTextNode(v.toFixed(4))));
  }
  for (const v of niceTicks(Math.ceil(x0), Math.floor(x1), 10).filter((v) => Number.isInteger(v))) {
    axis.append(svg("text", { x: X(v), y: H - M.b + 16, "text-anchor": "middle" }, document.createTextNode(String(v))));
  }
  axis.append(svg("text", { x: 12, y: M.t + (H - M.t - M.b) / 2, transform: `rotate(-90 12 ${M.t + (H - M.t - M.b) / 2})`, "text-anchor": "middle" },
    document.createTextNode(`val_bpb (${minimize ? "lower" : "higher"} is better)`)));
  axis.append(svg("line", { x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }));
  root.append(grid, axis);

  const clip = svg("clipPath", { id: "plot-area" }, svg("rect", { x: M.l, y: 0, width: W - M.l - M.r, height: H - M.b }));
  const plot = svg("g", { "clip-path": "url(#plot-area)" });
  root.append(svg("defs", {}, clip), plot);

  // The running best, as a step line (after each experiment, the best so far).
  let d = "";
  for (const r of rows) {
    if (r.best === null) continue;
    d += d ? ` H${X(r.n).toFixed(1)} V${Y(r.best).toFixed(1)}` : `M${X(r.n).toFixed(1)} ${Y(r.best).toFixed(1)}`;
  }
  const last = rows[rows.length - 1];
  if (d && last.best !== null) d += ` H${X(Math.max(last.n, x1)).toFixed(1)}`;
  if (d) plot.append(svg("path", { d, class: "best" }));

  const marks = [];
  const kept = visible.filter((r) => r.state === "kept" && r.metric !== null);
  for (const r of rows) {
    const x = X(r.n);
    let node, y;
    if (r.metric === null) {
      y = failY;
      node = svg("path", { d: `M${x - 4} ${y - 4} L${x + 4} ${y + 4} M${x - 4} ${y + 4} L${x + 4} ${y - 4}`, class: "pt failed " + r.outcome });
    } else {
      y = Y(r.metric);
      node = svg("circle", { cx: x.toFixed(1), cy: y.toFixed(1), r: r.state === "kept" ? 4.5 : 3, class: "pt " + r.state });
    }
    node.setAttribute("data-n", r.n);
    node.setAttribute("data-state", r.outcome);
    plot.append(node);
    if (r.n >= x0 && r.n <= x1) marks.push({ r, x, y, node });
  }
  if (kept.length <= 60) {
    for (const r of kept) {
      const x = X(r.n) + 5, y = Y(r.metric) - 7, label = (r.description || `exp ${r.n}`).slice(0, 40);
      plot.append(svg("text", { x, y, class: "label", transform: `rotate(-20 ${x} ${y})` }, document.createTextNode(label)));
    }
  }
  const sel = svg("rect", { class: "sel", x: 0, y: M.t, width: 0, height: H - M.t - M.b, visibility: "hidden" });
  root.append(sel);
  box.replaceChildren(root);
  wireChart(root, { W, H, M, x0, x1, nMin, nMax, marks, sel });
  document.getElementById("zoom-reset").hidden = !S.zoom;
}

function wireChart(root, c) {
  const tip = document.getElementById("tooltip");
  const toN = (px) => c.x0 + ((px - c.M.l) / (c.W - c.M.l - c.M.r)) * (c.x1 - c.x0);
  const local = (ev) => {
    const b = root.getBoundingClientRect();
    return { x: ((ev.clientX - b.left) * c.W) / b.width, y: ((ev.clientY - b.top) * c.H) / b.height };
  };
  let drag = null, hovered = null;
  root.addEventListener("mousedown", (ev) => { drag = local(ev).x; });
  root.addEventListener("mousemove", (ev) => {
    const p = local(ev);
    if (drag !== null) {
      c.sel.setAttribute("x", Math.min(drag, p.x));
      c.sel.setAttribute("width", Math.abs(p.x - drag));
      c.sel.setAttribute("visibility", "visible");
    }
    let best = null, bestD = 12 * 12;
    for (const m of c.marks) {
      const dd = (m.x - p.x) ** 2 + (m.y - p.y) ** 2;
      if (dd < bestD) { best = m; bestD = dd; }
    }
    if (hovered && hovered !== best) hovered.node.classList.remove("hover");
    hovered = best;
    if (!best) { tip.hidden = true; return; }
    best.node.classList.add("hover");
    const r = best.r;
    tip.textContent = `#${r.n} ${r.outcome}  ${fmtMetric(r.metric)}` + (r.delta !== null ? `  (${fmtDelta(r.delta)} vs parent)` : "") +
      `\n${r.description || r.reason || ""}`;
    tip.hidden = false;
    const card = root.parentElement.parentElement.getBoundingClientRect(), b = root.getBoundingClientRect();
    tip.style.left = Math.min(b.left - card.left + (best.x * b.width) / c.W + 12, card.width - 440) + "px";
    tip.style.top = b.top - card.top + (best.y * b.height) / c.H + 12 + "px";
  });
  root.addEventListener("mouseleave", () => { tip.hidden = true; drag = null; c.sel.setAttribute("visibility", "hidden"); });
  root.addEventListener("mouseup", (ev) => {
    const p = local(ev);
    c.sel.setAttribute("visibility", "hidden");
    if (drag !== null && Math.abs(p.x - drag) > 6) {
      const a = toN(Math.min(drag, p.x)), b = toN(Math.max(drag, p.x));
      drag = null;
      if (b - a >= 1) { S.zoom = [a, b]; renderChart(); }
      return;
    }
    drag = null;
    if (hovered) location.hash = `#/exp/${hovered.r.n}`;
  });
  root.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const at = toN(local(ev).x), k = ev.deltaY > 0 ? 1.25 : 0.8;
    let a = at - (at - c.x0) * k, b = at + (c.x1 - at) * k;
    const lo = c.nMin - 0.5, hi = c.nMax + 0.5;
    if (b - a >= hi - lo) { S.zoom = null; } else {
      if (a < lo) { b += lo - a; a = lo; }
      if (b > hi) { a -= b - hi; b = hi; }
      S.zoom = b - a < 2 ? S.zoom : [a, b];
    }
    renderChart();
  }, { passive: false });
  root.addEventListener("dblclick", () => { S.zoom = null; renderChart(); });
}

document.getElementById("zoom-reset").addEventListener("click", () => { S.zoom = null; renderChart(); });
window.addEventListener("resize", () => { if (S.header && S.detail === null) { renderChart(); renderTimeline(); } });

// ---------------------------------------------------------------- timeline

const PERIOD_COLORS = {
  running: "#2da44e", baseline: "#54aeff", preparing: "#b6e3ff", starting: "#b6e3ff", paused: "#d4a72c",
  blocked: "#cf222e", exhausted: "#8250df", stopped: "#d0d7de", down: "#57606a",
};

function periods() {
  const items = S.timeline.filter((t) => t.trigger !== "note"), out = [];
  const now = Date.now(), end = S.header.alive ? now : Date.parse(S.header.last_time || now);
  for (let i = 0; i < items.length; i++) {
    const t = items[i], next = items[i + 1];
    let state = t.dest, stop = next ? Date.parse(next.time) : end;
    if (next && next.trigger === "boot" && next.crashed_before) {  // died here: down until the restart
      const died = i + 1 < items.length ? Date.parse(t.time) : stop;
      out.push({ state, start: Date.parse(t.time), end: died, item: t });
      state = "down";
    }
    out.push({ state, start: Date.parse(t.time), end: Math.max(stop, Date.parse(t.time)), item: t });
  }
  if (!S.header.alive && items.length && !["stopped", "exhausted"].includes(S.header.daemon)) {
    out.push({ state: "down", start: end, end: now, item: null });
  }
  return out;
}

function renderTimeline() {
  const box = document.getElementById("timeline"), W = box.clientWidth || 900, H = 64, M = { l: 70, r: 16 };
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, id: "timeline-svg" });
  const ps = periods();
  if (!ps.length) { box.replaceChildren(root); return; }
  const t0 = ps[0].start, t1 = Math.max(...ps.map((p) => p.end), t0 + 1000);
  const X = (t) => M.l + ((t - t0) / (t1 - t0)) * (W - M.l - M.r);
  for (const p of ps) {
    const reason = p.item && p.item.payload && p.item.payload.reason ? `: ${p.item.payload.reason}` : "";
    root.append(svg("rect", { x: X(p.start), y: 12, width: Math.max(1, X(p.end) - X(p.start)), height: 22,
      fill: PERIOD_COLORS[p.state] || "#8c959f", class: "period", "data-state": p.state },
      svgTitle(`${p.state} ${fmtDateTime(new Date(p.start).toISOString())} → ${fmtDateTime(new Date(p.end).toISOString())}` +
        ` (${fmtDur((p.end - p.start) / 1000)})${reason}`)));
  }
  for (const t of S.timeline) {
    const x = X(Date.parse(t.time));
    if (t.trigger === "boot") {
      root.append(svg("path", { d: `M${x - 5} 44 L${x + 5} 44 L${x} 36 Z`, fill: t.crashed_before ? "#cf222e" : "#24292f", class: "boot" },
        svgTitle(`daemon started ${fmtDateTime(t.time)}${t.crashed_before ? " after a crash (no stop recorded)" : ""}`)));
    } else if (t.trigger === "note") {
      root.append(svg("circle", { cx: x, cy: 40, r: 3, fill: "#8250df" }, svgTitle(`${t.payload.kind} ${fmtDateTime(t.time)}`)));
    }
  }
  const axis = svg("g", { class: "axis" });
  axis.append(svg("text", { x: M.l, y: 60 }, document.createTextNode(fmtDateTime(new Date(t0).toISOString()))));
  axis.append(svg("text", { x: W - M.r, y: 60, "text-anchor": "end" }, document.createTextNode(fmtDateTime(new Date(t1).toISOString()))));
  root.append(axis);
  box.replaceChildren(root);
  const legend = document.getElementById("timeline-legend");
  const seen = [...new Set(ps.map((p) => p.state))];
  legend.replaceChildren(...seen.map((s) => {
    const sw = el("i");
    sw.style.background = PERIOD_COLORS[s] || "#8c959f";
    return el("span", {}, sw, s);
  }));
}

// ---------------------------------------------------------------- table

function renderFilters() {
  const rows = [...S.rows.values()], counts = { all: rows.length, "in flight": 0 };
  for (const o of OUTCOMES) counts[o] = 0;
  for (const r of rows) counts[outcomeOf(r)] = (counts[outcomeOf(r)] || 0) + 1;
  const box = document.getElementById("filters");
  box.replaceChildren(...["all", ...OUTCOMES, "in flight"].map((f) => {
    const b = el("button", { type: "button", class: S.filter === f ? "on" : "", "data-filter": f, text: `${f} ${counts[f] || 0}` });
    b.addEventListener("click", () => { S.filter = f; S.page = 0; renderFilters(); renderTable(); });
    return b;
  }));
}

const PAGE_ROWS = 100;

function renderPager(total, pages) {
  const box = document.getElementById("pager");
  if (pages <= 1) { box.replaceChildren(); return; }
  const go = (p) => { S.page = p; renderTable(); };
  const btn = (text, page, disabled) => {
    const b = el("button", { type: "button", text, disabled, "data-page": String(page) });
    b.addEventListener("click", () => go(page));
    return b;
  };
  const first = S.page * PAGE_ROWS + 1, last = Math.min(total, (S.page + 1) * PAGE_ROWS);
  box.replaceChildren(btn("‹ newer", S.page - 1, S.page === 0),
    el("span", { class: "muted", id: "page-info", text: ` ${first}–${last} of ${total} ` }),
    btn("older ›", S.page + 1, S.page >= pages - 1));
}

function renderTable() {
  const { key, dir } = S.sort;
  let rows = [...S.rows.values()];
  if (S.filter !== "all") rows = rows.filter((r) => outcomeOf(r) === S.filter);
  const val = (r) => (key === "state" ? outcomeOf(r) : r[key]);
  rows.sort((a, b) => {
    const va = val(a), vb = val(b);
    if (va === vb) return a.n - b.n;
    if (va === null || va === undefined) return 1;  // missing values last, whatever the direction
    if (vb === null || vb === undefined) return -1;
    return (va < vb ? -1 : 1) * dir;
  });
  // One page of rows at a time: a thousand rows cost the browser more to lay out than the rest.
  const pages = Math.max(1, Math.ceil(rows.length / PAGE_ROWS));
  S.page = Math.min(S.page, pages - 1);
  const shown = rows.slice(S.page * PAGE_ROWS, (S.page + 1) * PAGE_ROWS);
  renderPager(rows.length, pages);
  const body = document.querySelector("#experiments tbody");
  body.parentElement.dataset.rows = String(rows.length);
  body.replaceChildren(...shown.map((r) => {
    const tr = el("tr", { "data-n": String(r.n), "data-state": outcomeOf(r) },
      el("td", { class: "num", text: String(r.n) }),
      el("td", {}, el("span", { class: "badge " + (r.terminal ? r.outcome : r.state), text: r.terminal ? r.outcome : r.state })),
      el("td", { class: "num", text: fmtMetric(r.metric) }),
      el("td", { class: "num " + (r.delta === null ? "" : r.delta > 0 ? "pos" : "neg"), text: fmtDelta(r.delta) }),
      el("td", { class: "desc", text: r.description || r.reason || "", title: r.reason || "" }),
      el("td", { class: "num", text: fmtSpan(r.duration_s) }),
      el("td", { class: "num", text: fmtCost(r.cost_usd) }));
    tr.addEventListener("click", () => { location.hash = `#/exp/${r.n}`; });
    return tr;
  }));
  for (const th of document.querySelectorAll("#experiments th")) {
    th.className = (th.classList.contains("num") ? "num " : "") + (th.dataset.key === key ? (dir > 0 ? "sorted-asc" : "sorted-desc") : "");
  }
}

for (const th of document.querySelectorAll("#experiments th")) {
  th.addEventListener("click", () => {
    const key = th.dataset.key;
    S.sort = S.sort.key === key ? { key, dir: -S.sort.dir } : { key, dir: key === "n" ? -1 : 1 };
    S.page = 0;
    renderTable();
  });
}

// ---------------------------------------------------------------- events

function renderEvents() {
  const box = document.getElementById("events"), fresh = S.freshEvents || new Set();
  box.replaceChildren(...S.events.slice().reverse().map((e) => {
    const who = e.n === null ? "daemon" : `#${e.n}`;
    const li = el("li", { "data-seq": String(e.seq), class: fresh.has(e.seq) ? "new" : "" },
      el("span", { class: "muted", text: `${e.seq} ${fmtTime(e.time)} ` }),
      e.n === null ? who : el("a", { href: `#/exp/${e.n}`, text: who }),
      ` ${e.trigger}: ${e.source} → ${e.dest} `, el("span", { class: "muted", text: eventSummary(e) }));
    return li;
  }));
  S.freshEvents = new Set();
}

// ---------------------------------------------------------------- the experiment page

let detailTimer = null;
function refreshDetail() {
  clearTimeout(detailTimer);
  detailTimer = setTimeout(() => showExperiment(S.detail), 250);
}

async function showExperiment(n) {
  const page = document.getElementById("experiment");
  const res = await fetch(`/api/experiments/${n}`, { cache: "no-store" });
  if (S.detail !== n) return;
  if (!res.ok) {
    page.replaceChildren(el("div", { class: "card" }, el("a", { href: "#/", text: "← all experiments" }),
      el("p", { text: `no experiment ${n}` })));
    return;
  }
  const d = await res.json();
  if (S.detail !== n) return;
  const facts = el("div", { class: "grid2" });
  const add = (k, v) => { if (v !== null && v !== undefined && v !== "") facts.append(el("span", { class: "k", text: k }), el("span", { class: "v", text: String(v) })); };
  add("outcome", d.state);
  add("kind", d.kind);
  add("reason", d.reason);
  add("metric", d.metric === null ? null : fmtMetric(d.metric) + (d.delta !== null ? `  (${fmtDelta(d.delta)} vs parent #${d.parent_n})` : ""));
  if (d.metrics.length > 1) add("runs' metrics", d.metrics.map(fmtMetric).join(", "));
  add("memory", d.memory_gb === null ? null : d.memory_gb.toFixed(2) + " GB");
  add("proposer", d.proposer);
  add("commit", d.commit ? `${d.commit.slice(0, 12)} (parent ${d.parent ? d.parent.slice(0, 12) : "-"})` : null);
  add("lines", `+${d.added} -${d.removed}`);
  add("runs", d.runs + (d.interrupts ? `, interrupted ${d.interrupts}×` : ""));
  add("sandbox", d.sandbox);
  add("started", fmtDateTime(d.started));
  add("ended", d.ended ? fmtDateTime(d.ended) : null);
  add("duration", fmtSpan(d.duration_s));
  const u = d.usage || {};
  if (Object.keys(u).length || d.cost_usd) {
    add("tokens", `in ${u.input_tokens || 0}, out ${u.output_tokens || 0}, cache read ${u.cache_read_input_tokens || 0}, cache write ${u.cache_creation_input_tokens || 0}`);
    add("cost", "$" + d.cost_usd.toFixed(4));
  }
  if (d.latest_loss !== null) add("latest loss", d.latest_loss.toFixed(4));

  const diff = el("pre", { class: "diff code", id: "diff" });
  if (d.diff_html) diff.innerHTML = d.diff_html;  // rendered by the server from escaped text (Pygments)
  else diff.textContent = d.commit ? "(no change against its parent)" : "(no commit: nothing was run)";
  const log = el("pre", { class: "log", id: "log", text: d.log || "(no output recorded)" });
  const events = el("table", { class: "table", id: "exp-events" },
    el("thead", {}, el("tr", {}, ...["seq", "time", "trigger", "transition", "detail"].map((h) => el("th", { text: h })))),
    el("tbody", {}, ...d.events.map((e) => el("tr", { "data-seq": String(e.seq) },
      el("td", { class: "num", text: String(e.seq) }), el("td", { text: fmtDateTime(e.time) }),
      el("td", { text: e.trigger }), el("td", { text: `${e.source} → ${e.dest}` }),
      el("td", { class: "desc", text: eventSummary(e) })))));
  const prev = S.rows.has(n - 1) ? el("a", { href: `#/exp/${n - 1}`, text: `← #${n - 1}` }) : null;
  const next = S.rows.has(n + 1) ? el("a", { href: `#/exp/${n + 1}`, text: `#${n + 1} →` }) : null;
  page.replaceChildren(
    el("div", { class: "card" },
      el("div", { class: "card-head" }, el("a", { href: "#/", text: "← all experiments" }), prev, next),
      el("h2", {}, `${d.kind === "baseline" ? "Baseline" : "Experiment"} #${d.n} `, el("span", { class: "badge " + d.state, text: d.state })),
      el("p", { class: "desc", id: "exp-description", text: d.description || "" }), facts),
    el("div", { class: "card" }, el("h2", { text: "Diff" }), diff),
    el("div", { class: "card" }, el("h2", {}, "Run log ", el("span", { class: "muted hint", text: d.log_source })), log),
    el("div", { class: "card" }, el("h2", { text: "Events" }), events));
  page.dataset.n = String(n);
}

function route() {
  const m = location.hash.match(/^#\/exp\/(\d+)$/);
  const overview = document.getElementById("overview"), page = document.getElementById("experiment");
  if (m) {
    S.detail = Number(m[1]);
    overview.hidden = true;
    page.hidden = false;
    page.replaceChildren(el("div", { class: "card", text: "loading…" }));
    page.dataset.n = "";
    showExperiment(S.detail).catch(showError);
  } else {
    S.detail = null;
    overview.hidden = false;
    page.hidden = true;
    renderAll();
  }
  window.scrollTo(0, 0);
}

window.addEventListener("hashchange", route);
route();
connect();
