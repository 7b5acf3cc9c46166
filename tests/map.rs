//! The map page at cluster size, in a real headless Chromium driven
//! through WebDriver, served by `flowmap serve --database` over a real
//! store that the agent's own write path filled with a synthetic cluster
//! (testkit `mapstore`): groups collapsed by default with exact endpoint
//! counts, expanding a namespace and a workload, edges aggregated between
//! collapsed ends with exact totals and the worst status, finding an
//! endpoint, hiding a namespace and the system noise; a past window, and
//! the exact changes between two windows (/api/diff) on the page.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use flowmap::flow::Failure;
use flowmap::sinks::store::{Location, Store};
use flowmap_testkit::browser::{self, Browser, ENTER};
use flowmap_testkit::mapstore::{Conn, Served, SynthCluster};
use flowmap_testkit::tempdir::TempDir;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

const WORKLOADS: &[(&str, &str, usize)] = &[
    ("shop", "web", 30),
    ("shop", "db", 2),
    ("billing", "api", 30),
    ("kube-system", "coredns", 2),
];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The live window's connections (one interval a few minutes ago).
fn live_conns(c: &SynthCluster) -> Vec<Conn> {
    let p = |ns: &str, n: &str| c.pod(ns, n).ip;
    let mut v = Vec::new();
    for i in 0..30u64 {
        let web = p("shop", &format!("web-{i}"));
        let api = p("billing", &format!("api-{i}"));
        // web → db-0 (inside shop).
        v.push(Conn::tcp(
            web,
            p("shop", "db-0"),
            5432,
            (10 + i, 1000 * (i + 1)),
            (5, 500),
        ));
        // web → api (shop → billing).
        v.push(Conn::tcp(web, api, 8080, (3, 300 + i), (2, 200)));
        // api → db-1 (billing → shop); the last one refused (Red).
        let mut back = Conn::tcp(api, p("shop", "db-1"), 5432, (4, 400), (4, 4000));
        if i == 29 {
            back.c2s = (1, 60);
            back.s2c = (1, 54);
            back.failure = Some(Failure::Refused);
        }
        v.push(back);
    }
    // shop → kube-system: DNS.
    for (w, d) in [("web-0", "coredns-0"), ("web-1", "coredns-1")] {
        v.push(Conn {
            protocol: "udp",
            ..Conn::tcp(p("shop", w), p("kube-system", d), 53, (1, 80), (1, 120))
        });
    }
    // The node → a pod on it: a kubelet health probe.
    v.push(Conn::tcp(
        c.node_ip,
        p("shop", "web-0"),
        8080,
        (3, 180),
        (2, 140),
    ));
    // billing → an external peer.
    v.push(Conn::tcp(
        p("billing", "api-0"),
        ip("192.0.2.99"),
        443,
        (5, 5000),
        (5, 9000),
    ));
    v
}

/// A store with one interval of the live window.
fn store(state: &TempDir) -> SynthCluster {
    let now = SystemTime::now();
    let c = SynthCluster::new(WORKLOADS, now - Duration::from_secs(3 * 3600)).unwrap();
    let mut s = Store::open(&Location::Sqlite(state.path().join("flowmap.db"))).unwrap();
    let end = now - Duration::from_secs(240);
    c.write(&mut s, end - Duration::from_secs(60), end, &live_conns(&c))
        .unwrap();
    c
}

/// `flowmap serve` over the test's store.
fn serve(state: &TempDir) -> Served {
    Served::start(
        env!("CARGO_BIN_EXE_flowmap"),
        &state.path().join("flowmap.db"),
        &[],
    )
    .unwrap()
}

/// The drawn graph: nodes (id → data) and edges ((source, target) → data).
fn drawn(b: &Browser) -> (BTreeMap<String, Value>, BTreeMap<(String, String), Value>) {
    let v = b
        .eval(
            "const cy = window.flowmap.cy();
             return { nodes: cy.nodes().map((n) => n.data()), edges: cy.edges().map((e) => e.data()) };",
        )
        .unwrap();
    let nodes = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_string(), n.clone()))
        .collect();
    let mut edges = BTreeMap::new();
    for e in v["edges"].as_array().unwrap() {
        let k = (
            e["source"].as_str().unwrap().to_string(),
            e["target"].as_str().unwrap().to_string(),
        );
        assert!(
            edges.insert(k.clone(), e.clone()).is_none(),
            "two edges {k:?}"
        );
    }
    (nodes, edges)
}

/// (bytes, packets, connections, status) of a drawn edge.
fn totals(e: &Value) -> (u64, u64, u64, &str) {
    (
        e["bytes"].as_u64().unwrap(),
        e["packets"].as_u64().unwrap(),
        e["connections"].as_u64().unwrap(),
        e["status"].as_str().unwrap(),
    )
}

/// The rows of the groups overview: group id → endpoints.
fn overview(b: &Browser) -> BTreeMap<String, u64> {
    let v = b
        .eval("return [...document.querySelectorAll('tr.group-row')].map((r) => [r.dataset.group, Number(r.dataset.count)]);")
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_u64().unwrap()))
        .collect()
}

fn ids<'a>(m: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
    m.into_iter().map(String::as_str).collect()
}

#[test]
fn the_map_groups_finds_and_hides_at_cluster_size() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !browser::available("the_map_groups_finds_and_hides_at_cluster_size") {
        return;
    }
    let state = TempDir::new("map-store");
    let c = store(&state);
    let a = serve(&state);
    let b = Browser::start(1400, 900).unwrap();
    b.goto(&format!("http://127.0.0.1:{}/", a.port)).unwrap();
    b.wait_for(
        "return document.body.dataset.loaded === 'true';",
        Duration::from_secs(30),
    )
    .unwrap();

    // 64 pods (above 60 endpoints): every group starts collapsed; the
    // overview lists the top-level groups with their endpoints (pods with
    // traffic in the window; hosts and nodes: the node).
    let want: BTreeMap<String, u64> = [
        ("ext", 1),
        ("hosts", 1),
        ("ns:billing", 30),
        ("ns:kube-system", 2),
        ("ns:shop", 32),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), *n))
    .collect();
    assert_eq!(overview(&b), want);
    let (nodes, edges) = drawn(&b);
    assert_eq!(
        ids(nodes.keys()),
        ["ext", "hosts", "ns:billing", "ns:kube-system", "ns:shop"]
    );
    for (id, n) in &nodes {
        assert_eq!(n["count"].as_u64(), Some(want[id]), "{n}");
        assert_eq!(n["open"].as_bool(), Some(false), "{n}");
    }
    let node = c.node_id();
    let edge = |s: &str, t: &str| {
        totals(
            edges
                .get(&(s.to_string(), t.to_string()))
                .unwrap_or_else(|| panic!("no edge {s} → {t}: {:?}", edges.keys())),
        )
    };
    // Aggregated exactly: 30 web → api connections.
    let web_api_bytes: u64 = (0..30).map(|i| 300 + i + 200).sum();
    assert_eq!(
        edge("ns:shop", "ns:billing"),
        (web_api_bytes, 30 * 5, 30, "Green")
    );
    // 29 healthy api → db-1 and one refused: the worst status, Red.
    assert_eq!(
        edge("ns:billing", "ns:shop"),
        (29 * 4400 + 114, 29 * 8 + 2, 30, "Red")
    );
    assert_eq!(edge("ns:shop", "ns:kube-system"), (400, 4, 2, "Green"));
    assert_eq!(edge("hosts", "ns:shop"), (320, 5, 1, "Green"));
    assert_eq!(edge("ns:billing", "ext"), (14000, 10, 1, "Green"));
    assert_eq!(edges.len(), 5, "{:?}", edges.keys());

    // Expanding shop shows its workloads (collapsed), then web's pods.
    b.click("tr.group-row[data-group='ns:shop'] button.toggle")
        .unwrap();
    let (nodes, edges) = drawn(&b);
    let web = "wl:shop/Deployment/web";
    let db = "wl:shop/Deployment/db";
    assert_eq!(nodes["ns:shop"]["open"].as_bool(), Some(true));
    for (w, n) in [(web, 30), (db, 2)] {
        assert_eq!(nodes[w]["count"].as_u64(), Some(n), "{}", nodes[w]);
        assert_eq!(nodes[w]["parent"].as_str(), Some("ns:shop"));
    }
    let web_db: u64 = (0..30).map(|i| 1000 * (i + 1) + 500).sum();
    let e = &edges[&(web.to_string(), db.to_string())];
    assert_eq!(
        totals(e),
        (web_db, (0..30).map(|i| 15 + i).sum(), 30, "Green")
    );
    assert_eq!(
        totals(&edges[&("ns:billing".to_string(), db.to_string())]),
        (29 * 4400 + 114, 29 * 8 + 2, 30, "Red")
    );
    b.click(&format!("tr.group-row[data-group='{web}'] button.toggle"))
        .unwrap();
    let (nodes, edges) = drawn(&b);
    let pods: Vec<&str> = nodes
        .iter()
        .filter(|(_, n)| n["parent"].as_str() == Some(web))
        .map(|(id, _)| id.as_str())
        .collect();
    let mut want_pods: Vec<String> = (0..30)
        .map(|i| c.pod("shop", &format!("web-{i}")).id.clone())
        .collect();
    want_pods.sort();
    assert_eq!(pods, want_pods);
    // A pod's edge to a collapsed group carries that pod's connection only.
    let web7 = &c.pod("shop", "web-7").id;
    assert_eq!(
        totals(&edges[&(web7.clone(), db.to_string())]),
        (8500, 22, 1, "Green")
    );
    // The probe: the node (inside the collapsed hosts group) → web-0.
    let web0 = &c.pod("shop", "web-0").id;
    assert!(edges.contains_key(&("hosts".to_string(), web0.clone())));

    // Find: by name, the groups holding it open and it is selected.
    b.type_into("#find", &format!("api-17{ENTER}")).unwrap();
    let api17 = &c.pod("billing", "api-17").id;
    let found = b
        .wait_for(
            "return document.body.dataset.found;",
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(found.as_str(), Some(api17.as_str()));
    let sel = b
        .eval("return window.flowmap.cy().$(':selected').map((e) => e.id());")
        .unwrap();
    assert_eq!(sel, serde_json::json!([api17]));
    let (nodes, _) = drawn(&b);
    assert_eq!(nodes["ns:billing"]["open"].as_bool(), Some(true));
    assert_eq!(
        nodes[api17.as_str()]["parent"].as_str(),
        Some("wl:billing/Deployment/api")
    );
    // By ID, exactly.
    b.type_into("#find", &format!("{node}{ENTER}")).unwrap();
    b.wait_for(
        &format!("return document.body.dataset.found === {node:?};"),
        Duration::from_secs(10),
    )
    .unwrap();
    // Nothing found says so.
    b.type_into("#find", &format!("no-such-pod{ENTER}"))
        .unwrap();
    let txt = b
        .eval("return document.getElementById('find-result').textContent;")
        .unwrap();
    assert_eq!(txt.as_str(), Some("no endpoint matches \"no-such-pod\""));

    // Hide a namespace: it and its edges leave the map, not the overview.
    b.click("tr.group-row[data-group='ns:kube-system'] input.show")
        .unwrap();
    let (nodes, edges) = drawn(&b);
    assert!(
        !nodes.keys().any(|k| k.contains("kube-system")),
        "{:?}",
        nodes.keys()
    );
    assert!(!edges
        .keys()
        .any(|(s, t)| s.contains("kube-system") || t.contains("kube-system")));
    assert_eq!(overview(&b)["ns:kube-system"], 2);
    b.click("tr.group-row[data-group='ns:kube-system'] input.show")
        .unwrap();
    assert!(drawn(&b).0.contains_key("ns:kube-system"));

    // System noise: kube-system and the health probe go (the hosts group
    // is open since the node was found).
    let probe = (node.clone(), web0.clone());
    assert_eq!(totals(&drawn(&b).1[&probe]), (320, 5, 1, "Green"));
    b.click("#noise").unwrap();
    let (nodes, edges) = drawn(&b);
    assert!(!nodes.keys().any(|k| k.contains("kube-system")));
    assert!(nodes.contains_key(&node) && nodes.contains_key(web0));
    assert!(!edges.contains_key(&probe), "{:?}", edges.keys());
    let status = b
        .eval("return document.getElementById('status').textContent;")
        .unwrap();
    assert!(
        status.as_str().unwrap().contains("1 health probes hidden"),
        "{status}"
    );
    drop(b);
    drop(a);
}

/// Window A (two hours ago): the live connections, but api-1 talked to an
/// external peer that is gone in B, api-0 had not yet talked to
/// 192.0.2.99, api-29 → db-1 succeeded, and web-1 → db-0 carried 200
/// bytes instead of 2,500.
fn earlier_conns(c: &SynthCluster) -> Vec<Conn> {
    let p = |ns: &str, n: &str| c.pod(ns, n).ip;
    let mut v: Vec<Conn> = live_conns(c)
        .into_iter()
        .filter(|x| x.server != ip("192.0.2.99"))
        .collect();
    for x in v.iter_mut() {
        x.failure = None;
        if x.client == p("shop", "web-1") && x.server == p("shop", "db-0") {
            x.c2s = (2, 100);
            x.s2c = (1, 100);
        }
    }
    v.push(Conn::tcp(
        p("billing", "api-1"),
        ip("192.0.2.77"),
        443,
        (5, 700),
        (5, 900),
    ));
    v
}

/// The rows of the page's change list: (change, what, key).
fn diff_rows(b: &Browser) -> Vec<(String, String, String)> {
    let v = b
        .eval(
            "return [...document.querySelectorAll('tr.diff-row')].map((r) => [r.dataset.change, r.dataset.what,
               r.dataset.what === 'endpoint' ? r.dataset.id : r.dataset.source + ' > ' + r.dataset.target + ' ' + r.dataset.service]);",
        )
        .unwrap();
    let mut rows: Vec<(String, String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_str().unwrap().to_string(),
                r[2].as_str().unwrap().to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn the_map_shows_a_past_window_and_what_changed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !browser::available("the_map_shows_a_past_window_and_what_changed") {
        return;
    }
    let state = TempDir::new("map-store");
    let c = store(&state);
    {
        let mut s = Store::open(&Location::Sqlite(state.path().join("flowmap.db"))).unwrap();
        let end = SystemTime::now() - Duration::from_secs(7200);
        c.write(
            &mut s,
            end - Duration::from_secs(60),
            end,
            &earlier_conns(&c),
        )
        .unwrap();
    }
    let a = serve(&state);
    let b = Browser::start(1400, 900).unwrap();
    b.goto(&format!("http://127.0.0.1:{}/", a.port)).unwrap();
    b.wait_for(
        "return document.body.dataset.loaded === 'true';",
        Duration::from_secs(30),
    )
    .unwrap();
    let ext = |a: &str| format!("cluster-flows.external-{a}");
    let has =
        |id: &str| format!("return window.flowmap.state.raw.nodes.some((n) => n.id === {id:?});");
    assert_eq!(b.eval(&has(&ext("192.0.2.99"))).unwrap(), Value::Bool(true));
    assert_eq!(
        b.eval(&has(&ext("192.0.2.77"))).unwrap(),
        Value::Bool(false)
    );

    // A past window: two hours ago, the peer that vanished since.
    b.type_into("#to", "-118m").unwrap();
    b.type_into("#from", &format!("-125m{ENTER}")).unwrap();
    b.wait_for(&has(&ext("192.0.2.77")), Duration::from_secs(20))
        .unwrap();
    assert_eq!(
        b.eval(&has(&ext("192.0.2.99"))).unwrap(),
        Value::Bool(false)
    );
    let (_, edges) = drawn(&b);
    // web-1 → db-0 carried 200 bytes then: inside shop, so shop → billing
    // is unchanged, and billing → shop was all Green.
    assert_eq!(
        totals(&edges[&("ns:billing".to_string(), "ns:shop".to_string())]).3,
        "Green"
    );
    b.click("#live").unwrap();
    b.wait_for(&has(&ext("192.0.2.99")), Duration::from_secs(20))
        .unwrap();

    // What changed between A and B.
    for (id, t) in [
        ("#diff-a-from", "-125m"),
        ("#diff-a-to", "-118m"),
        ("#diff-b-from", "-10m"),
        ("#diff-b-to", "now"),
    ] {
        b.type_into(id, t).unwrap();
    }
    b.click("#diff-run").unwrap();
    b.wait_for(
        "return document.body.dataset.diff === 'true';",
        Duration::from_secs(20),
    )
    .unwrap();
    let pod = |ns: &str, n: &str| c.pod(ns, n).id.clone();
    let mut want = vec![
        ("appeared", "endpoint", ext("192.0.2.99")),
        ("vanished", "endpoint", ext("192.0.2.77")),
        (
            "appeared",
            "edge",
            format!(
                "{} > {} tcp/443",
                pod("billing", "api-0"),
                ext("192.0.2.99")
            ),
        ),
        (
            "vanished",
            "edge",
            format!(
                "{} > {} tcp/443",
                pod("billing", "api-1"),
                ext("192.0.2.77")
            ),
        ),
        (
            "worsened",
            "edge",
            format!(
                "{} > {} tcp/5432",
                pod("billing", "api-29"),
                pod("shop", "db-1")
            ),
        ),
        (
            "changed",
            "edge",
            format!(
                "{} > {} tcp/5432",
                pod("shop", "web-1"),
                pod("shop", "db-0")
            ),
        ),
    ]
    .into_iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c))
    .collect::<Vec<_>>();
    want.sort();
    assert_eq!(diff_rows(&b), want);
    // On the map (collapsed): the external group holds an appeared and a
    // vanished peer (appeared shows), billing → shop worsened, billing →
    // external appeared (stronger than the vanished edge beside it).
    let (nodes, edges) = drawn(&b);
    assert_eq!(nodes["ext"]["diff"].as_str(), Some("appeared"));
    assert_eq!(nodes["ext"]["count"].as_u64(), Some(2));
    let diff = |s: &str, t: &str| edges[&(s.to_string(), t.to_string())]["diff"].clone();
    assert_eq!(diff("ns:billing", "ns:shop"), "worsened");
    assert_eq!(diff("ns:billing", "ext"), "appeared");
    assert_eq!(diff("ns:shop", "ns:billing"), "");
    // B's figures, and A's for the edge that vanished.
    assert_eq!(
        totals(&edges[&("ns:billing".to_string(), "ext".to_string())]),
        (14000 + 1600, 20, 2, "Green")
    );
    drop(b);
    drop(a);
}
