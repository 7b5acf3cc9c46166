//! `flowmap-bench scale page`: how long the map page takes to become
//! usable at cluster size in a real headless Chromium.
//!
//! A synthetic cluster (testkit `mapstore`: namespaces of ten Deployments
//! each) with `endpoints` pods and `edges` distinct edges is written into
//! a SQLite store through the agent's write path (resolve, build, judge,
//! `Store::write`); `flowmap serve --database` serves that store
//! (`--web-max-edges` as large as the edges, so the page gets all of
//! them); Chromium opens the page through WebDriver.
//!
//! **Usable** is the page's own clock (`performance.now()`, from the start
//! of the navigation) at the moment it has answered a search: the first
//! graph of the window has been fetched, grouped and drawn (collapsed by
//! default at this size), then the harness, as soon as it sees the page
//! loaded, types a pod's name and Enter into the find box, and the page
//! has found the pod, opened its groups, drawn them, and selected and
//! centred it. The harness's own polling (20 ms) and WebDriver's typing
//! are inside that time, so it is an upper bound. Each round is a fresh
//! navigation; the first one starts with an empty browser cache.

use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};

use flowmap::flow::Failure;
use flowmap::sinks::store::{Location, Store};
use flowmap_testkit::browser::{Browser, ENTER};
use flowmap_testkit::mapstore::{Conn, Served, SynthCluster};
use flowmap_testkit::tempdir::TempDir;

use crate::scale::flowmap_bin;

/// The synthetic cluster of `endpoints` pods: namespaces `team-NN` of ten
/// Deployments `svc-NN` each, about 250 pods per namespace.
fn workloads(endpoints: usize) -> Vec<(String, String, usize)> {
    let namespaces = endpoints.div_ceil(250).max(1);
    let n = namespaces * 10;
    (0..n)
        .map(|w| {
            (
                format!("team-{:02}", w / 10),
                format!("svc-{:03}", w),
                endpoints / n + usize::from(w < endpoints % n),
            )
        })
        .filter(|w| w.2 > 0)
        .collect()
}

/// `edges` distinct edges between the pods: edge i from pod i mod n to
/// another pod on port 8000 + i div n, one in 997 refused (Red).
fn conns(c: &SynthCluster, edges: usize) -> Vec<Conn> {
    let n = c.pods.len();
    (0..edges)
        .map(|i| {
            let client = i % n;
            let mut server = (i.wrapping_mul(7919) + 1 + i / n) % n;
            if server == client {
                server = (server + 1) % n;
            }
            let mut conn = Conn::tcp(
                c.pods[client].ip,
                c.pods[server].ip,
                8000 + (i / n) as u16,
                (2 + (i % 7) as u64, 200 + (i * 13 % 5000) as u64),
                (2 + (i % 5) as u64, 300 + (i * 29 % 90000) as u64),
            );
            if i % 997 == 0 {
                conn.failure = Some(Failure::Refused);
            }
            conn
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn page(endpoints: u32, edges: u32, rounds: u32, out: &mut dyn Write) -> Result<()> {
    let (endpoints, edges) = (endpoints.max(2) as usize, edges as usize);
    let state = TempDir::new("bench-page");
    let now = SystemTime::now();
    let spec = workloads(endpoints);
    let spec: Vec<(&str, &str, usize)> = spec
        .iter()
        .map(|(a, b, n)| (a.as_str(), b.as_str(), *n))
        .collect();
    let c = SynthCluster::new(&spec, now - Duration::from_secs(3600))?;
    let conns = conns(&c, edges);
    {
        let mut s = Store::open(&Location::Sqlite(state.path().join("flowmap.db")))?;
        let end = now - Duration::from_secs(120);
        c.write(&mut s, end - Duration::from_secs(30), end, &conns)
            .context("writing the store")?;
    }
    let a = Served::start(
        flowmap_bin(),
        &state.path().join("flowmap.db"),
        &["--web-max-edges", &edges.max(1).to_string()],
    )?;
    let url = format!("http://127.0.0.1:{}/", a.port);
    let b = Browser::start(1400, 900)?;
    let target = &c.pods[c.pods.len() / 2];
    let (mut usable, mut rendered) = (Vec::new(), Vec::new());
    let mut last = serde_json::Value::Null;
    for _ in 0..rounds.max(1) {
        b.goto(&url)?;
        b.wait_for(
            "return document.body.dataset.loaded === 'true';",
            Duration::from_secs(60),
        )?;
        b.type_into("#find", &format!("{}{ENTER}", target.name))?;
        b.wait_for(
            &format!("return document.body.dataset.found === {:?};", target.id),
            Duration::from_secs(60),
        )?;
        let v = b.eval(
            "const f = window.flowmap, cy = f.cy();
             const api = performance.getEntriesByType('resource').find((r) => r.name.includes('/api/graph'));
             return { usable: f.answeredAt, rendered: f.renderedAt, nodes: f.state.raw.nodes.length,
                      edges: f.state.raw.edges.length, truncated: !!f.state.raw.truncated,
                      drawn_nodes: cy.nodes().length, drawn_edges: cy.edges().length,
                      api_ms: api ? api.responseEnd - api.startTime : -1, api_bytes: api ? api.encodedBodySize : -1 };",
        )?;
        usable.push(v["usable"].as_f64().context("no answer time")?);
        rendered.push(v["rendered"].as_f64().context("no render time")?);
        last = v;
    }
    if last["edges"].as_u64() != Some(edges as u64) || last["truncated"].as_bool() != Some(false) {
        bail!("the page got {} of {edges} edges", last["edges"]);
    }
    let max = usable.iter().cloned().fold(0.0, f64::max);
    writeln!(
        out,
        "bench scale page endpoints={} edges={} usable_ms={:.0} usable_ms_max={:.0} rendered_ms={:.0} api_ms={:.0} api_bytes={} api_endpoints={} drawn_nodes={} drawn_edges={} rounds={}",
        c.pods.len(),
        edges,
        median(&mut usable),
        max,
        median(&mut rendered),
        last["api_ms"].as_f64().unwrap_or(-1.0),
        last["api_bytes"],
        last["nodes"],
        last["drawn_nodes"],
        last["drawn_edges"],
        rounds.max(1)
    )?;
    drop(b);
    drop(a);
    Ok(())
}
