// The fedmobillm dashboard: plain JS, no dependencies, nothing fetched but this server's
// admin JSON API (GET v1/status and v1/quarantine every 2 s, `Authorization: Bearer` with the
// admin token kept in sessionStorage). Charts are inline SVG drawn here. Server data only ever
// reaches the page as text (textContent / SVG attributes), never as HTML.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "fedmobillm-admin-token";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d"];
const SVG_NS = "http://www.w3.org/2000/svg";
const STATUS_TEXT = {
  400: "bad request (invalid payload or values)", 401: "missing or wrong token",
  403: "forbidden (wrong role, quarantined device)", 404: "not found", 409: "conflict",
  413: "body too large", 415: "wrong content type", 422: "invalid request fields",
  429: "throttled (too many wrong tokens)", 431: "headers too large",
};

let timer = null;
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// -- formatting ----------------------------------------------------------------------------

const int = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
const pct = (x) => (Number.isFinite(x) ? (100 * x).toFixed(1) + "%" : "—");
const num = (x, d = 4) => (Number.isFinite(x) ? Number(x).toFixed(d) : "—");

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - t));
  const rel = s < 5 ? "just now" : s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago`
    : `${Math.round(s / 3600)} h ago`;
  return `${clock(t)} (${rel})`;
}

// -- API and login -------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function explain(status, detail, retryAfter) {
  if (status === 401) return `Wrong admin token: the server refused it (401: ${detail || "unknown token"}).`;
  if (status === 403) return `That is not the admin token (403: ${detail}). A device token cannot read the dashboard.`;
  if (status === 429) {
    return `Too many wrong tokens from this address: the server refuses every token from it for ` +
      `${retryAfter || "a few"} s (429). Wait, then log in again.`;
  }
  return `The server answered ${status}${detail ? ": " + detail : ""}.`;
}

async function api(path, token) {
  let r;
  try {
    r = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, `The server does not answer (${e.message}); retrying every 2 s.`);
  }
  if (r.ok) return r.json();
  let detail = "";
  try {
    detail = (await r.json()).detail || "";
  } catch (e) { /* not a JSON error body */ }
  const retry = r.headers.get("Retry-After");
  throw new ApiError(r.status, explain(r.status, detail, retry), retry);
}

async function load(token) {
  const [status, flags] = await Promise.all([api("v1/status", token), api("v1/quarantine", token)]);
  return { status, flags };
}

function showMain(on) {
  $("main").hidden = !on;
  $("login").hidden = on;
  $("logout").hidden = !on;
  if (!on) $("live").textContent = "";
}

function showLoginError(message) {
  $("login-error").textContent = message;
  $("login-error").hidden = !message;
}

function logout(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(TOKEN_KEY);
  showMain(false);
  showLoginError(message || "");
  $("token").focus();
}

async function login(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  $("login-button").disabled = true;
  showLoginError("");
  try {
    const data = await load(token);
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    showMain(true);
    render(data);
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  } catch (e) {
    showLoginError(e.message);
  } finally {
    $("login-button").disabled = false;
  }
}

function banner(message) {
  $("banner").textContent = message;
  $("banner").hidden = !message;
  $("live").classList.toggle("stale", Boolean(message));
}

async function poll() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return logout("");
  let delay = POLL_MS;
  try {
    render(await load(token));
    banner("");
  } catch (e) {
    if (e.status === 401 || e.status === 403) return logout(e.message);
    banner(e.message);
    if (e.status === 429 && Number(e.retryAfter) > 0) delay = 1000 * Number(e.retryAfter);
  }
  clearTimeout(timer);
  timer = setTimeout(poll, delay);
}

// -- rendering -----------------------------------------------------------------------------

function archColors(status) {
  const tr = status.trainer || {};
  const names = new Set([...Object.keys(status.architectures || {}),
    ...Object.keys(tr.architectures || {}), ...Object.keys(tr.best_validation || {})]);
  const colors = new Map();
  [...names].sort().forEach((n, i) => colors.set(n, COLORS[i % COLORS.length]));
  return colors;
}

function render({ status, flags }) {
  const tr = { task: status.task, ...(status.trainer || {}) };  // task: lm or classify
  const colors = archColors(status);
  renderSummary(status, tr, flags);
  renderSamplesChart(status.samples_over_time || [], colors);
  renderTrainingCharts(tr.history || [], colors, tr.task === "lm");
  renderPersonal(tr, colors);
  renderLabels(tr, colors);
  renderDevices(status.devices || [], flags, colors);
  renderQuarantine(flags);
  renderRequests(status.requests || {});
  $("live").textContent = `live · updated ${clock(Date.now() / 1000)}`;
}

function stat(id, label, value, note) {
  return el("div", { class: "stat", id }, el("div", { class: "label" }, label),
    el("div", { class: "value" }, value), el("div", { class: "note" }, note || ""));
}

function trainerState(tr) {
  if (tr.error) return `error: ${tr.error}`;
  if (!tr.running) return "not training (--no-train or stopped)";
  if (tr.weights_finite === false) return "weights not finite";
  return tr.idle ? "idle: waiting for new samples" : "training";
}

function renderSummary(status, tr, flags) {
  const totals = status.totals || {};
  const archs = Object.values(status.architectures || {});
  const sum = (key) => archs.reduce((a, x) => a + (x[key] || 0), 0);
  const quarantined = flags.filter((f) => f.quarantined).length;
  $("summary").replaceChildren(
    stat("stat-devices", "Devices", int(totals.devices), `${archs.length} architectures`),
    stat("stat-samples", "Stored samples", int(totals.samples),
      `train ${int(sum("train"))} · validation ${int(sum("validation"))}`),
    stat("stat-step", tr.task === "lm" ? "Trainer step (lm)" : "Trainer step",
      tr.running === false && !tr.step ? "off" : int(tr.step), trainerState(tr)),
    stat("stat-loss", "Training loss", num(tr.loss), `${int(tr.samples_seen)} samples seen`),
    stat("stat-rate", "Throughput", Number.isFinite(tr.samples_per_s)
      ? `${tr.samples_per_s.toFixed(0)}/s` : "—", "samples per second"),
    stat("stat-quarantined", "Quarantined", int(quarantined),
      `${flags.length} device${flags.length === 1 ? "" : "s"} with offences`),
  );
  $("stat-quarantined").classList.toggle("alert", quarantined > 0);
  $("stat-step").classList.toggle("alert", Boolean(tr.error) || tr.weights_finite === false);
}

function renderSamplesChart(points, colors) {
  const now = Date.now() / 1000;
  if (points.length && now > points.at(-1).time) points = [...points, { ...points.at(-1), time: now }];
  const series = [];
  for (const [arch, color] of colors) {
    for (const split of ["train", "validation"]) {
      series.push({
        name: `${arch} ${split}`, color, dash: split !== "train", step: true,
        points: points.map((p) => [p.time, ((p.architectures || {})[arch] || {})[split] || 0]),
      });
    }
  }
  lineChart($("chart-samples"), series.filter((s) => s.points.some(([, y]) => y > 0)),
    { time: true, label: "stored samples per architecture over time", empty: "no uploads yet" });
}

// classify: validation loss and accuracy; lm: validation nats per token and log10 of the
// perplexity (the frozen model's is often orders of magnitude higher), beside the frozen
// model's on the same samples (dashed)
function renderTrainingCharts(history, colors, lm) {
  const scale = { accuracy: (v) => v * 100, perplexity: Math.log10, frozen_perplexity: Math.log10 };
  const val = (arch, key) => history.filter((h) => (h.validation || {})[arch])
    .map((h) => [h.step, (scale[key] || Number)(h.validation[arch][key])]);
  const loss = [{ name: "training (all architectures)", color: "#475569",
    points: history.map((h) => [h.step, h.train_loss]) }];
  const accuracy = [];
  for (const [arch, color] of colors) {
    loss.push({ name: `${arch} validation`, color, dash: true,
      points: val(arch, lm ? "nll_per_token" : "loss") });
    accuracy.push({ name: arch, color, points: val(arch, lm ? "perplexity" : "accuracy") });
    if (lm) accuracy.push({ name: `${arch} frozen`, color, dash: true,
      points: val(arch, "frozen_perplexity") });
  }
  const empty = "no evaluation yet (upload validation samples)";
  lineChart($("chart-loss"), loss, { label: "loss by step", xLabel: "step", empty });
  $("title-accuracy").textContent = lm ? "Validation perplexity (log10)" : "Validation accuracy";
  lineChart($("chart-accuracy"), accuracy, lm
    ? { label: "log10 validation perplexity by step (frozen model dashed)", xLabel: "step", empty }
    : { label: "validation accuracy by step", xLabel: "step", yMax: 100, unit: "%", empty });
}

function table(id, head, rows, empty) {
  const body = rows.length ? rows : [el("tr", {}, el("td", { colspan: head.length, class: "empty" }, empty))];
  $(id).replaceChildren(el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...body));
}

function swatch(color) {
  const s = svgEl("svg", { width: 10, height: 10, class: "swatch" });
  s.append(svgEl("rect", { width: 10, height: 10, rx: 2, fill: color }));
  return s;
}

function renderPersonal(tr, colors) {
  const exported = tr.personal_models || {};
  const best = tr.best_validation || {};
  const last = ((tr.history || []).at(-1) || {}).validation || {};
  const names = [...new Set([...Object.keys(exported), ...Object.keys(best)])].sort();
  // classify: accuracy; lm: perplexity (lower is better)
  const show = tr.task === "lm" ? (m) => num(m.perplexity, 2) : (m) => pct(m.accuracy);
  const rows = names.map((n) => el("tr", {},
    el("td", {}, swatch(colors.get(n) || "#999"), " ", n),
    el("td", { class: "num" }, exported[n] === undefined ? "not yet" : int(exported[n])),
    el("td", { class: "num" }, best[n] ? show(best[n]) : "—"),
    el("td", { class: "num" }, best[n] ? int(best[n].step) : "—"),
    el("td", { class: "num" }, last[n] ? show(last[n]) : "—")));
  const metric = tr.task === "lm" ? "perplexity" : "validation";
  table("personal", ["Architecture", "Exported at step", `Best ${metric}`, "at step", "Latest"],
    rows, "no personal model yet");
}

// Label skew at a glance: each architecture's training samples per label name and the
// share of its most frequent label (flagged when one label holds 90% or more).
function renderLabels(tr, colors) {
  const archs = Object.entries(tr.architectures || {}).filter(([, a]) => a.labels).sort();
  const names = [...new Set(archs.flatMap(([, a]) => Object.keys(a.labels)))];
  const rows = archs.map(([n, a]) => {
    const counts = names.map((k) => a.labels[k] || 0);
    const total = counts.reduce((x, y) => x + y, 0);
    const top = total ? Math.max(...counts) / total : NaN;
    const skew = top >= 0.9 ? el("span", { class: "badge warn" }, `${pct(top)} one label`) : pct(top);
    return el("tr", { "data-arch": n }, el("td", {}, swatch(colors.get(n) || "#999"), " ", n),
      ...counts.map((c) => el("td", { class: "num" }, int(c))), el("td", { class: "num" }, skew));
  });
  table("labels", ["Architecture", ...names, "Largest label"], rows,
    tr.task === "lm" ? "an lm federation has no labels: its targets are the devices' tokens"
      : "no training samples yet");
}

function deviceState(d, flag) {
  if (d.quarantined) return ["quarantined", "bad"];
  if (flag) return [`flagged: ${flag.offences} offences`, "warn"];
  return d.last_upload ? ["active", "ok"] : ["registered, no uploads", "idle"];
}

function renderDevices(devices, flags, colors) {
  const flagOf = new Map(flags.map((f) => [f.device_id, f]));
  const order = { bad: 0, warn: 1, ok: 2, idle: 3 };
  const rows = [];
  for (const [arch, color] of colors) {
    const mine = devices.filter((d) => d.architecture === arch)
      .map((d) => ({ d, state: deviceState(d, flagOf.get(d.device_id)) }))
      .sort((a, b) => order[a.state[1]] - order[b.state[1]] || a.d.name.localeCompare(b.d.name));
    if (!mine.length) continue;
    rows.push(el("tr", { class: "group" }, el("th", { colspan: 7 }, swatch(color), " ", arch,
      el("span", { class: "note" }, ` · ${mine.length} device${mine.length > 1 ? "s" : ""}`))));
    for (const { d, state } of mine) {
      const s = d.samples || {};
      rows.push(el("tr", { "data-device": d.device_id },
        el("td", {}, d.name), el("td", { class: "mono" }, d.device_id),
        el("td", {}, el("span", { class: `badge ${state[1]}` }, state[0])),
        el("td", { class: "num" }, int(s.train || 0)), el("td", { class: "num" }, int(s.validation || 0)),
        el("td", { class: "num" }, int(s.anchor || 0)), el("td", {}, ago(d.last_upload))));
    }
  }
  table("devices", ["Name", "Device id", "State", "Train", "Validation", "Anchor", "Last upload"],
    rows, "no device registered yet");
}

function renderQuarantine(flags) {
  const rows = flags.map((f) => el("tr", {},
    el("td", {}, f.name, el("div", { class: "mono note" }, f.device_id)),
    el("td", {}, f.architecture), el("td", { class: "num" }, int(f.offences)),
    el("td", {}, f.quarantined ? el("span", { class: "badge bad" }, `since ${clock(f.quarantined)}`)
      : el("span", { class: "badge warn" }, "counted only")),
    el("td", { class: "reason" }, f.last_reason)));
  table("quarantine", ["Device", "Architecture", "Offences", "Quarantined", "Last reason"], rows,
    "no device has offences");
}

function renderRequests(req) {
  const rows = [
    ["acknowledged batches", req.acked_batches], ["re-sent (duplicate) batches", req.duplicate_batches],
    ["conflicts (409)", req.conflicts], ["refused impossible values", req.refused_values],
  ].map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", { class: "num" }, int(v))));
  for (const [code, n] of Object.entries(req.rejected || {})) {
    rows.push(el("tr", { class: "rejected", "data-status": code },
      el("td", {}, `rejected ${code}: ${STATUS_TEXT[code] || "error"}`), el("td", { class: "num" }, int(n))));
  }
  table("requests", ["Requests since the server started", "Count"], rows, "");
}

// -- charts --------------------------------------------------------------------------------

function span(values, lo, hi) {
  let a = lo ?? Math.min(...values);
  let b = hi ?? Math.max(...values);
  if (lo === undefined && a > 0) a = 0;
  if (a === b) b = a + 1;
  return [a, b];
}

function ticks(a, b, n = 4) {
  const raw = (b - a) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(a / step) * step; v <= b + step * 1e-9; v += step) out.push(v);
  return out;
}

function tickText(v, time, unit) {
  if (time) return clock(v);
  const a = Math.abs(v);
  const s = a >= 1e4 ? `${(v / 1000).toFixed(0)}k` : a >= 10 || v === 0 ? v.toFixed(0) : v.toPrecision(2);
  return s + (unit || "");
}

function drawAxes(svg, g, opt) {
  for (const v of ticks(g.y0, g.y1)) {
    svg.append(svgEl("line", { x1: g.L, x2: g.W - g.R, y1: g.sy(v), y2: g.sy(v), class: "gridline" }));
    svg.append(svgEl("text", { x: g.L - 6, y: g.sy(v) + 4, class: "tick", "text-anchor": "end" },
      tickText(v, false, opt.unit)));
  }
  let previous = "";
  for (const v of ticks(g.x0, g.x1, opt.time ? 3 : 5)) {
    const text = tickText(v, opt.time);
    if (text === previous) continue; // a time axis shorter than its ticks: one label each
    previous = text;
    svg.append(svgEl("text", { x: g.sx(v), y: g.H - g.B + 16, class: "tick", "text-anchor": "middle" },
      text));
  }
  svg.append(svgEl("line", { x1: g.L, x2: g.W - g.R, y1: g.H - g.B, y2: g.H - g.B, class: "axis" }));
  if (opt.xLabel) {
    svg.append(svgEl("text", { x: g.W - g.R, y: g.H - 2, class: "tick", "text-anchor": "end" }, opt.xLabel));
  }
}

function pathOf(points, sx, sy, step) {
  const out = [];
  points.forEach(([x, y], i) => {
    if (i && step) out.push(`L${sx(x).toFixed(1)},${sy(points[i - 1][1]).toFixed(1)}`);
    out.push(`${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`);
  });
  return out.join("");
}

function lineChart(box, series, opt) {
  const ok = ([x, y]) => Number.isFinite(x) && Number.isFinite(y);
  const clean = series.map((s) => ({ ...s, points: s.points.filter(ok) })).filter((s) => s.points.length);
  const pts = clean.flatMap((s) => s.points);
  if (!pts.length) return box.replaceChildren(el("p", { class: "empty" }, opt.empty || "no data yet"));
  const g = { W: 520, H: 220, L: 52, R: 14, T: 10, B: 30 };
  [g.x0, g.x1] = span(pts.map((p) => p[0]), Math.min(...pts.map((p) => p[0])));
  [g.y0, g.y1] = span(pts.map((p) => p[1]), undefined, opt.yMax);
  if (opt.yMax !== undefined) g.y0 = 0;
  g.sx = (x) => g.L + ((x - g.x0) / (g.x1 - g.x0)) * (g.W - g.L - g.R);
  g.sy = (y) => g.H - g.B - ((y - g.y0) / (g.y1 - g.y0)) * (g.H - g.T - g.B);
  const svg = svgEl("svg", { viewBox: `0 0 ${g.W} ${g.H}`, class: "plot", role: "img", "aria-label": opt.label });
  drawAxes(svg, g, opt);
  for (const s of clean) {
    svg.append(svgEl("path", { d: pathOf(s.points, g.sx, g.sy, s.step), stroke: s.color,
      class: s.dash ? "line dashed" : "line" }));
    const [x, y] = s.points.at(-1);
    svg.append(svgEl("circle", { cx: g.sx(x), cy: g.sy(y), r: 3, fill: s.color }));
  }
  const legend = el("div", { class: "legend" }, ...clean.map((s) =>
    el("span", { class: s.dash ? "dashed" : "" }, swatch(s.color), " ", s.name)));
  box.replaceChildren(svg, legend);
}

// -- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => logout(""));
  if (sessionStorage.getItem(TOKEN_KEY)) {
    showMain(true);
    poll();
  } else {
    showMain(false);
  }
});
