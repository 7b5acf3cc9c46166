//! One map for the whole cluster (issue 15): agents of several nodes write
//! to one store, and a connection is counted once (the rule in
//! src/sinks/store/cluster.rs and the README, "Counted once across
//! nodes"). First the rule on the rows of two Kubernetes nodes (SQLite and
//! a real PostgreSQL); then two real agents in two namespaces-as-nodes
//! writing to one real PostgreSQL, read through `flowmap serve` as an
//! unprivileged user, `top`, `graph` and `diff`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use flowmap::enrich::{Endpoint, EndpointKind, Resolve};
use flowmap::flow::FlowRecord;
use flowmap::graph::Graph;
use flowmap::sinks::store::{self, EdgeRow, Location, Store, Window};
use flowmap::status::Status;
use flowmap_testkit::records::{at, record};
use flowmap_testkit::tempdir::TempDir;

/// Two pods on two nodes, a Service, an outside client.
struct Cluster;

fn pod(name: &str, node: &str, ip: IpAddr) -> Endpoint {
    let mut e = Endpoint::new(
        format!("uid-default-kubernetes.pod-{name}"),
        EndpointKind::Pod,
        name.into(),
        vec![ip],
    );
    e.namespace = Some("default".into());
    e.node = Some(node.into());
    e
}

impl Resolve for Cluster {
    fn endpoint(&self, ip: IpAddr, _at: SystemTime) -> Endpoint {
        match ip.to_string().as_str() {
            "10.1.0.5" => pod("client", "node-1", ip),
            "10.2.0.7" => pod("server", "node-2", ip),
            "10.96.0.10" => Endpoint::new(
                "uid-default-kubernetes.service-svc".into(),
                EndpointKind::Service,
                "svc".into(),
                vec![ip],
            ),
            _ => Endpoint::new(
                format!("ds-flows.external-{ip}"),
                EndpointKind::External,
                ip.to_string(),
                vec![ip],
            ),
        }
    }
    fn named_external(&self, name: &str) -> Endpoint {
        Endpoint::new(
            format!("ds-flows.external-{name}"),
            EndpointKind::External,
            name.into(),
            Vec::new(),
        )
    }
}

fn tcp(src: (&str, u16), dst: (&str, u16), t: u64, c2s: (u64, u64), s2c: (u64, u64)) -> FlowRecord {
    FlowRecord {
        opened: true,
        ..record("tcp", src, dst, t, c2s, s2c)
    }
}

fn write(s: &mut Store, node: &str, from: u64, recs: &[FlowRecord]) {
    s.set_agent(store::Agent {
        node: node.into(),
        instance_id: format!("{node}-instance"),
    });
    let mut g = Graph::build(recs, &Cluster);
    flowmap::status::apply(&mut g, &Default::default());
    s.write("ds", at(from), at(from + 30), &g, &[]).unwrap();
}

/// (client, server, port) → (packets c2s, bytes c2s, packets s2c, bytes s2c, node, seen by).
type Seen = BTreeMap<(String, String, u16), ([u64; 4], String, Vec<String>)>;

fn seen(edges: &[EdgeRow]) -> Seen {
    let short = |id: &str| id.rsplit('-').next().unwrap().to_string();
    edges
        .iter()
        .map(|e| {
            (
                (short(&e.source), short(&e.target), e.port),
                (
                    [
                        e.packets_client_to_server,
                        e.bytes_client_to_server,
                        e.packets_server_to_client,
                        e.bytes_server_to_client,
                    ],
                    e.node.clone(),
                    e.seen_by.clone(),
                ),
            )
        })
        .collect()
}

fn check_rule(loc: &Location) {
    let mut s = Store::open(loc).unwrap();
    // node-1 runs the client pod: it sees the direct connection, the
    // Service connection before and after DNAT (client → svc, svc →
    // server), and an outside client of its pod.
    write(
        &mut s,
        "node-1",
        0,
        &[
            tcp(
                ("10.1.0.5", 40000),
                ("10.2.0.7", 8080),
                1,
                (10, 1000),
                (8, 800),
            ),
            tcp(
                ("10.1.0.5", 40001),
                ("10.96.0.10", 80),
                1,
                (5, 500),
                (4, 400),
            ),
            tcp(
                ("10.1.0.5", 40001),
                ("10.2.0.7", 8443),
                1,
                (5, 500),
                (4, 400),
            ),
            tcp(
                ("203.0.113.9", 5555),
                ("10.1.0.5", 22),
                1,
                (3, 300),
                (2, 200),
            ),
        ],
    );
    // node-2 runs the server pod: the same direct connection, the Service
    // connection after DNAT only (pod → pod), and its own outside client.
    write(
        &mut s,
        "node-2",
        0,
        &[
            tcp(
                ("10.1.0.5", 40000),
                ("10.2.0.7", 8080),
                1,
                (10, 1000),
                (8, 800),
            ),
            tcp(
                ("10.1.0.5", 40001),
                ("10.2.0.7", 8443),
                1,
                (5, 500),
                (4, 400),
            ),
            tcp(
                ("203.0.113.9", 6666),
                ("10.2.0.7", 8080),
                1,
                (7, 700),
                (6, 600),
            ),
        ],
    );
    let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let expected: Seen = [
        (
            ("client", "server", 8080),
            ([10, 1000, 8, 800], "node-1", n(&["node-1", "node-2"])),
        ),
        (
            ("client", "svc", 80),
            ([5, 500, 4, 400], "node-1", n(&["node-1"])),
        ),
        (
            ("svc", "server", 8443),
            ([5, 500, 4, 400], "node-1", n(&["node-1"])),
        ),
        (
            ("203.0.113.9", "client", 22),
            ([3, 300, 2, 200], "node-1", n(&["node-1"])),
        ),
        (
            ("203.0.113.9", "server", 8080),
            ([7, 700, 6, 600], "node-2", n(&["node-2"])),
        ),
    ]
    .into_iter()
    .map(|((a, b, p), (c, node, by))| ((a.into(), b.into(), p), (c, node.into(), by)))
    .collect();
    let edges = s.edges(at(0)).unwrap();
    assert_eq!(seen(&edges), expected);
    // Every edge carries traffic of its latest interval: Green.
    let live = Window {
        from_ms: flowmap::sinks::store::unix_ms(at(0)),
        to_ms: i64::MAX,
        live: true,
    };
    let (edges, truncated) = s.edges_in(&live, None).unwrap();
    assert!(!truncated);
    assert!(
        edges.iter().all(|e| e.health.status == Status::Green),
        "{edges:?}"
    );
    // node-1's next interval has the Service connection only: in the live
    // view its other edges are idle (NoStatus); a past window keeps the
    // worst status of its intervals.
    write(
        &mut s,
        "node-1",
        30,
        &[tcp(
            ("10.1.0.5", 40001),
            ("10.96.0.10", 80),
            31,
            (5, 500),
            (4, 400),
        )],
    );
    let status = |edges: &[EdgeRow], src: &str, port: u16| {
        edges
            .iter()
            .find(|e| e.source.ends_with(src) && e.port == port)
            .map(|e| e.health.status)
            .unwrap()
    };
    let (edges, _) = s.edges_in(&live, None).unwrap();
    assert_eq!(status(&edges, "client", 80), Status::Green);
    assert_eq!(status(&edges, "client", 8080), Status::NoStatus);
    // node-2 wrote no later interval: its edges are not idle.
    assert_eq!(status(&edges, "203.0.113.9", 8080), Status::Green);
    let past = Window::between(
        flowmap::sinks::store::unix_ms(at(0)),
        flowmap::sinks::store::unix_ms(at(60)),
    );
    let (edges, _) = s.edges_in(&past, None).unwrap();
    assert_eq!(status(&edges, "client", 8080), Status::Green);
    // The agents of the window.
    let agents: Vec<(String, String, i64)> = s
        .agents(&past)
        .unwrap()
        .into_iter()
        .map(|a| (a.node, a.instance_id, a.last_interval_end_ms))
        .collect();
    assert_eq!(
        agents,
        vec![
            ("node-1".into(), "node-1-instance".into(), 1_800_000_060_000),
            ("node-2".into(), "node-2-instance".into(), 1_800_000_030_000)
        ]
    );
}

#[test]
fn the_cluster_rule_on_sqlite() {
    let dir = TempDir::new("cluster-rule");
    check_rule(&Location::Sqlite(dir.path().join("f.db")));
}

/// The map's bounded read asks for two (edge, agent) rows per edge kept;
/// when the busiest rows are ones the rule leaves out (the server's node's
/// view of connections whose client's node has an agent), it asks for
/// four, and the map still has the busiest edges.
#[test]
fn the_bounded_map_reads_more_rows_when_the_rule_leaves_rows_out() {
    let dir = TempDir::new("cluster-bounded");
    let mut s = Store::open(&Location::Sqlite(dir.path().join("f.db"))).unwrap();
    let dropped: Vec<FlowRecord> = (0..3u16)
        .map(|i| {
            tcp(
                ("10.1.0.5", 40000 + i),
                ("10.2.0.7", 9000 + i),
                1,
                (10, 100_000),
                (1, 100),
            )
        })
        .collect();
    write(&mut s, "node-2", 0, &dropped);
    write(
        &mut s,
        "node-1",
        0,
        &[
            tcp(
                ("10.1.0.5", 41000),
                ("10.96.0.10", 80),
                1,
                (5, 500),
                (4, 400),
            ),
            tcp(
                ("10.1.0.5", 41001),
                ("10.96.0.10", 81),
                1,
                (3, 300),
                (2, 200),
            ),
        ],
    );
    let v =
        flowmap::serve::view::graph_bounded(&mut s, &Window::since(at(0)), &Default::default(), 2)
            .unwrap();
    let got: Vec<(String, u16, u64)> = v
        .edges
        .iter()
        .map(|e| {
            (
                e.target.rsplit('-').next().unwrap().to_string(),
                e.port,
                e.bytes(),
            )
        })
        .collect();
    assert_eq!(got, [("svc".into(), 80, 900), ("svc".into(), 81, 500)]);
    assert!(!v.truncated);
    // One edge asked for: the busiest, and there were more.
    let v =
        flowmap::serve::view::graph_bounded(&mut s, &Window::since(at(0)), &Default::default(), 1)
            .unwrap();
    assert_eq!(v.edges.len(), 1);
    assert_eq!((v.edges[0].port, v.edges[0].bytes()), (80, 900));
    assert!(v.truncated);
}

#[test]
fn the_cluster_rule_on_postgres() {
    if !flowmap_testkit::net::privileged("the_cluster_rule_on_postgres") {
        return;
    }
    let Some(pg) = flowmap_testkit::postgres::Pg::start("the_cluster_rule_on_postgres") else {
        return;
    };
    check_rule(&Location::Postgres(pg.connection_string()));
}

// ---------------------------------------------------------------------
// Real agents, one real PostgreSQL.

use std::net::UdpSocket;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flowmap_testkit::agent::{http_get, Agent};
use flowmap_testkit::net::{privileged_serial, Netns};
use flowmap_testkit::postgres::Pg;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());
const BIN: &str = env!("CARGO_BIN_EXE_flowmap");
/// UDP payload sizes per exchange; each is answered with 50 bytes.
const SIZES: [usize; 5] = [100, 200, 300, 400, 500];
const HDR: u64 = 14 + 20 + 8;

fn agent_config(ds: &str, conn: &str) -> String {
    format!(
        "coordimap:
  database:
    driver: postgres
    connection_string: \"{conn}\"
  data_sources:
    - type: flows
      data_source_id: {ds}
      config:
        - name: interface_name
          value: all
        - name: crawl_interval
          value: 1s
"
    )
}

fn start_agent(ns: &Netns, node: &str, ds: &str, conn: &str) -> Agent {
    Agent::builder(BIN)
        .config(&agent_config(ds, conn))
        .netns(ns)
        .env("NODE_NAME", node)
        .output("none")
        .no_web()
        .start()
        .unwrap()
}

/// Datagrams of SIZES from namespace `from` to `to`'s `addr:port`, each
/// answered with 50 bytes.
fn exchange(from: &Netns, to: &Netns, addr: &str, port: u16) {
    let bind = addr.to_string();
    let server = to.spawn_in(move || {
        let s = UdpSocket::bind((bind.as_str(), port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 2048];
        for _ in SIZES {
            let (_, peer) = s.recv_from(&mut buf).unwrap();
            s.send_to(&[7u8; 50], peer).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let dst = addr.to_string();
    from.run_in(move || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 128];
        for n in SIZES {
            c.send_to(&vec![1u8; n], (dst.as_str(), port)).unwrap();
            assert_eq!(c.recv(&mut buf).unwrap(), 50);
        }
    })
    .unwrap();
    server.join().unwrap().unwrap();
}

/// A child process killed when dropped (also when the test fails).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn expected() -> [u64; 4] {
    let sent: u64 = SIZES.iter().map(|s| HDR + *s as u64).sum();
    let n = SIZES.len() as u64;
    [n, sent, n, (HDR + 50) * n]
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The edge of a graph JSON (`/api/graph` or `flowmap graph`).
fn edge<'a>(g: &'a Value, source: &str, target: &str, port: u16) -> Option<&'a Value> {
    g["edges"]
        .as_array()?
        .iter()
        .find(|e| e["source"] == source && e["target"] == target && e["port"] == port)
}

fn counts(e: &Value) -> [u64; 4] {
    let n = |k: &str| e[k].as_u64().unwrap_or(0);
    [
        n("packets_client_to_server"),
        n("bytes_client_to_server"),
        n("packets_server_to_client"),
        n("bytes_server_to_client"),
    ]
}

/// `flowmap <args>` as the unprivileged user `nobody`: success and output.
fn as_nobody(args: &[&str]) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", BIN])
        .args(args)
        .env_remove("COORDIMAP_CONFIG_PATH")
        .current_dir("/")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn two_agents_one_postgres_one_map() {
    let Some(_g) = privileged_serial("two_agents_one_postgres_one_map", &SERIAL) else {
        return;
    };
    let Some(pg) = Pg::start("two_agents_one_postgres_one_map") else {
        return;
    };
    // Node A, node B joined by a veth (10.77.0.1 — 10.77.0.2), and behind
    // A a peer without an agent (10.78.0.2).
    let a = Netns::builder().no_link().build().unwrap();
    let b = Netns::builder()
        .host_in(&a)
        .v4("10.77.0.1", "10.77.0.2", 24)
        .no_v6()
        .build()
        .unwrap();
    let c = Netns::builder()
        .host_in(&a)
        .v4("10.78.0.1", "10.78.0.2", 24)
        .no_v6()
        .build()
        .unwrap();
    let conn = pg.socket_connection_string();
    let agent_a = start_agent(&a, "node-a", "a", &conn);
    let agent_b = start_agent(&b, "node-b", "b", &conn);
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = flowmap::sinks::store::unix_ms(SystemTime::now());
    exchange(&a, &b, "10.77.0.2", 5300);
    exchange(&c, &a, "10.78.0.1", 5301);

    // The hub, as nobody, over TCP, with a role that may only read (the
    // agents made the schema and its indexes).
    let mut admin = postgres::Client::connect(&pg.connection_string(), postgres::NoTls).unwrap();
    wait_for("the agents' schema", 30, || {
        admin
            .query_one("SELECT to_regclass('edge_live') IS NOT NULL", &[])
            .ok()
            .and_then(|r| r.get::<_, bool>(0).then_some(()))
    });
    admin
        .batch_execute(
            "CREATE ROLE hub LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO hub;
             ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO hub;
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;",
        )
        .unwrap();
    let port = flowmap_testkit::net::free_port();
    let listen = format!("127.0.0.1:{port}");
    let db = pg.connection_string().replace("user=postgres", "user=hub");
    let hub = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", BIN])
        .args(["serve", "--database", &db, "--listen", &listen])
        .current_dir("/")
        .spawn()
        .unwrap();
    let _hub = Killed(hub);
    let host = flowmap::enrich::host::hostname();
    let (ha, hb) = (
        format!("a-flows.host-{host}"),
        format!("b-flows.host-{host}"),
    );
    let peer_c = "a-flows.external-10.78.0.2";
    let mut last = String::new();
    let end = Instant::now() + Duration::from_secs(30);
    let graph = wait_for("both edges on the hub", 35, || {
        let (code, body) = http_get(port, "/api/graph?since=15m&protocol=udp").ok()?;
        assert!(
            Instant::now() < end,
            "{code} {last}\n{}\n{}",
            agent_a.stderr(),
            agent_b.stderr()
        );
        last = body.clone();
        let g: Value = serde_json::from_str(&body).ok()?;
        let ok = code == 200
            && edge(&g, &ha, &hb, 5300).is_some_and(|e| counts(e) == expected())
            && edge(&g, peer_c, &ha, 5301).is_some_and(|e| counts(e) == expected());
        ok.then_some(g)
    });
    // A → B is one edge between the two hosts, counted once (both agents
    // saw it), not two half-edges to external addresses.
    let ab = edge(&graph, &ha, &hb, 5300).unwrap();
    assert_eq!(ab["node"], "node-a");
    assert_eq!(ab["seen_by"], serde_json::json!(["node-a", "node-b"]));
    let cb = edge(&graph, peer_c, &ha, 5301).unwrap();
    assert_eq!(cb["seen_by"], serde_json::json!(["node-a"]));
    let udp: Vec<&Value> = graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["port"] == 5300 || e["port"] == 5301)
        .collect();
    assert_eq!(udp.len(), 2, "{graph:#}");
    let agents: Vec<&str> = graph["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["node"].as_str().unwrap())
        .collect();
    assert_eq!(agents, vec!["node-a", "node-b"]);

    let (code, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, metrics) = http_get(port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("flowmap_hub_agents 2\n"), "{metrics}");
    assert!(metrics.contains("flowmap_hub_store_up 1\n"), "{metrics}");

    // top, graph and diff against the same store, as nobody.
    let (ok, top) = as_nobody(&["top", "--database", &db, "--since", "15m"]);
    assert!(ok, "{top}");
    let line = top
        .lines()
        .find(|l| l.contains("udp/5300"))
        .unwrap_or_else(|| panic!("{top}"));
    assert!(
        line.contains(&host) && line.contains(&format!(" {} ", expected()[1] + expected()[3])),
        "{top}"
    );
    let (ok, out) = as_nobody(&[
        "graph",
        "--database",
        &db,
        "--since",
        "15m",
        "--format",
        "json",
    ]);
    assert!(ok, "{out}");
    let g: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(counts(edge(&g, &ha, &hb, 5300).unwrap()), expected());
    let (ok, out) = as_nobody(&[
        "diff",
        "--database",
        &db,
        "--a-from",
        "-2h",
        "--a-to",
        "-1h",
        "--b-from",
        &t0.saturating_sub(1000).to_string(),
        "--b-to",
        "now",
        "--format",
        "json",
    ]);
    assert!(ok, "{out}");
    let d: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        d["edges"]["appeared"].as_array().unwrap().contains(
            &serde_json::json!({"source": ha, "destination": hb, "protocol": "udp", "port": 5300})
        ),
        "{d:#}"
    );
    assert_eq!(d["edges"]["vanished"], serde_json::json!([]));
    assert!(d["endpoints"]["appeared"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(hb)));
    // The same through the API (times in Unix ms).
    let now = flowmap::sinks::store::unix_ms(SystemTime::now());
    let hour = 3_600_000;
    let (code, body) = http_get(
        port,
        &format!(
            "/api/diff?a_from={}&a_to={}&b_from={}&b_to={now}",
            now - 2 * hour,
            now - hour,
            t0 - 1000
        ),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let api: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(api["edges"]["appeared"], d["edges"]["appeared"]);
    assert_eq!(api["b"]["to"], now);
    let (code, body) = http_get(port, "/api/diff?a_from=1&a_to=2&b_from=3").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (400, r#"{"error":"b_to: required (Unix milliseconds)"}"#)
    );
    agent_a.stop().unwrap();
    agent_b.stop().unwrap();
}
