//! Names on the map (issue 14), through the agent binary in real
//! namespaces: a real DNS server (dnsmasq) answers A, AAAA and a CNAME
//! chain, a real TLS client and server (openssl) exchange a ClientHello,
//! also one split across segments, a real HTTP client and server (curl,
//! python3's http.server) a plain request, and a real QUIC client and
//! server (aioquic) their Initial packets. The agent's flow records
//! and the batches it ships to a collector on loopback must name exactly
//! the peers the client asked for, and nothing else.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;
use std::time::Duration;

use flowmap_testkit::agent::{Agent, AgentBuilder};
use flowmap_testkit::collector;
use flowmap_testkit::dns::Dnsmasq;
use flowmap_testkit::net::{privileged_serial, sh, Netns};
use flowmap_testkit::tempdir::TempDir;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn agent(iface: &str, col: &collector::Server, state: &TempDir) -> AgentBuilder {
    Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        .id("names")
        .iface(iface)
        .interval("1s")
        .api_key("k")
        .args(&["--endpoint", &col.url(), "--retry-max", "1s"])
        .state_dir(state.path())
        .output("flows")
        // Host-level edges: this test is not about processes (tests/process.rs).
        .option("processes", "false")
}

/// `10.213.5.2` → `10.213.5.<last>`; `fd0f:5::2` → `fd0f:5::<last>`.
fn sibling(addr: &str, last: u8) -> String {
    match addr.rsplit_once('.') {
        Some((p, _)) => format!("{p}.{last}"),
        None => format!("{}{last}", addr.trim_end_matches('2')),
    }
}

/// A TCP server in `ns` on every address, port `port`: accepts `n`
/// connections and reads each to its end.
fn tcp_server(ns: &Netns, port: u16, n: usize) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = ns.spawn_in(move || {
        let l = TcpListener::bind(("::", port)).unwrap();
        tx.send(()).unwrap();
        for _ in 0..n {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the server listens");
    h
}

/// Connects from `from` to `to`, sends 100 bytes and closes.
fn connect(from: &str, to: &str, port: u16) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let from: std::net::IpAddr = from.parse().unwrap();
    let to = SocketAddr::new(to.parse().unwrap(), port);
    rt.block_on(async {
        let s = if from.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .unwrap();
        s.bind(SocketAddr::new(from, 0)).unwrap();
        let s = s.connect(to).await.unwrap();
        let mut s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s.write_all(&[7u8; 100]).unwrap();
    });
}

/// Connections opened on the edge `src` → `dst`, by (protocol, port).
fn opened(
    els: &[(String, String, String, Value)],
    src: &str,
    dst: &str,
) -> HashMap<(String, u64), u64> {
    let mut out = HashMap::new();
    for (id, _, _, p) in els {
        if *id != format!("{src}.{dst}") {
            continue;
        }
        for f in p["flows"].as_array().unwrap() {
            let k = (
                f["protocol"].as_str().unwrap().to_string(),
                f["port"].as_u64().unwrap(),
            );
            *out.entry(k).or_default() += f["connections_opened"].as_u64().unwrap();
        }
    }
    out
}

/// The flow records of `--output flows` from `src` to `dst` port `port`.
fn records<'a>(out: &'a [Value], src: &str, dst: &str, port: u64) -> Vec<&'a Value> {
    out.iter()
        .filter(|r| r["src_ip"] == src && r["dst_ip"] == dst && r["dst_port"] == port)
        .collect()
}

#[test]
fn a_dns_answer_names_the_peer_for_the_client_that_asked_only() {
    let Some(_g) = privileged_serial(
        "a_dns_answer_names_the_peer_for_the_client_that_asked_only",
        &SERIAL,
    ) else {
        return;
    };
    let v = Netns::new().unwrap();
    // The answers' addresses, in the namespace beside its DNS server, and a
    // second client address on this host.
    let (a3, a4, a6) = (
        sibling(&v.peer_v4, 3),
        sibling(&v.peer_v4, 4),
        sibling(&v.peer_v6, 3),
    );
    let other = sibling(&v.host_v4, 9);
    v.exec(&["ip", "addr", "add", &format!("{a3}/32"), "dev", &v.peer]);
    v.exec(&["ip", "addr", "add", &format!("{a4}/32"), "dev", &v.peer]);
    v.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{a6}/128"),
        "dev",
        &v.peer,
        "nodad",
    ]);
    sh(&["ip", "addr", "add", &format!("{other}/32"), "dev", &v.host]);
    let _dns = Dnsmasq::start(
        &v,
        &[&v.peer_v4, &v.peer_v6],
        &[
            format!("--host-record=origin.test,{a3},{a6},60"),
            format!("--host-record=origin.test,{a4},60"),
            "--cname=www.test,edge.test,60".into(),
            "--cname=edge.test,origin.test,60".into(),
        ],
    )
    .unwrap();
    let server = tcp_server(&v, 5301, 4);
    let col = collector::Server::start();
    let state = TempDir::new("names");
    let agent = agent(&v.host, &col, &state).start().unwrap();

    // The client resolves (A over IPv4, AAAA over IPv6: each answer goes
    // to the address that connects) and connects to every address.
    let a = sh(&["dig", "+short", &format!("@{}", v.peer_v4), "www.test", "A"]);
    assert_eq!(
        a.lines().collect::<BTreeSet<_>>(),
        BTreeSet::from(["edge.test.", "origin.test.", a3.as_str(), a4.as_str()])
    );
    let aaaa = sh(&[
        "dig",
        "+short",
        &format!("@{}", v.peer_v6),
        "www.test",
        "AAAA",
    ]);
    assert!(aaaa.lines().any(|l| l == a6), "AAAA answer: {aaaa}");
    connect(&v.host_v4, &a3, 5301);
    connect(&v.host_v4, &a4, 5301);
    connect(&v.host_v6, &a6, 5301);
    // Another client of this host connects to the same address without
    // having resolved anything.
    connect(&other, &a3, 5301);
    server.join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (out, err) = agent.stop().unwrap();
    let out: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // Flow records: the server end named by DNS for the client that asked.
    let named = serde_json::json!({"dns": "www.test"});
    for (src, dst) in [(&v.host_v4, &a3), (&v.host_v4, &a4), (&v.host_v6, &a6)] {
        let rs = records(&out, src, dst, 5301);
        assert!(!rs.is_empty(), "no record {src} -> {dst}:\n{err}");
        for r in rs {
            assert_eq!(r["dst_names"], named, "{r}");
            assert!(r.get("src_names").is_none(), "{r}");
        }
    }
    for r in records(&out, &other, &a3, 5301) {
        assert!(
            r.get("dst_names").is_none(),
            "the other client got a name: {r}"
        );
    }
    // The DNS exchange itself names nothing.
    for r in records(&out, &v.host_v4, &v.peer_v4, 53) {
        assert!(r.get("dst_names").is_none(), "{r}");
    }

    // The graph: one endpoint for the name, with every address.
    let els = col.elements();
    let host = format!("names-flows.host-{}", flowmap::enrich::host::hostname());
    let www = "names-flows.external-www.test";
    let mut addrs = BTreeSet::new();
    let mut seen = 0;
    for (id, kind, name, p) in &els {
        if id != www {
            continue;
        }
        seen += 1;
        assert_eq!(
            (kind.as_str(), name.as_str()),
            ("flows.external", "www.test")
        );
        assert_eq!(p["name"], "www.test");
        assert_eq!(p["dns_names"], serde_json::json!(["www.test"]));
        assert!(p.get("tls_server_names").is_none(), "{p}");
        for a in p["addresses"].as_array().unwrap() {
            addrs.insert(a.as_str().unwrap().to_string());
        }
    }
    assert!(seen > 0, "no element {www}");
    assert_eq!(addrs, BTreeSet::from([a3.clone(), a4.clone(), a6.clone()]));
    assert_eq!(
        opened(&els, &host, www),
        HashMap::from([(("tcp".into(), 5301), 3)])
    );
    // The unnamed client's connection stays on the address's own endpoint.
    let plain = format!("names-flows.external-{a3}");
    assert_eq!(
        opened(&els, &host, &plain),
        HashMap::from([(("tcp".into(), 5301), 1)])
    );
    // The store has it too: `top` and `graph` read it.
    let bin = env!("CARGO_BIN_EXE_flowmap");
    let dir = state.path().to_str().unwrap();
    let top = sh(&[bin, "top", "--state-dir", dir, "--since", "1h"]);
    assert!(top.contains("www.test"), "{top}");
    let graph = sh(&[
        bin,
        "graph",
        "--state-dir",
        dir,
        "--since",
        "1h",
        "--format",
        "json",
    ]);
    assert!(graph.contains(www), "{graph}");
    for gone in [&a4, &a6] {
        let id = format!("names-flows.external-{gone}");
        assert!(
            !els.iter().any(|e| e.0 == id),
            "{id} should have been named"
        );
    }
}

/// The first captured bytes and the length of the TCP payload of an IPv4
/// Ethernet frame (`(length on the wire, first bytes)`, as the capture
/// keeps it) from `src` to port `dport`.
fn payload_to<'a>(f: &'a (usize, Vec<u8>), src: &str, dport: u16) -> Option<(&'a [u8], usize)> {
    let (wire, f) = (f.0, &f.1);
    if f.get(12..14)? != [0x08, 0x00] || f.get(23)? != &6 {
        return None;
    }
    let ip_len = u16::from_be_bytes([f[16], f[17]]) as usize;
    let ihl = (f[14] & 0xf) as usize * 4;
    let s: [u8; 4] = f.get(26..30)?.try_into().ok()?;
    let l4 = 14 + ihl;
    let d = u16::from_be_bytes([*f.get(l4 + 2)?, *f.get(l4 + 3)?]);
    if std::net::IpAddr::from(s).to_string() != src || d != dport {
        return None;
    }
    let off = l4 + (f.get(l4 + 12)? >> 4) as usize * 4;
    let len = (14 + ip_len).min(wire).checked_sub(off)?;
    Some((f.get(off..)?, len))
}

/// A self-signed certificate and its key (openssl), in `dir`.
fn self_signed(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    sh(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=flowmap-test",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    (cert, key)
}

#[test]
fn tls_server_names_name_the_peer_also_when_the_hello_is_split() {
    let Some(_g) = privileged_serial(
        "tls_server_names_name_the_peer_also_when_the_hello_is_split",
        &SERIAL,
    ) else {
        return;
    };
    // A node routing between a client and a server namespace; the agent
    // runs in the node. The client's interface sends plain segments (no
    // TSO/GSO), so a large ClientHello reaches the node as two skbs, as it
    // does on a router or on a server without GRO.
    let node = Netns::builder().no_link().build().unwrap();
    let routed = |i: u8| {
        let (gw, ip) = (format!("10.215.{i}.1"), format!("10.215.{i}.2"));
        Netns::routed_behind(&node, &gw, &ip)
    };
    let (client, server) = (routed(1), routed(2));
    node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    client.exec(&["ethtool", "-K", "eth0", "tso", "off", "gso", "off"]);
    let dir = TempDir::new("names-tls");
    let (cert, key) = self_signed(&dir);
    let mut tls_server = std::process::Command::new("ip")
        .args([
            "netns", "exec", &server.ns, "openssl", "s_server", "-quiet", "-naccept", "2",
        ])
        .args([
            "-accept",
            "4433",
            "-cert",
            cert.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let col = node.run_in(collector::Server::start).unwrap();
    let state = TempDir::new("names");
    // (`ip netns exec` mounts the node's /sys.)
    let idx: u32 = node
        .exec(&["cat", &format!("/sys/class/net/{}/ifindex", client.host)])
        .trim()
        .parse()
        .unwrap();
    let cap = node
        .run_in(move || flowmap_testkit::traffic::Capture::start(idx))
        .unwrap();
    let agent = agent(&client.host, &col, &state)
        .netns(&node)
        .start()
        .unwrap();
    let tls_client = |extra: &[&str]| {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &client.ns,
                "openssl",
                "s_client",
                "-connect",
                "10.215.2.2:4433",
            ])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    tls_client(&["-servername", "api.tls.test"]);
    // Twelve ALPN protocols of 203 bytes: a ClientHello of about 2.7 KB,
    // two segments.
    let alpn: Vec<String> = (0..12)
        .map(|i| format!("p{i:02}{}", "x".repeat(200)))
        .collect();
    tls_client(&["-servername", "Big.TLS.test.", "-alpn", &alpn.join(",")]);
    let _ = tls_server.wait();
    std::thread::sleep(Duration::from_millis(1500));
    let frames = cap.finish();
    let (out, err) = agent.stop().unwrap();

    // The big hello really crossed the interface split: its first segment
    // starts a handshake record longer than itself.
    let firsts: Vec<(&[u8], usize)> = frames
        .iter()
        .filter_map(|f| payload_to(f, "10.215.1.2", 4433))
        .filter(|(p, _)| p.len() > 5 && p[0] == 0x16 && p[5] == 0x01)
        .collect();
    assert_eq!(firsts.len(), 2, "two ClientHellos");
    let rec = |p: &[u8]| ((p[3] as usize) << 8 | p[4] as usize) + 5;
    assert!(
        rec(firsts[0].0) <= firsts[0].1,
        "the first hello fits one segment"
    );
    assert!(
        rec(firsts[1].0) > 2000 && rec(firsts[1].0) > firsts[1].1,
        "the second is split: {} of {}",
        firsts[1].1,
        rec(firsts[1].0)
    );

    let out: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut names: Vec<String> = records(&out, "10.215.1.2", "10.215.2.2", 4433)
        .iter()
        .map(|r| r["dst_names"]["tls"].as_str().unwrap_or("none").to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["api.tls.test", "big.tls.test"], "{err}");
    let els = col.elements();
    let from = "names-flows.external-10.215.1.2";
    for name in ["api.tls.test", "big.tls.test"] {
        let id = format!("names-flows.external-{name}");
        let (_, kind, el_name, p) = els
            .iter()
            .find(|e| e.0 == id)
            .unwrap_or_else(|| panic!("no {id}"));
        assert_eq!((kind.as_str(), el_name.as_str()), ("flows.external", name));
        assert_eq!(p["addresses"], serde_json::json!(["10.215.2.2"]));
        assert_eq!(p["tls_server_names"], serde_json::json!([name]));
        assert!(p.get("dns_names").is_none(), "{p}");
        assert_eq!(
            opened(&els, from, &id),
            HashMap::from([(("tcp".into(), 4433), 1)])
        );
    }
    // Both connections are named: the address's own endpoint has no edge.
    assert!(opened(&els, from, "names-flows.external-10.215.2.2").is_empty());
    drop(col);
}

/// A real HTTP server (python3's http.server) and client (curl): the Host
/// of a plain HTTP request names the peer when neither DNS nor TLS did; a
/// Host that is an address names nothing; nothing of the request but the
/// name leaves the agent.
#[test]
fn the_host_of_a_plain_http_request_names_the_peer() {
    let Some(_g) = privileged_serial("the_host_of_a_plain_http_request_names_the_peer", &SERIAL)
    else {
        return;
    };
    let v = Netns::new().unwrap();
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &v.ns, "python3", "-m", "http.server"])
        .args(["--bind", &v.peer_v4, "8080"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::net::TcpStream::connect((v.peer_v4.as_str(), 8080)).is_ok()
    });
    let col = collector::Server::start();
    let state = TempDir::new("names");
    let agent = agent(&v.host, &col, &state).start();
    let curl = |url: &str, extra: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", "Authorization: Bearer flowmap-secret-7"])
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let named = curl(
        "http://Web.HTTP.test:8080/",
        &[
            "--connect-to",
            &format!("web.http.test:8080:{}:8080", v.peer_v4),
        ],
    );
    let plain = curl(&format!("http://{}:8080/", v.peer_v4), &[]);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = server.kill();
    let _ = server.wait();
    assert!(up, "the HTTP server listens");
    let (out, err) = agent.unwrap().stop().unwrap();
    assert_eq!((named.as_str(), plain.as_str()), ("200", "200"));

    let recs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut got: Vec<Value> = records(&recs, &v.host_v4, &v.peer_v4, 8080)
        .iter()
        .map(|r| r.get("dst_names").cloned().unwrap_or(Value::Null))
        .collect();
    got.sort_by_key(|x| x.to_string());
    assert_eq!(
        got,
        [Value::Null, serde_json::json!({"http": "web.http.test"})],
        "{err}"
    );
    let els = col.elements();
    let host = format!("names-flows.host-{}", flowmap::enrich::host::hostname());
    let id = "names-flows.external-web.http.test";
    let (_, kind, name, p) = els
        .iter()
        .find(|e| e.0 == id)
        .unwrap_or_else(|| panic!("no {id}"));
    assert_eq!(
        (kind.as_str(), name.as_str()),
        ("flows.external", "web.http.test")
    );
    assert_eq!(p["addresses"], serde_json::json!([v.peer_v4]));
    assert_eq!(p["http_hosts"], serde_json::json!(["web.http.test"]));
    assert!(
        p.get("dns_names").is_none() && p.get("tls_server_names").is_none(),
        "{p}"
    );
    assert_eq!(
        opened(&els, &host, id),
        HashMap::from([(("tcp".into(), 8080), 1)])
    );
    assert_eq!(
        opened(&els, &host, &format!("names-flows.external-{}", v.peer_v4)),
        HashMap::from([(("tcp".into(), 8080), 1)])
    );
    // The request's other headers stay in the kernel's copy and the parser.
    let secret = "flowmap-secret-7";
    assert!(!out.contains(secret) && !err.contains(secret));
    for b in col.bodies() {
        assert!(!String::from_utf8_lossy(&b).contains(secret));
    }
}

const QUIC_SERVER: &str = r#"
import asyncio, sys
from aioquic.asyncio import serve
from aioquic.quic.configuration import QuicConfiguration
cfg = QuicConfiguration(is_client=False, alpn_protocols=["flowmap"])
cfg.load_cert_chain(sys.argv[1], sys.argv[2])
async def main():
    await serve(sys.argv[3], 443, configuration=cfg)
    print("ready", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"#;

const QUIC_CLIENT: &str = r#"
import asyncio, ssl, sys
from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration
cfg = QuicConfiguration(is_client=True, alpn_protocols=sys.argv[3].split(","), server_name=sys.argv[2])
cfg.verify_mode = ssl.CERT_NONE
async def main():
    async with connect(sys.argv[1], 443, configuration=cfg) as c:
        await c.ping()
    print("connected", flush=True)
asyncio.run(main())
"#;

/// A real QUIC server and client (aioquic): the server name of a QUIC
/// connection comes from the client's Initial packets, also when its
/// ClientHello spans several of them.
#[test]
fn quic_initial_packets_name_the_peer() {
    let Some(_g) = privileged_serial("quic_initial_packets_name_the_peer", &SERIAL) else {
        return;
    };
    let v = Netns::new().unwrap();
    let dir = TempDir::new("names-quic");
    let (cert, key) = self_signed(&dir);
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &v.ns, "python3", "-c", QUIC_SERVER])
        .args([cert.to_str().unwrap(), key.to_str().unwrap(), &v.peer_v4])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    let col = collector::Server::start();
    let state = TempDir::new("names");
    let agent = agent(&v.host, &col, &state).start();
    let client = |name: &str, alpn: &str| {
        let out = std::process::Command::new("python3")
            .args(["-c", QUIC_CLIENT, &v.peer_v4, name, alpn])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
            + &String::from_utf8_lossy(&out.stderr)
    };
    let small = client("quic.test", "flowmap");
    // Twelve ALPN protocols of 203 bytes: a ClientHello of about 2.7 KB,
    // over three Initial packets.
    let alpn: Vec<String> = std::iter::once("flowmap".to_string())
        .chain((0..12).map(|i| format!("p{i:02}{}", "x".repeat(200))))
        .collect();
    let big = client("Big.QUIC.test", &alpn.join(","));
    std::thread::sleep(Duration::from_millis(1500));
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(ready.trim(), "ready");
    assert_eq!((small.as_str(), big.as_str()), ("connected", "connected"));
    let (out, err) = agent.unwrap().stop().unwrap();

    let recs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut names: Vec<String> = records(&recs, &v.host_v4, &v.peer_v4, 443)
        .iter()
        .filter(|r| r["protocol"] == "udp")
        .map(|r| r["dst_names"]["tls"].as_str().unwrap_or("none").to_string())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names, ["big.quic.test", "quic.test"], "{err}");
    let els = col.elements();
    let host = format!("names-flows.host-{}", flowmap::enrich::host::hostname());
    for name in ["quic.test", "big.quic.test"] {
        let id = format!("names-flows.external-{name}");
        let (_, kind, el_name, p) = els
            .iter()
            .find(|e| e.0 == id)
            .unwrap_or_else(|| panic!("no {id}"));
        assert_eq!((kind.as_str(), el_name.as_str()), ("flows.external", name));
        assert_eq!(p["addresses"], serde_json::json!([v.peer_v4]));
        assert_eq!(p["tls_server_names"], serde_json::json!([name]));
        assert_eq!(
            opened(&els, &host, &id),
            HashMap::from([(("udp".into(), 443), 1)])
        );
    }
    assert!(opened(&els, &host, &format!("names-flows.external-{}", v.peer_v4)).is_empty());
}

#[test]
fn capture_names_false_names_nothing() {
    let Some(_g) = privileged_serial("capture_names_false_names_nothing", &SERIAL) else {
        return;
    };
    let v = Netns::new().unwrap();
    let a3 = sibling(&v.peer_v4, 3);
    v.exec(&["ip", "addr", "add", &format!("{a3}/32"), "dev", &v.peer]);
    let _dns = Dnsmasq::start(
        &v,
        &[&v.peer_v4],
        &[format!("--host-record=www.test,{a3},60")],
    )
    .unwrap();
    let server = tcp_server(&v, 5301, 1);
    let col = collector::Server::start();
    let state = TempDir::new("names");
    let agent = agent(&v.host, &col, &state)
        .option("capture_names", "false")
        .start()
        .unwrap();
    let a = sh(&["dig", "+short", &format!("@{}", v.peer_v4), "www.test", "A"]);
    assert_eq!(a.trim(), a3);
    connect(&v.host_v4, &a3, 5301);
    server.join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (out, _) = agent.stop().unwrap();
    assert!(!out.contains("names"), "no names in the records:\n{out}");
    let els = col.elements();
    assert!(!els.iter().any(|e| e.0.ends_with("www.test")));
    let host = format!("names-flows.host-{}", flowmap::enrich::host::hostname());
    let plain = format!("names-flows.external-{a3}");
    assert_eq!(
        opened(&els, &host, &plain),
        HashMap::from([(("tcp".into(), 5301), 1)])
    );
}

/// The kernel side alone (BPF_PROG_TEST_RUN): a DNS answer is handed to
/// user space sender first with its bytes, a query is not, each CPU hands
/// over at most its rate and counts the rest, and with capture off nothing
/// is handed over.
#[test]
fn the_kernel_hands_over_dns_answers_at_a_bounded_rate_and_counts_the_rest() {
    use flowmap::datapath::{Datapath, Entry, Options, STAT_NAMES};
    use flowmap_testkit::frames::{eth_frame, L4};
    if !flowmap_testkit::net::privileged("the_kernel_hands_over_dns_answers_at_a_bounded_rate") {
        return;
    }
    let idx = |n: &str| STAT_NAMES.iter().position(|s| *s == n).unwrap();
    let (dns, client) = ("10.1.0.53".parse().unwrap(), "10.1.0.2".parse().unwrap());
    let answer = eth_frame(
        dns,
        client,
        &L4::Udp {
            sport: 53,
            dport: 40000,
            payload: 20,
        },
        &[],
    );
    let query = eth_frame(
        client,
        dns,
        &L4::Udp {
            sport: 40000,
            dport: 53,
            payload: 20,
        },
        &[],
    );
    // Runs `frame` `n` times in one call, on one CPU, within well under
    // the rate's one-second window.
    let run = |dp: &Datapath, frame: &[u8], n: u32| {
        let input = libbpf_rs::ProgramInput {
            data_in: Some(frame),
            repeat: n,
            ..Default::default()
        };
        dp.program(Entry::EthIngress).test_run(input).unwrap();
    };
    let on = || {
        Datapath::load(&Options {
            capture_names: true,
            ..Options::default()
        })
        .unwrap()
    };
    let mut dp = on();
    run(&dp, &query, 10);
    run(&dp, &answer, 1);
    let d = dp.drain().unwrap();
    assert_eq!(d.names.len(), 1);
    let c = &d.names[0];
    assert_eq!(c.kind, flowmap::datapath::names::CapturedKind::DnsUdp);
    assert_eq!((c.sender, c.receiver), ((dns, 53), (client, 40000)));
    assert_eq!(c.bytes.len(), 20);
    // A fresh program: the whole run falls in the CPU's first window.
    let mut dp = on();
    let per_sec = flowmap::datapath::names::NAMES_PER_SEC_PER_CPU;
    run(&dp, &answer, per_sec + 500);
    let d = dp.drain().unwrap();
    assert_eq!(
        d.names.len() as u32,
        per_sec,
        "the CPU's budget of a second"
    );
    assert_eq!(d.stats[idx("names_limited")], 500);
    assert_eq!(d.stats[idx("names_lost")], 0);

    let mut off = Datapath::load(&Options::default()).unwrap();
    run(&off, &answer, 10);
    let d = off.drain().unwrap();
    assert!(d.names.is_empty());
    assert_eq!(d.stats[idx("names_limited")], 0);
}
