//! The collector client against real HTTP servers on loopback: a redirect
//! is not followed (the API key never reaches the host it points to), a
//! huge reply is read only up to its cap, and a clear-text endpoint off
//! loopback is refused unless the operator opts in. TLS to a collector
//! with a private CA, and the bundled CA roots when the system has none.
//! The spool with real files and the loopback collector: idempotency keys
//! unique across nodes and restarts, bad files quarantined, a batch that
//! could not be written never sent later.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use flowmap::sinks::coordimap::sender::{Collector, Outcome, REPLY_MAX};

/// A one-shot-per-connection HTTP server on loopback that answers every
/// request with `reply` and keeps the header lines it received.
fn server(reply: Vec<u8>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                log.lock().unwrap().push(line.trim_end().to_string());
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            let _ = s.write_all(&reply);
            // Hold the connection: a reply that claims more than it sends
            // never ends for a reader without a cap.
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(30));
                drop(s);
            });
        }
    });
    (port, seen)
}

fn key() -> flowmap::config::Secret {
    let cfg = flowmap::config::parse(
        "coordimap:\n  api_key: the-key-42\n  data_sources:\n    - type: flows\n      id: d\n",
        &|_| None,
    )
    .unwrap();
    cfg.api_key.unwrap()
}

fn post(url: &str) -> Outcome {
    let c = Collector::new(url, key(), false).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(c.post("00000000-0000-4000-8000-000000000000", 1, b"{}".to_vec()))
}

#[test]
fn a_redirect_is_not_followed_and_the_key_stays_home() {
    let (other, other_seen) = server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec());
    let redirect = format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://localhost:{other}/steal\r\nContent-Length: 0\r\n\r\n"
    );
    let (port, seen) = server(redirect.into_bytes());
    let out = post(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(
        out,
        Outcome::Transient("HTTP 307 redirect, not followed".into())
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|h| h == "api-key: the-key-42"),
        "{:?}",
        seen.lock().unwrap()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        other_seen.lock().unwrap().is_empty(),
        "the redirect target was asked"
    );
}

#[test]
fn a_huge_reply_is_read_only_up_to_the_cap() {
    let body = vec![b'x'; 8 * REPLY_MAX];
    let mut reply = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    reply.extend(&body);
    let (port, _) = server(reply);
    match post(&format!("http://127.0.0.1:{port}/")) {
        Outcome::Rejected(why) => assert_eq!(why, format!("HTTP 400: {}", "x".repeat(300))),
        other => panic!("{other:?}"),
    }
}

#[test]
fn plain_http_off_loopback_needs_consent() {
    let e = Collector::new("http://collector.example/api", key(), false)
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e, "the endpoint uses http:// to a host that is not loopback: the API key would travel in clear text; use https://, or pass --allow-plain-http to accept that");
    assert!(Collector::new("http://collector.example/api", key(), true).is_ok());
    assert!(Collector::new("https://collector.example/api", key(), false).is_ok());
    assert!(Collector::new("http://[::1]:9/", key(), false).is_ok());
    assert!(Collector::new("http://localhost:9/", key(), false).is_ok());
}

// ---- TLS -------------------------------------------------------------

/// A private CA and a certificate for 127.0.0.1 and localhost signed by
/// it: (CA PEM, server certificate DER, server key DER).
fn private_ca() -> (String, Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "flowmap test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.der().to_vec(), key.serialize_der())
}

/// A TLS collector on loopback with the certificate `cert`/`key`: answers
/// each request with Coordimap's OK and keeps the header lines.
fn tls_server(cert: Vec<u8>, key: Vec<u8>) -> (u16, Arc<Mutex<Vec<String>>>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
    let cfg = Arc::new(cfg);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { break };
            let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, s);
            let mut head = Vec::new();
            let mut len = 0;
            let mut r = BufReader::new(&mut tls);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push(line.trim_end().to_string());
            }
            let mut body = vec![0u8; len];
            if head.is_empty() || r.read_exact(&mut body).is_err() {
                continue;
            }
            log.lock().unwrap().extend(head);
            let ok = r#"{"status":{"http_code":200,"message":"ok","error_code":""}}"#;
            let _ = write!(
                tls,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ok}",
                ok.len()
            );
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (port, seen)
}

fn flowmap(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_flowmap"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn ca_roots_come_from_the_system_else_from_the_bundle() {
    let dir = flowmap_testkit::tempdir::TempDir::new("roots");
    let cfg = dir.file(
        "c.yaml",
        "coordimap:\n  api_key: k\n  data_sources:\n    - type: flows\n      id: f\n",
    );
    let empty_dir = dir.path().join("no-certs");
    std::fs::create_dir(&empty_dir).unwrap();
    let empty_file = dir.file("none.pem", "");
    let (ca, _, _) = private_ca();
    let ca_file = dir.file("ca.pem", &ca);
    let check = |file: &std::path::Path| {
        let o = flowmap(
            &[
                "check",
                "--config",
                cfg.to_str().unwrap(),
                "--endpoint",
                "https://collector.example/api",
            ],
            &[
                ("SSL_CERT_FILE", file.to_str().unwrap()),
                ("SSL_CERT_DIR", empty_dir.to_str().unwrap()),
            ],
        );
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.lines()
            .find(|l| l.starts_with("collector CA roots: "))
            .unwrap_or_default()
            .to_string()
    };
    // A minimal container: no system roots; the bundled ones are used.
    assert_eq!(
        check(&empty_file),
        format!(
            "collector CA roots: bundled (the system has none), {} certificates",
            webpki_roots::TLS_SERVER_ROOTS.len()
        )
    );
    // Roots the loader finds (SSL_CERT_FILE here) are the system's.
    assert_eq!(
        check(&ca_file),
        "collector CA roots: system, 1 certificates"
    );
}

#[test]
fn a_tls_collector_with_a_private_ca_is_trusted_through_ssl_cert_file() {
    let dir = flowmap_testkit::tempdir::TempDir::new("tls");
    let (ca, cert, key) = private_ca();
    let ca_file = dir.file("ca.pem", &ca);
    let empty = dir.file("none.pem", "");
    let (port, seen) = tls_server(cert, key);
    let url = format!("https://127.0.0.1:{port}/api/crawl");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The roots are read when the client is built: with the private CA the
    // batch goes through; with the bundled roots alone it cannot.
    std::env::set_var("SSL_CERT_FILE", &ca_file);
    let trusted = Collector::new(&url, key_secret(), false).unwrap();
    std::env::set_var("SSL_CERT_FILE", &empty);
    let bundled = Collector::new(&url, key_secret(), false).unwrap();
    std::env::remove_var("SSL_CERT_FILE");
    let inst = "00000000-0000-4000-8000-000000000000";
    assert_eq!(
        rt.block_on(trusted.node("n1").post(inst, 7, b"{}".to_vec())),
        Outcome::Delivered
    );
    assert!(seen
        .lock()
        .unwrap()
        .contains(&"api-key: the-key-42".to_string()));
    assert!(seen
        .lock()
        .unwrap()
        .contains(&format!("idempotency-key: n1:{inst}:7")));
    match rt.block_on(bundled.post(inst, 8, b"{}".to_vec())) {
        Outcome::Transient(why) => assert!(why.contains("error sending request"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(!seen.lock().unwrap().iter().any(|h| h.ends_with(":8")));
}

fn key_secret() -> flowmap::config::Secret {
    key()
}

// ---- the spool ---------------------------------------------------------

use flowmap::sinks::coordimap::sender::{run_sender, Retry};
use flowmap::sinks::coordimap::spool::{DeliveryStats, Spool, QUARANTINE_MAX_FILES};
use flowmap_testkit::collector::{self, header};

fn seq_name(seq: u64) -> String {
    format!("{seq:020}.json")
}

/// Delivers everything in `spool` to `url` as node `node`, then returns.
fn deliver(spool: Spool, url: &str, node: &str, stats: &Arc<DeliveryStats>) -> Spool {
    let spool = Arc::new(Mutex::new(spool));
    let col = Collector::new(url, key(), false).unwrap().node(node);
    let (tx, rx) = tokio::sync::watch::channel(true);
    let retry = Retry {
        first: std::time::Duration::from_millis(50),
        max: std::time::Duration::from_millis(200),
        credentials: std::time::Duration::from_millis(200),
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run_sender(
            spool.clone(),
            col,
            retry,
            Arc::new(tokio::sync::Notify::new()),
            rx,
            stats.clone(),
        ));
    drop(tx);
    Arc::try_unwrap(spool).ok().unwrap().into_inner().unwrap()
}

fn keys(col: &collector::Server) -> Vec<String> {
    let log = col.log.lock().unwrap();
    log.accepted
        .iter()
        .map(|(h, _)| header(h, "idempotency-key").to_string())
        .collect()
}

fn open(dir: &std::path::Path, stats: &Arc<DeliveryStats>) -> Spool {
    Spool::open(dir, 1 << 20, stats.clone()).unwrap()
}

#[test]
fn idempotency_keys_are_unique_across_nodes_and_restarts() {
    let col = collector::Server::start();
    let (a, b) = (
        flowmap_testkit::tempdir::TempDir::new("node-a"),
        flowmap_testkit::tempdir::TempDir::new("node-b"),
    );
    let stats = Arc::new(DeliveryStats::default());
    let mut sa = open(&a.path().join("spool"), &stats);
    let mut sb = open(&b.path().join("spool"), &stats);
    let (ia, ib) = (sa.instance_id().to_string(), sb.instance_id().to_string());
    assert_ne!(ia, ib);
    sa.push(b"[1]").unwrap();
    sa.push(b"[2]").unwrap();
    sb.push(b"[1]").unwrap();
    drop(deliver(sa, &col.url(), "node-a", &stats));
    drop(deliver(sb, &col.url(), "node-b", &stats));
    // Restarted: the same instance ID, the sequence goes on.
    let mut sa = open(&a.path().join("spool"), &stats);
    assert_eq!(sa.instance_id(), ia);
    assert_eq!(sa.push(b"[3]").unwrap(), 3);
    drop(deliver(sa, &col.url(), "node-a", &stats));
    assert_eq!(
        keys(&col),
        [
            format!("node-a:{ia}:1"),
            format!("node-a:{ia}:2"),
            format!("node-b:{ib}:1"),
            format!("node-a:{ia}:3"),
        ]
    );
    // The X-Flowmap-Batch hint is the bare sequence number.
    let log = col.log.lock().unwrap();
    let seqs: Vec<&str> = log
        .accepted
        .iter()
        .map(|(h, _)| header(h, "x-flowmap-batch"))
        .collect();
    assert_eq!(seqs, ["1", "2", "1", "3"]);
    // The ID is kept 0600 in the spool directory.
    use std::os::unix::fs::PermissionsExt;
    let id_file = a.path().join("spool/instance_id");
    assert_eq!(std::fs::read_to_string(&id_file).unwrap(), ia);
    let mode = std::fs::metadata(&id_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn bad_spool_files_are_quarantined_and_delivery_goes_on() {
    let col = collector::Server::start();
    let d = flowmap_testkit::tempdir::TempDir::new("quarantine");
    let dir = d.path().join("spool");
    let stats = Arc::new(DeliveryStats::default());
    let mut s = open(&dir, &stats);
    for i in 1..=5 {
        s.push(format!("[{i}]").as_bytes()).unwrap();
    }
    drop(s);
    // Found after a restart: garbage, a name that is a directory (cannot
    // be read), and a file cut to nothing.
    std::fs::write(dir.join(seq_name(2)), b"{not json").unwrap();
    std::fs::remove_file(dir.join(seq_name(3))).unwrap();
    std::fs::create_dir(dir.join(seq_name(3))).unwrap();
    std::fs::write(dir.join(seq_name(4)), b"").unwrap();
    let s = deliver(open(&dir, &stats), &col.url(), "n", &stats);
    assert!(s.is_empty());
    assert_eq!(col.bodies(), [b"[1]".to_vec(), b"[5]".to_vec()]);
    assert_eq!(stats.spool_quarantined.get(), 3);
    let metrics = flowmap::serve::metrics::Metrics::new(stats.clone()).encode();
    assert!(
        metrics.contains("\nflowmap_spool_quarantined_total 3\n"),
        "{metrics}"
    );
    let listing = |p: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let q = dir.join("quarantine");
    assert_eq!(listing(&q), [seq_name(2), seq_name(3), seq_name(4)]);
    // The quarantine is bounded: the oldest go.
    let mut s = open(&dir, &stats);
    for i in 6..=25u64 {
        assert_eq!(s.push(b"[0]").unwrap(), i);
        std::fs::write(dir.join(seq_name(i)), b"\xff\xfe").unwrap();
    }
    drop(s);
    let s = deliver(open(&dir, &stats), &col.url(), "n", &stats);
    assert!(s.is_empty());
    assert_eq!(col.bodies().len(), 2);
    assert_eq!(stats.spool_quarantined.get(), 23);
    let kept: Vec<String> = (25 + 1 - QUARANTINE_MAX_FILES as u64..=25)
        .map(seq_name)
        .collect();
    assert_eq!(listing(&q), kept);
    // And delivery goes on afterwards.
    let mut s = open(&dir, &stats);
    assert_eq!(s.push(b"[26]").unwrap(), 26);
    drop(deliver(s, &col.url(), "n", &stats));
    assert_eq!(col.bodies().last().unwrap(), b"[26]");
}

#[test]
fn a_batch_that_could_not_be_written_is_never_sent_later() {
    let col = collector::Server::start();
    let d = flowmap_testkit::tempdir::TempDir::new("lost");
    let dir = d.path().join("spool");
    let stats = Arc::new(DeliveryStats::default());
    let mut s = open(&dir, &stats);
    assert_eq!(s.push(b"[1]").unwrap(), 1);
    // The batch file cannot be written (its temporary name is taken by a
    // directory, which even root cannot open for writing).
    std::fs::create_dir(dir.join(format!("{}.tmp", seq_name(2)))).unwrap();
    assert!(s.push(b"[2]").is_err());
    assert_eq!(s.push(b"[3]").unwrap(), 3);
    // The sequence file cannot be replaced.
    std::fs::create_dir(dir.join("last_seq.tmp")).unwrap();
    assert!(s.push(b"[4]").is_err());
    std::fs::remove_dir(dir.join("last_seq.tmp")).unwrap();
    assert_eq!(s.push(b"[5]").unwrap(), 5);
    assert_eq!(stats.batches_lost.get(), 2);
    let s = deliver(s, &col.url(), "n", &stats);
    drop(s);
    // Restarted: nothing of 2 or 4 turns up, and numbers go on after 5.
    let mut s = open(&dir, &stats);
    assert!(s.is_empty());
    assert_eq!(s.push(b"[6]").unwrap(), 6);
    drop(deliver(s, &col.url(), "n", &stats));
    let sent: Vec<String> = col
        .bodies()
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert_eq!(sent, ["[1]", "[3]", "[5]", "[6]"]);
    let seqs: Vec<String> = keys(&col)
        .iter()
        .map(|k| k.rsplit(':').next().unwrap().to_string())
        .collect();
    assert_eq!(seqs, ["1", "3", "5", "6"]);
}

#[test]
fn a_spool_directory_open_to_others_is_named_and_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let d = flowmap_testkit::tempdir::TempDir::new("modes");
    let dir = d.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stats = Arc::new(DeliveryStats::default());
    drop(open(&dir, &stats));
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}
