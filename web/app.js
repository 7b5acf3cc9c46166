// flowmap's live service map: fetches /api/graph, lays it out with
// cytoscape (a maintained graph library, served by the agent itself) and
// refreshes every crawl interval.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  let cy = null;
  let refreshMs = 30000;
  let timer = null;
  let lastKey = "";

  function fmtBytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + u[i];
  }

  const service = (e) => (e.port ? e.protocol + "/" + e.port : e.protocol);

  function params() {
    const p = new URLSearchParams();
    p.set("since", $("since").value);
    if ($("port").value.trim()) p.set("port", $("port").value.trim());
    if ($("protocol").value) p.set("protocol", $("protocol").value);
    if ($("q").value.trim()) p.set("q", $("q").value.trim());
    return p;
  }

  function text(tag, s, cls) {
    const el = document.createElement(tag);
    el.textContent = s;
    if (cls) el.className = cls;
    return el;
  }

  function showDetails(pairs) {
    const d = $("details");
    d.replaceChildren();
    const dl = document.createElement("dl");
    for (const [k, v] of pairs) { dl.append(text("dt", k), text("dd", v)); }
    d.append(dl);
  }

  // Edge health: status rank (worst last) and the causes behind it.
  const STATUS_RANK = { NoStatus: 0, Green: 1, Orange: 2, Red: 3 };
  const rank = (s) => STATUS_RANK[s] || 0;
  function causes(e) {
    const f = e.connections_failed || {};
    const out = [];
    for (const k of ["refused", "unanswered", "unreachable"]) if (f[k]) out.push(f[k] + " " + k);
    const resets = (e.resets_client || 0) + (e.resets_server || 0);
    if (resets) out.push(resets + " reset after establishment");
    const rt = (e.retransmits_client_to_server || 0) + (e.retransmits_server_to_client || 0);
    if (rt) out.push(rt + " segments retransmitted");
    return out.join(", ");
  }

  function edgeDetails(e, names) {
    showDetails([
      ["client", names[e.source] || e.source],
      ["server", names[e.target] || e.target],
      ["service", service(e)],
      ["connections", e.connections_active + " active, " + e.connections_opened + " opened"],
      ["client → server", e.packets_client_to_server + " packets, " + fmtBytes(e.bytes_client_to_server)],
      ["server → client", e.packets_server_to_client + " packets, " + fmtBytes(e.bytes_server_to_client)],
      ["handshake", e.handshake_count ? (e.handshake_min_us.toFixed(1) + " / " + e.handshake_mean_us.toFixed(1) + " / " + e.handshake_max_us.toFixed(1) + " µs (min/mean/max)") : "not seen"],
      ["TCP resets", String(e.tcp_resets)],
      ["status", (e.status || "NoStatus") + (causes(e) ? " (" + causes(e) + ")" : "")],
      ["first seen", new Date(e.first_seen_ms).toISOString()],
      ["last seen", new Date(e.last_seen_ms).toISOString()],
    ]);
  }

  function nodeDetails(n) {
    const addrs = (n.payload && n.payload.addresses) || [];
    const p = n.payload || {};
    const extra = [];
    if (p.namespace) extra.push(["namespace", p.namespace]);
    if (p.workload) extra.push(["workload", p.workload]);
    if (p.node) extra.push(["node", p.node]);
    showDetails([["name", n.name], ["type", n.type], ["id", n.id], ...extra, ["addresses", addrs.join(", ") || "-"],
      ["last seen", new Date(n.last_seen_ms).toISOString()]]);
  }

  const KINDS = { "flows.host": "host", "flows.external": "external", "kubernetes.pod": "pod",
    "kubernetes.service": "service", "kubernetes.node": "host" };
  const GROUP_LABELS = { host: "hosts and nodes", external: "external", pod: "pods", service: "services" };

  function render(data) {
    const names = {};
    for (const n of data.nodes) names[n.id] = n.name;
    const byId = {};
    const els = [];
    const grouping = $("group").value;
    const groups = new Set();
    for (const n of data.nodes) {
      const kind = KINDS[n.type] || "external";
      const ns = n.payload && n.payload.namespace;
      const el = { group: "nodes", data: { id: n.id, label: ns ? ns + "/" + n.name : n.name, kind: kind } };
      if (grouping === "kind") {
        const g = "group:" + kind;
        groups.add(g);
        el.data.parent = g;
      }
      byId[n.id] = n;
      els.push(el);
    }
    for (const g of groups) {
      els.push({ group: "nodes", data: { id: g, label: GROUP_LABELS[g.slice(6)] || g.slice(6), kind: "group" } });
    }
    const maxBytes = Math.max(1, ...data.edges.map((e) => e.bytes_client_to_server + e.bytes_server_to_client));
    // A server endpoint's status: the worst of its incoming edges.
    const nodeStatus = {};
    data.edges.forEach((e, i) => {
      const bytes = e.bytes_client_to_server + e.bytes_server_to_client;
      const st = e.status || "NoStatus";
      if (rank(st) >= rank(nodeStatus[e.target])) nodeStatus[e.target] = st;
      els.push({ group: "edges", data: { id: "e" + i, source: e.source, target: e.target, status: st,
        label: service(e), width: 1 + 5 * Math.log1p(bytes) / Math.log1p(maxBytes), idx: i } });
    });
    for (const el of els) if (el.group === "nodes" && nodeStatus[el.data.id]) el.data.status = nodeStatus[el.data.id];

    const key = JSON.stringify(els.map((e) => e.data.id + ">" + (e.data.source || "") + (e.data.target || "") + (e.data.parent || "")));
    if (!cy) {
      cy = cytoscape({
        container: $("map"),
        style: [
          { selector: "node", style: { "label": "data(label)", "font-size": 11, "text-valign": "bottom", "text-margin-y": 4,
            "background-color": "#6b7a90", "width": 22, "height": 22 } },
          { selector: "node[kind = 'host']", style: { "background-color": "#1f6feb", "shape": "round-rectangle", "width": 34, "height": 26 } },
          { selector: "node[kind = 'pod']", style: { "background-color": "#2da44e" } },
          { selector: "node[kind = 'service']", style: { "background-color": "#8250df", "shape": "diamond", "width": 26, "height": 26 } },
          { selector: "node[kind = 'group']", style: { "background-color": "#eef2f7", "border-color": "#c7ced9", "border-width": 1,
            "text-valign": "top", "font-weight": "bold", "color": "#5a6474" } },
          { selector: "edge", style: { "width": "data(width)", "curve-style": "bezier", "target-arrow-shape": "triangle",
            "line-color": "#9aa7b8", "target-arrow-color": "#9aa7b8", "label": "data(label)", "font-size": 9,
            "text-rotation": "autorotate", "color": "#3d4756" } },
          { selector: "edge[status = 'Green']", style: { "line-color": "#2da44e", "target-arrow-color": "#2da44e" } },
          { selector: "edge[status = 'Orange']", style: { "line-color": "#f08c00", "target-arrow-color": "#f08c00" } },
          { selector: "edge[status = 'Red']", style: { "line-color": "#cf222e", "target-arrow-color": "#cf222e" } },
          { selector: "node[status = 'Orange']", style: { "border-color": "#f08c00", "border-width": 3 } },
          { selector: "node[status = 'Red']", style: { "border-color": "#cf222e", "border-width": 4 } },
          { selector: ":selected", style: { "line-color": "#f08c00", "target-arrow-color": "#f08c00", "border-color": "#f08c00", "border-width": 3 } },
        ],
        wheelSensitivity: 0.3,
      });
    }
    const current = data;
    cy.off("mouseover tap");
    cy.on("mouseover tap", "edge", (ev) => edgeDetails(current.edges[ev.target.data("idx")], names));
    cy.on("mouseover tap", "node", (ev) => { const n = byId[ev.target.id()]; if (n) nodeDetails(n); });
    if (key !== lastKey) {
      cy.elements().remove();
      cy.add(els);
      const layout = grouping === "none"
        // A star: this host (or hosts) in the middle, the endpoints it talks to around it.
        ? { name: "concentric", animate: false, padding: 40, minNodeSpacing: 40, nodeDimensionsIncludeLabels: true,
            concentric: (n) => (n.data("kind") === "host" ? 2 : 1), levelWidth: () => 1 }
        : { name: "cose", animate: false, padding: 40, randomize: true, nodeDimensionsIncludeLabels: true,
            nodeRepulsion: () => 400000, nodeOverlap: 40, idealEdgeLength: () => 140, edgeElasticity: () => 100,
            nestingFactor: 1.2, gravity: 40, numIter: 2500, componentSpacing: 120 };
      cy.layout(layout).run();
      // Few endpoints: do not blow them up to fill the screen.
      if (cy.zoom() > 1.1) { cy.zoom(1.1); cy.center(); }
      lastKey = key;
    } else {
      for (const el of els) { if (el.group === "edges") cy.getElementById(el.data.id).data("width", el.data.width); }
    }

    const tbody = $("edge-list");
    tbody.replaceChildren();
    // Failing edges first (worst status first, otherwise the API's order).
    const order = data.edges.map((e, i) => i).sort((a, b) => rank(data.edges[b].status) - rank(data.edges[a].status) || a - b);
    order.forEach((i) => {
      const e = data.edges[i];
      const tr = document.createElement("tr");
      tr.className = "edge-row";
      tr.dataset.status = e.status || "NoStatus";
      tr.title = (e.status || "NoStatus") + (causes(e) ? ": " + causes(e) : "");
      tr.dataset.source = e.source;
      tr.dataset.target = e.target;
      tr.append(text("td", names[e.source] || e.source), text("td", names[e.target] || e.target),
        text("td", service(e)), text("td", String(e.connections_active), "num"),
        text("td", fmtBytes(e.bytes_client_to_server + e.bytes_server_to_client), "num"),
        text("td", e.handshake_mean_us == null ? "-" : e.handshake_mean_us.toFixed(1), "num"));
      tr.addEventListener("click", () => { cy.elements().unselect(); cy.getElementById("e" + i).select(); edgeDetails(e, names); });
      tbody.append(tr);
    });
    if (!data.edges.length) {
      const tr = document.createElement("tr");
      const td = text("td", "No traffic in this window yet.", "empty");
      td.colSpan = 6;
      tr.append(td);
      tbody.append(tr);
    }
    $("edge-count").textContent = String(data.edges.length);
    $("status").textContent = data.nodes.length + " endpoints, " + data.edges.length + " edges" +
      (data.truncated ? " (the busiest only: narrow the window)" : "") +
      " · updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "true";
  }

  async function load() {
    clearTimeout(timer);
    try {
      const r = await fetch("/api/graph?" + params().toString());
      const data = await r.json();
      if (!r.ok) throw new Error(data.error || r.statusText);
      if (data.refresh_seconds) refreshMs = data.refresh_seconds * 1000;
      render(data);
    } catch (err) {
      $("status").textContent = "error: " + err.message;
    }
    timer = setTimeout(load, refreshMs);
  }

  for (const id of ["since", "protocol", "group"]) $(id).addEventListener("change", () => { lastKey = ""; load(); });
  for (const id of ["port", "q"]) $(id).addEventListener("input", () => { lastKey = ""; clearTimeout(timer); timer = setTimeout(load, 300); });
  load();
})();
