// meshd dashboard: reads /api/mesh (every node's report, gathered by this meshd over mTLS) and draws
// the mesh with Cytoscape.js. No build step: this file is served as it is. Every number shown in the
// graph is also in the DOM (the traffic table, the service and node panels), for tests and for
// screen readers.
"use strict";

const REFRESH_MS = 5000;
let cy = null;
let shapeKey = "";
let lastMesh = null;

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children.flat()) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fmtRate(v, unit) { return v >= 100 ? `${v.toFixed(0)} ${unit}` : `${(+v).toFixed(2)} ${unit}`; }
function fmtBytes(v) {
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function fmtMs(v) { return v === null || v === undefined ? "-" : `${v.toFixed(v < 10 ? 1 : 0)} ms`; }
function fmtAge(seconds) {
  if (seconds < 0) return "expired";
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60);
  return h >= 48 ? `${Math.floor(h / 24)} d` : h ? `${h} h ${m} min` : `${m} min`;
}

function edgeLabel(e) {
  const lock = e.security === "mutual_tls" ? "mTLS · " : e.security === "none" ? "plaintext · " : "mixed · ";
  if (e.protocol === "http") {
    return `${lock}${fmtRate(e.rps || 0, "rps")} · ${((e.error_rate || 0) * 100).toFixed(1)}% err · p99 ${fmtMs(e.p99_ms)}`;
  }
  return `${lock}${fmtRate(e.cps || 0, "conn/s")} · ${fmtBytes(e.bytes_per_s || 0)}/s`;
}

function edgeColor(e) {
  if (e.protocol !== "http") return "#4a6fd6";
  if ((e.error_rate || 0) > 0.05) return "#d33c2e";
  if ((e.error_rate || 0) > 0) return "#e5a000";
  return "#2e9e5b";
}

function elements(graph) {
  const nodes = graph.nodes.map((n) => ({ group: "nodes", data: { ...n } }));
  const edges = graph.edges.map((e) => ({
    group: "edges",
    data: {
      ...e,
      label: e.kind === "traffic" ? edgeLabel(e) : "waypoint",
      color: e.kind === "traffic" ? edgeColor(e) : "#9a7bd1",
      line: e.kind !== "traffic" ? "dotted" : e.security === "none" ? "dashed" : "solid",
    },
  }));
  return nodes.concat(edges);
}

const STYLE = [
  { selector: "node", style: { label: "data(label)", "font-size": 11, "text-valign": "bottom", "text-margin-y": 3,
    width: 26, height: 26, "background-color": "#5b6b8c", color: "#1d2330" } },
  { selector: 'node[kind = "service"]', style: { shape: "round-triangle", "background-color": "#2f7d8c", width: 30, height: 30 } },
  { selector: 'node[kind = "workload"]', style: { shape: "ellipse", "background-color": "#4a6fd6" } },
  { selector: 'node[kind = "waypoint"]', style: { shape: "hexagon", "background-color": "#9a7bd1", width: 34, height: 34 } },
  { selector: 'node[kind = "node"]', style: { shape: "round-rectangle", "background-color": "#eef1f7",
    "border-color": "#b9c2d6", "border-width": 1, "text-valign": "top", "text-margin-y": -3, "font-weight": "bold" } },
  { selector: ':parent', style: { "background-opacity": 0.6, padding: 10 } },
  { selector: "edge", style: { width: 2, "curve-style": "bezier", "target-arrow-shape": "triangle",
    "line-color": "data(color)", "target-arrow-color": "data(color)", "line-style": "data(line)",
    label: "data(label)", "font-size": 9, "text-rotation": "autorotate", "text-background-color": "#fff",
    "text-background-opacity": 0.85, "text-background-padding": 1, color: "#333" } },
  { selector: 'edge[kind = "waypoint"]', style: { width: 1, "target-arrow-shape": "none", "font-size": 8, color: "#7c62b0" } },
  { selector: ":selected", style: { "border-width": 3, "border-color": "#e5a000" } },
];

function draw(graph) {
  const started = performance.now();
  const els = elements(graph);
  const key = els.map((e) => e.data.id).sort().join("|");
  if (cy && key === shapeKey) {
    for (const e of els) cy.getElementById(e.data.id).data(e.data);  // same shape: update numbers only
  } else {
    shapeKey = key;
    if (cy) cy.destroy();
    const forced = new URLSearchParams(location.search).get("layout");  // ?layout=cose|breadthfirst
    const big = forced ? forced !== "cose" : els.length > 120;
    cy = cytoscape({
      container: $("#graph"),
      elements: els,
      style: STYLE,
      wheelSensitivity: 0.3,
      layout: big
        ? { name: "breadthfirst", directed: true, spacingFactor: 1.1, animate: false }
        : { name: "cose", animate: false, randomize: false, numIter: 800, nodeRepulsion: () => 400000,
            idealEdgeLength: () => 140, nestingFactor: 0.8, gravity: 40, padding: 30 },
    });
    if (big) cy.edges().style("label", "");  // 200 labels are unreadable at once: hover or select one
    cy.on("tap", "node", (ev) => showDetails(ev.target.data()));
    cy.on("mouseover", "edge", (ev) => ev.target.style("label", ev.target.data("label")));
  }
  const ms = performance.now() - started;
  document.body.dataset.renderMs = ms.toFixed(1);
  document.body.dataset.elements = String(els.length);
}

function renderEdges(graph) {
  const label = (id) => (graph.nodes.find((n) => n.id === id) || { label: id }).label;
  const rows = graph.edges.filter((e) => e.kind === "traffic").map((e) => {
    const http = e.protocol === "http";
    return el("tr", { class: "edge", "data-from": e.source, "data-to": e.target, "data-protocol": e.protocol,
      "data-rps": http ? e.rps : null, "data-cps": http ? null : e.cps, "data-error-rate": http ? e.error_rate : null,
      "data-security": e.security },
      el("td", {}, label(e.source)), el("td", {}, label(e.target)), el("td", {}, e.protocol),
      el("td", {}, e.security === "mutual_tls" ? "mTLS" : e.security),
      el("td", {}, http ? fmtRate(e.rps, "rps") : `${fmtRate(e.cps, "conn/s")}, ${fmtBytes(e.bytes_per_s)}/s`),
      el("td", {}, http ? `${(e.error_rate * 100).toFixed(1)}%` : "-"),
      el("td", {}, http ? fmtMs(e.p50_ms) : "-"), el("td", {}, http ? fmtMs(e.p99_ms) : "-"),
      el("td", {}, http ? `${e.requests_total} req` : `${e.connections_total} conn, ${fmtBytes(e.bytes_total)}`));
  });
  $("#edges tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 9, class: "hint" }, "no traffic seen yet"))]));
}

function routesOf(mesh, service) {
  const out = [];
  for (const r of mesh.reports) for (const route of r.routes || []) if (route.service === service) out.push({ ...route, waypoint: r.node });
  return out;
}

function renderServices(mesh) {
  const cat = mesh.catalog;
  const bindings = cat.waypoints || {};
  const cards = (cat.service_entries || []).map((s) => {
    const eps = cat.workloads.filter((w) => w.services.includes(s.service));
    const wp = bindings[s.service];
    const routes = routesOf(mesh, s.service);
    return el("div", { class: "svc-card", id: `svc-${s.service}`, "data-service": s.service },
      el("h3", {}, s.service),
      el("div", {}, "ports: ", s.ports.map((p) => `${p.port}${p.target_port !== p.port ? "->" + p.target_port : ""}/${p.protocol}`).join(", ")),
      el("div", {}, "waypoint: ", wp ? `${wp.waypoint} (by ${wp.binding})` : "none"),
      el("div", {}, `endpoints (${eps.length}): `, eps.map((w) => `${w.workload}@${w.node} ${w.address}`).join(", ") || "none"),
      routes.length ? el("div", {}, "routes: ", el("ul", {}, routes.map((r) => el("li", {},
        el("b", {}, r.name), ` at ${r.waypoint}`, (r.filters || []).length ? ` filters: ${r.filters.map((f) => f.name).join(", ")}` : "",
        r.timeout ? ` timeout ${r.timeout}` : "", r.retries ? ` retries ${r.retries.attempts}` : "", " ", el("code", {}, r.source))))) : "");
  });
  $("#service-list").replaceChildren(...cards);
  $("#destinations").replaceChildren(...(cat.service_entries || []).flatMap((s) => s.ports.map((p) => el("option", { value: `${s.service}:${p.port}` }))));
}

function reloadView(r) {
  const parts = [];
  if (r.reload.refused) {
    parts.push(el("div", { class: "refused", "data-node": r.node },
      el("b", {}, `reload refused at ${r.reload.refused.at} (${r.reload.refused.trigger})`),
      " — the config and policy from before stay in force:",
      el("ul", {}, r.reload.refused.problems.map((p) => el("li", {}, el("code", { class: "problem" }, p))))));
  }
  const last = r.reload.last;
  parts.push(el("div", {}, "last reload: ", last ? `${last.result} at ${last.at} (${last.trigger})` : "none since start"));
  return parts;
}

function renderNodes(mesh) {
  const principals = new Set();
  const cards = mesh.reports.map((r) => {
    for (const c of r.certificates) principals.add(c.identity);
    return el("div", { class: "node-card", id: `node-${r.node}`, "data-node": r.node, "data-role": r.role },
      el("h3", {}, `${r.node} `, el("small", {}, `${r.role}, meshd ${r.version}, ${r.ready ? "ready" : "not ready"}, up ${fmtAge(r.uptime_s)}`)),
      reloadView(r),
      el("div", {}, "certificates:", el("ul", {}, r.certificates.map((c) => el("li", { class: c.expires_in_s < 3600 ? "expiring" : "" },
        el("code", {}, c.identity), ` expires in ${fmtAge(c.expires_in_s)}`, c.last_error ? ` (renewal failing: ${c.last_error})` : ""))) ),
      el("div", {}, "peers: ", r.peers.map((p) => `${p.name || "?"} ${p.address} (${p.how}${p.last_error ? ", " + p.last_error : ""})`).join("; ") || "none"),
      el("div", {}, "policy files: ", r.policy.files.join(", ") || "none", r.policy.dir ? ` in ${r.policy.dir}` : ""),
      r.tracing && r.tracing.enabled ? el("div", {}, `tracing: ${r.tracing.exported} spans exported, ${r.tracing.dropped_queue_full} dropped`) : "");
  });
  for (const name of Object.keys(mesh.errors)) {
    cards.push(el("div", { class: "node-card problem", "data-node": name }, el("h3", {}, name), `no report: ${mesh.errors[name]}`));
  }
  $("#node-list").replaceChildren(...cards);
  $("#principals").replaceChildren(el("option", { value: "plaintext" }), ...[...principals].sort().map((p) => el("option", { value: p })));
}

function showDetails(data) {
  const mesh = lastMesh;
  const box = $("#details");
  const title = el("h2", {}, "Details: ", data.label);
  let body;
  if (data.kind === "service") {
    const card = document.getElementById(`svc-${data.label}`);
    body = card ? card.cloneNode(true) : el("p", {}, data.label);
    body.removeAttribute("id");
  } else if (data.kind === "node" || data.kind === "waypoint") {
    const card = document.getElementById(`node-${data.label}`);
    body = card ? card.cloneNode(true) : el("p", {}, "no report from this node");
    if (card) body.removeAttribute("id");
  } else {
    const w = (mesh.catalog.workloads || []).find((x) => x.workload === `${data.label}.${data.namespace}`);
    body = el("p", {}, w ? `workload ${w.workload} on ${w.node}, ${w.address}, ports ${w.ports.join(", ")}, serves ${w.services.join(", ")}` : data.label);
  }
  box.replaceChildren(title, body);
}

async function refresh() {
  try {
    const resp = await fetch("/api/mesh", { cache: "no-store" });
    if (!resp.ok) throw new Error(`/api/mesh answered ${resp.status}`);
    show(await resp.json());
  } catch (err) {
    const p = $("#errors");
    p.hidden = false;
    p.textContent = `cannot read /api/mesh: ${err.message}`;
  }
}

function show(mesh) {
  lastMesh = mesh;
  draw(mesh.graph);
  renderEdges(mesh.graph);
  renderServices(mesh);
  renderNodes(mesh);
  $("#alerts").replaceChildren(...mesh.reports.filter((r) => r.reload.refused).map((r) =>
    el("p", { class: "alert", "data-node": r.node }, el("b", {}, `${r.node}: reload refused`),
      ` at ${r.reload.refused.at}, the config from before stays in force: `,
      el("code", {}, r.reload.refused.problems.join("; ")))));
  const errs = Object.entries(mesh.errors || {});
  const p = $("#errors");
  p.hidden = !errs.length;
  p.textContent = errs.map(([n, e]) => `${n}: ${e}`).join("; ");
  $("#updated").textContent = `from ${mesh.from}, ${new Date(mesh.generated_at * 1000).toLocaleTimeString()}`;
  document.body.dataset.loaded = "true";
}

$("#explain-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = new FormData(ev.target);
  const params = new URLSearchParams();
  for (const [k, v] of form.entries()) if (v) params.append(k, v);
  // Ask the node that serves the destination (it knows the workload's policy); the service's entry says.
  const svc = String(form.get("to") || "").split(":")[0];
  const w = lastMesh && (lastMesh.catalog.workloads || []).find((x) => x.services.includes(svc));
  const wp = lastMesh && (lastMesh.catalog.waypoints || {})[svc];
  const node = form.get("method") || form.get("path") ? (wp ? wp.waypoint : w && w.node) : w && w.node;
  if (node) params.append("node", node);
  const out = $("#explain-result");
  out.textContent = "asking…";
  try {
    const resp = await fetch(`/api/explain?${params}`);
    const data = await resp.json();
    out.textContent = resp.ok
      ? `asked ${data.node || "this meshd"}\n` + data.results.map((r) => r.text || JSON.stringify(r, null, 1)).join("\n\n")
      : `${resp.status}: ${data.error}`;
  } catch (err) {
    out.textContent = String(err);
  }
});

if (window.__MESH__) {
  show(window.__MESH__);  // bench/dashboard.py: a given mesh, drawn at once
} else {
  refresh();
  setInterval(refresh, REFRESH_MS);
}
