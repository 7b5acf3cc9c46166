//! `flowmap bench-scale`: the load harness. Each run builds its own network
//! namespaces and veth pairs, drives the real agent binary (or the datapath
//! in-process for throughput), prints `bench scale <name> <metric>=<value>`
//! lines, and removes everything it created.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// A namespace joined to the root namespace by a veth pair; removed on drop.
pub struct Net {
    pub ns: String,
    pub host: String,
    pub peer: String,
}

impl Net {
    /// Host end 10.231.0.1/16 and fd31::1/64; the namespace holds
    /// 10.231.0.2 and fd31::2, plus `extra` more of each (10.231.1.x, fd31::x).
    pub fn new(tag: &str, extra: u32) -> Result<Net> {
        let id = std::process::id() % 100_000;
        let n = Net { ns: format!("fms{tag}{id}"), host: format!("fms{tag}h{id}"), peer: format!("fms{tag}p{id}") };
        ip(&["netns", "add", &n.ns])?;
        ip(&["link", "add", &n.host, "type", "veth", "peer", "name", &n.peer])?;
        ip(&["link", "set", &n.peer, "netns", &n.ns])?;
        ip(&["addr", "add", "10.231.0.1/16", "dev", &n.host])?;
        ip(&["-6", "addr", "add", "fd31::1/64", "dev", &n.host, "nodad"])?;
        ip(&["link", "set", &n.host, "up"])?;
        n.exec(&["ip", "addr", "add", "10.231.0.2/16", "dev", &n.peer])?;
        for i in 0..extra {
            n.exec(&["ip", "addr", "add", &format!("10.231.1.{}/16", i + 2), "dev", &n.peer])?;
            n.exec(&["ip", "-6", "addr", "add", &format!("fd31::{:x}/64", i + 3), "dev", &n.peer, "nodad"])?;
        }
        n.exec(&["ip", "-6", "addr", "add", "fd31::2/64", "dev", &n.peer, "nodad"])?;
        n.exec(&["ip", "link", "set", &n.peer, "up"])?;
        n.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(n)
    }

    fn exec(&self, args: &[&str]) -> Result<()> {
        let mut a = vec!["netns", "exec", self.ns.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// Runs `f` on a thread that has entered the namespace (setns affects
    /// only the calling thread, so it gets a thread of its own).
    pub fn spawn_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread with a namespace fd we hold open.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        ip_quiet(&["link", "del", &self.host]);
        ip_quiet(&["netns", "del", &self.ns]);
    }
}

/// The agent binary, run as a child with its log collected.
pub struct AgentProc {
    child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    pub port: u16,
    _cfg: TempFile,
    state: std::path::PathBuf,
}

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl AgentProc {
    pub fn start(iface: &str, interval: &str, max_flows: u32) -> Result<AgentProc> {
        let cfg = std::env::temp_dir().join(format!("flowmap-scale-{}.yaml", std::process::id()));
        std::fs::write(
            &cfg,
            format!(
                "coordimap:\n  data_sources:\n    - type: flows\n      id: scale\n      config:\n        - name: interface_name\n          value: {iface}\n        - name: crawl_interval\n          value: {interval}\n        - name: max_flows\n          value: {max_flows}\n"
            ),
        )?;
        let port = free_port()?;
        let state = std::env::temp_dir().join(format!("flowmap-scale-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let mut child = Command::new(std::env::current_exe()?)
            .args(["run", "--config", cfg.to_str().unwrap_or_default(), "--listen", &format!("127.0.0.1:{port}")])
            .args(["--state-dir", state.to_str().unwrap_or_default(), "--output", "none"])
            .env("RUST_LOG", "info")
            .env_remove("COORDIMAP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let err = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let a = AgentProc { child, log, port, _cfg: TempFile(cfg), state };
        a.wait_log("flowmap running", Duration::from_secs(30))?;
        Ok(a)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<Instant> {
        let end = Instant::now() + timeout;
        loop {
            if self.log.lock().map(|l| l.iter().any(|s| s.contains(needle))).unwrap_or(false) {
                return Ok(Instant::now());
            }
            if Instant::now() > end {
                bail!("the agent did not log {needle:?} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log.lock().map(|l| l.iter().filter(|s| s.contains(needle)).count()).unwrap_or(0)
    }

    /// One sample of /metrics.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
            .ok_or_else(|| anyhow!("metric {name} not found"))
    }

    pub fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

pub fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

pub fn proc_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// TCX links of flowmap programs, on any interface.
pub fn flowmap_links() -> usize {
    use libbpf_rs::query::{LinkInfoIter, LinkTypeInfo, ProgInfoIter};
    let ids: Vec<u32> = LinkInfoIter::default()
        .filter(|l| matches!(l.info, LinkTypeInfo::Tcx(_)))
        .map(|l| l.prog_id)
        .collect();
    if ids.is_empty() {
        return 0;
    }
    let ours: Vec<u32> = ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy().starts_with("flowmap_"))
        .map(|p| p.id)
        .collect();
    ids.iter().filter(|id| ours.contains(id)).count()
}

/// Opens `udp` distinct UDP flows (one datagram each, IPv4 and IPv6 alike)
/// and `tcp` TCP connections into the namespace, at `rate` flows/s (0: as
/// fast as possible). Returns the TCP connections, kept open.
pub fn generate(net: &Net, udp: u32, tcp: u32, rate: u32) -> Result<Vec<TcpStream>> {
    // A listener in the namespace for the TCP connections.
    let ready = Arc::new(AtomicBool::new(false));
    let r2 = ready.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let server = net.spawn_in(move || -> Result<Vec<TcpStream>> {
        let l = TcpListener::bind("[::]:7000")?;
        l.set_nonblocking(true)?;
        r2.store(true, Ordering::SeqCst);
        let mut held = Vec::new();
        while !s2.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((c, _)) => held.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        Ok(held)
    });
    while !ready.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let pace = |i: u32, start: Instant| {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
    };
    let start = Instant::now();
    let u4 = UdpSocket::bind("0.0.0.0:0")?;
    let u6 = UdpSocket::bind("[::]:0")?;
    let payload = [0u8; 32];
    // Distinct 5-tuples: destination ports 1024.. over several addresses.
    for i in 0..udp {
        pace(i, start);
        // Per family: ports 1024..61024 on the first address, then the next.
        let j = i / 2;
        let port = 1024 + (j % 60_000) as u16;
        let h = j / 60_000;
        let dst: SocketAddr = if i % 2 == 0 {
            let a = if h == 0 { Ipv4Addr::new(10, 231, 0, 2) } else { Ipv4Addr::new(10, 231, 1, h as u8 + 1) };
            (a, port).into()
        } else {
            (Ipv6Addr::new(0xfd31, 0, 0, 0, 0, 0, 0, 2 + h as u16), port).into()
        };
        let sock = if dst.is_ipv4() { &u4 } else { &u6 };
        sock.send_to(&payload, dst)?;
    }
    let mut conns = Vec::with_capacity(tcp as usize);
    for i in 0..tcp {
        pace(udp + i, start);
        let dst: SocketAddr = if i % 2 == 0 { "10.231.0.2:7000".parse()? } else { "[fd31::2]:7000".parse()? };
        conns.push(TcpStream::connect_timeout(&dst, Duration::from_secs(5))?);
    }
    stop.store(true, Ordering::SeqCst);
    let _held = server.join().map_err(|_| anyhow!("listener thread panicked"))???;
    Ok(conns)
}

pub fn flows(udp: u32, tcp: u32, rate: u32, out: &mut dyn Write) -> Result<()> {
    let extra = udp / 2 / 60_000 + 1;
    let net = Net::new("f", extra)?;
    let max_flows = ((udp + tcp + 1024) * 5 / 4).next_power_of_two().max(1024);
    let agent = AgentProc::start(&net.host, "5s", max_flows)?;
    let rss0 = proc_rss(agent.pid());
    let t = Instant::now();
    let conns = generate(&net, udp, tcp, rate)?;
    let gen = t.elapsed();
    // The next interval carries them all.
    let seen0 = agent.count_log("interval ");
    let end = Instant::now() + Duration::from_secs(15);
    while agent.count_log("interval ") == seen0 {
        if Instant::now() > end {
            bail!("no interval after the flows were sent");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let flows = agent.metric("flowmap_flows_last_interval ")?;
    let secs = agent.metric("flowmap_interval_processing_seconds ")?;
    let rss = agent.metric("flowmap_resident_memory_bytes ")?;
    let kmem = agent.metric("flowmap_kernel_map_memory_bytes ")?;
    let lost = agent.metric("flowmap_kernel_events_total{reason=\"ring_lost\"} ").unwrap_or(0.0);
    writeln!(out, "bench scale flows flows_sent={} generate_ms={}", udp + tcp, gen.as_millis())?;
    writeln!(out, "bench scale flows flows_in_interval={flows:.0} ring_lost={lost:.0}")?;
    writeln!(out, "bench scale flows interval_processing_ms={:.1}", secs * 1000.0)?;
    if let Some(line) = agent.log.lock().ok().and_then(|l| l.iter().rev().find(|s| s.contains("interval ")).cloned()) {
        let parts: Vec<&str> = line.split_whitespace().filter(|w| w.ends_with("_ms") || w.contains("_ms=")).collect();
        writeln!(out, "bench scale flows phases {}", parts.join(" "))?;
    }
    writeln!(out, "bench scale flows agent_rss_bytes={rss:.0} agent_rss_start_bytes={rss0}")?;
    writeln!(out, "bench scale flows kernel_map_bytes={kmem:.0} max_flows={max_flows}")?;
    drop(conns);
    agent.stop()?;
    Ok(())
}

/// Creates `n` veth pairs (2n interfaces), starts the agent with `all`, and
/// times how long until every one is attached.
pub fn attach(n: u32, out: &mut dyn Write) -> Result<()> {
    let id = std::process::id() % 100_000;
    let names: Vec<String> = (0..n).map(|i| format!("fma{id}x{i}")).collect();
    struct Links(Vec<String>);
    impl Drop for Links {
        fn drop(&mut self) {
            for l in &self.0 {
                ip_quiet(&["link", "del", l]);
            }
        }
    }
    let links = Links(names.clone());
    for name in &links.0 {
        ip(&["link", "add", name, "type", "veth", "peer", "name", &format!("{name}p")])?;
    }
    let t = Instant::now();
    let agent = AgentProc::start("all", "30s", 32768)?;
    let end = Instant::now() + Duration::from_secs(60);
    while names.iter().any(|nm| agent.count_log(&format!("interface={nm} ")) == 0) {
        if Instant::now() > end {
            bail!("not every interface was attached within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    writeln!(out, "bench scale attach interfaces={} attach_all_ms={}", 2 * n, t.elapsed().as_millis())?;
    // One more, while running.
    let late = format!("fma{id}late");
    let t = Instant::now();
    ip(&["link", "add", &late, "type", "veth", "peer", "name", &format!("{late}p")])?;
    let late_links = Links(vec![late.clone()]);
    agent.wait_log(&format!("interface={late} "), Duration::from_secs(10))?;
    writeln!(out, "bench scale attach new_interface_ms={}", t.elapsed().as_millis())?;
    agent.stop()?;
    drop(late_links);
    drop(links);
    Ok(())
}

/// Creates and deletes a veth pair `cycles` times while the agent runs with
/// `all`; compares file descriptors, TCX links and memory before and after.
pub fn churn(cycles: u32, out: &mut dyn Write) -> Result<ChurnResult> {
    let agent = AgentProc::start("all", "30s", 32768)?;
    let pid = agent.pid();
    std::thread::sleep(Duration::from_millis(500));
    let (fd0, links0, rss0) = (proc_fds(pid), flowmap_links(), proc_rss(pid));
    let id = std::process::id() % 100_000;
    let mut worst = Duration::ZERO;
    let mut total = Duration::ZERO;
    for c in 0..cycles {
        let name = format!("fmc{id}c{c}");
        let t = Instant::now();
        ip(&["link", "add", &name, "type", "veth", "peer", "name", &format!("{name}p")])?;
        let r = agent.wait_log(&format!("interface={name} "), Duration::from_secs(10));
        ip_quiet(&["link", "del", &name]);
        r?;
        let d = t.elapsed();
        worst = worst.max(d);
        total += d;
    }
    // Let the agent notice the last deletion.
    std::thread::sleep(Duration::from_millis(800));
    let (fd1, links1, rss1) = (proc_fds(pid), flowmap_links(), proc_rss(pid));
    writeln!(
        out,
        "bench scale churn cycles={cycles} attach_ms_mean={} attach_ms_max={}",
        (total / cycles.max(1)).as_millis(),
        worst.as_millis()
    )?;
    writeln!(out, "bench scale churn fds_start={fd0} fds_end={fd1} links_start={links0} links_end={links1}")?;
    writeln!(out, "bench scale churn rss_start_bytes={rss0} rss_end_bytes={rss1}")?;
    agent.stop()?;
    Ok(ChurnResult { fds: (fd0, fd1), links: (links0, links1) })
}

pub struct ChurnResult {
    pub fds: (usize, usize),
    pub links: (usize, usize),
}

/// 64-byte UDP frames through a veth pair for `secs` seconds per round,
/// rounds alternating without and with flowmap attached.
pub fn throughput(rounds: u32, secs: f64, out: &mut dyn Write) -> Result<()> {
    let net = Net::new("t", 0)?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r2, s2) = (received.clone(), stop.clone());
    let rx = net.spawn_in(move || -> Result<()> {
        let s = UdpSocket::bind("10.231.0.2:9")?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = [0u8; 64];
        while !s2.load(Ordering::Relaxed) {
            if s.recv(&mut buf).is_ok() {
                r2.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let tx = UdpSocket::bind("10.231.0.1:0")?;
    tx.connect("10.231.0.2:9")?;
    // 14 + 20 + 8 + 22 = a 64-byte frame.
    let payload = [0u8; 22];
    let mut dp = crate::datapath::Datapath::load(&crate::datapath::Options::default())?;
    let iface = crate::datapath::ifaces::list()?
        .into_iter()
        .find(|i| i.name == net.host)
        .ok_or_else(|| anyhow!("veth {} not found", net.host))?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for round in 0..rounds * 2 {
        let attached = round % 2 == 1;
        if attached {
            dp.attach(&iface)?;
        } else {
            dp.detach_all();
        }
        let before = received.load(Ordering::Relaxed);
        let t = Instant::now();
        let mut sent = 0u64;
        while t.elapsed().as_secs_f64() < secs {
            for _ in 0..256 {
                if tx.send(&payload).is_ok() {
                    sent += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(150));
        let got = received.load(Ordering::Relaxed) - before;
        let pps = got as f64 / secs;
        let _ = sent;
        if attached {
            with.push(pps);
        } else {
            without.push(pps);
        }
        dp.drain()?;
    }
    dp.detach_all();
    stop.store(true, Ordering::Relaxed);
    rx.join().map_err(|_| anyhow!("receiver panicked"))???;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (w, wo) = (median(&mut with), median(&mut without));
    writeln!(out, "bench scale throughput frame_bytes=64 rounds={rounds} seconds_per_round={secs}")?;
    writeln!(out, "bench scale throughput pps_without={wo:.0} pps_with={w:.0} ratio={:.3}", w / wo.max(1.0))?;
    Ok(())
}
