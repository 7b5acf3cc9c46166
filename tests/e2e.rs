//! End to end: real traffic through a veth pair into a namespace the test
//! creates, the agent binary attached to it, and its JSON lines compared
//! with exact expected counts and with an independent AF_PACKET capture.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flowmap_testkit::agent::{http_get, Agent, AgentBuilder};
use flowmap_testkit::collector::{self, header};
use flowmap_testkit::net::{ifindex, privileged_serial, sh, Link, Netns};
use flowmap_testkit::tempdir::TempDir;
use flowmap_testkit::traffic::{
    agent_totals, oracle, traffic, Capture, Dir, Server, Tuple, TCP_BYTES, UDP_SIZES,
};

/// The e2e tests share interfaces of the host: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The agent binary on `iface`: data source `e2e`, a 1 s interval, its
/// flow records on stdout.
fn agent(iface: &str) -> AgentBuilder {
    Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        .id("e2e")
        .iface(iface)
        .interval("1s")
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
}

fn nothing_attached(dev: &str) {
    let tcx = flowmap_testkit::agent::tcx_programs(ifindex(dev));
    assert!(
        tcx.iter().all(|n| !n.starts_with("flowmap")),
        "flowmap TCX links left on {dev}: {tcx:?}"
    );
    for dir in ["ingress", "egress"] {
        let tc = Command::new("tc")
            .args(["filter", "show", "dev", dev, dir])
            .output()
            .unwrap();
        let tc = String::from_utf8_lossy(&tc.stdout);
        assert!(
            !tc.contains("flowmap"),
            "flowmap TC filter left on {dev} {dir}:\n{tc}"
        );
    }
    // Nor the clsact qdisc flowmap made for its filters.
    let q = sh(&["tc", "qdisc", "show", "dev", dev]);
    assert!(!q.contains("clsact"), "clsact qdisc left on {dev}:\n{q}");
}

#[test]
fn exact_counts_ipv4_and_ipv6_through_a_veth() {
    let Some(_g) = privileged_serial("exact_counts_ipv4_and_ipv6_through_a_veth", &SERIAL) else {
        return;
    };
    let v = Netns::new().unwrap();
    let _server = Server::start(&v);
    let cap = Capture::start(v.ifindex());
    let agent = agent(&v.host).start().unwrap();
    // Within the start-up grace a UDP flow may have been running before the
    // agent: its first packet does not decide; the bound socket on this
    // host's port 7000 does.
    let early = UdpSocket::bind((v.host_v4.as_str(), 7000)).unwrap();
    early
        .send_to(&[0u8; 10], (v.peer_v4.as_str(), 40001))
        .unwrap();
    // Past the grace: flows from here on are seen from their start.
    std::thread::sleep(Duration::from_millis(1100));
    let (t4, u4) = traffic(v.peer_v4.parse().unwrap());
    let (t6, u6) = traffic(v.peer_v6.parse().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let captured = cap.finish();
    let (out, err) = agent.stop().unwrap();
    nothing_attached(&v.host);
    let got = agent_totals(&out);
    let early: Tuple = (
        "udp".into(),
        v.peer_v4.clone(),
        40001,
        v.host_v4.clone(),
        7000,
    );
    let e = got
        .get(&early)
        .unwrap_or_else(|| panic!("no early UDP flow {early:?} in:\n{out}"));
    assert_eq!(
        (e.orientation.as_str(), e.d2s),
        (
            "listen_socket",
            Dir {
                packets: 1,
                bytes: 14 + 20 + 8 + 10
            }
        )
    );

    for (host, peer, tcp_port, udp_port, ip_hdr, icmp) in [
        (&v.host_v4, &v.peer_v4, t4, u4, 20u64, "icmp"),
        (&v.host_v6, &v.peer_v6, t6, u6, 40u64, "icmpv6"),
    ] {
        let tcp: Tuple = ("tcp".into(), host.clone(), tcp_port, peer.clone(), 5001);
        let a = got
            .get(&tcp)
            .unwrap_or_else(|| panic!("no TCP flow {tcp:?} in:\n{out}\n{err}"));
        let o = oracle(&captured, &tcp);
        assert_eq!(
            (a.s2d, a.d2s),
            (o.s2d, o.d2s),
            "TCP {tcp:?} agent vs capture"
        );
        assert!(a.s2d.bytes > TCP_BYTES as u64 && a.d2s.bytes > 1000);
        assert_eq!(a.orientation, "syn");
        assert!(
            a.rtt_us.is_some_and(|r| r > 0.0),
            "handshake time for {tcp:?}"
        );
        assert_eq!(a.interface, v.host);

        let udp: Tuple = ("udp".into(), host.clone(), udp_port, peer.clone(), 5002);
        let a = got
            .get(&udp)
            .unwrap_or_else(|| panic!("no UDP flow {udp:?} in:\n{out}"));
        let hdr = 14 + ip_hdr + 8;
        let sent: u64 = UDP_SIZES.iter().map(|s| hdr + *s as u64).sum();
        assert_eq!(
            a.s2d,
            Dir {
                packets: 10,
                bytes: sent
            },
            "UDP {udp:?}"
        );
        assert_eq!(
            a.d2s,
            Dir {
                packets: 10,
                bytes: 10 * (hdr + 50)
            }
        );
        let o = oracle(&captured, &udp);
        assert_eq!((a.s2d, a.d2s), (o.s2d, o.d2s));
        assert_eq!(a.orientation, "first_packet");

        let ping: Tuple = (icmp.into(), host.clone(), 0, peer.clone(), 0);
        let a = got
            .get(&ping)
            .unwrap_or_else(|| panic!("no ICMP flow {ping:?} in:\n{out}"));
        let echo = 14 + ip_hdr + 8 + 56;
        assert_eq!(
            a.s2d,
            Dir {
                packets: 3,
                bytes: 3 * echo
            },
            "{icmp} echo requests"
        );
        if icmp == "icmp" {
            // ICMPv6 also carries neighbour discovery between the same hosts.
            assert_eq!(
                a.d2s,
                Dir {
                    packets: 3,
                    bytes: 3 * echo
                }
            );
        }
        assert_eq!(a.orientation, "icmp_echo");
    }
}

/// IPv4 flows go to the kernel's compact IPv4 flow maps only on interfaces
/// whose index fits its 24 bits; on others they use the full key. Both
/// give the same records.
#[test]
fn an_interface_index_past_the_ipv4_key_counts_the_same() {
    let Some(_g) = privileged_serial(
        "an_interface_index_past_the_ipv4_key_counts_the_same",
        &SERIAL,
    ) else {
        return;
    };
    let v = Netns::builder().host_index(1 << 24).build().unwrap();
    assert_eq!(v.ifindex(), 1 << 24);
    let _server = Server::start(&v);
    let cap = Capture::start(v.ifindex());
    let agent = agent(&v.host).start().unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (t4, u4) = traffic(v.peer_v4.parse().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let captured = cap.finish();
    let (out, err) = agent.stop().unwrap();
    let got = agent_totals(&out);
    let tcp: Tuple = ("tcp".into(), v.host_v4.clone(), t4, v.peer_v4.clone(), 5001);
    let a = got
        .get(&tcp)
        .unwrap_or_else(|| panic!("no TCP flow {tcp:?} in:\n{out}\n{err}"));
    assert_eq!((a.s2d, a.d2s), {
        let o = oracle(&captured, &tcp);
        (o.s2d, o.d2s)
    });
    assert_eq!(
        (a.orientation.as_str(), a.interface.as_str()),
        ("syn", v.host.as_str())
    );
    let udp: Tuple = ("udp".into(), v.host_v4.clone(), u4, v.peer_v4.clone(), 5002);
    let a = got
        .get(&udp)
        .unwrap_or_else(|| panic!("no UDP flow {udp:?} in:\n{out}"));
    let hdr = 14 + 20 + 8;
    let sent: u64 = UDP_SIZES.iter().map(|s| hdr + *s as u64).sum();
    assert_eq!(
        (a.s2d, a.d2s),
        (
            Dir {
                packets: 10,
                bytes: sent
            },
            Dir {
                packets: 10,
                bytes: 10 * (hdr + 50)
            }
        )
    );
}

#[test]
fn a_veth_created_while_running_is_attached_and_counted() {
    let Some(_g) = privileged_serial(
        "a_veth_created_while_running_is_attached_and_counted",
        &SERIAL,
    ) else {
        return;
    };
    let agent = agent("all").start().unwrap();
    let v = Netns::new().unwrap();
    if agent
        .wait_log(&format!("interface={}", v.host), Duration::from_secs(5))
        .is_err()
    {
        panic!("new veth not attached:\n{}", agent.stderr());
    }
    let u = UdpSocket::bind("0.0.0.0:0").unwrap();
    let port = u.local_addr().unwrap().port();
    for _ in 0..5 {
        u.send_to(&[0u8; 300], (v.peer_v4.as_str(), 5999)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let (out, _) = agent.stop().unwrap();
    let got = agent_totals(&out);
    let t: Tuple = (
        "udp".into(),
        v.host_v4.clone(),
        port,
        v.peer_v4.clone(),
        5999,
    );
    let a = got
        .get(&t)
        .unwrap_or_else(|| panic!("no flow {t:?}:\n{out}"));
    assert_eq!(
        a.s2d,
        Dir {
            packets: 5,
            bytes: 5 * (14 + 20 + 8 + 300)
        }
    );
    assert_eq!(a.interface, v.host);
    nothing_attached(&v.host);
}

#[test]
fn nothing_stays_attached_after_sigkill_and_restart() {
    let Some(_g) = privileged_serial("nothing_stays_attached_after_sigkill_and_restart", &SERIAL)
    else {
        return;
    };
    let v = Netns::new().unwrap();
    // TCX links die with the process.
    let a = agent(&v.host)
        .args(&["--attach-mode", "tcx"])
        .start()
        .unwrap();
    let tcx = flowmap_testkit::agent::tcx_programs(v.ifindex());
    assert_eq!(
        tcx.iter().filter(|n| *n == "flowmap_eth").count(),
        2,
        "TCX ingress+egress expected: {tcx:?}"
    );
    a.kill();
    std::thread::sleep(Duration::from_millis(200));
    nothing_attached(&v.host);

    // Classic TC filters outlive a killed process ...
    let a = agent(&v.host)
        .args(&["--attach-mode", "tc"])
        .start()
        .unwrap();
    a.kill();
    let left = sh(&["tc", "filter", "show", "dev", &v.host, "ingress"]);
    assert!(
        left.contains("flowmap_eth"),
        "the killed agent's filter should remain:\n{left}"
    );
    // ... and the next start removes them, and its own at exit.
    let a = agent(&v.host)
        .args(&["--attach-mode", "tc"])
        .start()
        .unwrap();
    assert!(
        a.stderr()
            .contains("removed TC filters left by an earlier flowmap"),
        "{}",
        a.stderr()
    );
    a.stop().unwrap();
    nothing_attached(&v.host);
}

/// (protocol, port) → summed flow stats of relationship src → dst over all batches.
fn edge_totals(bodies: &[Vec<u8>], src: &str, dst: &str) -> HashMap<(String, u64), [u64; 6]> {
    use base64::Engine;
    let mut out: HashMap<(String, u64), [u64; 6]> = HashMap::new();
    for b in bodies {
        let batch: flowmap::sinks::coordimap::Batch =
            serde_json::from_slice(b).expect("a Coordimap batch");
        for e in &batch.cloud_crawl_data.crawled_data.data {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&e.data)
                .unwrap();
            assert_eq!(
                e.hash,
                flowmap::sinks::coordimap::hex_sha256(&bytes),
                "hash of {}",
                e.id
            );
            if e.id != format!("{src}.{dst}") {
                continue;
            }
            assert_eq!(e.kind, "coordimap.relationship_skipinsert");
            let p: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                (p["source_id"].as_str(), p["destination_id"].as_str()),
                (Some(src), Some(dst))
            );
            assert_eq!(p["relation_type"], 104);
            for f in p["flows"].as_array().unwrap() {
                let t = out
                    .entry((
                        f["protocol"].as_str().unwrap().to_string(),
                        f["port"].as_u64().unwrap(),
                    ))
                    .or_default();
                for (i, k) in [
                    "packets_client_to_server",
                    "bytes_client_to_server",
                    "packets_server_to_client",
                    "bytes_server_to_client",
                    "connections_opened",
                ]
                .iter()
                .enumerate()
                {
                    t[i] += f[k].as_u64().unwrap();
                }
                t[5] += f["handshake"]["count"].as_u64().unwrap_or(0);
            }
        }
    }
    out
}

#[test]
fn ships_the_graph_to_a_collector_on_loopback() {
    let Some(_g) = privileged_serial("ships_the_graph_to_a_collector_on_loopback", &SERIAL) else {
        return;
    };
    let v = Netns::new().unwrap();
    let _server = Server::start(&v);
    let col = collector::Server::start();
    let state = TempDir::new("wire");
    let cap = Capture::start(v.ifindex());
    let url = col.url();
    let agent = agent(&v.host)
        .api_key("${FM_TEST_KEY}")
        .args(&["--endpoint", &url, "--retry-max", "1s"])
        .state_dir(state.path())
        .output("none")
        .env("FM_TEST_KEY", "k-123-not-for-logs")
        .start()
        .unwrap();
    let (tcp_port, _) = traffic(v.peer_v4.parse().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let captured = cap.finish();
    let (_, err) = agent.stop().unwrap();
    assert!(
        !err.contains("k-123-not-for-logs"),
        "the API key reached a log line"
    );
    let log = col.log.lock().unwrap();
    assert!(!log.accepted.is_empty());
    for (i, (h, _)) in log.accepted.iter().enumerate() {
        assert_eq!(header(h, "api-key"), "k-123-not-for-logs");
        assert_eq!(header(h, "content-type"), "application/json");
        assert_eq!(
            header(h, "x-flowmap-batch"),
            (i + 1).to_string(),
            "batches in order, each once"
        );
    }
    drop(log);
    let bodies = col.bodies();
    let host = format!("e2e-flows.host-{}", flowmap::enrich::host::hostname());
    let peer = format!("e2e-flows.external-{}", v.peer_v4);
    let got = edge_totals(&bodies, &host, &peer);
    assert_eq!(got[&("udp".to_string(), 5002)], udp_exchange(&UDP_SIZES));
    assert_eq!(got[&("icmp".to_string(), 0)], [3, 3 * 98, 3, 3 * 98, 1, 0]);
    let tcp: Tuple = (
        "tcp".into(),
        v.host_v4.clone(),
        tcp_port,
        v.peer_v4.clone(),
        5001,
    );
    let o = oracle(&captured, &tcp);
    assert_eq!(
        got[&("tcp".to_string(), 5001)],
        [o.s2d.packets, o.s2d.bytes, o.d2s.packets, o.d2s.bytes, 1, 1]
    );
    // The host element carries the host's address on the veth.
    let first: flowmap::sinks::coordimap::Batch = serde_json::from_slice(&bodies[0]).unwrap();
    let h = first
        .cloud_crawl_data
        .crawled_data
        .data
        .iter()
        .find(|e| e.id == host)
        .expect("host element");
    let payload: serde_json::Value = serde_json::from_slice(&h.payload().unwrap()).unwrap();
    assert!(payload["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == &serde_json::json!(v.host_v4)));
    assert_eq!(first.cloud_crawl_data.crawl_internal_id, "e2e");
}

fn count_spooled(err: &str) -> u64 {
    err.lines().filter(|l| l.contains("batch spooled")).count() as u64
}

#[test]
fn every_batch_arrives_once_in_order_through_failures_and_a_restart() {
    use collector::Mode;
    let Some(_g) = privileged_serial(
        "every_batch_arrives_once_in_order_through_failures_and_a_restart",
        &SERIAL,
    ) else {
        return;
    };
    let v = Netns::new().unwrap();
    let mut col = collector::Server::start();
    let state = TempDir::new("faults");
    let url = col.url();
    let start = || {
        agent(&v.host)
            .api_key("${FM_TEST_KEY}")
            .args(&["--endpoint", &url, "--retry-max", "1s"])
            .args(&["--shutdown-timeout", "1s"])
            .state_dir(state.path())
            .output("none")
            .env("FM_TEST_KEY", "k")
            .start()
            .unwrap()
    };
    let a1 = start();
    std::thread::sleep(Duration::from_millis(2500));
    col.set_mode(Mode::Fail500);
    std::thread::sleep(Duration::from_secs(3));
    col.down();
    std::thread::sleep(Duration::from_secs(2));
    // Restarted while the collector is down: what is spooled waits on disk.
    let (_, err1) = a1.stop().unwrap();
    let a2 = start();
    std::thread::sleep(Duration::from_secs(2));
    col.set_mode(Mode::Slow(Duration::from_secs(2)));
    col.up();
    std::thread::sleep(Duration::from_secs(4));
    col.set_mode(Mode::Ok);
    // Give the backlog time to drain, then stop: the last batch goes too.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spooled = std::fs::read_dir(state.path().join("spool"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".json")
            })
            .count();
        if spooled == 0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, err2) = a2.stop().unwrap();
    let built = count_spooled(&err1) + count_spooled(&err2);
    let log = col.log.lock().unwrap();
    let seqs: Vec<u64> = log
        .accepted
        .iter()
        .map(|(h, _)| header(h, "x-flowmap-batch").parse().unwrap())
        .collect();
    assert!(log.refused > 0, "the 500 phase was exercised");
    assert!(built >= 10, "batches built: {built}");
    assert_eq!(
        seqs,
        (1..=built).collect::<Vec<u64>>(),
        "every batch once, in order\n--- first run\n{err1}\n--- second run\n{err2}"
    );
    assert!(
        err2.contains("undelivered batches found in the spool"),
        "{err2}"
    );
}

/// Parses Prometheus text: every sample line is `name[{labels}] value`.
fn prom_samples(text: &str) -> HashMap<String, f64> {
    let mut m = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad metrics line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            name.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_'),
            "bad metric name in {line:?}"
        );
        m.insert(name.to_string(), v);
    }
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    m
}

fn chromium(args: &[&str]) -> String {
    let profile = TempDir::new("chromium-profile");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.path().display()),
            "--virtual-time-budget=15000",
            "--window-size=1400,900",
        ])
        .args(args)
        .output()
        .expect("chromium runs (scripts/setup.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn local_store_map_page_and_metrics() {
    let Some(_g) = privileged_serial("local_store_map_page_and_metrics", &SERIAL) else {
        return;
    };
    if Command::new("chromium").arg("--version").output().is_err() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("chromium is not installed (scripts/setup.sh installs it) and CI=true forbids skipping");
        }
        eprintln!("SKIP local_store_map_page_and_metrics: chromium is not installed");
        return;
    }
    let v = Netns::new().unwrap();
    let _server = Server::start(&v);
    let state = TempDir::new("store");
    let agent = agent(&v.host)
        .state_dir(state.path())
        .output("none")
        .start()
        .unwrap();
    let port = agent.port();
    let (code, health) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 200, "{health}");
    let h: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(
        (
            h["status"].as_str(),
            h["datapath"]["interfaces_attached"].as_u64()
        ),
        (Some("ok"), Some(1))
    );
    let before = prom_samples(&http_get(port, "/metrics").unwrap().1);

    traffic(v.peer_v4.parse().unwrap());
    // Two intervals of 1 s go by: the graph is stored.
    std::thread::sleep(Duration::from_millis(2500));
    let (code, body) = http_get(port, "/api/graph?since=15m&protocol=udp").unwrap();
    assert_eq!(code, 200, "{body}");
    let g: serde_json::Value = serde_json::from_str(&body).unwrap();
    let host = format!("e2e-flows.host-{}", flowmap::enrich::host::hostname());
    let peer = format!("e2e-flows.external-{}", v.peer_v4);
    let edges = g["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 1, "{body}");
    let e = &edges[0];
    assert_eq!(
        (
            e["source"].as_str(),
            e["target"].as_str(),
            e["port"].as_u64()
        ),
        (Some(host.as_str()), Some(peer.as_str()), Some(5002))
    );
    let hdr = 14 + 20 + 8;
    let sent: u64 = UDP_SIZES.iter().map(|s| hdr + *s as u64).sum();
    assert_eq!(
        (
            e["packets_client_to_server"].as_u64(),
            e["bytes_client_to_server"].as_u64(),
            e["bytes_server_to_client"].as_u64()
        ),
        (Some(10), Some(sent), Some(10 * (hdr + 50)))
    );
    let names: Vec<&str> = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&v.peer_v4.as_str()), "{names:?}");
    assert_eq!(http_get(port, "/api/graph?since=soon").unwrap().0, 400);

    let after = prom_samples(&http_get(port, "/metrics").unwrap().1);
    let moved =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    assert!(
        moved("flowmap_packets_total{direction=\"client_to_server\"}") >= 10.0 + 3.0,
        "packets counter moved"
    );
    assert!(
        moved("flowmap_bytes_total{direction=\"server_to_client\"}") >= (10 * (hdr + 50)) as f64
    );
    assert!(moved("flowmap_batches_built_total") >= 2.0);
    assert!(moved("flowmap_store_intervals_written_total") >= 2.0);
    assert_eq!(after["flowmap_interfaces_attached"], 1.0);
    assert_eq!(after["flowmap_kernel_map_capacity"], 32768.0);

    // The page in a real browser: the map and its edge list show the flows.
    let url = format!("http://127.0.0.1:{port}/");
    let dom = chromium(&["--dump-dom", &url]);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page did not load its graph:\n{dom}"
    );
    assert!(
        dom.contains(&format!("data-source=\"{host}\" data-target=\"{peer}\"")),
        "edge row missing:\n{dom}"
    );
    assert!(
        dom.contains("udp/5002") && dom.contains("tcp/5001") && dom.contains(&v.peer_v4),
        "{dom}"
    );
    assert!(!dom.contains("error:"), "{dom}");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("map-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[&format!("--screenshot={}", shot.display()), &url]);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        png.len() > 10_000,
        "a real picture, not a blank page: {} bytes",
        png.len()
    );

    agent.stop().unwrap();
    // The CLI reads the same store.
    let out = Command::new(env!("CARGO_BIN_EXE_flowmap"))
        .args([
            "top",
            "--state-dir",
            state.path().to_str().unwrap(),
            "--since",
            "15m",
            "--by",
            "packets",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.contains("udp/5002"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains(&v.peer_v4) && row.contains(&format!(" {} ", sent + 10 * (hdr + 50))),
        "{row}"
    );
}

// ---- Kubernetes mode --------------------------------------------------

const CLUSTER_UID: &str = "6f5f56e3-0123-4567-89ab-6c8f1e2a0cde";

/// Sends UDP datagrams of `sizes` to `dst`:`port` from namespace `ns`;
/// each must be answered with 50 bytes.
fn udp_from(ns: &Netns, dst: &str, port: u16, sizes: &[usize]) {
    let script = format!(
        "import socket\nu=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nu.settimeout(3)\n\
         for n in {sizes:?}:\n    u.sendto(b'x'*n,('{dst}',{port}))\n    assert len(u.recv(100))==50\n"
    );
    ns.exec(&["python3", "-c", &script]);
}

/// A pod of the test cluster: a namespace whose `eth0` has `ip`/24, its
/// veth's node end a port of `bridge` (as with a bridge CNI).
fn pod_on(bridge: &Link, ip: &str) -> Netns {
    Netns::builder()
        .pod()
        .bridge(bridge)
        .v4("", ip, 24)
        .no_v6()
        .build()
        .unwrap()
}

/// A web pod of the test cluster's Deployment `web`.
fn web_pod(name: &str, ip: &str, node: &str) -> serde_json::Value {
    flowmap_testkit::standin::pod(
        "shop",
        name,
        "1",
        ip,
        node,
        Some(("ReplicaSet", "web-6b9f")),
    )
}

/// The test cluster in the stand-in API: node `node`, the client pod, the
/// web pod `web-6b9f-aaaaa` of Deployment `web`.
fn shop_cluster(
    api: &flowmap_testkit::standin::StandIn,
    node: &str,
    node_ip: &str,
    client_ip: &str,
    web_ip: &str,
) {
    use flowmap_testkit::standin;
    api.set_cluster_uid(CLUSTER_UID);
    api.upsert(standin::node(node, node_ip));
    api.upsert(standin::replicaset("shop", "web-6b9f", Some("web")));
    api.upsert(standin::pod("shop", "client", "1", client_ip, node, None));
    api.upsert(web_pod("web-6b9f-aaaaa", web_ip, node));
}

/// The agent in Kubernetes mode on every interface of `netns` (None: this
/// one), against the stand-in API, shipping to `col`.
fn kube_agent(
    netns: Option<&Netns>,
    api: &flowmap_testkit::standin::StandIn,
    col: &collector::Server,
    state: &TempDir,
    node: &str,
) -> Agent {
    let mut b = agent("all")
        .api_key("k-kube")
        .option("deployedAt", "kubernetes")
        .option("external_mappings", format!("\"*@{CLUSTER_UID}\""))
        .args(&["--endpoint", &col.url(), "--retry-max", "1s"])
        .state_dir(state.path())
        .output("none")
        .no_web()
        .env("NODE_NAME", node);
    if let Some(ns) = netns {
        b = b.netns(ns);
    }
    let kubeconfig = b.file("kubeconfig", &api.kubeconfig());
    let agent = b
        .env("KUBECONFIG", kubeconfig.to_str().unwrap())
        .start()
        .unwrap();
    let err = agent.stderr();
    assert!(err.contains("Kubernetes watch caches in sync"), "{err}");
    assert!(!err.contains("differs from this cluster's"), "{err}");
    agent
}

fn pod_id(name: &str) -> String {
    format!("{CLUSTER_UID}-shop-kubernetes.pod-{name}")
}

/// The exact edge totals (`edge_totals`) of one UDP exchange of `sizes`,
/// each datagram answered with 50 bytes.
fn udp_exchange(sizes: &[usize]) -> [u64; 6] {
    let hdr = 14 + 20 + 8;
    let n = sizes.len() as u64;
    let sent = sizes.iter().map(|s| hdr + *s as u64).sum();
    [n, sent, n, n * (hdr + 50), 1, 0]
}

#[test]
fn kubernetes_mode_attaches_flows_to_pods_and_follows_ip_reuse() {
    use flowmap_testkit::standin::StandIn;
    let Some(_g) = privileged_serial(
        "kubernetes_mode_attaches_flows_to_pods_and_follows_ip_reuse",
        &SERIAL,
    ) else {
        return;
    };
    let net = format!("10.213.{}", 230 + std::process::id() % 20);
    let (node_ip, client_ip, web_ip) =
        (format!("{net}.1"), format!("{net}.10"), format!("{net}.11"));
    let br = Link::bridge(&format!("{node_ip}/24")).unwrap();
    let client = pod_on(&br, &client_ip);
    let web1 = pod_on(&br, &web_ip);
    let server1 = Server::start(&web1);
    let api = StandIn::start().unwrap();
    shop_cluster(&api, "node-e2e", &node_ip, &client_ip, &web_ip);
    let col = collector::Server::start();
    let state = TempDir::new("kube");
    let agent = kube_agent(None, &api, &col, &state, "node-e2e");

    // Traffic to the first pod, which is then deleted before the agent's
    // next drain: its flows still belong to it, by their time.
    udp_from(&client, &web_ip, 5002, &[100, 200, 300]);
    std::thread::sleep(Duration::from_millis(100));
    api.delete("Pod", Some("shop"), "web-6b9f-aaaaa");
    drop(server1);
    drop(web1);
    // The IP comes back as a new pod, in a new namespace on a new veth.
    let web2 = pod_on(&br, &web_ip);
    let _server2 = Server::start(&web2);
    api.upsert(web_pod("web-6b9f-bbbbb", &web_ip, "node-e2e"));
    // The client forgets the old pod's MAC (a CNI announces the new one).
    client.exec(&["ip", "neigh", "flush", "all"]);
    // The new veth is attached within the poll period.
    std::thread::sleep(Duration::from_millis(1200));
    udp_from(&client, &web_ip, 5002, &[400, 500, 600, 700]);
    std::thread::sleep(Duration::from_millis(1500));
    let (_, err) = agent.stop().unwrap();

    let bodies = col.bodies();
    let udp = ("udp".to_string(), 5002);
    let old = edge_totals(&bodies, &pod_id("client"), &pod_id("web-6b9f-aaaaa"));
    assert_eq!(
        old.get(&udp).copied(),
        Some(udp_exchange(&[100, 200, 300])),
        "{old:?}\n{err}"
    );
    let new = edge_totals(&bodies, &pod_id("client"), &pod_id("web-6b9f-bbbbb"));
    assert_eq!(
        new.get(&udp).copied(),
        Some(udp_exchange(&[400, 500, 600, 700])),
        "{new:?}\n{err}"
    );
    // The pods' elements carry their workload; the node is its own element.
    let mut seen = HashMap::new();
    for b in &bodies {
        let batch: flowmap::sinks::coordimap::Batch = serde_json::from_slice(b).unwrap();
        for e in batch.cloud_crawl_data.crawled_data.data {
            if e.kind != "coordimap.relationship_skipinsert" {
                let p: serde_json::Value = serde_json::from_slice(&e.payload().unwrap()).unwrap();
                seen.insert(e.id.clone(), (e.kind.clone(), p));
            }
        }
    }
    let (kind, p) = &seen[&pod_id("web-6b9f-bbbbb")];
    assert_eq!(kind, "kubernetes.pod");
    assert_eq!(
        (
            p["namespace"].as_str(),
            p["workload"].as_str(),
            p["node"].as_str()
        ),
        (Some("shop"), Some("Deployment/web"), Some("node-e2e"))
    );
    assert_eq!(seen[&pod_id("client")].1["workload"], "Pod/client");
    assert_eq!(
        seen[&format!("{CLUSTER_UID}--kubernetes.node-node-e2e")].0,
        "kubernetes.node"
    );
    // No pod traffic went to an external endpoint.
    assert!(
        !seen
            .keys()
            .any(|k| k.contains(&format!("flows.external-{net}."))),
        "{:?}",
        seen.keys().collect::<Vec<_>>()
    );
    drop(web2);
    drop(client);
}

#[test]
fn kubernetes_mode_sees_pod_to_service_to_pod_through_a_cluster_ip() {
    use flowmap_testkit::standin::{self, StandIn};
    let Some(_g) = privileged_serial(
        "kubernetes_mode_sees_pod_to_service_to_pod_through_a_cluster_ip",
        &SERIAL,
    ) else {
        return;
    };
    // A node that routes between two pods and DNATs a ClusterIP the way
    // kube-proxy's nftables mode does; the agent, the API server and the
    // collector all live in the node's namespace (its loopback).
    let node = Netns::builder().no_link().build().unwrap();
    let routed_pod = |i: u8| {
        let (gw, ip) = (format!("10.214.{i}.1"), format!("10.214.{i}.2"));
        Netns::routed_behind(&node, &gw, &ip)
    };
    let client = routed_pod(1);
    let web = routed_pod(2);
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    node.exec(&[
        "nft",
        "add table ip kubeproxy; \
         add chain ip kubeproxy prerouting { type nat hook prerouting priority dstnat; policy accept; }; \
         add rule ip kubeproxy prerouting ip daddr 10.96.0.10 udp dport 80 dnat to 10.214.2.2:5002",
    ]);
    let _server = Server::start(&web);
    let (api, col) = node
        .run_in(|| (StandIn::start().unwrap(), collector::Server::start()))
        .unwrap();
    shop_cluster(&api, "node-k", "10.214.1.1", "10.214.1.2", "10.214.2.2");
    api.upsert(standin::service("shop", "web", "10.96.0.10", 80, 5002));
    let state = TempDir::new("kube-svc");
    let agent = kube_agent(Some(&node), &api, &col, &state, "node-k");
    let sizes = [120, 240, 360];
    udp_from(&client, "10.96.0.10", 80, &sizes);
    std::thread::sleep(Duration::from_millis(1500));
    let (_, err) = agent.stop().unwrap();

    let bodies = col.bodies();
    let svc = format!("{CLUSTER_UID}-shop-kubernetes.service-web");
    let want = Some(udp_exchange(&sizes));
    let to_svc = edge_totals(&bodies, &pod_id("client"), &svc);
    assert_eq!(
        to_svc.get(&("udp".to_string(), 80)).copied(),
        want,
        "{to_svc:?}\n{err}"
    );
    let from_svc = edge_totals(&bodies, &svc, &pod_id("web-6b9f-aaaaa"));
    assert_eq!(
        from_svc.get(&("udp".to_string(), 5002)).copied(),
        want,
        "{from_svc:?}\n{err}"
    );
    let direct = edge_totals(&bodies, &pod_id("client"), &pod_id("web-6b9f-aaaaa"));
    assert!(
        direct.is_empty(),
        "no pod → pod edge past the service: {direct:?}"
    );
    drop(api);
    drop(col);
}
