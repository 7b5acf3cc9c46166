//! Network namespaces and links for the privileged tests and the load
//! harness, removed on drop even when a test fails; the privilege rule;
//! running commands.
//!
//! One namespace type, [`Netns`]: a namespace joined by a veth pair to the
//! root namespace (the default), to a bridge (a "pod"), or to another
//! namespace; or a namespace alone. [`Link`] is a link of the root
//! namespace: a bridge, or a veth pair with both ends here.
//!
//! Names are `fm<kind><pid % 100000>n<seq>` (at most 15 characters, unique
//! in the process): namespaces `fmt…`, the outer veth ends `fmh…`, the
//! inner ends `fmp…`, bare veth pairs `fmv…` (and `fmv…p`), bridges
//! `fmb…`. `scripts/cleanup-test-leftovers.sh` removes those a killed run
//! left.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

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

/// The privilege rule, then the lock of the tests that share `serial`
/// (host interfaces, a test network): one at a time. None: skip the test.
pub fn privileged_serial(
    test: &str,
    serial: &'static Mutex<()>,
) -> Option<MutexGuard<'static, ()>> {
    privileged(test).then(|| serial.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("{args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// As [`run`], panicking when the command fails.
pub fn sh(args: &[&str]) -> String {
    run(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs a command and ignores how it went (for clean-up).
pub fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("binding a loopback port: {e}"))
}

/// The index of interface `dev` of this namespace.
pub fn ifindex(dev: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
        .unwrap_or_else(|e| panic!("interface {dev}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("ifindex of {dev}: {e}"))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh `fm<kind><pid>n<seq>` name (see the module's comment).
fn fresh(kind: char) -> (u32, String) {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    (n, name(kind, n))
}

fn name(kind: char, n: u32) -> String {
    format!("fm{kind}{}n{n}", std::process::id() % 100_000)
}

/// `ip` with `args`, in namespace `ns` when given.
fn ip_in(ns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut a = vec!["ip"];
    if let Some(ns) = ns {
        a.extend(["-n", ns]);
    }
    a.extend_from_slice(args);
    run(&a)
}

/// Adds `cidr` (IPv4 or IPv6, without duplicate address detection) to
/// `dev` of namespace `ns` (None: this one).
fn add_addr(ns: Option<&str>, dev: &str, cidr: &str) -> Result<()> {
    if cidr.contains(':') {
        ip_in(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"])?;
    } else {
        ip_in(ns, &["addr", "add", cidr, "dev", dev])?;
    }
    Ok(())
}

/// The addresses of the two ends of a veth pair, one family; an empty
/// `host` leaves the outer end without one.
#[derive(Clone, Debug)]
struct Pair {
    host: String,
    peer: String,
    prefix: u8,
}

/// A network namespace, joined by a veth pair to the root namespace unless
/// built otherwise; removed on drop with its links.
pub struct Netns {
    /// The namespace's name (for `ip netns exec`).
    pub ns: String,
    /// The veth end outside the namespace (empty with [`NetnsBuilder::no_link`]).
    pub host: String,
    /// The veth end inside the namespace.
    pub peer: String,
    /// The addresses of the two ends, without prefix length; empty where
    /// an end has none of that family.
    pub host_v4: String,
    pub peer_v4: String,
    pub host_v6: String,
    pub peer_v6: String,
    /// The namespace the outer end lives in (None: the root namespace).
    host_ns: Option<String>,
}

/// How to build a [`Netns`]. By default: a veth pair to the root namespace
/// with a /24 of 10.213.0.0/16 and a /64 of fd0f::/16 (`.1` outside, `.2`
/// inside), chosen per process and namespace.
#[derive(Default)]
pub struct NetnsBuilder {
    no_link: bool,
    v4: Option<Pair>,
    v6: Option<Pair>,
    no_v6: bool,
    host_addrs: Vec<String>,
    bridge: Option<String>,
    host_ns: Option<String>,
    pod: bool,
    host_index: Option<u32>,
}

impl NetnsBuilder {
    /// IPv4 addresses of the outer end (`""`: none) and the inner end.
    pub fn v4(mut self, host: &str, peer: &str, prefix: u8) -> Self {
        self.v4 = Some(Pair {
            host: host.into(),
            peer: peer.into(),
            prefix,
        });
        self
    }

    /// IPv6 addresses of the outer end (`""`: none) and the inner end.
    pub fn v6(mut self, host: &str, peer: &str, prefix: u8) -> Self {
        self.v6 = Some(Pair {
            host: host.into(),
            peer: peer.into(),
            prefix,
        });
        self.no_v6 = false;
        self
    }

    /// No IPv6 address on either end.
    pub fn no_v6(mut self) -> Self {
        self.no_v6 = true;
        self.v6 = None;
        self
    }

    /// One more address (`addr/prefix`, either family) on the outer end,
    /// e.g. a client address to send from.
    pub fn host_addr(mut self, cidr: &str) -> Self {
        self.host_addrs.push(cidr.into());
        self
    }

    /// The outer end is a port of `bridge` (and has no address), as with a
    /// bridge CNI.
    pub fn bridge(mut self, bridge: &Link) -> Self {
        self.bridge = Some(bridge.name.clone());
        self
    }

    /// The outer end lives in namespace `node` instead of the root one.
    pub fn host_in(mut self, node: &Netns) -> Self {
        self.host_ns = Some(node.ns.clone());
        self
    }

    /// The namespace is a pod: its end of the pair is `eth0`.
    pub fn pod(mut self) -> Self {
        self.pod = true;
        self
    }

    /// The outer end gets this interface index (e.g. past the range of
    /// flowmap's IPv4 flow key).
    pub fn host_index(mut self, index: u32) -> Self {
        self.host_index = Some(index);
        self
    }

    /// Only the namespace (with its loopback up), no veth pair.
    pub fn no_link(mut self) -> Self {
        self.no_link = true;
        self
    }

    pub fn build(self) -> Result<Netns> {
        let (n, ns) = fresh('t');
        let mut net = Netns {
            ns,
            host: String::new(),
            peer: String::new(),
            host_v4: String::new(),
            peer_v4: String::new(),
            host_v6: String::new(),
            peer_v6: String::new(),
            host_ns: self.host_ns.clone(),
        };
        // From here on, whatever fails, Drop removes what exists.
        ip_in(None, &["netns", "add", &net.ns])?;
        let inner = Some(net.ns.as_str());
        ip_in(inner, &["link", "set", "lo", "up"])?;
        if self.no_link {
            return Ok(net);
        }
        let subnet = (std::process::id() % 200) + n * 7 % 50;
        let v4 = self.v4.unwrap_or_else(|| Pair {
            host: format!("10.213.{}.1", subnet % 250),
            peer: format!("10.213.{}.2", subnet % 250),
            prefix: 24,
        });
        let v6 = match (self.v6, self.no_v6) {
            (_, true) => None,
            (Some(p), false) => Some(p),
            (None, false) => Some(Pair {
                host: format!("fd0f:{subnet:x}::1"),
                peer: format!("fd0f:{subnet:x}::2"),
                prefix: 64,
            }),
        };
        net.host = name('h', n);
        net.peer = if self.pod {
            "eth0".to_string()
        } else {
            name('p', n)
        };
        let index = self.host_index.map(|i| i.to_string());
        let mut add = vec!["link", "add", &net.host];
        if let Some(i) = &index {
            add.extend(["index", i.as_str()]);
        }
        add.extend(["type", "veth", "peer", "name", &net.peer, "netns", &net.ns]);
        ip_in(None, &add)?;
        let outer = self.host_ns.as_deref();
        if let Some(node) = outer {
            ip_in(None, &["link", "set", &net.host, "netns", node])?;
        }
        if let Some(br) = &self.bridge {
            ip_in(outer, &["link", "set", &net.host, "master", br])?;
        }
        let mut host_addrs = Vec::new();
        for p in [Some(&v4), v6.as_ref()].into_iter().flatten() {
            if !p.host.is_empty() {
                host_addrs.push(format!("{}/{}", p.host, p.prefix));
            }
        }
        host_addrs.extend(self.host_addrs);
        for a in &host_addrs {
            add_addr(outer, &net.host, a)?;
        }
        ip_in(outer, &["link", "set", &net.host, "up"])?;
        for p in [Some(&v4), v6.as_ref()].into_iter().flatten() {
            add_addr(inner, &net.peer, &format!("{}/{}", p.peer, p.prefix))?;
        }
        ip_in(inner, &["link", "set", &net.peer, "up"])?;
        (net.host_v4, net.peer_v4) = (v4.host, v4.peer);
        if let Some(v6) = v6 {
            (net.host_v6, net.peer_v6) = (v6.host, v6.peer);
        }
        Ok(net)
    }
}

impl Netns {
    pub fn builder() -> NetnsBuilder {
        NetnsBuilder::default()
    }

    /// A namespace joined to the root namespace with the default addresses.
    pub fn new() -> Result<Netns> {
        Netns::builder().build()
    }

    /// Runs a command in the namespace (`ip netns exec`); its stdout.
    pub fn try_exec(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["ip", "netns", "exec", self.ns.as_str()];
        a.extend_from_slice(args);
        run(&a)
    }

    /// As [`Netns::try_exec`], panicking when the command fails.
    pub fn exec(&self, args: &[&str]) -> String {
        self.try_exec(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The index of the outer end (in the root namespace).
    pub fn ifindex(&self) -> u32 {
        ifindex(&self.host)
    }

    /// Runs `f` on a thread of its own that has entered the namespace
    /// (setns changes only the calling thread, and fails with EINVAL in a
    /// thread that shares more than it may). Sockets it makes, and threads
    /// it starts, live in the namespace.
    /// A pod-like namespace behind `node`: a veth into it with `gw` on the
    /// node's end and `ip`/24 on its own, IPv4 only, and its default route
    /// through the node (so traffic between two of them is routed, and
    /// seen, by the node).
    pub fn routed_behind(node: &Netns, gw: &str, ip: &str) -> Netns {
        let ns = Netns::builder()
            .pod()
            .host_in(node)
            .v4(gw, ip, 24)
            .no_v6()
            .build()
            .unwrap();
        ns.exec(&["ip", "route", "add", "default", "via", gw]);
        ns
    }

    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread with a namespace fd we hold open.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
    }

    /// As [`Netns::spawn_in`], waiting for `f`'s result.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        match self.spawn_in(f).join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.host.is_empty() {
            let _ = ip_in(self.host_ns.as_deref(), &["link", "del", &self.host]);
        }
        sh_quiet(&["ip", "netns", "del", &self.ns]);
    }
}

/// A link of the root namespace, removed on drop.
pub struct Link {
    pub name: String,
}

impl Link {
    /// A veth pair with both ends here: `name` and `<name>p`.
    pub fn veth_pair() -> Result<Link> {
        let l = Link { name: fresh('v').1 };
        let peer = format!("{}p", l.name);
        ip_in(
            None,
            &[
                "link", "add", &l.name, "type", "veth", "peer", "name", &peer,
            ],
        )?;
        Ok(l)
    }

    /// A bridge, up, with address `cidr` on it.
    pub fn bridge(cidr: &str) -> Result<Link> {
        let l = Link { name: fresh('b').1 };
        ip_in(None, &["link", "add", &l.name, "type", "bridge"])?;
        add_addr(None, &l.name, cidr)?;
        ip_in(None, &["link", "set", &l.name, "up"])?;
        Ok(l)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        sh_quiet(&["ip", "link", "del", &self.name]);
    }
}
