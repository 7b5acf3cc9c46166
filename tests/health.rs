//! Edge health end to end: real failures between two namespaces (a client
//! "node" where the agent runs, and a server namespace behind a veth),
//! the agent binary's flow records, its Coordimap batches on a loopback
//! collector, and `flowmap top --by failures` over its local store, all
//! compared with exact counts and with the kernel's own counters (nstat).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use flowmap_testkit::agent::{http_get, Agent};
use flowmap_testkit::collector;
use flowmap_testkit::net::{privileged_serial, Netns};
use flowmap_testkit::tempdir::TempDir;

static SERIAL: Mutex<()> = Mutex::new(());

/// The client namespace (where the agent runs) and the server namespace,
/// joined by a veth whose outer end is in the client namespace.
struct Rig {
    node: Netns,
    srv: Netns,
}

impl Rig {
    fn new() -> Rig {
        let node = Netns::builder().no_link().build().unwrap();
        let srv = Netns::builder().host_in(&node).no_v6().build().unwrap();
        Rig { node, srv }
    }

    /// A counter of `nstat` (e.g. TcpRetransSegs) in namespace `ns`, since
    /// the namespace was made.
    fn nstat(ns: &Netns, name: &str) -> u64 {
        let out = ns.exec(&["nstat", "-azs", name]);
        out.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(name)).then(|| w.next().unwrap().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no {name} in nstat output:\n{out}"))
    }

    fn nft(&self, rules: &str) {
        self.srv.exec(&["nft", rules]);
    }
}

/// The map page of the agent on `port` in namespace `ns`, rendered by a
/// headless Chromium in that namespace: its DOM.
fn map_page(ns: &Netns, port: u16, query: &str) -> String {
    let profile = TempDir::new("health-chromium");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.ns,
            "chromium",
            "--headless",
            "--no-sandbox",
        ])
        .args([
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args([
            "--virtual-time-budget=15000",
            "--window-size=1400,900",
            "--dump-dom",
        ])
        .arg(format!("http://127.0.0.1:{port}/{query}"))
        .output()
        .expect("chromium runs (scripts/setup.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The flow records of the agent's stdout.
fn records(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Relationship payload entries and element statuses of every batch:
/// (element id → statuses in order), ((protocol, port) → entries).
type Entries = HashMap<(String, u64), Vec<serde_json::Value>>;

fn batches(bodies: &[Vec<u8>], rel: &str) -> (HashMap<String, Vec<String>>, Entries) {
    let mut status: HashMap<String, Vec<String>> = HashMap::new();
    let mut entries: Entries = HashMap::new();
    for b in bodies {
        let batch: flowmap::sinks::coordimap::Batch = serde_json::from_slice(b).unwrap();
        for e in &batch.cloud_crawl_data.crawled_data.data {
            status
                .entry(e.id.clone())
                .or_default()
                .push(e.status.clone());
            if e.id != rel {
                continue;
            }
            let p: serde_json::Value = serde_json::from_slice(&e.payload().unwrap()).unwrap();
            for f in p["flows"].as_array().unwrap() {
                let k = (
                    f["protocol"].as_str().unwrap().to_string(),
                    f["port"].as_u64().unwrap(),
                );
                entries.entry(k).or_default().push(f.clone());
            }
        }
    }
    (status, entries)
}

fn sum(entries: &[serde_json::Value], path: &[&str]) -> u64 {
    entries
        .iter()
        .map(|e| path.iter().fold(e, |v, k| &v[*k]).as_u64().unwrap_or(0))
        .sum()
}

const REFUSED_PORT: u16 = 5999;
const SILENT_PORT: u16 = 5998;
const CLOSED_UDP_PORT: u16 = 5997;
const CLEAN_PORT: u16 = 5996;

#[test]
fn failures_by_cause_exact_with_status_and_top() {
    let Some(_g) = privileged_serial("failures_by_cause_exact_with_status_and_top", &SERIAL) else {
        return;
    };
    let rig = Rig::new();
    let peer = rig.srv.peer_v4.clone();
    // SYNs to SILENT_PORT vanish.
    rig.nft("add table inet fmhealth");
    rig.nft("add chain inet fmhealth in { type filter hook input priority 0; }");
    rig.nft(&format!(
        "add rule inet fmhealth in tcp dport {SILENT_PORT} tcp flags & (syn|ack) == syn drop"
    ));
    // A clean server: reads everything, answers, closes.
    let clean = rig
        .srv
        .run_in(move || TcpListener::bind(("0.0.0.0", CLEAN_PORT)).unwrap())
        .unwrap();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = clean.accept().unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            s.write_all(&buf[..100]).unwrap();
        }
    });
    let col = rig.node.run_in(collector::Server::start).unwrap();
    let state = TempDir::new("health");
    let agent = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .id("health")
        .iface(&rig.srv.host)
        .interval("1s")
        .netns(&rig.node)
        .api_key("k")
        .args(&["--endpoint", &col.url()])
        .state_dir(state.path())
        .start()
        .unwrap();
    let retrans_before = Rig::nstat(&rig.node, "TcpRetransSegs");
    let unreach_before = Rig::nstat(&rig.srv, "IcmpOutDestUnreachs");

    let p = peer.clone();
    rig.node
        .run_in(move || {
            let dst: SocketAddr = format!("{p}:0").parse().unwrap();
            // Three connects to a port without a listener: refused.
            for _ in 0..3 {
                let e = TcpStream::connect((dst.ip(), REFUSED_PORT)).unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
            }
            // Two connects whose SYNs are dropped, side by side: each gives
            // up after 1.5 s (the SYN was sent again once, at 1 s).
            let silent: Vec<_> = (0..2)
                .map(|_| {
                    std::thread::spawn(move || {
                        let a = SocketAddr::new(dst.ip(), SILENT_PORT);
                        TcpStream::connect_timeout(&a, Duration::from_millis(1500)).unwrap_err()
                    })
                })
                .collect();
            // Three datagrams from three sockets to a closed UDP port.
            for _ in 0..3 {
                let u = UdpSocket::bind("0.0.0.0:0").unwrap();
                u.send_to(b"anyone?", (dst.ip(), CLOSED_UDP_PORT)).unwrap();
            }
            // Two clean exchanges.
            for _ in 0..2 {
                let mut s = TcpStream::connect((dst.ip(), CLEAN_PORT)).unwrap();
                s.write_all(&[5u8; 1000]).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                assert_eq!(back.len(), 100);
            }
            for s in silent {
                assert_eq!(s.join().unwrap().kind(), std::io::ErrorKind::TimedOut);
            }
        })
        .unwrap();
    server.join().unwrap();
    // The unanswered attempts are decided 3 s after their first SYN, at a
    // drain: wait for two more intervals past that.
    std::thread::sleep(Duration::from_millis(4500));
    let syn_retransmits = Rig::nstat(&rig.node, "TcpRetransSegs") - retrans_before;
    let icmp_sent = Rig::nstat(&rig.srv, "IcmpOutDestUnreachs") - unreach_before;
    let port = agent.port();
    let metrics = rig
        .node
        .run_in(move || http_get(port, "/metrics").unwrap().1)
        .unwrap();
    // The live view shows idle edges as NoStatus (the failures are
    // seconds old, the agent's interval is 1 s): read the window of the
    // whole test as a past window, where each edge has its worst status.
    let dom = map_page(&rig.node, port, "?from=-2m&to=now");
    let (out, err) = agent.stop().unwrap();
    let recs = records(&out);

    let of_port = |proto: &str, port: u16| -> Vec<&serde_json::Value> {
        recs.iter()
            .filter(|r| r["protocol"] == proto && r["dst_port"] == port && r["dst_ip"] == *peer)
            .collect()
    };
    let failures = |proto: &str, port: u16, cause: &str| -> usize {
        of_port(proto, port)
            .iter()
            .filter(|r| r["failure"] == cause)
            .count()
    };
    // Refused: one failure per attempt, nothing else.
    assert_eq!(failures("tcp", REFUSED_PORT, "refused"), 3, "{out}\n{err}");
    assert!(of_port("tcp", REFUSED_PORT)
        .iter()
        .all(|r| r["failure"] == "refused" && r["resets_server"] == 0));
    // Unanswered: one per attempt; the SYNs sent again are the kernel's.
    assert_eq!(
        failures("tcp", SILENT_PORT, "unanswered"),
        2,
        "{out}\n{err}"
    );
    let retx: u64 = of_port("tcp", SILENT_PORT)
        .iter()
        .map(|r| r["syn_retransmits"].as_u64().unwrap())
        .sum();
    assert_eq!((retx, syn_retransmits), (2, 2));
    // Unreachable: every ICMP error the server sent, on its own UDP flow.
    assert_eq!(icmp_sent, 3);
    let udp = of_port("udp", CLOSED_UDP_PORT);
    let mut ports: Vec<u64> = udp
        .iter()
        .filter(|r| r["failure"] == "unreachable")
        .map(|r| r["src_port"].as_u64().unwrap())
        .collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3, "{out}");
    // Clean traffic: no failure, no reset.
    let clean = of_port("tcp", CLEAN_PORT);
    assert!(!clean.is_empty());
    assert!(clean.iter().all(|r| r["failure"].is_null()
        && r["resets_client"] == 0
        && r["resets_server"] == 0
        && r["syn_retransmits"] == 0));

    // The relationship payload and the statuses.
    let host = format!("health-flows.host-{}", flowmap::enrich::host::hostname());
    let ext = format!("health-flows.external-{peer}");
    let rel = format!("{host}.{ext}");
    let (status, entries) = batches(&col.bodies(), &rel);
    let e = |proto: &str, port: u16| entries[&(proto.to_string(), port as u64)].clone();
    let refused = e("tcp", REFUSED_PORT);
    assert_eq!(sum(&refused, &["connections_failed", "refused"]), 3);
    assert_eq!(sum(&refused, &["connections_attempted"]), 3);
    assert!(refused.iter().all(|f| f["status"] == "Red"));
    let silent = e("tcp", SILENT_PORT);
    assert_eq!(sum(&silent, &["connections_failed", "unanswered"]), 2);
    assert_eq!(sum(&silent, &["syn_retransmits"]), 2);
    assert!(silent
        .iter()
        .filter(|f| f["connections_failed"]["unanswered"].as_u64() > Some(0))
        .all(|f| f["status"] == "Red"));
    let udp = e("udp", CLOSED_UDP_PORT);
    assert_eq!(sum(&udp, &["connections_failed", "unreachable"]), 3);
    let clean = e("tcp", CLEAN_PORT);
    assert_eq!(sum(&clean, &["connections_opened"]), 2);
    assert!(clean.iter().all(|f| f["status"] == "Green"), "{clean:?}");
    // The relationship and the server endpoint went Red.
    assert!(status[&rel].iter().any(|s| s == "Red"));
    assert!(status[&ext].iter().any(|s| s == "Red"));
    // The host is the server only of the ICMP errors' own flow: not Red.
    assert!(
        status[&host].iter().all(|s| s != "Red"),
        "{:?}",
        status[&host]
    );

    // /metrics: failures by cause, edges by status: a fixed set of series.
    let series = |prefix: &str| -> Vec<String> {
        let mut v: Vec<String> = metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        series("flowmap_connection_failures_total"),
        vec![
            "flowmap_connection_failures_total{cause=\"refused\"} 3",
            "flowmap_connection_failures_total{cause=\"unanswered\"} 2",
            "flowmap_connection_failures_total{cause=\"unreachable\"} 3",
        ],
        "{metrics}"
    );
    let statuses: Vec<String> = series("flowmap_edges_by_status")
        .iter()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(
        statuses,
        ["Green", "NoStatus", "Orange", "Red"]
            .map(|s| format!("flowmap_edges_by_status{{status=\"{s}\"}}"))
    );

    // The map page lists the failing edges first, with their causes.
    let rows: Vec<&str> = dom
        .split("<tr class=\"edge-row\"")
        .skip(1)
        .map(|r| {
            r.split("data-status=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(&rows[..3], ["Red", "Red", "Red"], "{dom}");
    assert!(rows[3..].iter().all(|s| *s != "Red"), "{rows:?}");
    // The kernel frees the SYNs and datagrams that found no socket as
    // NO_SOCKET drops, and the nftables rule's SYNs as NETFILTER_DROP.
    assert!(
        dom.contains("title=\"Red: 3 refused, 3 dropped (NO_SOCKET 3)\""),
        "{dom}"
    );
    assert!(
        dom.contains("title=\"Red: 3 unreachable, 3 dropped (NO_SOCKET 3)\""),
        "{dom}"
    );

    // `flowmap top --by failures` over the local store.
    let top = Command::new(env!("CARGO_BIN_EXE_flowmap"))
        .args(["top", "--by", "failures", "--limit", "3", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&top.stdout).to_string();
    let rows: Vec<Vec<&str>> = top
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let cols = |r: &Vec<&str>| (r[2].to_string(), r[7].to_string(), r[11].to_string());
    assert_eq!(
        rows.iter().map(cols).collect::<Vec<_>>(),
        vec![
            // Ties in port order.
            (format!("udp/{CLOSED_UDP_PORT}"), "3".into(), "Red".into()),
            (format!("tcp/{REFUSED_PORT}"), "3".into(), "Red".into()),
            (format!("tcp/{SILENT_PORT}"), "2".into(), "Red".into()),
        ],
        "{top}"
    );
}

const LOSSY_PORT: u16 = 5995;

#[test]
fn retransmits_equal_the_senders_tcp_retrans_segs_and_make_the_edge_orange() {
    let Some(_g) = privileged_serial(
        "retransmits_equal_the_senders_tcp_retrans_segs_and_make_the_edge_orange",
        &SERIAL,
    ) else {
        return;
    };
    let rig = Rig::new();
    let peer = rig.srv.peer_v4.clone();
    // The receiver drops every 20th data segment of the transfer (a
    // counter, not chance: a run can never see no loss).
    rig.nft("add table inet fmloss");
    rig.nft("add chain inet fmloss in { type filter hook input priority 0; }");
    rig.nft(&format!(
        "add rule inet fmloss in tcp dport {LOSSY_PORT} meta length gt 200 numgen inc mod 20 == 0 drop"
    ));
    let listener = rig
        .srv
        .run_in(move || TcpListener::bind(("0.0.0.0", LOSSY_PORT)).unwrap())
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(&(buf.len() as u64).to_be_bytes()).unwrap();
    });
    let col = rig.node.run_in(collector::Server::start).unwrap();
    let state = TempDir::new("health-loss");
    let agent = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .id("health")
        .iface(&rig.srv.host)
        .interval("1s")
        .netns(&rig.node)
        .api_key("k")
        .args(&["--endpoint", &col.url()])
        .state_dir(state.path())
        .no_web()
        .start()
        .unwrap();
    let sent_before = Rig::nstat(&rig.node, "TcpRetransSegs");
    let back_before = Rig::nstat(&rig.srv, "TcpRetransSegs");
    let p = peer.clone();
    let got = rig
        .node
        .run_in(move || {
            let mut s = TcpStream::connect((p.as_str(), LOSSY_PORT)).unwrap();
            s.write_all(&vec![9u8; 16 << 20]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut n = [0u8; 8];
            s.read_exact(&mut n).unwrap();
            u64::from_be_bytes(n)
        })
        .unwrap();
    server.join().unwrap();
    assert_eq!(got, 16 << 20);
    // Two more intervals: every retransmission is drained.
    std::thread::sleep(Duration::from_millis(2500));
    let sent = Rig::nstat(&rig.node, "TcpRetransSegs") - sent_before;
    let back = Rig::nstat(&rig.srv, "TcpRetransSegs") - back_before;
    eprintln!("TcpRetransSegs delta: sender {sent}, receiver {back}");
    let (out, err) = agent.stop().unwrap();
    let recs: Vec<serde_json::Value> = records(&out)
        .into_iter()
        .filter(|r| r["protocol"] == "tcp" && r["dst_port"] == LOSSY_PORT)
        .collect();
    let total = |k: &str| -> u64 { recs.iter().map(|r| r[k].as_u64().unwrap()).sum() };
    assert!(sent > 0, "the drop rule made no loss");
    assert_eq!(
        (
            total("retransmits_client_to_server"),
            total("retransmits_server_to_client")
        ),
        (sent, back),
        "{out}\n{err}"
    );
    let host = format!("health-flows.host-{}", flowmap::enrich::host::hostname());
    let rel = format!("{host}.health-flows.external-{peer}");
    let (_, entries) = batches(&col.bodies(), &rel);
    let lossy = &entries[&("tcp".to_string(), LOSSY_PORT as u64)];
    assert_eq!(sum(lossy, &["retransmits_client_to_server"]), sent);
    assert_eq!(sum(lossy, &["retransmits_server_to_client"]), back);
    let statuses: Vec<&str> = lossy
        .iter()
        .filter(|f| f["retransmits_client_to_server"].as_u64() > Some(0))
        .map(|f| f["status"].as_str().unwrap())
        .collect();
    assert!(
        !statuses.is_empty() && statuses.iter().all(|s| *s == "Orange"),
        "{statuses:?}"
    );
}

const DROPPED_UDP_PORT: u16 = 5994;

#[test]
fn kernel_drops_by_reason_on_the_flow_and_orange() {
    let Some(_g) = privileged_serial("kernel_drops_by_reason_on_the_flow_and_orange", &SERIAL)
    else {
        return;
    };
    let rig = Rig::new();
    let peer = rig.srv.peer_v4.clone();
    // The receiving namespace drops every datagram of the port (and counts).
    rig.nft("add table inet fmdrops");
    rig.nft("add chain inet fmdrops in { type filter hook input priority 0; }");
    rig.nft(&format!(
        "add rule inet fmdrops in udp dport {DROPPED_UDP_PORT} counter drop"
    ));
    let col = rig.node.run_in(collector::Server::start).unwrap();
    let state = TempDir::new("health-drops");
    let agent = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .id("health")
        .iface(&rig.srv.host)
        .interval("1s")
        .netns(&rig.node)
        .api_key("k")
        .args(&["--endpoint", &col.url()])
        .state_dir(state.path())
        .start()
        .unwrap();
    const SENT: u64 = 40;
    let p = peer.clone();
    let sport = rig
        .node
        .run_in(move || {
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            for i in 0..SENT {
                u.send_to(&[i as u8; 64], (p.as_str(), DROPPED_UDP_PORT))
                    .unwrap();
            }
            u.local_addr().unwrap().port()
        })
        .unwrap();
    // Two more intervals: every drop is drained.
    std::thread::sleep(Duration::from_millis(2500));
    let listed = rig.srv.exec(&["nft", "list", "table", "inet", "fmdrops"]);
    let port = agent.port();
    let metrics = rig
        .node
        .run_in(move || http_get(port, "/metrics").unwrap().1)
        .unwrap();
    let (out, err) = agent.stop().unwrap();
    // The kernel's own count: the rule's counter.
    let counted: u64 = listed
        .split("counter packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {listed}"));
    assert_eq!(counted, SENT, "{listed}");
    let recs: Vec<serde_json::Value> = records(&out)
        .into_iter()
        .filter(|r| {
            r["protocol"] == "udp" && r["dst_port"] == DROPPED_UDP_PORT && r["src_port"] == sport
        })
        .collect();
    assert!(!recs.is_empty(), "{out}\n{err}");
    let dropped: u64 = recs
        .iter()
        .map(|r| r["drops"]["NETFILTER_DROP"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(dropped, SENT, "{out}\n{err}");
    // No other reason on this flow.
    assert!(recs.iter().all(|r| r.get("drops").is_none()
        || r["drops"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k == "NETFILTER_DROP")));
    let sent: u64 = recs
        .iter()
        .map(|r| r["src_to_dst"]["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(sent, SENT);
    // The relationship entry (udp, port): the same drops, Orange.
    let host = format!("health-flows.host-{}", flowmap::enrich::host::hostname());
    let rel = format!("{host}.health-flows.external-{peer}");
    let (status, entries) = batches(&col.bodies(), &rel);
    let e = &entries[&("udp".to_string(), DROPPED_UDP_PORT as u64)];
    assert_eq!(sum(e, &["drops", "NETFILTER_DROP"]), SENT, "{e:?}");
    let with_drops: Vec<&str> = e
        .iter()
        .filter(|f| f.get("drops").is_some())
        .map(|f| f["status"].as_str().unwrap())
        .collect();
    assert!(
        !with_drops.is_empty() && with_drops.iter().all(|s| *s == "Orange"),
        "{with_drops:?}"
    );
    assert!(status[&rel].iter().any(|s| s == "Orange"));
    // /metrics: drops by reason (host-wide: other namespaces' drops count
    // too, so at least the flow's).
    let line = metrics
        .lines()
        .find(|l| l.starts_with("flowmap_kernel_drops_total{reason=\"NETFILTER_DROP\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= SENT, "{line}");
    assert!(!metrics.contains("reason=\"NOT_SPECIFIED\""), "{metrics}");
    assert!(!metrics.contains("reason=\"SKB_CONSUMED\""), "{metrics}");
}

const RTT_PORT: u16 = 5993;

#[test]
fn smoothed_rtt_one_sample_per_connection() {
    let Some(_g) = privileged_serial("smoothed_rtt_one_sample_per_connection", &SERIAL) else {
        return;
    };
    let rig = Rig::new();
    let peer = rig.srv.peer_v4.clone();
    const CONNS: usize = 5;
    let listener = rig
        .srv
        .run_in(move || TcpListener::bind(("0.0.0.0", RTT_PORT)).unwrap())
        .unwrap();
    let server = std::thread::spawn(move || {
        for _ in 0..CONNS {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            s.write_all(&buf[..10]).unwrap();
        }
    });
    let col = rig.node.run_in(collector::Server::start).unwrap();
    let state = TempDir::new("health-rtt");
    let agent = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .id("health")
        .iface(&rig.srv.host)
        .interval("1s")
        .netns(&rig.node)
        .api_key("k")
        .args(&["--endpoint", &col.url()])
        .state_dir(state.path())
        .no_web()
        .start()
        .unwrap();
    // All connections in one interval (started right after a batch): each
    // gets exactly one sample (the client socket's, as it closes).
    wait_batches(&col, 1);
    next_interval(&col);
    let p = peer.clone();
    rig.node
        .run_in(move || {
            for _ in 0..CONNS {
                let mut s = TcpStream::connect((p.as_str(), RTT_PORT)).unwrap();
                s.write_all(&[1u8; 20_000]).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                assert_eq!(back.len(), 10);
            }
        })
        .unwrap();
    server.join().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let (out, err) = agent.stop().unwrap();
    let recs: Vec<serde_json::Value> = records(&out)
        .into_iter()
        .filter(|r| r["protocol"] == "tcp" && r["dst_port"] == RTT_PORT)
        .collect();
    let samples: Vec<u64> = recs.iter().filter_map(|r| r["srtt_us"].as_u64()).collect();
    // One sample per connection, each a plausible RTT over a veth.
    assert_eq!(samples.len(), CONNS, "{out}\n{err}");
    let mut ports: Vec<u64> = recs
        .iter()
        .filter(|r| r["srtt_us"].is_u64())
        .map(|r| r["src_port"].as_u64().unwrap())
        .collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), CONNS);
    assert!(
        samples.iter().all(|us| (1..200_000).contains(us)),
        "{samples:?}"
    );
    // The relationship entry: samples, min, mean, max of the same.
    let host = format!("health-flows.host-{}", flowmap::enrich::host::hostname());
    let rel = format!("{host}.health-flows.external-{peer}");
    let (_, entries) = batches(&col.bodies(), &rel);
    let e = &entries[&("tcp".to_string(), RTT_PORT as u64)];
    assert_eq!(sum(e, &["srtt_us", "samples"]), CONNS as u64, "{e:?}");
    let min = e.iter().filter_map(|f| f["srtt_us"]["min"].as_u64()).min();
    let max = e.iter().filter_map(|f| f["srtt_us"]["max"].as_u64()).max();
    assert_eq!(min, samples.iter().copied().min());
    assert_eq!(max, samples.iter().copied().max());
    // mean × samples per entry adds up to the records' sum.
    let weighted: f64 = e
        .iter()
        .filter(|f| f.get("srtt_us").is_some())
        .map(|f| f["srtt_us"]["mean"].as_f64().unwrap() * f["srtt_us"]["samples"].as_f64().unwrap())
        .sum();
    assert!(
        (weighted - samples.iter().sum::<u64>() as f64).abs() < 1e-6,
        "{weighted} {samples:?}"
    );
    assert!(e
        .iter()
        .filter(|f| f.get("srtt_us").is_some())
        .all(|f| f["status"] == "Green"));
}

/// Waits until the collector has accepted at least `n` batches (one per
/// interval: the host element is sent every interval) and returns how many
/// it has. Traffic started right after a batch arrived falls in the next
/// interval, far from its end.
fn wait_batches(col: &collector::Server, n: usize) -> usize {
    let end = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = col.bodies().len();
        if got >= n {
            return got;
        }
        assert!(
            std::time::Instant::now() < end,
            "only {got} of {n} batches arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The next interval: waits for one more batch than there are now and
/// returns the index its traffic will be sent in.
fn next_interval(col: &collector::Server) -> usize {
    let now = col.bodies().len();
    wait_batches(col, now + 1)
}

/// Per batch: the status of relationship `rel` (None: not in that batch)
/// and its entries for (protocol, port).
fn per_batch(
    bodies: &[Vec<u8>],
    rel: &str,
    proto: &str,
    port: u16,
) -> Vec<(Option<String>, Vec<serde_json::Value>)> {
    bodies
        .iter()
        .map(|b| {
            let batch: flowmap::sinks::coordimap::Batch = serde_json::from_slice(b).unwrap();
            let Some(e) = batch
                .cloud_crawl_data
                .crawled_data
                .data
                .iter()
                .find(|e| e.id == rel)
            else {
                return (None, Vec::new());
            };
            let p: serde_json::Value = serde_json::from_slice(&e.payload().unwrap()).unwrap();
            let entries = p["flows"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["protocol"] == proto && f["port"] == port)
                .cloned()
                .collect();
            (Some(e.status.clone()), entries)
        })
        .collect()
}

/// The kernel's smoothed RTT (µs) of the one established connection to
/// `port` in `ns`, as `ss -ti` prints it (`rtt:<ms>/<var>`: tcpi_rtt, the
/// same `srtt_us >> 3`, in ms with µs precision).
fn ss_rtt_us(ns: &Netns, port: u16) -> u64 {
    let out = ns.exec(&[
        "ss",
        "-tin",
        "state",
        "established",
        &format!("dport = :{port}"),
    ]);
    let rtts: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("rtt:"))
        .map(|v| {
            let ms: f64 = v.split('/').next().unwrap().parse().unwrap();
            (ms * 1000.0).round() as u64
        })
        .collect();
    assert_eq!(rtts.len(), 1, "{out}");
    rtts[0]
}

const HELD_PORT: u16 = 5992;

#[test]
fn connection_held_open_srtt_each_interval_with_traffic_as_ss_reports_idle_intervals_not_emitted() {
    let Some(_g) = privileged_serial(
        "connection_held_open_srtt_each_interval_with_traffic_as_ss_reports_idle_intervals_not_emitted",
        &SERIAL,
    ) else {
        return;
    };
    let rig = Rig::new();
    let peer = rig.srv.peer_v4.clone();
    // A server that answers each 100-byte request with 1000 bytes, over one
    // connection, until the client closes it.
    let listener = rig
        .srv
        .run_in(move || TcpListener::bind(("0.0.0.0", HELD_PORT)).unwrap())
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = [0u8; 100];
        while s.read_exact(&mut req).is_ok() {
            s.write_all(&[req[0]; 1000]).unwrap();
        }
    });
    let col = rig.node.run_in(collector::Server::start).unwrap();
    let state = TempDir::new("health-held");
    let agent = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .id("health")
        .iface(&rig.srv.host)
        .interval("1s")
        .netns(&rig.node)
        .api_key("k")
        .args(&["--endpoint", &col.url()])
        .state_dir(state.path())
        .no_web()
        .start()
        .unwrap();
    fn burst(s: &mut TcpStream) {
        for i in 0..5u8 {
            s.write_all(&[i; 100]).unwrap();
            let mut back = [0u8; 1000];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, [i; 1000]);
        }
    }
    wait_batches(&col, 1);
    // Intervals with traffic, by the index of their batch: the connection
    // opens in the first, then one burst in each of the next three.
    let mut active = vec![next_interval(&col)];
    let p = peer.clone();
    let mut conn = rig
        .node
        .run_in(move || TcpStream::connect((p.as_str(), HELD_PORT)).unwrap())
        .unwrap();
    let client_port = conn.local_addr().unwrap().port();
    burst(&mut conn);
    for _ in 0..3 {
        active.push(next_interval(&col));
        burst(&mut conn);
    }
    // Two intervals without a packet; the connection stays open.
    let last = *active.last().unwrap();
    wait_batches(&col, last + 3);
    // Quiet: the kernel's estimate cannot change until the next segment.
    let kernel_us = ss_rtt_us(&rig.node, HELD_PORT);
    active.push(next_interval(&col));
    burst(&mut conn);
    let total = wait_batches(&col, active.last().unwrap() + 2);
    let (out, err) = agent.stop().unwrap();
    drop(conn);
    server.join().unwrap();

    // Records: one per interval with traffic, each with a sample; none for
    // the idle intervals (the connection was tracked and open throughout).
    let recs: Vec<serde_json::Value> = records(&out)
        .into_iter()
        .filter(|r| r["dst_port"] == HELD_PORT && r["src_port"] == client_port)
        .collect();
    assert_eq!(recs.len(), active.len(), "{out}\n{err}");
    assert!(recs
        .iter()
        .all(|r| r["src_to_dst"]["packets"].as_u64() > Some(0)
            && r["dst_to_src"]["packets"].as_u64() > Some(0)));
    let srtt: Vec<u64> = recs
        .iter()
        .map(|r| r["srtt_us"].as_u64().unwrap_or_else(|| panic!("{r}")))
        .collect();
    // The last sample is the client socket's estimate at the first segment
    // it received in that interval: what the kernel reported while the
    // connection was quiet before it.
    assert_eq!(*srtt.last().unwrap(), kernel_us, "{srtt:?}");
    assert!(srtt.iter().all(|us| (1..200_000).contains(us)), "{srtt:?}");

    // The batches: the edge is in exactly the intervals with traffic, one
    // sample each (min = max = the record's), Green; absent when idle.
    let host = format!("health-flows.host-{}", flowmap::enrich::host::hostname());
    let rel = format!("{host}.health-flows.external-{peer}");
    let bodies = col.bodies();
    let got = per_batch(&bodies[..total], &rel, "tcp", HELD_PORT);
    let with_edge: Vec<usize> = (0..got.len()).filter(|i| got[*i].0.is_some()).collect();
    assert_eq!(with_edge, active, "{got:?}");
    for (i, b) in active.iter().enumerate() {
        let (status, entries) = &got[*b];
        assert_eq!(status.as_deref(), Some("Green"));
        assert_eq!(entries.len(), 1, "{entries:?}");
        let e = &entries[0];
        assert_eq!(e["status"], "Green");
        assert_eq!(e["srtt_us"]["samples"], 1, "{e}");
        assert_eq!(e["srtt_us"]["min"], srtt[i], "{e}");
        assert_eq!(e["srtt_us"]["max"], srtt[i], "{e}");
        assert_eq!(e["srtt_us"]["mean"].as_f64(), Some(srtt[i] as f64), "{e}");
    }
    assert!(got[last + 1].0.is_none() && got[last + 2].0.is_none());
}

const RESET_BY_SERVER_PORT: u16 = 5991;
const RESET_BY_CLIENT_PORT: u16 = 5990;

/// Closes a TCP socket with a RST (SO_LINGER on, 0 s).
fn close_with_reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a linger struct of its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(s);
}

#[test]
fn resets_after_establishment_per_direction_and_orange() {
    let Some(_g) = privileged_serial(
        "resets_after_establishment_per_direction_and_orange",
        &SERIAL,
    ) else {
        return;
    };
    let rig = Rig::new();
    let peer = rig.srv.peer_v4.clone();
    let (by_server, by_client) = rig
        .srv
        .run_in(move || {
            (
                TcpListener::bind(("0.0.0.0", RESET_BY_SERVER_PORT)).unwrap(),
                TcpListener::bind(("0.0.0.0", RESET_BY_CLIENT_PORT)).unwrap(),
            )
        })
        .unwrap();
    let server = std::thread::spawn(move || {
        // Reads the request, then resets the connection.
        let (mut s, _) = by_server.accept().unwrap();
        let mut req = [0u8; 100];
        s.read_exact(&mut req).unwrap();
        close_with_reset(s);
        // Answers; the client resets.
        let (mut s, _) = by_client.accept().unwrap();
        s.read_exact(&mut req).unwrap();
        s.write_all(&req).unwrap();
        let mut rest = Vec::new();
        let e = s.read_to_end(&mut rest).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    });
    let col = rig.node.run_in(collector::Server::start).unwrap();
    let state = TempDir::new("health-resets");
    let agent = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .id("health")
        .iface(&rig.srv.host)
        .interval("1s")
        .netns(&rig.node)
        .api_key("k")
        .args(&["--endpoint", &col.url()])
        .state_dir(state.path())
        .no_web()
        .start()
        .unwrap();
    wait_batches(&col, 1);
    let p = peer.clone();
    rig.node
        .run_in(move || {
            let mut s = TcpStream::connect((p.as_str(), RESET_BY_SERVER_PORT)).unwrap();
            s.write_all(&[1u8; 100]).unwrap();
            let mut back = Vec::new();
            let e = s.read_to_end(&mut back).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
            let mut s = TcpStream::connect((p.as_str(), RESET_BY_CLIENT_PORT)).unwrap();
            s.write_all(&[2u8; 100]).unwrap();
            let mut back = [0u8; 100];
            s.read_exact(&mut back).unwrap();
            close_with_reset(s);
        })
        .unwrap();
    server.join().unwrap();
    let n = col.bodies().len();
    let total = wait_batches(&col, n + 2);
    let (out, err) = agent.stop().unwrap();
    let recs = records(&out);
    let of_port = |port: u16| -> Vec<&serde_json::Value> {
        recs.iter()
            .filter(|r| r["protocol"] == "tcp" && r["dst_port"] == port)
            .collect()
    };
    let total_of =
        |port: u16, k: &str| -> u64 { of_port(port).iter().map(|r| r[k].as_u64().unwrap()).sum() };
    for (port, client, server) in [(RESET_BY_SERVER_PORT, 0, 1), (RESET_BY_CLIENT_PORT, 1, 0)] {
        assert_eq!(
            (
                total_of(port, "resets_client"),
                total_of(port, "resets_server")
            ),
            (client, server),
            "port {port}: {out}\n{err}"
        );
        assert!(of_port(port)
            .iter()
            .all(|r| r["failure"].is_null() && r["syn_retransmits"] == 0));
    }
    let host = format!("health-flows.host-{}", flowmap::enrich::host::hostname());
    let rel = format!("{host}.health-flows.external-{peer}");
    let (_, entries) = batches(&col.bodies()[..total], &rel);
    for (port, client, server) in [(RESET_BY_SERVER_PORT, 0, 1), (RESET_BY_CLIENT_PORT, 1, 0)] {
        let e = &entries[&("tcp".to_string(), port as u64)];
        assert_eq!(sum(e, &["resets_client"]), client, "{e:?}");
        assert_eq!(sum(e, &["resets_server"]), server, "{e:?}");
        assert_eq!(sum(e, &["connections_failed", "refused"]), 0);
        let reset: Vec<&str> = e
            .iter()
            .filter(|f| {
                f["resets_client"].as_u64().unwrap() + f["resets_server"].as_u64().unwrap() > 0
            })
            .map(|f| f["status"].as_str().unwrap())
            .collect();
        assert_eq!(reset, ["Orange"], "{e:?}");
    }
}

const SYNACK_LOST_PORT: u16 = 5989;

#[test]
fn synack_retransmits_equal_the_servers_tcp_retrans_segs() {
    let Some(_g) = privileged_serial(
        "synack_retransmits_equal_the_servers_tcp_retrans_segs",
        &SERIAL,
    ) else {
        return;
    };
    let rig = Rig::new();
    let peer = rig.srv.peer_v4.clone();
    // The client's input drops the server's SYN/ACKs (after the agent's TC
    // hook on the veth has seen them): the server sends each again, from
    // its timer and in answer to the client's own SYN retransmits. (The
    // record takes a SYN sent after a SYN/ACK it saw for a new attempt on
    // the same tuple, so `syn_retransmits` stays 0 here; not asserted.)
    rig.node.exec(&["nft", "add table inet fmsynack"]);
    rig.node.exec(&[
        "nft",
        "add chain inet fmsynack in { type filter hook input priority 0; }",
    ]);
    rig.node.exec(&[
        "nft",
        &format!(
            "add rule inet fmsynack in tcp sport {SYNACK_LOST_PORT} tcp flags & (syn|ack) == syn|ack drop"
        ),
    ]);
    let _listener = rig
        .srv
        .run_in(move || TcpListener::bind(("0.0.0.0", SYNACK_LOST_PORT)).unwrap())
        .unwrap();
    let col = rig.node.run_in(collector::Server::start).unwrap();
    let state = TempDir::new("health-synack");
    let agent = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
        .id("health")
        .iface(&rig.srv.host)
        .interval("1s")
        .netns(&rig.node)
        .api_key("k")
        .args(&["--endpoint", &col.url()])
        .state_dir(state.path())
        .no_web()
        .start()
        .unwrap();
    wait_batches(&col, 1);
    let client_before = Rig::nstat(&rig.node, "TcpRetransSegs");
    let server_before = Rig::nstat(&rig.srv, "TcpRetransSegs");
    let p = peer.clone();
    let e = rig
        .node
        .run_in(move || {
            let a = SocketAddr::new(p.parse().unwrap(), SYNACK_LOST_PORT);
            TcpStream::connect_timeout(&a, Duration::from_millis(2500)).unwrap_err()
        })
        .unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    let n = col.bodies().len();
    wait_batches(&col, n + 2);
    let client = Rig::nstat(&rig.node, "TcpRetransSegs") - client_before;
    let server = Rig::nstat(&rig.srv, "TcpRetransSegs") - server_before;
    let (out, err) = agent.stop().unwrap();
    let recs: Vec<serde_json::Value> = records(&out)
        .into_iter()
        .filter(|r| r["protocol"] == "tcp" && r["dst_port"] == SYNACK_LOST_PORT)
        .collect();
    let total = |k: &str| -> u64 { recs.iter().map(|r| r[k].as_u64().unwrap()).sum() };
    assert!(server >= 2, "server TcpRetransSegs delta {server}");
    // Every SYN/ACK the server sent (the first and each sent again) was
    // dropped by the client's input rule, on this flow.
    let dropped: u64 = recs
        .iter()
        .map(|r| r["drops"]["NETFILTER_DROP"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        (
            total("retransmits_client_to_server"),
            total("retransmits_server_to_client"),
            dropped,
        ),
        (client, server, server + 1),
        "{out}\n{err}"
    );
}
