//! The agent's listeners, through the binary: the map page and its API on
//! loopback by default, a bearer token off loopback (and no start without
//! one), the Host header checked against DNS rebinding, /metrics and
//! /healthz on a listener of their own, and store reads through a bounded
//! pool of kept connections that answers within its deadline (a real
//! PostgreSQL whose table the test locks) and reads a bounded number of
//! edges.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use flowmap::enrich::host::HostView;
use flowmap::enrich::server::ServerResolver;
use flowmap::flow::FlowRecord;
use flowmap::graph::Graph;
use flowmap::sinks::store::{Location, Store};
use flowmap_testkit::agent::{http_get, http_request, wait_until, Agent, AgentBuilder};
use flowmap_testkit::net::{privileged, Netns};
use flowmap_testkit::postgres::Pg;
use flowmap_testkit::records::record;
use flowmap_testkit::tempdir::TempDir;
use serde_json::Value;

const TOKEN: &str = "s3cr3t-web-token-0123456789";

/// The agent on the host end of `v`'s veth.
fn agent(v: &Netns) -> AgentBuilder {
    Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        .iface(&v.host)
        .output("none")
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
}

fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    http_request(addr, path, headers).unwrap()
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn the_map_listens_on_loopback_by_default() {
    if !privileged("the_map_listens_on_loopback_by_default") {
        return;
    }
    let v = Netns::new().unwrap();
    let a = agent(&v).default_listen().start().unwrap();
    assert_eq!(a.web_addr(), "127.0.0.1:9464".parse().unwrap());
    let (code, body) = http_get(9464, "/api/graph").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(9464, "/healthz").unwrap().0, 200);
    // Nothing on the node's other addresses.
    let host: IpAddr = v.host_v4.parse().unwrap();
    assert!(
        std::net::TcpStream::connect((host, 9464)).is_err(),
        "the map page answers on {host}"
    );
    let line = a.last_log("map page and API listening").unwrap();
    assert!(line.contains("http://127.0.0.1:9464/"), "{line}");
    assert!(line.contains("token=false"), "{line}");
}

#[test]
fn off_loopback_the_map_needs_a_token_and_metrics_listen_apart() {
    if !privileged("off_loopback_the_map_needs_a_token_and_metrics_listen_apart") {
        return;
    }
    let v = Netns::new().unwrap();
    // No token: no start, and the error says what to do.
    let err = agent(&v)
        .listen_on(&v.host_v4)
        .start()
        .err()
        .expect("an agent off loopback without a token must not start");
    let err = format!("{err:#}");
    assert!(err.contains("is not a loopback address"), "{err}");
    assert!(err.contains("--web-token-file"), "{err}");
    // Nor with an empty token file.
    let b = agent(&v).listen_on(&v.host_v4);
    let empty = b.file("empty-token", "\n");
    let err = format!(
        "{:#}",
        b.arg("--web-token-file")
            .arg(empty.to_str().unwrap())
            .start()
            .err()
            .unwrap()
    );
    assert!(err.contains("is empty"), "{err}");

    let b = agent(&v).listen_on(&v.host_v4).metrics_listen();
    let file = b.file("token", &format!("{TOKEN}\n"));
    let a = b
        .arg("--web-token-file")
        .arg(file.to_str().unwrap())
        .start()
        .unwrap();
    let web = a.web_addr();
    let host = web.to_string();
    let h = |auth: Option<&str>| -> Vec<(&str, String)> {
        let mut v = vec![("Host", host.clone())];
        if let Some(a) = auth {
            v.push(("Authorization", a.to_string()));
        }
        v
    };
    let call = |path: &str, auth: Option<&str>| {
        let hs = h(auth);
        let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        get(web, path, &hs)
    };
    for path in ["/", "/api/graph", "/assets/app.js"] {
        assert_eq!(call(path, None).0, 401, "{path} without a token");
        assert_eq!(call(path, Some("Bearer wrong")).0, 401, "{path}");
        assert_eq!(
            call(path, Some(&format!("Bearer {TOKEN}x"))).0,
            401,
            "{path}"
        );
        assert_eq!(call(path, Some(&format!("Basic {TOKEN}"))).0, 401, "{path}");
    }
    let (code, body) = call("/api/graph", Some(&format!("Bearer {TOKEN}")));
    assert_eq!(code, 200, "{body}");
    let g = json(&body);
    assert!(g["edges"].is_array() && g["nodes"].is_array(), "{body}");
    let (code, page) = call("/", Some(&format!("Bearer {TOKEN}")));
    assert_eq!(code, 200);
    assert!(page.contains("/assets/app.js"), "{page}");
    // /metrics and /healthz are not on the map's listener...
    assert_eq!(call("/metrics", Some(&format!("Bearer {TOKEN}"))).0, 404);
    assert_eq!(call("/healthz", Some(&format!("Bearer {TOKEN}"))).0, 404);
    // ...but on their own, without a token, and the map is not there.
    let m = a.metrics_port();
    assert_ne!(m, web.port());
    let (code, health) = http_get(m, "/healthz").unwrap();
    assert_eq!((code, json(&health)["status"].as_str()), (200, Some("ok")));
    let (code, metrics) = http_get(m, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("flowmap_build_info"), "{metrics}");
    assert_eq!(http_get(m, "/api/graph").unwrap().0, 404);
    assert_eq!(http_get(m, "/").unwrap().0, 404);
    let line = a.last_log("map page and API listening").unwrap();
    assert!(line.contains("token=true"), "{line}");
    let (_, log) = a.stop().unwrap();
    assert!(!log.contains(TOKEN), "the token reached the log:\n{log}");
}

#[test]
fn the_host_header_is_checked() {
    if !privileged("the_host_header_is_checked") {
        return;
    }
    let v = Netns::new().unwrap();
    let a = agent(&v)
        .args(&["--web-host", "map.example,flowmap.internal"])
        .start()
        .unwrap();
    let web = a.web_addr();
    let p = web.port();
    let ok = [
        format!("127.0.0.1:{p}"),
        "127.0.0.1".to_string(),
        format!("localhost:{p}"),
        format!("[::1]:{p}"),
        // A port-forward changes the port: names are checked, not ports.
        "localhost:8080".to_string(),
        "map.example".to_string(),
        format!("FlowMap.Internal:{p}"),
    ];
    for host in &ok {
        for path in ["/", "/api/graph", "/metrics", "/healthz"] {
            let (code, body) = get(web, path, &[("Host", host)]);
            assert_eq!(code, 200, "Host {host} {path}: {body}");
        }
    }
    // A rebinding attacker's page sends its own name.
    let bad = [
        format!("attacker.example:{p}"),
        "map.example.attacker.example".to_string(),
        format!("{}:{p}", v.host_v4),
    ];
    for host in &bad {
        for path in ["/", "/api/graph", "/metrics", "/healthz"] {
            let (code, body) = get(web, path, &[("Host", host)]);
            assert_eq!(code, 421, "Host {host} {path}: {body}");
        }
    }
    let (code, body) = get(web, "/api/graph", &[]);
    assert_eq!(
        (code, json(&body)["error"].as_str()),
        (421, Some("a Host header is required"))
    );
}

/// Three edges of one interval that ended now, from this host (`ds`'s host
/// endpoint is the agent's own).
fn prepared_store(path: &std::path::Path, ds: &str) {
    let h = HostView {
        hostname: flowmap::enrich::host::hostname(),
        addrs: vec!["10.0.0.1".parse().unwrap()],
        ..Default::default()
    };
    let r = ServerResolver {
        data_source_id: ds,
        host: &h,
    };
    let rec = |dst: &str, port: u16, proto: &'static str, c2s: u64, s2c: u64| -> FlowRecord {
        FlowRecord {
            opened: true,
            ..record(
                proto,
                ("10.0.0.1", 40000),
                (dst, port),
                0,
                (c2s / 100, c2s),
                (s2c / 100, s2c),
            )
        }
    };
    let g = Graph::build(
        &[
            rec("192.0.2.10", 443, "tcp", 1000, 50000),
            rec("192.0.2.53", 53, "udp", 100, 300),
            rec("192.0.2.20", 80, "tcp", 3000, 3000),
        ],
        &r,
    );
    let mut s = Store::open(&Location::Sqlite(path.to_path_buf())).unwrap();
    let now = SystemTime::now();
    s.write(
        ds,
        now - Duration::from_secs(30),
        now,
        &g,
        &[r.host_endpoint()],
    )
    .unwrap();
}

/// File descriptors of `pid` open on `path` itself.
fn fds_on(pid: u32, path: &std::path::Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t == path)
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_map_reads_the_busiest_edges_through_kept_connections() {
    if !privileged("the_map_reads_the_busiest_edges_through_kept_connections") {
        return;
    }
    let v = Netns::new().unwrap();
    let state = TempDir::new("web-store");
    let db = state.path().join("flowmap.db");
    prepared_store(&db, "test");
    let a = agent(&v)
        .state_dir(state.path())
        .args(&["--web-max-edges", "2", "--web-timeout", "1s"])
        .start()
        .unwrap();
    let port = a.port();
    let ext = |ip: &str| format!("test-flows.external-{ip}");

    // The two busiest edges of the window, and it says there were more.
    let (code, body) = http_get(port, "/api/graph?since=15m").unwrap();
    assert_eq!(code, 200, "{body}");
    let g = json(&body);
    let edges: Vec<(String, u64, u64)> = g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["target"].as_str().unwrap().to_string(),
                e["port"].as_u64().unwrap(),
                e["bytes_client_to_server"].as_u64().unwrap()
                    + e["bytes_server_to_client"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        edges,
        [
            (ext("192.0.2.10"), 443, 51000),
            (ext("192.0.2.20"), 80, 6000)
        ]
    );
    assert_eq!(g["truncated"], true);
    let mut nodes: Vec<&str> = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    nodes.sort_unstable();
    let host_id = format!("test-flows.host-{}", flowmap::enrich::host::hostname());
    let mut want = [host_id.as_str(), &ext("192.0.2.10"), &ext("192.0.2.20")];
    want.sort_unstable();
    assert_eq!(nodes, want);

    // Connections are kept between requests, and never more than two.
    let pid = a.pid();
    for _ in 0..10 {
        assert_eq!(http_get(port, "/api/graph?since=15m").unwrap().0, 200);
    }
    let writer_and_reader = fds_on(pid, &db);
    assert_eq!(
        writer_and_reader, 2,
        "the writer's connection and one reader"
    );

    a.stop().unwrap();
}

/// Agent connections to the server, seen by `observer` (not itself, not
/// `lock`).
fn agent_conns(observer: &mut postgres::Client, lock: i32) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'
             AND datname = 'postgres' AND pid <> pg_backend_pid() AND pid <> $1",
            &[&lock],
        )
        .unwrap()
        .get(0)
}

#[test]
fn store_reads_end_at_their_deadline_on_a_bounded_pool() {
    let test = "store_reads_end_at_their_deadline_on_a_bounded_pool";
    if !privileged(test) {
        return;
    }
    let Some(pg) = Pg::start(test) else {
        return;
    };
    let cs = pg.connection_string();
    let v = Netns::new().unwrap();
    let config = format!(
        "coordimap:
  database:
    driver: postgres
    connection_string: \"{cs}\"
  data_sources:
    - type: flows
      data_source_id: test
      config:
        - name: interface_name
          value: {}
        - name: crawl_interval
          value: 1s
",
        v.host
    );
    let a = agent(&v)
        .config(&config)
        .args(&["--web-timeout", "1s"])
        .start()
        .unwrap();
    let port = a.port();
    let mut observer = postgres::Client::connect(&cs, postgres::NoTls).unwrap();
    let mut lock = postgres::Client::connect(&cs, postgres::NoTls).unwrap();
    let lock_pid: i32 = lock
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);

    assert_eq!(http_get(port, "/api/graph?since=15m").unwrap().0, 200);
    for _ in 0..10 {
        assert_eq!(http_get(port, "/api/graph?since=15m").unwrap().0, 200);
    }
    // The writer's connection and one kept for reads.
    assert_eq!(agent_conns(&mut observer, lock_pid), 2);

    // Reads wait on a lock: every request ends at its deadline with 503,
    // and no more than two connections ever serve them.
    lock.batch_execute("BEGIN; LOCK TABLE edge_keys IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..5)
            .map(|_| s.spawn(|| http_get(port, "/api/graph?since=15m").unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(agent_conns(&mut observer, lock_pid) <= 3);
    let mut deadline = 0;
    for (code, body) in &answers {
        assert_eq!(*code, 503, "{body}");
        let e = json(body)["error"].as_str().unwrap().to_string();
        if e.contains("ran past its deadline") {
            deadline += 1;
        } else {
            assert!(e.contains("every store connection is busy"), "{e}");
        }
    }
    assert!(deadline >= 2, "{answers:?}");
    lock.batch_execute("COMMIT").unwrap();
    wait_until(
        Instant::now() + Duration::from_secs(30),
        "reads again",
        || matches!(http_get(port, "/api/graph?since=15m"), Ok((200, _))),
    )
    .unwrap();
    assert_eq!(agent_conns(&mut observer, lock_pid), 3);
    a.stop().unwrap();
}
