//! The collector client against real HTTP servers on loopback: a redirect
//! is not followed (the API key never reaches the host it points to), a
//! huge reply is read only up to its cap, and a clear-text endpoint off
//! loopback is refused unless the operator opts in.

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
        .block_on(c.post(1, b"{}".to_vec()))
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
