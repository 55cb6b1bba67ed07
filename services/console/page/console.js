// The fleet console's page: renders /api/events' snapshots (server-sent events, so no reload) and draws
// /api/charts as SVG by hand. No framework and no build step: this file is served as it is.
// Every element a test or a script may read carries stable ids and data attributes (data-device,
// data-health, data-sync-state, data-rollout-id, data-phase, data-rollout-state, data-canary, data-chart-device).
"use strict";

const COLORS = ["#2457c5", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490"];
let chartsShown = -1;
let chartsLoading = false;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 3600)} h`;
}

function clock(at) {
  return new Date(at * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"});
}

// -- the devices ---------------------------------------------------------------------------------------

function deviceRow(d) {
  const health = el("td", {"data-field": "health"},
    el("span", {class: "badge", "data-health": d.health}, d.health),
    el("span", {class: "detail"}, d.health_reason || `status ${age(d.age_s)} ago`));
  const sync = el("td", {"data-field": "sync"}, (d.sync_state || "—").replace("_", " "),
    d.sync_reason ? el("span", {class: "detail"}, d.sync_reason) : null);
  const alerts = d.open_alerts.length
    ? d.open_alerts.map((a) => el("span", {class: "badge warn", "data-alert": a}, a))
    : [el("span", {class: "muted"}, "none")];
  return el("tr", {"data-device": d.device, "data-health": d.health, "data-sync-state": d.sync_state || ""},
    el("td", {"data-field": "device"}, el("b", {}, d.device)),
    health,
    el("td", {"data-field": "model"}, d.model || "—"),
    sync,
    el("td", {"data-field": "pred-per-s", class: "num"},
      d.predictions_per_s === null ? "—" : d.predictions_per_s.toFixed(1)),
    el("td", {"data-field": "outbox", class: "num"}, d.outbox_records === null ? "—" : d.outbox_records),
    el("td", {"data-field": "alerts"}, ...alerts));
}

function renderDevices(snapshot) {
  const body = document.querySelector("#devices tbody");
  const rows = snapshot.devices.map(deviceRow);
  if (!rows.length) rows.push(el("tr", {class: "empty"}, el("td", {colspan: 7}, "No device has reported yet.")));
  body.replaceChildren(...rows);
  const stale = snapshot.devices.filter((d) => d.health === "stale").length;
  document.getElementById("device-count").textContent =
    `${snapshot.devices.length} · ${stale} stale (no status for ${snapshot.stale_after_s} s, or a service offline)`;
}

// -- the rollouts --------------------------------------------------------------------------------------

function target(r) {
  if (r.canary) return `canary: ${r.canary}`;  // the devices it targets exactly, while not promoted
  const who = r.target_devices.length ? `devices ${r.target_devices.join(", ")}`
    : r.target_groups.length ? `groups ${r.target_groups.join(", ")}` : "all devices";
  // A promoted rollout takes its whole target whatever its canary share was (services/sync/membership.py).
  return r.phase === "promoted" ? who : `${Math.round(r.share * 1000) / 10} % of ${who}`;
}

function rolloutBlock(r, id) {
  const chips = Object.entries(r.states).sort().map(([state, count]) =>
    el("span", {class: "chip", "data-rollout-state": state}, `${state.replace("_", " ")} `, el("b", {}, count)));
  const devices = Object.entries(r.devices).map(([device, state]) =>
    el("li", {"data-device": device, "data-state": state}, `${device}: ${state.replace("_", " ")}`));
  return el("div", {id, "data-rollout-id": r.rollout_id, "data-phase": r.phase, "data-model": r.name,
    "data-version": r.version, "data-kind": r.kind, "data-canary": r.canary ? r.canary_devices.join(",") : ""},
    el("div", {class: "rollout-title"}, `${r.kind === "plugin" ? "plugin " : ""}${r.name} v${r.version} `,
      el("span", {class: r.phase === "aborted" ? "badge bad" : "badge good", "data-field": "phase"}, r.phase)),
    el("div", {class: "rollout-meta"}, `${r.rollout_id} · target: ${target(r)} · issued ${clock(r.issued_at)}`),
    chips.length ? el("div", {class: "chips"}, ...chips) : el("p", {class: "muted"}, "No device has reported on it yet."),
    devices.length ? el("ul", {class: "rollout-devices"}, ...devices) : null);
}

function renderRollouts(snapshot) {
  const current = document.getElementById("rollout");
  current.replaceWith(snapshot.rollout ? rolloutBlock(snapshot.rollout, "rollout")
    : el("div", {id: "rollout", "data-rollout-id": "", "data-phase": ""},
      el("p", {class: "muted"}, "No rollout on the fleet broker.")));
  const rollbacks = snapshot.rollbacks.map((b) => el("li", {"data-device": b.device, "data-rollout-id": b.rollout_id},
    el("b", {}, b.device), ` rolled back ${b.target || ""} → ${b.serving || "?"} at ${clock(b.at)}`,
    el("div", {class: "reasons", "data-field": "verdict"},
      b.canary_passed === null ? (b.reason || "no canary verdict")
        : `canary ${b.canary_conclusive === false ? "inconclusive" : "failed"}: ` +
          (b.canary_reasons.join("; ") || b.reason || ""))));
  document.getElementById("rollbacks").replaceChildren(
    ...(rollbacks.length ? rollbacks : [el("li", {class: "muted"}, "None seen.")]));
  const plugins = snapshot.plugin_rollouts.map((r) => rolloutBlock(r, `plugin-rollout-${r.name}`));
  document.getElementById("plugin-rollouts").replaceChildren(
    ...(plugins.length ? [el("h3", {}, "Plugin rollouts"), ...plugins] : []));
}

// -- the charts ----------------------------------------------------------------------------------------

const W = 520, H = 170, LEFT = 46, RIGHT = 10, TOP = 10, BOTTOM = 24;

function lineChart(title, times, series, unit) {
  const values = series.flatMap((s) => s.values).filter((v) => v !== null);
  const fig = el("figure", {"data-chart": title});
  if (!times.length || !values.length) {
    fig.append(el("figcaption", {}, `${title}: nothing measured yet`));
    return fig;
  }
  const t0 = times[0], t1 = Math.max(times[times.length - 1], t0 + 1);
  const lo = Math.min(0, ...values), hi = Math.max(...values, lo + 1e-9);
  const x = (t) => LEFT + (t - t0) / (t1 - t0) * (W - LEFT - RIGHT);
  const y = (v) => TOP + (1 - (v - lo) / (hi - lo)) * (H - TOP - BOTTOM);
  const root = svg("svg", {class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title});
  for (const frac of [0, 0.5, 1]) {
    const v = lo + frac * (hi - lo);
    root.append(svg("line", {class: "grid", x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v)}));
    root.append(svg("text", {x: LEFT - 4, y: y(v) + 4, "text-anchor": "end"}, `${+v.toPrecision(3)}`));
  }
  root.append(svg("line", {class: "axis", x1: LEFT, x2: LEFT, y1: TOP, y2: H - BOTTOM}));
  root.append(svg("line", {class: "axis", x1: LEFT, x2: W - RIGHT, y1: H - BOTTOM, y2: H - BOTTOM}));
  root.append(svg("text", {x: LEFT, y: H - 6}, clock(t0)));
  root.append(svg("text", {x: W - RIGHT, y: H - 6, "text-anchor": "end"}, clock(t1)));
  const legend = el("div", {class: "legend"});
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const points = s.values.map((v, j) => v === null ? null : `${x(times[j]).toFixed(1)},${y(v).toFixed(1)}`)
      .filter((p) => p !== null);
    const line = svg("polyline", {points: points.join(" "), stroke: color, "data-series": s.name});
    root.append(line);
    if (points.length === 1) {
      const [px, py] = points[0].split(",");
      root.append(svg("circle", {cx: px, cy: py, r: 3, fill: color}));
    }
    const swatch = el("i");
    swatch.style.background = color;  // CSSOM, which the page's Content-Security-Policy allows
    legend.append(el("span", {}, swatch, s.name));
  });
  fig.append(root, el("figcaption", {}, `${title}${unit ? ` (${unit})` : ""}`), legend);
  return fig;
}

function renderCharts(charts) {
  const box = document.getElementById("charts");
  const note = document.getElementById("charts-note");
  note.textContent = (charts.read_at ? `read from S3 at ${clock(charts.read_at)}` : "not read yet") +
    ` · last ${age(charts.window_s)}` + (charts.error ? ` · ${charts.error}` : "") +
    (charts.truncated ? " · more to read" : "");
  if (!charts.devices.length) {
    box.replaceChildren(el("p", {class: "muted"}, "No drift samples in the telemetry yet."));
    return;
  }
  box.replaceChildren(...charts.devices.map((d) => el("div", {class: "chart-card", "data-chart-device": d.device,
    "data-samples": d.at.length},
    el("h3", {}, d.device),
    lineChart("drift scores", d.at, Object.entries(d.scores).map(([name, values]) => ({name, values})), ""),
    lineChart("latency", d.at, [{name: "p50", values: d.latency_p50_ms}, {name: "p95", values: d.latency_p95_ms}],
      "ms"))));
}

async function loadCharts(version) {
  if (chartsLoading) return;
  chartsLoading = true;
  try {
    const response = await fetch("api/charts", {cache: "no-store"});
    if (!response.ok) return;
    renderCharts(await response.json());
    chartsShown = version;
  } catch (error) {
    document.getElementById("charts-note").textContent = `charts unavailable: ${error}`;
  } finally {
    chartsLoading = false;
  }
}

// -- live ----------------------------------------------------------------------------------------------

function render(snapshot) {
  renderDevices(snapshot);
  renderRollouts(snapshot);
  const broker = document.getElementById("broker");
  broker.dataset.state = snapshot.broker_connected ? "connected" : "disconnected";
  broker.textContent = snapshot.broker_connected ? "fleet broker connected" : "fleet broker unreachable";
  document.getElementById("updated").textContent = `updated ${clock(snapshot.now)}`;
  document.body.dataset.snapshotAt = snapshot.now;
  if (snapshot.charts_version !== chartsShown) loadCharts(snapshot.charts_version);
}

function connect() {
  const connection = document.getElementById("connection");
  const events = new EventSource("api/events");
  events.addEventListener("fleet", (event) => {
    connection.dataset.state = "live";
    connection.textContent = "live";
    render(JSON.parse(event.data));
  });
  events.onerror = () => {  // EventSource reconnects by itself (the stream's retry: field)
    connection.dataset.state = "reconnecting";
    connection.textContent = "reconnecting…";
  };
}

connect();
