//! `coordimap.database: {driver: postgres, …}` the way a user runs it:
//! `flowmap run` (the release-like binary) against a real PostgreSQL on
//! loopback, exact UDP counts in the store through `/api/graph`, `flowmap
//! top` and `flowmap graph`; the server restarted mid-run (writes resume,
//! `/healthz` recovers); and a TLS-only server reached with sslmode.

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
const PORT: u16 = 5300;
/// UDP payload sizes per exchange; each is answered with 50 bytes.
const SIZES: [usize; 5] = [100, 200, 300, 400, 500];
const HDR: u64 = 14 + 20 + 8;

fn config(conn: &str, iface: &str) -> String {
    format!(
        "coordimap:
  database:
    driver: postgres
    connection_string: \"{conn}\"
  data_sources:
    - type: flows
      data_source_id: pg
      config:
        - name: interface_name
          value: {iface}
        - name: crawl_interval
          value: 1s
"
    )
}

/// Datagrams of SIZES from the root namespace to the namespace's echo
/// server, which answers each with 50 bytes.
fn exchange(v: &Netns) {
    let server = v.spawn_in(|| {
        let s = UdpSocket::bind(("0.0.0.0", PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 2048];
        for _ in SIZES {
            let (_, from) = s.recv_from(&mut buf).unwrap();
            s.send_to(&[7u8; 50], from).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let c = UdpSocket::bind((v.host_v4.as_str(), 0)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 128];
    for n in SIZES {
        c.send_to(&vec![1u8; n], (v.peer_v4.as_str(), PORT))
            .unwrap();
        assert_eq!(c.recv(&mut buf).unwrap(), 50);
    }
    server.join().unwrap().unwrap();
}

/// The UDP edge host → peer of `/api/graph`: packets and bytes both ways.
fn udp_edge(port: u16, v: &Netns) -> Option<[u64; 4]> {
    let (code, body) = http_get(port, "/api/graph?since=15m&protocol=udp").ok()?;
    if code != 200 {
        return None;
    }
    let g: Value = serde_json::from_str(&body).ok()?;
    let host = format!("pg-flows.host-{}", flowmap::enrich::host::hostname());
    let peer = format!("pg-flows.external-{}", v.peer_v4);
    let e = g["edges"].as_array()?.iter().find(|e| {
        e["source"] == host.as_str() && e["target"] == peer.as_str() && e["port"] == PORT
    })?;
    let n = |k: &str| e[k].as_u64().unwrap_or(0);
    Some([
        n("packets_client_to_server"),
        n("bytes_client_to_server"),
        n("packets_server_to_client"),
        n("bytes_server_to_client"),
    ])
}

fn expected(times: u64) -> [u64; 4] {
    let sent: u64 = SIZES.iter().map(|s| HDR + *s as u64).sum();
    let n = SIZES.len() as u64;
    [n * times, sent * times, n * times, (HDR + 50) * n * times]
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn healthz(port: u16) -> u16 {
    http_get(port, "/healthz").map(|(c, _)| c).unwrap_or(0)
}

/// `flowmap <args> --config <file>`: its exit status and stdout.
fn cli(args: &[&str], cfg: &std::path::Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn run_top_and_graph_with_a_postgres_store_that_restarts() {
    let Some(_g) = privileged_serial(
        "run_top_and_graph_with_a_postgres_store_that_restarts",
        &SERIAL,
    ) else {
        return;
    };
    let Some(pg) = Pg::start("run_top_and_graph_with_a_postgres_store_that_restarts") else {
        return;
    };
    let v = Netns::new().unwrap();
    let cfg_text = config(&pg.connection_string(), &v.host);
    let agent = Agent::builder(BIN)
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .config(&cfg_text)
        .output("none")
        .start()
        .unwrap();
    let port = agent.port();
    exchange(&v);
    assert_eq!(
        wait_for("the edge in the store", 15, || udp_edge(port, &v)
            .filter(|e| *e == expected(1))),
        expected(1)
    );
    assert_eq!(healthz(port), 200);

    // top and graph through the binary, against the same store.
    let dir = flowmap_testkit::tempdir::TempDir::new("pgcli");
    let cfg = dir.file("config.yaml", &cfg_text);
    let (ok, top) = cli(&["top", "--since", "15m"], &cfg);
    assert!(ok, "{top}");
    assert!(
        top.contains(&v.peer_v4) && top.contains(&format!("udp/{PORT}")),
        "{top}"
    );
    let (ok, graph) = cli(&["graph", "--since", "15m", "--format", "json"], &cfg);
    assert!(ok, "{graph}");
    let g: Value = serde_json::from_str(&graph).unwrap_or_else(|e| panic!("{e}: {graph}"));
    let e = g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["port"] == PORT)
        .unwrap_or_else(|| panic!("{graph}"));
    assert_eq!(e["bytes_client_to_server"].as_u64(), Some(expected(1)[1]));

    // The server goes away: writes fail, /healthz says so; the agent runs on.
    pg.stop();
    wait_for("the store failure in /healthz", 20, || {
        (healthz(port) == 503).then_some(())
    });
    exchange(&v);
    std::thread::sleep(Duration::from_millis(1500));
    pg.start_again();
    // Writes resume (the intervals kept while it was down included) and
    // /healthz recovers.
    assert_eq!(
        wait_for("the edge after the restart", 60, || udp_edge(port, &v)
            .filter(|e| *e == expected(2))),
        expected(2)
    );
    wait_for("/healthz after the restart", 30, || {
        (healthz(port) == 200).then_some(())
    });
    assert!(
        agent.count_log("store reconnected") >= 1,
        "{}",
        agent.stderr()
    );
    let (_, err) = agent.stop().unwrap();
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_tls_only_postgres_is_reached_with_sslmode() {
    let Some(_g) = privileged_serial("a_tls_only_postgres_is_reached_with_sslmode", &SERIAL) else {
        return;
    };
    let Some(pg) = Pg::start("a_tls_only_postgres_is_reached_with_sslmode") else {
        return;
    };
    let ca = pg.require_tls();
    let dir = flowmap_testkit::tempdir::TempDir::new("pgtls");
    let base = format!(
        "host=localhost port={} user=postgres dbname=postgres",
        pg.port
    );
    let graph = |conn: &str| {
        let cfg = dir.file("config.yaml", &config(conn, "lo"));
        cli(&["graph", "--since", "15m", "--format", "json"], &cfg)
    };
    // Plain text is refused by the server.
    let (ok, out) = graph(&format!("{base} sslmode=disable"));
    assert!(!ok && out.contains("no encryption"), "{out}");
    // Encrypted, as libpq's require: no check of the certificate.
    let (ok, out) = graph(&format!("{base} sslmode=require"));
    assert!(ok, "{out}");
    // verify-full with the CA and the name the certificate carries.
    let (ok, out) = graph(&format!(
        "{base} sslmode=verify-full sslrootcert={}",
        ca.display()
    ));
    assert!(ok, "{out}");
    // verify-full against the address, which the certificate does not name.
    let ip = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    let (ok, out) = graph(&format!(
        "{ip} sslmode=verify-full sslrootcert={}",
        ca.display()
    ));
    assert!(!ok && out.contains("certificate"), "{out}");
    // ...which verify-ca accepts (the chain is checked, not the name).
    let (ok, out) = graph(&format!(
        "{ip} sslmode=verify-ca sslrootcert={}",
        ca.display()
    ));
    assert!(ok, "{out}");
    // And the agent itself writes through TLS.
    let v = Netns::new().unwrap();
    let conn = format!("{base} sslmode=verify-full sslrootcert={}", ca.display());
    let agent = Agent::builder(BIN)
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .config(&config(&conn, &v.host))
        .output("none")
        .start()
        .unwrap();
    exchange(&v);
    assert_eq!(
        wait_for("the edge through TLS", 15, || udp_edge(agent.port(), &v)
            .filter(|e| *e == expected(1))),
        expected(1)
    );
    agent.stop().unwrap();
}

/// Issue 15: a fleet starting at once against one fresh PostgreSQL. Each
/// agent migrates under an advisory lock: all of them come up, and the
/// schema is made once (one row per version). A store newer than the
/// binary is still refused.
#[test]
fn agents_starting_at_once_migrate_one_schema() {
    let Some(_g) = privileged_serial("agents_starting_at_once_migrate_one_schema", &SERIAL) else {
        return;
    };
    let Some(pg) = Pg::start("agents_starting_at_once_migrate_one_schema") else {
        return;
    };
    const N: usize = 5;
    let nets: Vec<Netns> = (0..N)
        .map(|_| Netns::builder().no_link().build().unwrap())
        .collect();
    let conn = pg.socket_connection_string();
    let starts: Vec<_> = nets
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let b = Agent::builder(BIN)
                .config(&config(&conn, "all"))
                .netns(ns)
                .env("NODE_NAME", format!("node-{i}"))
                .output("none")
                .no_web();
            std::thread::spawn(move || b.start())
        })
        .collect();
    let agents: Vec<Agent> = starts
        .into_iter()
        .map(|t| t.join().unwrap().unwrap_or_else(|e| panic!("{e:#}")))
        .collect();
    for a in &agents {
        assert_eq!(a.count_log("store ready"), 1, "{}", a.stderr());
    }
    let mut c = postgres::Client::connect(&pg.connection_string(), postgres::NoTls).unwrap();
    let versions: Vec<i32> = c
        .query("SELECT version FROM flowmap_schema ORDER BY version", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    for a in agents {
        let (_, err) = a.stop().unwrap();
        assert!(!err.contains("panicked"), "{err}");
    }
    // A newer store is refused, by the agent and by `serve`.
    c.batch_execute("INSERT INTO flowmap_schema VALUES (6)")
        .unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--database",
            &pg.connection_string(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "the store's schema version 6 is newer than this flowmap (5); use a newer flowmap"
        ),
        "{err}"
    );
}
