//! Shared helpers of the privileged tests: the privilege rule, and
//! namespaces and links that are removed even when a test fails.
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// True when the test may run. Outside CI a missing privilege skips with a
/// reason; under CI=true it is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (CAP_BPF, CAP_NET_ADMIN) and CI=true forbids skipping");
    }
    eprintln!("SKIP {test}: needs root (CAP_BPF, CAP_NET_ADMIN); run the suite as root");
    false
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

pub mod collector;
pub mod flows;
pub mod postgres;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace joined to the root namespace by a veth pair. The
/// root end is `host`, the namespace end `peer`. Dropped: both removed.
pub struct VethNs {
    pub ns: String,
    pub host: String,
    pub peer: String,
    pub host_v4: String,
    pub peer_v4: String,
    pub host_v6: String,
    pub peer_v6: String,
}

impl VethNs {
    pub fn new() -> VethNs {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let id = std::process::id() % 100_000;
        let subnet = (std::process::id() % 200) as u32 + n * 7 % 50;
        let ns = format!("fmt{id}n{n}");
        let host = format!("fmh{id}n{n}");
        let peer = format!("fmp{id}n{n}");
        let v = VethNs {
            host_v4: format!("10.213.{}.1", subnet % 250),
            peer_v4: format!("10.213.{}.2", subnet % 250),
            host_v6: format!("fd0f:{:x}::1", subnet),
            peer_v6: format!("fd0f:{:x}::2", subnet),
            ns,
            host,
            peer,
        };
        // Whatever fails below, Drop still removes what exists.
        sh(&["ip", "netns", "add", &v.ns]);
        sh(&[
            "ip", "link", "add", &v.host, "type", "veth", "peer", "name", &v.peer,
        ]);
        sh(&["ip", "link", "set", &v.peer, "netns", &v.ns]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", v.host_v4),
            "dev",
            &v.host,
        ]);
        sh(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{}/64", v.host_v6),
            "dev",
            &v.host,
            "nodad",
        ]);
        sh(&["ip", "link", "set", &v.host, "up"]);
        v.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", v.peer_v4),
            "dev",
            &v.peer,
        ]);
        v.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{}/64", v.peer_v6),
            "dev",
            &v.peer,
            "nodad",
        ]);
        v.exec(&["ip", "link", "set", &v.peer, "up"]);
        v.exec(&["ip", "link", "set", "lo", "up"]);
        v
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", self.ns.as_str()];
        a.extend_from_slice(args);
        sh(&a)
    }

    pub fn ifindex(&self) -> u32 {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.host))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for VethNs {
    fn drop(&mut self) {
        sh_quiet(&["ip", "link", "del", &self.host]);
        sh_quiet(&["ip", "netns", "del", &self.ns]);
    }
}
