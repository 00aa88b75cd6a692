// The live sale page (engine/api/live.py): polls GET /v1/live about once a second with the
// admin token (kept in this tab's sessionStorage, sent as a header, never in a URL) and draws
// the figures as text and plain SVG. Rates and per-route p99 come from the difference between
// two polls of cumulative counters. Every figure carries data-k (its name) and data-v (its
// exact value), which the browser test compares with GET /v1/campaigns/{id}/stats.
"use strict";

const KEY = "flashteam-admin-token";
const HISTORY = 120; // points kept for each sparkline (about two minutes)
const ITEM_FIELDS = [
  ["initial", "initial", "int"], ["available", "available", "int"], ["held", "held", "int"],
  ["paid_units", "paid", "int"], ["orders", "orders", "int"], ["paid_orders", "paid orders", "int"],
  ["gmv", "GMV", "money"], ["hold_to_paid", "hold→paid", "pct"],
  ["sell_through", "sell-through", "pct"], ["time_to_sell_out_s", "sold out after", "secs"],
];
const TEAM_FIELDS = [
  ["created", "created", "int"], ["pending", "pending", "int"], ["open", "open", "int"],
  ["succeeded", "succeeded", "int"], ["failed", "failed", "int"], ["dissolved", "dissolved", "int"],
  ["success_rate", "success rate", "pct"], ["mean_time_to_fill_s", "time to fill", "secs"],
];
const COLORS = { available: "#2e7d32", held: "#f9a825", paid: "#1565c0", gone: "#9e9e9e" };

let previous = null; // the last answer, for rates
let timer = null;
const history = new Map(); // series name -> values

function format(value, kind) {
  if (value === null || value === undefined) return "–";
  if (kind === "pct") return (value * 100).toFixed(1) + "%";
  if (kind === "secs") return value.toFixed(1) + " s";
  if (kind === "rate") return value.toFixed(1);
  if (kind === "money") return (value / 100).toLocaleString("en-US", { minimumFractionDigits: 2 });
  if (kind === "ms") return value.toFixed(1) + " ms";
  return Math.round(value).toLocaleString("en-US");
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
}

function figure(key, label, value, kind) {
  const v = value === null || value === undefined ? "" : String(value);
  return `<div class="kpi"><div class="v" data-k="${escapeHtml(key)}" data-v="${v}">` +
    `${format(value, kind)}</div><div class="l">${escapeHtml(label)}</div></div>`;
}

function cell(key, value, kind) {
  const v = value === null || value === undefined ? "" : String(value);
  return `<td data-k="${escapeHtml(key)}" data-v="${v}">${format(value, kind)}</td>`;
}

function remember(name, value) {
  const points = history.get(name) || [];
  points.push(value);
  if (points.length > HISTORY) points.shift();
  history.set(name, points);
  return points;
}

function sparkline(points, color, width = 240, height = 48) {
  const max = Math.max(1, ...points);
  const step = width / Math.max(1, HISTORY - 1);
  const start = width - step * (points.length - 1);
  const xy = points.map((p, i) => `${(start + i * step).toFixed(1)},` +
    `${(height - 2 - (p / max) * (height - 6)).toFixed(1)}`).join(" ");
  return `<svg width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">` +
    `<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${xy}"/>` +
    `<text x="4" y="12" font-size="10" fill="#5b6675">max ${format(max, "int")}</text></svg>`;
}

function stockBar(item, width = 240, height = 16) {
  const gone = item.initial - item.available - item.held - item.paid_units;
  const parts = [["available", item.available], ["held", item.held],
    ["paid", item.paid_units], ["gone", Math.max(0, gone)]];
  let x = 0;
  const rects = parts.map(([name, n]) => {
    const w = item.initial ? (n / item.initial) * width : 0;
    const rect = `<rect x="${x.toFixed(1)}" y="0" width="${w.toFixed(1)}" height="${height}" ` +
      `fill="${COLORS[name]}"><title>${name} ${n}</title></rect>`;
    x += w;
    return rect;
  });
  return `<svg width="${width}" height="${height}">${rects.join("")}</svg>`;
}

function rate(now, before, seconds) {
  if (before === undefined || before === null || seconds <= 0) return null;
  return Math.max(0, (now - before) / seconds);
}

// The q-quantile of the requests between two polls, from the cumulative latency buckets
// (interpolated inside its bucket, as Prometheus' histogram_quantile does); null if none.
function quantile(q, buckets, before) {
  const old = new Map((before || []).map(([le, n]) => [le, n]));
  const deltas = buckets.map(([le, n]) => [le, n - (old.get(le) || 0)]);
  const total = deltas.length ? deltas[deltas.length - 1][1] : 0;
  if (total <= 0) return null;
  const target = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, n] of deltas) {
    if (n >= target) {
      if (le === null) return lower; // +Inf: the last finite bound
      return lower + (le - lower) * ((target - below) / Math.max(n - below, 1e-9));
    }
    lower = le;
    below = n;
  }
  return lower;
}

function campaignCard(c, before, seconds) {
  const stats = c.stats;
  const payments = stats.items.reduce((s, i) => s + i.paid_orders + i.refunds, 0);
  const previousPayments = before ? before.stats.items.reduce(
    (s, i) => s + i.paid_orders + i.refunds, 0) : null;
  const ordersPerS = rate(c.orders_created, before && before.orders_created, seconds);
  const paymentsPerS = rate(payments, previousPayments, seconds);
  const id = c.id;
  let html = `<h2>${escapeHtml(c.title)}<span class="badge ${escapeHtml(c.status)}" ` +
    `data-k="c:${escapeHtml(id)}:status" data-v="${escapeHtml(c.status)}">` +
    `${escapeHtml(c.status)}</span></h2><div class="sub">${escapeHtml(id)} · ${c.kind} · ` +
    `${escapeHtml(c.starts_at)} → ${escapeHtml(c.ends_at)} · ` +
    `${stats.unflushed_events} events not yet in SQL</div><div class="kpis">` +
    figure(`c:${id}:orders_created`, "orders created", c.orders_created, "int") +
    figure(`c:${id}:orders_per_s`, "orders / s", ordersPerS, "rate") +
    figure(`c:${id}:payments_per_s`, "payments / s", paymentsPerS, "rate") + "</div>";
  html += "<table><tr><th>item</th>" + ITEM_FIELDS.map(([, l]) => `<th>${l}</th>`).join("") +
    "<th>stock</th></tr>";
  const charts = [];
  for (const item of stats.items) {
    const base = `c:${id}:i:${item.sku}`;
    html += `<tr><td>${escapeHtml(item.sku)}</td>` +
      ITEM_FIELDS.map(([f, , kind]) => cell(`${base}:${f}`, item[f], kind)).join("") +
      `<td>${stockBar(item)}</td></tr>`;
    const left = remember(`${id}/${item.sku}/available`, item.available);
    charts.push(`<figure>${sparkline(left, COLORS.available)}` +
      `<figcaption>${escapeHtml(item.sku)}: units available</figcaption></figure>`);
  }
  html += "</table>";
  if (ordersPerS !== null) remember(`${id}/orders`, ordersPerS);
  if (paymentsPerS !== null) remember(`${id}/payments`, paymentsPerS);
  charts.push(`<figure>${sparkline(history.get(`${id}/orders`) || [], "#6a1b9a")}` +
    "<figcaption>orders / s</figcaption></figure>");
  charts.push(`<figure>${sparkline(history.get(`${id}/payments`) || [], COLORS.paid)}` +
    "<figcaption>payments / s</figcaption></figure>");
  html += `<div class="charts">${charts.join("")}</div>`;
  const codes = Object.keys(stats.rejections).sort();
  html += "<table><tr><th>rejections by reason</th><th>so far</th><th>per s</th></tr>";
  if (!codes.length) html += "<tr><td>none</td><td></td><td></td></tr>";
  for (const code of codes) {
    const was = before ? (before.stats.rejections[code] || 0) : null;
    html += `<tr><td>${escapeHtml(code)}</td>` +
      cell(`c:${id}:rej:${code}`, stats.rejections[code], "int") +
      `<td>${format(rate(stats.rejections[code], was, seconds), "rate")}</td></tr>`;
  }
  html += "</table>";
  if (stats.teams) {
    html += "<table><tr><th>teams</th>" + TEAM_FIELDS.map(([, l]) => `<th>${l}</th>`).join("") +
      "</tr><tr><td></td>" +
      TEAM_FIELDS.map(([f, , k]) => cell(`c:${id}:teams:${f}`, stats.teams[f], k)).join("") +
      "</tr></table>";
  }
  return `<section class="card" data-campaign="${escapeHtml(id)}">${html}</section>`;
}

function engineCard(engine, before, seconds) {
  const total = engine.routes.reduce((s, r) => s + r.count, 0);
  const was = before ? before.routes.reduce((s, r) => s + r.count, 0) : null;
  const rps = rate(total, was, seconds);
  if (rps !== null) remember("engine/rps", rps);
  const old = new Map((before ? before.routes : []).map((r) => [r.route, r]));
  let html = "<h2>engine</h2><div class=\"kpis\">" +
    figure("e:rps", "requests / s", rps, "rate") +
    figure("e:stream_lag_s", "stream lag", engine.stream_lag_s, "secs") +
    figure("e:reaper_lag_s", "reaper lag", engine.reaper_lag_s, "secs") +
    figure("e:unflushed", "events not in SQL", engine.unflushed, "int") +
    figure("e:dead_letters", "dead letters", engine.dead_letters, "int") +
    figure("e:restarts", "process restarts",
      Object.values(engine.restarts).reduce((s, n) => s + n, 0), "int") + "</div>";
  html += `<div class="charts"><figure>${sparkline(history.get("engine/rps") || [], "#37474f")}` +
    "<figcaption>requests / s</figcaption></figure></div>";
  html += "<table><tr><th>route</th><th>requests / s</th><th>shed / s</th><th>p99</th>" +
    "<th>requests</th></tr>";
  for (const r of engine.routes) {
    const prior = old.get(r.route);
    const p99 = quantile(0.99, r.buckets, prior && prior.buckets);
    html += `<tr><td>${escapeHtml(r.route)}</td>` +
      cell(`e:route:${r.route}:rps`, rate(r.count, prior && prior.count, seconds), "rate") +
      cell(`e:route:${r.route}:shed_rps`, rate(r.shed, prior && prior.shed, seconds), "rate") +
      cell(`e:route:${r.route}:p99_ms`, p99 === null ? null : p99 * 1000, "ms") +
      cell(`e:route:${r.route}:count`, r.count, "int") + "</tr>";
  }
  const outcomes = Object.keys(engine.outcomes).sort();
  html += "</table><table><tr><th>outcome</th><th>requests / s</th><th>requests</th></tr>";
  for (const o of outcomes) {
    const prior = before ? before.outcomes[o] || 0 : null;
    html += `<tr><td>${escapeHtml(o)}</td>` +
      cell(`e:outcome:${o}:rps`, rate(engine.outcomes[o], prior, seconds), "rate") +
      cell(`e:outcome:${o}:count`, engine.outcomes[o], "int") + "</tr>";
  }
  return html + "</table>";
}

function render(data) {
  const seconds = previous ? (Date.parse(data.at) - Date.parse(previous.at)) / 1000 : 0;
  const before = new Map((previous ? previous.campaigns : []).map((c) => [c.id, c]));
  const engine = document.getElementById("engine");
  engine.className = "card";
  engine.hidden = false;
  engine.innerHTML = engineCard(data.engine, previous && previous.engine, seconds);
  document.getElementById("campaigns").innerHTML = data.campaigns.length
    ? data.campaigns.map((c) => campaignCard(c, before.get(c.id), seconds)).join("")
    : "<section class=\"card\">No campaign ended within the last hour or is coming.</section>";
  previous = data;
}

function setStatus(text, ok) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = "status " + (ok ? "ok" : "bad");
}

function showLogin(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(KEY);
  document.getElementById("login").hidden = false;
  document.getElementById("logout").hidden = true;
  const error = document.getElementById("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  setStatus("not connected", false);
}

async function poll() {
  const token = sessionStorage.getItem(KEY);
  if (!token) return showLogin("");
  try {
    const answer = await fetch("/v1/live", {
      headers: { Authorization: "Bearer " + token }, cache: "no-store",
    });
    if (answer.status === 401 || answer.status === 403) {
      return showLogin("That is not the admin token.");
    }
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
    setStatus("live · " + new Date().toLocaleTimeString(), true);
  } catch (error) {
    setStatus("retrying: " + error.message, false);
  }
  timer = setTimeout(poll, 1000);
}

function start() {
  document.getElementById("login").hidden = true;
  document.getElementById("logout").hidden = false;
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    sessionStorage.setItem(KEY, input.value.trim());
    input.value = "";
    start();
  });
  document.getElementById("logout").addEventListener("click", () => showLogin(""));
  if (sessionStorage.getItem(KEY)) start();
});
