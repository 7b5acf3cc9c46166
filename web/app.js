// flowmap's service map: fetches /api/graph, groups the endpoints
// (namespace → workload → pod, hosts → host → process, external → domain),
// draws the groups collapsed or expanded with cytoscape (a maintained graph
// library, served by the agent itself) and aggregates the edges whose ends
// are collapsed. It refreshes every crawl interval while it shows the live
// window; a past window (from/to) and a comparison of two windows (from
// /api/diff) stay still.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  let cy = null;
  let refreshMs = 30000;
  let timer = null;
  let lastKey = "";

  // ---------------------------------------------------------------- state
  const state = {
    raw: null, // the last /api/graph answer (or the merged windows of a comparison)
    diff: null, // the last /api/diff answer while comparing
    expanded: new Set(), // group ids shown open
    seen: new Set(), // group ids met so far (new ones follow `autoExpand`)
    autoExpand: null, // decided on the first answer: small maps open, cluster-size maps collapsed
    hidden: new Set(), // top-level group ids the user hid (namespaces, hosts, external)
    focus: null, // endpoint id found by the search
    model: null, // what is drawn (see build())
  };
  // Above this many endpoints every group starts collapsed.
  const COLLAPSE_AT = 60;
  // Rows of the edge table (the map keeps every edge).
  const MAX_ROWS = 300;
  // Namespaces whose endpoints are "system noise".
  const SYSTEM_NAMESPACES = new Set(["kube-system", "kube-public", "kube-node-lease"]);

  // ---------------------------------------------------------------- format
  function fmtBytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + u[i];
  }
  const service = (e) => (e.port ? e.protocol + "/" + e.port : e.protocol);
  const iso = (ms) => new Date(ms).toISOString();

  function text(tag, s, cls) {
    const el = document.createElement(tag);
    el.textContent = s;
    if (cls) el.className = cls;
    return el;
  }

  function showDetails(pairs, extra) {
    const d = $("details");
    d.replaceChildren();
    const dl = document.createElement("dl");
    for (const [k, v] of pairs) { dl.append(text("dt", k), text("dd", v)); }
    d.append(dl);
    if (extra) d.append(extra);
  }

  // ---------------------------------------------------------------- health
  const STATUS_RANK = { NoStatus: 0, Green: 1, Orange: 2, Red: 3 };
  const rank = (s) => STATUS_RANK[s] || 0;
  const worst = (a, b) => (rank(b) > rank(a) ? b : a);

  // The health of several edges summed (one edge: itself).
  function healthOf(edges) {
    const h = { failed: { refused: 0, unanswered: 0, unreachable: 0 }, resets: 0, retrans: 0, drops: {}, srtt: null };
    for (const e of edges) {
      const f = e.connections_failed || {};
      for (const k of ["refused", "unanswered", "unreachable"]) h.failed[k] += f[k] || 0;
      h.resets += (e.resets_client || 0) + (e.resets_server || 0);
      h.retrans += (e.retransmits_client_to_server || 0) + (e.retransmits_server_to_client || 0);
      for (const [r, n] of Object.entries(e.drops || {})) h.drops[r] = (h.drops[r] || 0) + n;
      const s = e.srtt_us;
      if (s && s.samples) {
        if (!h.srtt) h.srtt = { samples: 0, min: s.min, max: s.max, sum: 0 };
        h.srtt.samples += s.samples;
        h.srtt.sum += s.mean * s.samples;
        h.srtt.min = Math.min(h.srtt.min, s.min);
        h.srtt.max = Math.max(h.srtt.max, s.max);
      }
    }
    return h;
  }

  // The causes behind a status, in words: failures, resets, retransmits,
  // kernel drops by reason, and the smoothed RTT when it was sampled.
  function causes(edges) {
    const h = healthOf(edges);
    const out = [];
    for (const k of ["refused", "unanswered", "unreachable"]) if (h.failed[k]) out.push(h.failed[k] + " " + k);
    if (h.resets) out.push(h.resets + " reset after establishment");
    if (h.retrans) out.push(h.retrans + " segments retransmitted");
    const reasons = Object.entries(h.drops).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
    if (reasons.length) {
      const total = reasons.reduce((s, r) => s + r[1], 0);
      out.push(total + " dropped (" + reasons.map(([r, n]) => r + " " + n).join(", ") + ")");
    }
    if (h.srtt) out.push("srtt " + srttText(h.srtt));
    return out.join(", ");
  }

  function srttText(s) {
    return s.min + " / " + (s.sum / s.samples).toFixed(1) + " / " + s.max + " µs (min/mean/max of " + s.samples + ")";
  }

  // ---------------------------------------------------------------- groups
  const PROCESS = "flows.process";
  const KINDS = { "flows.host": "host", "kubernetes.node": "host", "flows.external": "external",
    "flows.external_group": "external", "kubernetes.pod": "pod", "kubernetes.service": "service", [PROCESS]: "process" };
  const kindOf = (n) => KINDS[n.type] || "external";
  const isAddress = (s) => /^\d{1,3}(\.\d{1,3}){3}$/.test(s) || s.includes(":");

  // The external names' group: the last two labels of a DNS name, or
  // "addresses" for peers known only by their address.
  function domainOf(n) {
    if (n.type === "flows.external_group") return "folded";
    const name = n.name || "";
    if (!name || isAddress(name)) return "addresses";
    const labels = name.replace(/\.$/, "").split(".");
    return labels.length <= 2 ? labels.join(".") : labels.slice(-2).join(".");
  }

  // The groups an endpoint belongs to, outermost first: [id, label, kind].
  function pathOf(n, hostsWithProcesses) {
    const p = n.payload || {};
    switch (n.type) {
      case "kubernetes.pod":
      case "kubernetes.service": {
        const ns = p.namespace || "(no namespace)";
        const path = [["ns:" + ns, ns, "namespace"]];
        if (n.type === "kubernetes.pod" && p.workload) path.push(["wl:" + ns + "/" + p.workload, p.workload, "workload"]);
        return path;
      }
      case PROCESS: {
        const h = p.hostname || "(unknown host)";
        return [["hosts", "hosts and nodes", "hosts"], ["host:" + h, h, "host"]];
      }
      case "flows.host":
      case "kubernetes.node":
        return hostsWithProcesses.has(n.name)
          ? [["hosts", "hosts and nodes", "hosts"], ["host:" + n.name, n.name, "host"]]
          : [["hosts", "hosts and nodes", "hosts"]];
      default: {
        const d = domainOf(n);
        return [["ext", "external", "external"], ["ext:" + d, d, "domain"]];
      }
    }
  }

  // System noise: endpoints of the Kubernetes system namespaces, and
  // health probes (see isProbe).
  const isSystem = (n) => !!n && (n.type === "kubernetes.pod" || n.type === "kubernetes.service") &&
    SYSTEM_NAMESPACES.has((n.payload || {}).namespace);
  // A health probe: an edge from a Kubernetes node to a pod that runs on
  // that same node (kubelet's liveness, readiness and startup probes come
  // from the node's own address).
  const isProbe = (e, byId) => {
    const s = byId.get(e.source), t = byId.get(e.target);
    return !!s && !!t && s.type === "kubernetes.node" && t.type === "kubernetes.pod" &&
      (t.payload || {}).node === s.name;
  };

  const DIFF_RANK = { changed: 1, vanished: 2, appeared: 3, worsened: 4 };
  const strongerDiff = (a, b) => ((DIFF_RANK[b] || 0) > (DIFF_RANK[a] || 0) ? b : a);

  // What is drawn: the groups, the visible nodes (an endpoint, or the
  // outermost collapsed group holding it) and the edges between them
  // (one per endpoint pair and service when both ends are endpoints,
  // otherwise aggregated per pair of visible ends).
  function build(data) {
    const byId = new Map(data.nodes.map((n) => [n.id, n]));
    const hostsWithProcesses = new Set(data.nodes.filter((n) => n.type === PROCESS).map((n) => (n.payload || {}).hostname));
    const groups = new Map();
    const noise = $("noise").checked;
    // Each answer's paths are worked out once (a search or a toggle reuses them).
    if (!data.paths) {
      data.paths = new Map();
      for (const n of data.nodes) data.paths.set(n.id, pathOf(n, hostsWithProcesses));
    }
    const paths = data.paths;
    for (const n of data.nodes) {
      const path = paths.get(n.id);
      let parent = null;
      path.forEach(([id, label, kind], depth) => {
        if (!groups.has(id)) {
          groups.set(id, { id, label, kind, depth, parent, top: path[0][0], endpoints: 0, total: 0, children: new Set(),
            status: "NoStatus", diff: { appeared: 0, vanished: 0 } });
        }
        if (parent) groups.get(parent).children.add(id);
        parent = id;
      });
    }
    if (state.autoExpand === null) state.autoExpand = data.nodes.length <= COLLAPSE_AT;
    for (const id of groups.keys()) {
      if (!state.seen.has(id)) { state.seen.add(id); if (state.autoExpand) state.expanded.add(id); }
    }
    const shown = (n) => !state.hidden.has(paths.get(n.id)[0][0]) && !(noise && isSystem(n));
    // An endpoint's visible node.
    const rep = new Map();
    for (const n of data.nodes) {
      for (const [id] of paths.get(n.id)) groups.get(id).total++;
      if (!shown(n)) continue;
      const path = paths.get(n.id);
      const closed = path.find(([id]) => !state.expanded.has(id));
      rep.set(n.id, closed ? closed[0] : n.id);
      for (const [id] of path) {
        const g = groups.get(id);
        g.endpoints++;
        if (n.diff) g.diff[n.diff]++;
      }
    }
    // Server status: the worst of an endpoint's incoming edges.
    const nodeStatus = new Map();
    const edges = new Map();
    let probes = 0;
    data.edges.forEach((e, i) => {
      const s = rep.get(e.source), t = rep.get(e.target);
      if (s === undefined || t === undefined) return;
      if (noise && isProbe(e, byId)) { probes++; return; }
      const st = e.status || "NoStatus";
      nodeStatus.set(e.target, worst(nodeStatus.get(e.target) || "NoStatus", st));
      if (s === t) return; // inside one collapsed group
      const leaf = s === e.source && t === e.target;
      const key = leaf ? s + "\u0000" + t + "\u0000" + service(e) : s + "\u0000" + t;
      let a = edges.get(key);
      if (!a) {
        a = { id: "e" + edges.size, source: s, target: t, members: [], services: new Set(), status: "NoStatus", diff: "",
          bytes_c2s: 0, bytes_s2c: 0, packets_c2s: 0, packets_s2c: 0, connections_active: 0, connections_opened: 0,
          handshake_count: 0, handshake_sum: 0 };
        edges.set(key, a);
      }
      a.members.push(i);
      a.services.add(service(e));
      a.status = worst(a.status, st);
      a.diff = strongerDiff(a.diff, e.diff || "");
      a.bytes_c2s += e.bytes_client_to_server;
      a.bytes_s2c += e.bytes_server_to_client;
      a.packets_c2s += e.packets_client_to_server;
      a.packets_s2c += e.packets_server_to_client;
      a.connections_active += e.connections_active;
      a.connections_opened += e.connections_opened;
      if (e.handshake_count && e.handshake_mean_us != null) {
        a.handshake_count += e.handshake_count;
        a.handshake_sum += e.handshake_mean_us * e.handshake_count;
      }
    });
    for (const n of data.nodes) {
      if (!rep.has(n.id)) continue;
      for (const [id] of paths.get(n.id)) {
        const g = groups.get(id);
        g.status = worst(g.status, nodeStatus.get(n.id) || "NoStatus");
      }
    }
    // Visible groups: every group whose ancestors are all open and that
    // holds a shown endpoint.
    const visibleGroups = [];
    for (const g of groups.values()) {
      if (!g.endpoints) continue;
      let p = g.parent, open = true;
      while (p) { if (!state.expanded.has(p)) { open = false; break; } p = groups.get(p).parent; }
      if (open) visibleGroups.push(g);
    }
    visibleGroups.sort((a, b) => a.depth - b.depth || (a.id < b.id ? -1 : 1));
    return { byId, groups, paths, rep, nodeStatus, edges: [...edges.values()], visibleGroups, probes };
  }

  // ---------------------------------------------------------------- render
  const STYLE = [
    { selector: "node", style: { "label": "data(label)", "font-size": 11, "text-valign": "bottom", "text-margin-y": 4,
      "background-color": "#6b7a90", "width": 22, "height": 22 } },
    { selector: "node[kind = 'host']", style: { "background-color": "#1f6feb", "shape": "round-rectangle", "width": 34, "height": 26 } },
    { selector: "node[kind = 'pod']", style: { "background-color": "#2da44e" } },
    { selector: "node[kind = 'process']", style: { "background-color": "#0598bc", "shape": "round-rectangle" } },
    { selector: "node[kind = 'service']", style: { "background-color": "#8250df", "shape": "diamond", "width": 26, "height": 26 } },
    { selector: "node[?group]", style: { "shape": "round-rectangle", "background-color": "#dfe6ef", "border-color": "#8c99ab",
      "border-width": 2, "width": "data(size)", "height": "data(size)", "font-weight": "bold", "color": "#3d4756" } },
    { selector: "node[?group][?open]", style: { "background-color": "#f3f5f8", "border-color": "#c7ced9", "border-width": 1,
      "text-valign": "top", "color": "#5a6474" } },
    { selector: "edge", style: { "width": "data(width)", "curve-style": "bezier", "target-arrow-shape": "triangle",
      "line-color": "#9aa7b8", "target-arrow-color": "#9aa7b8", "label": "data(label)", "font-size": 9,
      "text-rotation": "autorotate", "color": "#3d4756", "min-zoomed-font-size": 8 } },
    // Many edges: straight lines draw faster than curves.
    { selector: "edge.many", style: { "curve-style": "straight" } },
    // Idle edges (no traffic in the window): grey and dashed.
    { selector: "edge[status = 'NoStatus']", style: { "line-color": "#c3c9d2", "target-arrow-color": "#c3c9d2", "line-style": "dashed" } },
    { selector: "edge[status = 'Green']", style: { "line-color": "#2da44e", "target-arrow-color": "#2da44e" } },
    { selector: "edge[status = 'Orange']", style: { "line-color": "#f08c00", "target-arrow-color": "#f08c00" } },
    { selector: "edge[status = 'Red']", style: { "line-color": "#cf222e", "target-arrow-color": "#cf222e" } },
    { selector: "node[status = 'Orange']", style: { "border-color": "#f08c00", "border-width": 3 } },
    { selector: "node[status = 'Red']", style: { "border-color": "#cf222e", "border-width": 4 } },
    // A comparison of two windows.
    { selector: "[diff = 'appeared']", style: { "underlay-color": "#0969da", "underlay-opacity": 0.35, "underlay-padding": 6 } },
    { selector: "[diff = 'vanished']", style: { "opacity": 0.45, "line-style": "dotted", "border-style": "dotted", "border-width": 3 } },
    { selector: "[diff = 'worsened']", style: { "underlay-color": "#cf222e", "underlay-opacity": 0.35, "underlay-padding": 6 } },
    { selector: "[diff = 'changed']", style: { "underlay-color": "#bf8700", "underlay-opacity": 0.3, "underlay-padding": 4 } },
    { selector: ":selected", style: { "line-color": "#f08c00", "target-arrow-color": "#f08c00", "border-color": "#f08c00", "border-width": 4 } },
  ];

  function nodeLabel(n) {
    const ns = n.payload && n.payload.namespace;
    return n.type === "kubernetes.pod" || n.type === "kubernetes.service" || !ns ? n.name : ns + "/" + n.name;
  }

  function groupLabel(g) {
    return g.label + " · " + g.endpoints;
  }

  function render() {
    const data = state.raw;
    if (!data) return;
    const flat = $("group").value === "none";
    if (flat) { for (const id of state.seen) state.expanded.add(id); }
    const m = build(data);
    state.model = m;
    const els = [];
    const maxBytes = m.edges.reduce((x, a) => Math.max(x, a.bytes_c2s + a.bytes_s2c), 1);
    if (!flat) {
      for (const g of m.visibleGroups) {
        const open = state.expanded.has(g.id);
        const diff = g.diff.appeared ? "appeared" : g.diff.vanished ? "vanished" : "";
        els.push({ group: "nodes", data: { id: g.id, label: groupLabel(g), kind: g.kind, group: true, open, count: g.endpoints,
          size: Math.round(26 + 10 * Math.log10(1 + g.endpoints)), status: g.status, diff, parent: g.parent || undefined } });
      }
    }
    for (const n of data.nodes) {
      if (m.rep.get(n.id) !== n.id) continue;
      const path = m.paths.get(n.id);
      els.push({ group: "nodes", data: { id: n.id, label: nodeLabel(n), kind: kindOf(n), status: m.nodeStatus.get(n.id),
        diff: n.diff || "", parent: flat || !path.length ? undefined : path[path.length - 1][0] } });
    }
    const many = m.edges.length > 300 ? "many" : "";
    for (const a of m.edges) {
      const bytes = a.bytes_c2s + a.bytes_s2c;
      const svc = [...a.services];
      els.push({ group: "edges", data: { id: a.id, source: a.source, target: a.target, status: a.status, diff: a.diff,
        label: svc.length > 2 ? svc.length + " services" : svc.join(", "),
        width: 1 + 5 * Math.log1p(bytes) / Math.log1p(maxBytes), bytes, packets: a.packets_c2s + a.packets_s2c,
        connections: a.connections_active, members: a.members.length }, classes: many });
    }

    if (!cy) {
      cy = cytoscape({ container: $("map"), style: STYLE, wheelSensitivity: 0.3 });
      cy.on("mouseover tap", "edge", (ev) => edgeDetails(ev.target.id()));
      cy.on("mouseover tap", "node", (ev) => nodeOrGroupDetails(ev.target.id()));
      cy.on("dbltap", "node[?group]", (ev) => toggle(ev.target.id()));
    }
    const key = els.map((e) => e.data.id + ">" + (e.data.source || "") + ">" + (e.data.target || "") + ">" + (e.data.parent || "")).join("|");
    if (key !== lastKey) {
      cy.batch(() => { cy.elements().remove(); cy.add(els); });
      runLayout(flat);
      lastKey = key;
    } else {
      // Same elements: only their figures change (id, ends and parent cannot).
      cy.batch(() => {
        for (const el of els) {
          const { id, source, target, parent, ...rest } = el.data;
          cy.getElementById(id).data(rest);
        }
      });
    }
    renderOverview(m);
    renderEdges(m);
    renderDiff();
    const shownEndpoints = m.rep.size;
    $("status").textContent = data.nodes.length + " endpoints, " + data.edges.length + " edges" +
      (shownEndpoints !== data.nodes.length ? " (" + shownEndpoints + " shown)" : "") +
      (m.probes ? ", " + m.probes + " health probes hidden" : "") +
      (data.truncated ? " (the busiest only: narrow the window)" : "") +
      (state.diff ? " · comparing two windows" : data.from_ms && data.to_ms && !isLive()
        ? " · " + iso(data.from_ms) + " – " + iso(data.to_ms) : " · updated " + new Date().toLocaleTimeString());
    document.body.dataset.loaded = "true";
    if (window.flowmap.renderedAt == null) {
      window.flowmap.renderedAt = 0;
      requestAnimationFrame(() => requestAnimationFrame(() => { window.flowmap.renderedAt = performance.now(); }));
    }
  }

  function runLayout(flat) {
    const n = cy.nodes().length;
    let layout;
    if (flat && !cy.nodes("[?group]").length) {
      // A star: this host (or hosts) in the middle, the endpoints it talks to around it.
      layout = { name: "concentric", animate: false, padding: 40, minNodeSpacing: 40, nodeDimensionsIncludeLabels: n < 300,
        concentric: (x) => (x.data("kind") === "host" ? 2 : 1), levelWidth: () => 1 };
    } else if (n > 30) {
      packLayout();
      return;
    } else {
      // A force layout, pulled by the heaviest 200 edges only (its cost grows with the edges).
      const heavy = cy.edges().sort((a, b) => b.data("bytes") - a.data("bytes")).slice(0, 200);
      cy.nodes().union(heavy).layout({ name: "cose", animate: false, padding: 40, randomize: true,
        nodeDimensionsIncludeLabels: true, nodeRepulsion: () => 400000, nodeOverlap: 40, idealEdgeLength: () => 140,
        edgeElasticity: () => 100, nestingFactor: 1.2, gravity: 40, numIter: 1000, componentSpacing: 120 }).run();
      if (cy.zoom() > 1.1) { cy.zoom(1.1); cy.center(); }
      return;
    }
    cy.layout(layout).run();
    // Few endpoints: do not blow them up to fill the screen.
    if (cy.zoom() > 1.1) { cy.zoom(1.1); cy.center(); }
  }

  // Many visible nodes: a force layout would take a second or more, so
  // each group's members are packed in rows (a group's box holds its own
  // rows), the top level likewise: linear in the nodes.
  function packLayout() {
    const kids = new Map();
    cy.nodes().forEach((x) => {
      const p = x.data("parent") || "";
      if (!kids.has(p)) kids.set(p, []);
      kids.get(p).push(x);
    });
    const GAP = 24, PAD = 24, LABEL = 18;
    const rel = new Map();
    const measure = (id) => {
      const ch = (kids.get(id) || []).slice().sort((a, b) => (a.id() < b.id() ? -1 : 1));
      if (!ch.length) return id && cy.getElementById(id).data("group") ? [140, 80] : [130, 60];
      const dims = ch.map((c) => measure(c.id()));
      const area = dims.reduce((s, d) => s + (d[0] + GAP) * (d[1] + GAP), 0);
      const maxRow = Math.max(Math.sqrt(area) * 1.4, ...dims.map((d) => d[0]));
      let x = 0, y = 0, rowH = 0, w = 0;
      ch.forEach((c, i) => {
        const [cw, chh] = dims[i];
        if (x > 0 && x + cw > maxRow) { y += rowH + GAP; x = 0; rowH = 0; }
        rel.set(c.id(), [x, y, cw, chh]);
        x += cw + GAP;
        rowH = Math.max(rowH, chh);
        w = Math.max(w, x - GAP);
      });
      return [w + 2 * PAD, y + rowH + 2 * PAD + LABEL];
    };
    const [W, H] = measure("");
    const pos = {};
    const place = (id, x0, y0) => {
      for (const c of kids.get(id) || []) {
        const [x, y, w, h] = rel.get(c.id());
        const ax = x0 + x, ay = y0 + y;
        if (kids.has(c.id())) place(c.id(), ax + PAD, ay + PAD + LABEL);
        else pos[c.id()] = { x: ax + w / 2, y: ay + h / 2 };
      }
    };
    place("", 0, 0);
    cy.layout({ name: "preset", positions: (x) => pos[x.id()] || { x: 0, y: 0 }, fit: false, animate: false }).run();
    // Fit from the known extent (cy.fit() would measure every edge).
    const z = Math.min(1.1, (cy.width() - 60) / Math.max(W, 1), (cy.height() - 60) / Math.max(H, 1));
    cy.zoom(z);
    cy.pan({ x: (cy.width() - W * z) / 2, y: (cy.height() - H * z) / 2 });
  }

  function nameOf(id) {
    const m = state.model;
    if (!m) return id;
    const g = m.groups.get(id);
    if (g) return g.label + " (" + g.endpoints + ")";
    const n = m.byId.get(id);
    return n ? nodeLabel(n) : id;
  }

  function edgeDetails(id) {
    const a = state.model && state.model.edges.find((x) => x.id === id);
    if (!a) return;
    const members = a.members.map((i) => state.raw.edges[i]);
    if (members.length === 1 && a.source === members[0].source && a.target === members[0].target) {
      const e = members[0];
      const h = healthOf([e]);
      const pairs = [
        ["client", nameOf(e.source)],
        ["server", nameOf(e.target)],
        ["service", service(e)],
        ["connections", e.connections_active + " active, " + e.connections_opened + " opened"],
        ["client → server", e.packets_client_to_server + " packets, " + fmtBytes(e.bytes_client_to_server)],
        ["server → client", e.packets_server_to_client + " packets, " + fmtBytes(e.bytes_server_to_client)],
        ["handshake", e.handshake_count ? (e.handshake_min_us.toFixed(1) + " / " + e.handshake_mean_us.toFixed(1) + " / " + e.handshake_max_us.toFixed(1) + " µs (min/mean/max)") : "not seen"],
        ["smoothed RTT", h.srtt ? srttText(h.srtt) : "not sampled"],
        ["kernel drops", dropsText(h)],
        ["TCP resets", String(e.tcp_resets)],
        ["status", (e.status || "NoStatus") + (causes([e]) ? " (" + causes([e]) + ")" : "")],
        ["first seen", iso(e.first_seen_ms)],
        ["last seen", iso(e.last_seen_ms)],
      ];
      if (e.diff) pairs.push(["change", diffText(e)]);
      showDetails(pairs);
      return;
    }
    const svc = [...a.services];
    const h = healthOf(members);
    showDetails([
      ["client", nameOf(a.source)],
      ["server", nameOf(a.target)],
      ["edges", members.length + " (" + svc.slice(0, 6).join(", ") + (svc.length > 6 ? ", +" + (svc.length - 6) + " more" : "") + ")"],
      ["connections", a.connections_active + " active, " + a.connections_opened + " opened"],
      ["client → server", a.packets_c2s + " packets, " + fmtBytes(a.bytes_c2s)],
      ["server → client", a.packets_s2c + " packets, " + fmtBytes(a.bytes_s2c)],
      ["handshake", a.handshake_count ? (a.handshake_sum / a.handshake_count).toFixed(1) + " µs mean of " + a.handshake_count : "not seen"],
      ["smoothed RTT", h.srtt ? srttText(h.srtt) : "not sampled"],
      ["kernel drops", dropsText(h)],
      ["status", a.status + (causes(members) ? " (" + causes(members) + ")" : "")],
    ].concat(a.diff ? [["change", diffCounts(members)]] : []));
  }

  function dropsText(h) {
    const r = Object.entries(h.drops);
    return r.length ? r.map(([k, n]) => k + " " + n).join(", ") : "none";
  }

  function diffText(e) {
    if (e.diff === "worsened") return "worsened: " + e.status_a + " → " + e.status_b;
    if (e.diff === "changed") return "traffic changed: " + fmtBytes(e.bytes_a) + " → " + fmtBytes(e.bytes_b) + (e.factor == null ? "" : " (×" + Number(e.factor).toFixed(2) + ")");
    return e.diff;
  }

  function diffCounts(members) {
    const c = {};
    for (const e of members) if (e.diff) c[e.diff] = (c[e.diff] || 0) + 1;
    return Object.entries(c).map(([k, n]) => n + " " + k).join(", ");
  }

  function nodeOrGroupDetails(id) {
    const m = state.model;
    if (!m) return;
    const g = m.groups.get(id);
    if (g) {
      const btn = text("button", state.expanded.has(id) ? "collapse" : "expand", "toggle");
      btn.addEventListener("click", () => toggle(id));
      const pairs = [["group", g.label], ["level", g.kind], ["endpoints", String(g.endpoints)], ["status", g.status]];
      if (g.diff.appeared || g.diff.vanished) pairs.push(["change", g.diff.appeared + " appeared, " + g.diff.vanished + " vanished"]);
      showDetails(pairs, btn);
      return;
    }
    const n = m.byId.get(id);
    if (!n) return;
    const addrs = (n.payload && n.payload.addresses) || [];
    const p = n.payload || {};
    const extra = [];
    for (const k of ["namespace", "workload", "node", "hostname"]) if (p[k]) extra.push([k, String(p[k])]);
    if (n.diff) extra.push(["change", n.diff]);
    showDetails([["name", n.name], ["type", n.type], ["id", n.id], ...extra, ["addresses", addrs.join(", ") || "-"],
      ["status", m.nodeStatus.get(n.id) || "NoStatus"], ["last seen", iso(n.last_seen_ms)]]);
  }

  // ---------------------------------------------------------------- groups list
  function toggle(id) {
    if (state.expanded.has(id)) {
      // Closing a group closes what is inside it, so reopening starts from the overview.
      for (const g of state.model.groups.values()) {
        let p = g.id;
        while (p) { if (p === id) { state.expanded.delete(g.id); break; } p = state.model.groups.get(p).parent; }
      }
    } else {
      state.expanded.add(id);
    }
    render();
  }

  function setAll(open) {
    for (const id of state.model.groups.keys()) { if (open) state.expanded.add(id); else state.expanded.delete(id); }
    render();
  }

  // The all-groups overview: every top-level group (namespaces, hosts,
  // external) and the open groups' children, with endpoint counts, the
  // worst status, and a checkbox to hide a top-level group.
  function renderOverview(m) {
    const list = $("group-list");
    list.replaceChildren();
    const all = [...m.groups.values()].filter((g) => !g.parent).sort((a, b) => (a.id < b.id ? -1 : 1));
    const rows = [];
    const walk = (g) => {
      rows.push(g);
      if (state.expanded.has(g.id)) {
        [...g.children].map((c) => m.groups.get(c)).sort((a, b) => (a.id < b.id ? -1 : 1)).forEach(walk);
      }
    };
    all.forEach(walk);
    for (const g of rows) {
      const tr = document.createElement("tr");
      tr.className = "group-row";
      tr.dataset.group = g.id;
      tr.dataset.count = String(g.total);
      tr.dataset.status = g.status;
      const name = document.createElement("td");
      name.style.paddingLeft = 4 + 14 * g.depth + "px";
      const hasChildren = g.endpoints > 0;
      const btn = text("button", state.expanded.has(g.id) ? "−" : "+", "toggle");
      btn.title = state.expanded.has(g.id) ? "collapse" : "expand";
      btn.disabled = !hasChildren || state.hidden.has(g.top);
      btn.addEventListener("click", () => toggle(g.id));
      name.append(btn, text("span", " " + g.label));
      const hide = document.createElement("td");
      if (!g.parent) {
        const cb = document.createElement("input");
        cb.type = "checkbox";
        cb.className = "show";
        cb.checked = !state.hidden.has(g.id);
        cb.title = "show this group";
        cb.addEventListener("change", () => { if (cb.checked) state.hidden.delete(g.id); else state.hidden.add(g.id); render(); });
        hide.append(cb);
      }
      tr.append(name, text("td", g.kind), text("td", String(g.total), "num"), text("td", g.status), hide);
      list.append(tr);
    }
  }

  function renderEdges(m) {
    const tbody = $("edge-list");
    tbody.replaceChildren();
    const data = state.raw;
    // Failing edges first (worst status first, then the busiest).
    const order = m.edges.slice().sort((a, b) => rank(b.status) - rank(a.status) ||
      (b.bytes_c2s + b.bytes_s2c) - (a.bytes_c2s + a.bytes_s2c) || a.members[0] - b.members[0]);
    for (const a of order.slice(0, MAX_ROWS)) {
      const members = a.members.map((i) => data.edges[i]);
      const tr = document.createElement("tr");
      tr.className = "edge-row";
      tr.dataset.status = a.status;
      const c = causes(members);
      tr.title = a.status + (c ? ": " + c : "");
      tr.dataset.source = a.source;
      tr.dataset.target = a.target;
      tr.dataset.bytes = String(a.bytes_c2s + a.bytes_s2c);
      tr.dataset.packets = String(a.packets_c2s + a.packets_s2c);
      tr.dataset.connections = String(a.connections_active);
      if (a.diff) tr.dataset.diff = a.diff;
      const svc = [...a.services];
      tr.append(text("td", nameOf(a.source)), text("td", nameOf(a.target)),
        text("td", svc.length > 3 ? svc.slice(0, 3).join(", ") + " +" + (svc.length - 3) : svc.join(", ")),
        text("td", String(a.connections_active), "num"),
        text("td", fmtBytes(a.bytes_c2s + a.bytes_s2c), "num"),
        text("td", a.handshake_count ? (a.handshake_sum / a.handshake_count).toFixed(1) : "-", "num"));
      tr.addEventListener("click", () => { cy.elements().unselect(); cy.getElementById(a.id).select(); edgeDetails(a.id); });
      tbody.append(tr);
    }
    if (order.length > MAX_ROWS) {
      const tr = document.createElement("tr");
      const td = text("td", (order.length - MAX_ROWS) + " more edges: collapse groups or narrow the window.", "empty");
      td.colSpan = 6;
      tr.append(td);
      tbody.append(tr);
    }
    if (!m.edges.length) {
      const tr = document.createElement("tr");
      const td = text("td", "No traffic in this window yet.", "empty");
      td.colSpan = 6;
      tr.append(td);
      tbody.append(tr);
    }
    $("edge-count").textContent = String(m.edges.length);
  }

  // ---------------------------------------------------------------- search
  // Finds an endpoint by ID (exact) or by name or ID (substring, case
  // insensitive), opens the groups that hold it, selects it and centres
  // the map on it.
  function find(q) {
    const out = $("find-result");
    out.replaceChildren();
    delete document.body.dataset.found;
    q = q.trim();
    if (!q || !state.raw) return;
    const lq = q.toLowerCase();
    const nodes = state.raw.nodes;
    const exact = nodes.filter((n) => n.id === q || n.name === q);
    const partial = nodes.filter((n) => !exact.includes(n) && (n.name.toLowerCase().includes(lq) || n.id.toLowerCase().includes(lq)))
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const matches = exact.concat(partial);
    if (!matches.length) {
      out.append(text("span", "no endpoint matches " + JSON.stringify(q), "empty"));
      document.body.dataset.found = "";
      return;
    }
    focusEndpoint(matches[0].id);
    out.append(text("span", matches.length + (matches.length === 1 ? " match" : " matches") + ": "));
    for (const n of matches.slice(0, 8)) {
      const ns = (n.payload || {}).namespace;
      const a = text("a", ns ? ns + "/" + n.name : n.name, "match");
      a.href = "#";
      a.dataset.id = n.id;
      a.addEventListener("click", (ev) => { ev.preventDefault(); focusEndpoint(n.id); });
      out.append(a, document.createTextNode(" "));
    }
    if (matches.length > 8) out.append(text("span", "…"));
  }

  function focusEndpoint(id) {
    const m = state.model;
    const path = m.paths.get(id) || [];
    for (const [g] of path) state.expanded.add(g);
    if (path.length) state.hidden.delete(path[0][0]);
    if ($("noise").checked && isSystem(m.byId.get(id))) $("noise").checked = false;
    state.focus = id;
    render();
    const el = cy.getElementById(id);
    if (el.nonempty()) {
      cy.elements().unselect();
      el.select();
      cy.zoom(Math.max(cy.zoom(), 1));
      cy.center(el);
      nodeOrGroupDetails(id);
    }
    // Answered once the browser has painted the result (two frames on).
    requestAnimationFrame(() => requestAnimationFrame(() => {
      window.flowmap.answeredAt = performance.now();
      document.body.dataset.found = id;
    }));
  }

  // ---------------------------------------------------------------- time
  // A time as typed: "now", "-2h" (before now: s, m, h, d), an ISO 8601
  // time ("2026-12-07T01:00:00Z"; local time without a zone), or
  // milliseconds since the epoch.
  function parseTime(s, now) {
    s = (s || "").trim();
    if (!s || s === "now") return now;
    const rel = /^-(\d+(?:\.\d+)?)([smhd])$/.exec(s);
    if (rel) return now - Number(rel[1]) * { s: 1e3, m: 6e4, h: 36e5, d: 864e5 }[rel[2]];
    if (/^\d{10,}$/.test(s)) return Number(s);
    const t = Date.parse(s);
    if (Number.isNaN(t)) throw new Error(JSON.stringify(s) + " is not a time (now, -2h, 2026-12-07T01:00:00Z)");
    return t;
  }

  const isLive = () => !$("from").value.trim() && !$("to").value.trim();

  function params() {
    const p = new URLSearchParams();
    p.set("since", $("since").value);
    if (!isLive()) {
      const now = Date.now();
      const to = parseTime($("to").value, now);
      const from = $("from").value.trim() ? parseTime($("from").value, now) : to - sinceMs();
      if (from >= to) throw new Error("from must be before to");
      p.set("from", String(Math.round(from)));
      p.set("to", String(Math.round(to)));
    }
    if ($("port").value.trim()) p.set("port", $("port").value.trim());
    if ($("protocol").value) p.set("protocol", $("protocol").value);
    return p;
  }

  function sinceMs() {
    const m = /^(\d+)([mh])$/.exec($("since").value);
    return m ? Number(m[1]) * (m[2] === "h" ? 36e5 : 6e4) : 9e5;
  }

  async function getJson(url) {
    const r = await fetch(url);
    let data;
    try { data = await r.json(); } catch (e) { data = {}; }
    if (!r.ok) {
      const err = new Error(data.error || r.status + " " + r.statusText);
      err.status = r.status;
      throw err;
    }
    return data;
  }

  async function load() {
    clearTimeout(timer);
    if (state.diff) return;
    try {
      const data = await getJson("/api/graph?" + params().toString());
      if (data.refresh_seconds) refreshMs = data.refresh_seconds * 1000;
      state.raw = data;
      render();
    } catch (err) {
      $("status").textContent = "error: " + err.message;
    }
    if (isLive() && !state.diff) timer = setTimeout(load, refreshMs);
  }

  // ---------------------------------------------------------------- diff
  // Compares window A (before) with window B (after): /api/diff says what
  // appeared, vanished, worsened or changed; the map shows both windows'
  // endpoints and edges together (B's figures, A's for what vanished),
  // each marked with its change.
  async function compare() {
    const out = $("diff-status");
    try {
      const now = Date.now();
      const w = sinceMs();
      const bTo = $("diff-b-to").value.trim() ? parseTime($("diff-b-to").value, now) : now;
      const bFrom = $("diff-b-from").value.trim() ? parseTime($("diff-b-from").value, now) : bTo - w;
      const aTo = $("diff-a-to").value.trim() ? parseTime($("diff-a-to").value, now) : bFrom;
      const aFrom = $("diff-a-from").value.trim() ? parseTime($("diff-a-from").value, now) : aTo - (bTo - bFrom);
      if (aFrom >= aTo || bFrom >= bTo) throw new Error("each window's from must be before its to");
      const factor = Number($("diff-factor").value || "2");
      if (!(factor > 1)) throw new Error("the factor must be a number above 1");
      const q = (o) => new URLSearchParams(Object.entries(o).map(([k, v]) => [k, String(Math.round(v))])).toString();
      out.textContent = "comparing…";
      const diff = await getJson("/api/diff?" + q({ a_from: aFrom, a_to: aTo, b_from: bFrom, b_to: bTo }) + "&factor=" + factor);
      const [ga, gb] = await Promise.all([
        getJson("/api/graph?" + q({ from: aFrom, to: aTo })),
        getJson("/api/graph?" + q({ from: bFrom, to: bTo })),
      ]);
      clearTimeout(timer);
      state.diff = diff;
      state.raw = merge(ga, gb, diff);
      lastKey = "";
      render();
      out.textContent = "A " + iso(aFrom) + " – " + iso(aTo) + " · B " + iso(bFrom) + " – " + iso(bTo);
      document.body.dataset.diff = "true";
    } catch (err) {
      out.textContent = err.status === 404 ? "this server has no /api/diff (an older flowmap)" : "error: " + err.message;
    }
  }

  const edgeKey = (e) => e.source + "\u0000" + (e.target || e.destination) + "\u0000" + e.protocol + "\u0000" + e.port;

  function merge(ga, gb, diff) {
    const nodes = new Map();
    for (const n of ga.nodes) nodes.set(n.id, Object.assign({}, n));
    for (const n of gb.nodes) nodes.set(n.id, Object.assign({}, n));
    const ep = diff.endpoints || {};
    for (const [k, ids] of [["appeared", ep.appeared || []], ["vanished", ep.vanished || []]]) {
      for (const id of ids) {
        if (!nodes.has(id)) nodes.set(id, { id, type: "flows.external", name: id, payload: {}, last_seen_ms: 0 });
        nodes.get(id).diff = k;
      }
    }
    const edges = new Map();
    for (const e of ga.edges) edges.set(edgeKey(e), Object.assign({}, e, { bytes_client_to_server: 0, bytes_server_to_client: 0,
      packets_client_to_server: 0, packets_server_to_client: 0, connections_active: 0, connections_opened: 0, status: "NoStatus",
      _a: e }));
    for (const e of gb.edges) edges.set(edgeKey(e), Object.assign({}, e));
    const ed = diff.edges || {};
    for (const k of ["changed", "vanished", "appeared", "worsened"]) {
      for (const d of ed[k] || []) {
        let e = edges.get(edgeKey(d));
        if (!e) {
          e = { source: d.source, target: d.destination, protocol: d.protocol, port: d.port, bytes_client_to_server: 0,
            bytes_server_to_client: 0, packets_client_to_server: 0, packets_server_to_client: 0, connections_active: 0,
            connections_opened: 0, status: "NoStatus", first_seen_ms: 0, last_seen_ms: 0 };
          edges.set(edgeKey(d), e);
        }
        // A vanished edge is drawn with its figures of window A.
        if (k === "vanished" && e._a) Object.assign(e, e._a);
        e.diff = k;
        for (const f of ["status_a", "status_b", "bytes_a", "bytes_b", "factor"]) if (d[f] !== undefined) e[f] = d[f];
      }
    }
    for (const e of edges.values()) {
      delete e._a;
      for (const id of [e.source, e.target]) {
        if (!nodes.has(id)) nodes.set(id, { id, type: "flows.external", name: id, payload: {}, last_seen_ms: 0 });
      }
    }
    return { nodes: [...nodes.values()], edges: [...edges.values()], from_ms: gb.from_ms, to_ms: gb.to_ms, truncated: ga.truncated || gb.truncated };
  }

  // The list of changes (endpoints, then edges), each row focusing its item.
  function renderDiff() {
    const box = $("diff-list");
    box.replaceChildren();
    $("diff-clear").disabled = !state.diff;
    if (!state.diff) return;
    const d = state.diff;
    const rows = [];
    for (const k of ["appeared", "vanished"]) for (const id of (d.endpoints || {})[k] || []) rows.push({ k, what: "endpoint", id });
    for (const k of ["appeared", "vanished", "worsened", "changed"]) for (const e of (d.edges || {})[k] || []) rows.push({ k, what: "edge", e });
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.className = "diff-row";
      tr.dataset.change = r.k;
      tr.dataset.what = r.what;
      if (r.what === "endpoint") {
        tr.dataset.id = r.id;
        tr.append(text("td", r.k), text("td", "endpoint"), text("td", nameOf(r.id)));
        tr.addEventListener("click", () => focusEndpoint(r.id));
      } else {
        const e = r.e;
        tr.dataset.source = e.source;
        tr.dataset.target = e.destination;
        tr.dataset.service = service(e);
        const note = r.k === "worsened" ? " (" + e.status_a + " → " + e.status_b + ")"
          : r.k === "changed" ? " (" + fmtBytes(e.bytes_a) + " → " + fmtBytes(e.bytes_b) + ")" : "";
        tr.append(text("td", r.k), text("td", service(e)), text("td", nameOf(e.source) + " → " + nameOf(e.destination) + note));
        tr.addEventListener("click", () => focusEndpoint(e.destination));
      }
      box.append(tr);
    }
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = text("td", "Nothing changed between the two windows.", "empty");
      td.colSpan = 3;
      tr.append(td);
      box.append(tr);
    }
    $("diff-count").textContent = String(rows.length);
  }

  function clearDiff() {
    state.diff = null;
    delete document.body.dataset.diff;
    $("diff-status").textContent = "";
    $("diff-count").textContent = "0";
    lastKey = "";
    load();
  }

  // ---------------------------------------------------------------- wiring
  for (const id of ["since", "protocol"]) $(id).addEventListener("change", () => { lastKey = ""; load(); });
  $("group").addEventListener("change", () => { lastKey = ""; render(); });
  $("noise").addEventListener("change", () => render());
  $("port").addEventListener("input", () => { lastKey = ""; clearTimeout(timer); timer = setTimeout(load, 300); });
  for (const id of ["from", "to"]) {
    $(id).addEventListener("change", () => { lastKey = ""; load(); });
    $(id).addEventListener("keydown", (ev) => { if (ev.key === "Enter") { lastKey = ""; load(); } });
  }
  $("live").addEventListener("click", () => { $("from").value = ""; $("to").value = ""; lastKey = ""; load(); });
  $("find").addEventListener("keydown", (ev) => { if (ev.key === "Enter") find($("find").value); });
  $("expand-all").addEventListener("click", () => setAll(true));
  $("collapse-all").addEventListener("click", () => setAll(false));
  $("diff-run").addEventListener("click", compare);
  $("diff-clear").addEventListener("click", clearDiff);

  // For tests and the benchmark: the drawn graph and the time the last
  // search was answered (performance.now()).
  window.flowmap = { cy: () => cy, state, renderedAt: null, answeredAt: null, find };
  // A link can open a past window: /?from=-2h&to=-1h (any form the time
  // fields take).
  const linked = new URLSearchParams(location.search);
  for (const id of ["from", "to"]) if (linked.get(id)) $(id).value = linked.get(id);
  load();
})();
