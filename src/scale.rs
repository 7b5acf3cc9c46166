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
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// A veth pair `name` / `<name>p`, both ends in this namespace.
pub fn add_veth_pair(name: &str) -> Result<()> {
    ip(&[
        "link",
        "add",
        name,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{name}p"),
    ])
}

/// A namespace joined to the root namespace by a veth pair; removed on drop.
pub struct Net {
    pub ns: String,
    pub host: String,
    pub peer: String,
}

impl Net {
    /// Host end 10.231.0.1/16 and fd31::1/64 plus `clients` client
    /// addresses of each family (10.231.2.x, fd31::1:x); the namespace end
    /// 10.231.0.2 and fd31::2.
    pub fn new(tag: &str, clients: u32) -> Result<Net> {
        let id = std::process::id() % 100_000;
        let n = Net {
            ns: format!("fms{tag}{id}"),
            host: format!("fms{tag}h{id}"),
            peer: format!("fms{tag}p{id}"),
        };
        ip(&["netns", "add", &n.ns])?;
        ip(&[
            "link", "add", &n.host, "type", "veth", "peer", "name", &n.peer,
        ])?;
        ip(&["link", "set", &n.peer, "netns", &n.ns])?;
        ip(&["addr", "add", "10.231.0.1/16", "dev", &n.host])?;
        ip(&["-6", "addr", "add", "fd31::1/64", "dev", &n.host, "nodad"])?;
        ip(&["link", "set", &n.host, "up"])?;
        n.exec(&["ip", "addr", "add", "10.231.0.2/16", "dev", &n.peer])?;
        for i in 0..clients {
            ip(&[
                "addr",
                "add",
                &format!("10.231.2.{}/16", i + 1),
                "dev",
                &n.host,
            ])?;
            ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd31::1:{i:x}/64"),
                "dev",
                &n.host,
                "nodad",
            ])?;
        }
        n.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd31::2/64",
            "dev",
            &n.peer,
            "nodad",
        ])?;
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
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread with a namespace fd we hold open.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) };
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
    stdout: Option<std::thread::JoinHandle<String>>,
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

/// Polls `done` every 5 ms until it holds (returns when) or `end` passes.
fn wait_until(end: Instant, what: &str, mut done: impl FnMut() -> bool) -> Result<Instant> {
    loop {
        if done() {
            return Ok(Instant::now());
        }
        if Instant::now() > end {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl AgentProc {
    pub fn start(iface: &str, interval: &str, max_flows: u32) -> Result<AgentProc> {
        AgentProc::start_with(iface, interval, max_flows, &["--output", "none"])
    }

    /// `extra`: more `flowmap run` arguments; stdout is collected.
    pub fn start_with(
        iface: &str,
        interval: &str,
        max_flows: u32,
        extra: &[&str],
    ) -> Result<AgentProc> {
        AgentProc::start_config(
            &format!(
                "coordimap:\n  data_sources:\n    - type: flows\n      id: scale\n      config:\n        - name: interface_name\n          value: {iface}\n        - name: crawl_interval\n          value: {interval}\n        - name: max_flows\n          value: {max_flows}\n"
            ),
            extra,
            &[],
        )
    }

    /// Starts the agent on a whole configuration file's text, with more
    /// arguments and environment variables.
    pub fn start_config(config: &str, extra: &[&str], envs: &[(&str, &str)]) -> Result<AgentProc> {
        let cfg = std::env::temp_dir().join(format!("flowmap-scale-{}.yaml", std::process::id()));
        std::fs::write(&cfg, config)?;
        let port = free_port()?;
        let state =
            std::env::temp_dir().join(format!("flowmap-scale-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        // The agent binary: this one, or FLOWMAP_BIN (tests run from their
        // own binaries).
        let bin = match std::env::var_os("FLOWMAP_BIN") {
            Some(b) => std::path::PathBuf::from(b),
            None => std::env::current_exe()?,
        };
        let mut child = Command::new(bin)
            .args([
                "run",
                "--config",
                cfg.to_str().unwrap_or_default(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--state-dir", state.to_str().unwrap_or_default()])
            .args(extra)
            .env("RUST_LOG", "info,flowmap::datapath=debug")
            .envs(envs.iter().copied())
            .env_remove("COORDIMAP_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let stdout = Some(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = so.read_to_string(&mut s);
            s
        }));
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
        let a = AgentProc {
            child,
            log,
            stdout,
            port,
            _cfg: TempFile(cfg),
            state,
        };
        a.wait_log("flowmap running", Duration::from_secs(30))?;
        Ok(a)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<Instant> {
        wait_until(
            Instant::now() + timeout,
            &format!("the agent logging {needle:?}"),
            || self.count_log(needle) > 0,
        )
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .map(|l| l.iter().filter(|s| s.contains(needle)).count())
            .unwrap_or(0)
    }

    /// One sample of /metrics.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .ok_or_else(|| anyhow!("metric {name} not found"))
    }

    /// SIGTERM, wait; returns what the agent wrote to stdout.
    pub fn stop(mut self) -> Result<String> {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait()?;
        if !st.success() {
            bail!("the agent exited with {st}");
        }
        Ok(self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default())
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
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn proc_rss(pid: u32) -> u64 {
    crate::metrics::resident_bytes_of(&pid.to_string())
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

/// Opens `udp` distinct UDP flows (one datagram each, IPv4 and IPv6 alike,
/// to `services` server ports) and `tcp` TCP connections into the
/// namespace, at `rate` flows/s (0: as fast as possible). Returns the TCP
/// connections, kept open.
pub fn generate(net: &Net, udp: u32, tcp: u32, services: u32, rate: u32) -> Result<Vec<TcpStream>> {
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
    let payload = [0u8; 32];
    // Distinct 5-tuples as real traffic makes them: many client ports, few
    // services. Client (address, port) pairs: ports 10000..60000 on the
    // host's addresses 10.231.2.x / fd31::1:x; server port 8000 + i % services.
    for i in 0..udp {
        pace(i, start);
        let j = i / 2;
        let sport = 10_000 + (j % 50_000) as u16;
        let h = (j / 50_000) as u16;
        let dport = 8000 + (i % services.max(1)) as u16;
        let (src, dst): (SocketAddr, SocketAddr) = if i % 2 == 0 {
            (
                (Ipv4Addr::new(10, 231, 2, 1 + h as u8), sport).into(),
                (Ipv4Addr::new(10, 231, 0, 2), dport).into(),
            )
        } else {
            (
                (Ipv6Addr::new(0xfd31, 0, 0, 0, 0, 0, 1, h), sport).into(),
                (Ipv6Addr::new(0xfd31, 0, 0, 0, 0, 0, 0, 2), dport).into(),
            )
        };
        let sock = UdpSocket::bind(src).with_context(|| format!("binding {src}"))?;
        sock.send_to(&payload, dst)?;
    }
    let mut conns = Vec::with_capacity(tcp as usize);
    for i in 0..tcp {
        pace(udp + i, start);
        let dst: SocketAddr = if i % 2 == 0 {
            "10.231.0.2:7000".parse()?
        } else {
            "[fd31::2]:7000".parse()?
        };
        conns.push(TcpStream::connect_timeout(&dst, Duration::from_secs(5))?);
    }
    stop.store(true, Ordering::SeqCst);
    let _held = server
        .join()
        .map_err(|_| anyhow!("listener thread panicked"))???;
    Ok(conns)
}

pub fn flows(udp: u32, tcp: u32, services: u32, rate: u32, out: &mut dyn Write) -> Result<()> {
    let net = Net::new("f", udp / 2 / 50_000 + 1)?;
    let max_flows = ((udp + tcp + 1024) * 5 / 4).next_power_of_two().max(1024);
    let agent = AgentProc::start(&net.host, "5s", max_flows)?;
    let rss0 = proc_rss(agent.pid());
    let t = Instant::now();
    let conns = generate(&net, udp, tcp, services, rate)?;
    let gen = t.elapsed();
    // The next interval carries them all.
    let seen0 = agent.count_log("interval ");
    wait_until(
        Instant::now() + Duration::from_secs(15),
        "an interval after the flows were sent",
        || agent.count_log("interval ") > seen0,
    )?;
    let flows = agent.metric("flowmap_flows_last_interval ")?;
    let secs = agent.metric("flowmap_interval_processing_seconds ")?;
    let rss = agent.metric("flowmap_resident_memory_bytes ")?;
    let kmem = agent.metric("flowmap_kernel_map_memory_bytes ")?;
    let lost = agent
        .metric("flowmap_kernel_events_total{reason=\"ring_lost\"} ")
        .unwrap_or(0.0);
    writeln!(
        out,
        "bench scale flows flows_sent={} services={services} generate_ms={}",
        udp + tcp,
        gen.as_millis()
    )?;
    writeln!(
        out,
        "bench scale flows flows_in_interval={flows:.0} ring_lost={lost:.0}"
    )?;
    writeln!(
        out,
        "bench scale flows interval_processing_ms={:.1}",
        secs * 1000.0
    )?;
    if let Some(line) = agent
        .log
        .lock()
        .ok()
        .and_then(|l| l.iter().rev().find(|s| s.contains("interval ")).cloned())
    {
        let parts: Vec<&str> = line
            .split_whitespace()
            .filter(|w| w.ends_with("_ms") || w.contains("_ms="))
            .collect();
        writeln!(out, "bench scale flows phases {}", parts.join(" "))?;
    }
    if let Some(line) = agent.log.lock().ok().and_then(|l| {
        l.iter()
            .rev()
            .find(|s| s.contains("flow maps swapped"))
            .cloned()
    }) {
        let w: Vec<&str> = line
            .split_whitespace()
            .filter(|w| w.starts_with("wait_us="))
            .collect();
        writeln!(out, "bench scale flows swap {}", w.join(" "))?;
    }
    writeln!(
        out,
        "bench scale flows agent_rss_bytes={rss:.0} agent_rss_start_bytes={rss0}"
    )?;
    writeln!(
        out,
        "bench scale flows kernel_map_bytes={kmem:.0} max_flows={max_flows}"
    )?;
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
        add_veth_pair(name)?;
    }
    let t = Instant::now();
    let agent = AgentProc::start("all", "30s", 32768)?;
    let end = Instant::now() + Duration::from_secs(60);
    wait_until(end, "every interface attached", || {
        names
            .iter()
            .all(|nm| agent.count_log(&format!("interface={nm} ")) > 0)
    })?;
    writeln!(
        out,
        "bench scale attach interfaces={} attach_all_ms={}",
        2 * n,
        t.elapsed().as_millis()
    )?;
    // Then every one moves from its classic filters to TCX links.
    wait_until(end, "every interface moved to TCX", || {
        agent.count_log("left=0") > 0
    })?;
    writeln!(
        out,
        "bench scale attach all_tcx_ms={} tcx_links={}",
        t.elapsed().as_millis(),
        flowmap_links()
    )?;
    // One more, while running.
    let late = format!("fma{id}late");
    let t = Instant::now();
    add_veth_pair(&late)?;
    let late_links = Links(vec![late.clone()]);
    agent.wait_log(&format!("interface={late} "), Duration::from_secs(10))?;
    writeln!(
        out,
        "bench scale attach new_interface_ms={}",
        t.elapsed().as_millis()
    )?;
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
        add_veth_pair(&name)?;
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
    writeln!(
        out,
        "bench scale churn fds_start={fd0} fds_end={fd1} links_start={links0} links_end={links1}"
    )?;
    writeln!(
        out,
        "bench scale churn rss_start_bytes={rss0} rss_end_bytes={rss1}"
    )?;
    agent.stop()?;
    Ok(ChurnResult {
        fds: (fd0, fd1),
        links: (links0, links1),
    })
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
    let floor = crate::datapath::bench::Floor::load()?;
    let iface = crate::datapath::ifaces::list()?
        .into_iter()
        .find(|i| i.name == net.host)
        .ok_or_else(|| anyhow!("veth {} not found", net.host))?;
    // Rounds rotate: nothing attached, the empty program, flowmap.
    let mut pps: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds * 3 {
        let mode = (round % 3) as usize;
        dp.detach_all();
        let floor_hook = if mode == 1 {
            Some(floor.attach(iface.ifindex)?)
        } else {
            None
        };
        if mode == 2 {
            dp.attach(&iface)?;
        }
        let before = received.load(Ordering::Relaxed);
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < secs {
            for _ in 0..256 {
                let _ = tx.send(&payload);
            }
        }
        std::thread::sleep(Duration::from_millis(150));
        let got = received.load(Ordering::Relaxed) - before;
        pps[mode].push(got as f64 / secs);
        drop(floor_hook);
        dp.drain()?;
    }
    dp.detach_all();
    stop.store(true, Ordering::Relaxed);
    rx.join().map_err(|_| anyhow!("receiver panicked"))???;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let [mut a, mut b, mut c] = pps;
    let (wo, fl, w) = (median(&mut a), median(&mut b), median(&mut c));
    writeln!(
        out,
        "bench scale throughput frame_bytes=64 rounds={rounds} seconds_per_round={secs}"
    )?;
    writeln!(
        out,
        "bench scale throughput pps_without={wo:.0} pps_empty_program={fl:.0} pps_with={w:.0}"
    )?;
    writeln!(
        out,
        "bench scale throughput ratio={:.3} empty_program_ratio={:.3} flowmap_over_empty={:.3}",
        w / wo.max(1.0),
        fl / wo.max(1.0),
        w / fl.max(1.0)
    )?;
    Ok(())
}

/// The user-space half of an interval on `n` synthetic flows (no kernel):
/// ingest, graph build, encoding and serialisation, timed apart.
/// `services`: distinct server ports the flows go to (0: every flow its own
/// port, so every flow is its own edge: the worst case).
pub fn pipeline(n: u32, services: u32, out: &mut dyn Write) -> Result<()> {
    use crate::datapath::{RawKey, Sample};
    use crate::flow::{Clock, Context, FlowTable};
    use crate::graph::{Graph, ServerResolver};
    let host = crate::host::HostView {
        hostname: "bench".into(),
        addrs: vec!["10.231.0.1".parse()?],
        ..Default::default()
    };
    let mut entries = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut k = RawKey {
            ifindex: 2,
            proto: 17,
            family: 4,
            ..Default::default()
        };
        k.addr[0][10] = 0xff;
        k.addr[0][11] = 0xff;
        k.addr[0][12..].copy_from_slice(&[10, 231, 0, 1]);
        k.addr[1] = k.addr[0];
        k.addr[1][15] = 2 + (i / 60_000) as u8;
        // Client ports vary; the server port is one of `services`.
        let dport = if services == 0 {
            1024 + (i % 60_000) as u16
        } else {
            8000 + (i % services) as u16
        };
        let sport = if services == 0 {
            40000
        } else {
            1024 + (i % 60_000) as u16
        };
        k.port = [sport, dport];
        let s = Sample {
            packets: [1, 0],
            bytes: [74, 0],
            first_seen_ns: 10,
            last_seen_ns: 20,
            first_side: 1,
            ..Default::default()
        };
        entries.push((k, s));
    }
    let mut table = FlowTable::new(n as usize * 2, Duration::from_secs(120), 0);
    let name = |_: u32| -> Arc<str> { "eth0".into() };
    let cx = Context {
        now_mono_ns: 30,
        clock: Clock::now(),
        host: &host,
        name: &name,
    };
    let rss0 = crate::metrics::resident_bytes();
    let t = Instant::now();
    let records = table.ingest(&entries, &cx);
    let t_ingest = t.elapsed();
    let resolver = ServerResolver {
        data_source_id: "bench",
        host: &host,
    };
    let graph = Graph::build(&records, &resolver);
    let t_graph = t.elapsed();
    let src = crate::config::FlowsSource::default_server();
    let now = std::time::SystemTime::now();
    let batch = crate::coordimap::encode(&graph, &[resolver.host_endpoint()], &src, &[], now, now);
    let t_encode = t.elapsed();
    let body = serde_json::to_vec(&batch)?;
    let t_json = t.elapsed();
    let rss1 = crate::metrics::resident_bytes();
    writeln!(
        out,
        "bench scale pipeline flows={n} services={services} edges={} body_bytes={}",
        graph.edges.len(),
        body.len()
    )?;
    writeln!(
        out,
        "bench scale pipeline ingest_ms={} graph_ms={} encode_ms={} json_ms={} total_ms={}",
        t_ingest.as_millis(),
        (t_graph - t_ingest).as_millis(),
        (t_encode - t_graph).as_millis(),
        (t_json - t_encode).as_millis(),
        t_json.as_millis()
    )?;
    writeln!(
        out,
        "bench scale pipeline rss_growth_bytes={}",
        rss1.saturating_sub(rss0)
    )?;
    Ok(())
}

/// Kubernetes mode at cluster scale: a stand-in API server lists `pods`
/// pods (with a ReplicaSet per 5 pods, a Service per 10, a Node per 100);
/// prints how long the first sync took, what the caches cost in memory,
/// in this process and in a real agent, and the cost of one resolution.
pub fn kube(pods: u32, out: &mut dyn Write) -> Result<()> {
    use crate::k8s::index::Cluster;
    use crate::k8s::standin::{self, StandIn};
    let api = StandIn::start()?;
    let ip_of = |i: u32| format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
    for n in 0..pods.div_ceil(100).max(1) {
        api.upsert(standin::node(
            &format!("node-{n}"),
            &format!("192.168.{}.{}", n / 250, 1 + n % 250),
        ));
    }
    for r in 0..pods.div_ceil(5) {
        api.upsert(standin::replicaset(
            "bench",
            &format!("rs-{r}"),
            Some(&format!("deploy-{r}")),
        ));
    }
    for s in 0..pods.div_ceil(10) {
        api.upsert(standin::service(
            "bench",
            &format!("svc-{s}"),
            &format!("10.96.{}.{}", s / 256, s % 256),
            80,
            8080,
        ));
    }
    for i in 0..pods {
        let rs = format!("rs-{}", i / 5);
        api.upsert(standin::pod(
            "bench",
            &format!("pod-{i}"),
            "1",
            &ip_of(i),
            &format!("node-{}", i / 100),
            Some(("ReplicaSet", &rs)),
        ));
    }
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let rss0 = crate::metrics::resident_bytes();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let kubeconfig = api.kubeconfig();
    let (cluster, sync) = rt.block_on(async {
        let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let client = kube::Client::try_from(cfg)?;
        let cluster = Arc::new(std::sync::RwLock::new(Cluster::new(Duration::from_secs(
            120,
        ))));
        let metrics = Arc::new(crate::metrics::Metrics::new(Arc::new(
            crate::delivery::DeliveryStats::default(),
        )));
        let t0 = Instant::now();
        let tasks = crate::k8s::watch::start(client, cluster.clone(), metrics);
        if !crate::k8s::watch::wait_synced(&cluster, Duration::from_secs(120)).await {
            bail!("the watch caches did not sync within 120 s");
        }
        let sync = t0.elapsed();
        for t in tasks {
            t.abort();
        }
        Ok::<_, anyhow::Error>((cluster, sync))
    })?;
    drop(rt);
    // SAFETY: as above.
    unsafe { libc::malloc_trim(0) };
    let rss1 = crate::metrics::resident_bytes();
    let c = crate::k8s::watch::read(&cluster);
    let counts = c.counts();
    if counts[0].1 != pods as usize {
        bail!("the caches hold {} pods, not {pods}", counts[0].1);
    }
    let n = 1_000_000u32;
    let now = std::time::SystemTime::now();
    let ips: Vec<std::net::IpAddr> = (0..1024u32)
        .map(|i| {
            ip_of(i.wrapping_mul(2_654_435_761) % pods.max(1))
                .parse()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into())
        })
        .collect();
    let t = Instant::now();
    let mut found = 0u64;
    for i in 0..n {
        found += c.resolve(ips[(i % 1024) as usize], now).is_some() as u64;
    }
    let per = t.elapsed().as_nanos() as f64 / n as f64;
    // The graph of 100,000 flows between pods, each pod a client of three
    // others (10 % through a ClusterIP), with pod resolution and, for
    // comparison, with server-mode resolution of the same records.
    let host = crate::host::HostView::default();
    let resolver = crate::k8s::KubeResolver {
        cluster: &c,
        cluster_uid: "bench-cluster",
        data_source_id: "bench",
        node: "node-0",
        host: &host,
    };
    let records: Vec<crate::flow::FlowRecord> = (0..100_000u32)
        .map(|i| {
            let a = i.wrapping_mul(2_654_435_761) % pods.max(1);
            let b = (a.wrapping_mul(7) + i % 3) % pods.max(1);
            let via = i % 10 == 0;
            let dst = if via {
                format!("10.96.{}.{}", (b / 10) / 256, (b / 10) % 256)
            } else {
                ip_of(b)
            };
            let ip = |s: String| s.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            crate::flow::FlowRecord {
                opened: true,
                ..crate::flow::FlowRecord::between(
                    "tcp",
                    (ip(ip_of(a)), 1024 + (i % 60_000) as u16),
                    (ip(dst), if via { 80 } else { 8080 }),
                    now,
                )
            }
        })
        .collect();
    let t = Instant::now();
    let graph = crate::graph::Graph::build(&records, &resolver);
    let graph_ms = t.elapsed().as_secs_f64() * 1000.0;
    let server = crate::graph::ServerResolver {
        data_source_id: "bench",
        host: &host,
    };
    let t = Instant::now();
    let plain = crate::graph::Graph::build(&records, &server);
    let plain_ms = t.elapsed().as_secs_f64() * 1000.0;
    drop(plain);
    drop(c);
    writeln!(
        out,
        "bench scale kube pods={pods} sync_ms={} cache_rss_bytes={} resolve_ns={per:.0} resolved={found} graph_100k_flows_ms={graph_ms:.0} graph_edges={} server_mode_graph_ms={plain_ms:.0}",
        sync.as_millis(),
        rss1.saturating_sub(rss0),
        graph.edges.len()
    )?;

    // A real agent in Kubernetes mode against the same API.
    let kc_path =
        std::env::temp_dir().join(format!("flowmap-scale-kubeconfig-{}", std::process::id()));
    std::fs::write(&kc_path, &kubeconfig)?;
    let _kc = TempFile(kc_path.clone());
    let config = "coordimap:\n  data_sources:\n    - type: flows\n      id: scale\n      config:\n        - name: interface_name\n          value: lo\n        - name: deployedAt\n          value: kubernetes\n        - name: external_mappings\n          value: \"*@bench-cluster\"\n        - name: crawl_interval\n          value: 1s\n";
    let agent = AgentProc::start_config(
        config,
        &["--output", "none", "--no-store"],
        &[
            ("KUBECONFIG", kc_path.to_str().unwrap_or_default()),
            ("NODE_NAME", "node-0"),
        ],
    )?;
    agent.wait_log("interval", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(2));
    let rss = crate::metrics::resident_bytes_of(&agent.pid().to_string());
    let objects = agent.metric("flowmap_kube_objects{kind=\"pods\"}")?;
    agent.stop()?;
    writeln!(
        out,
        "bench scale kube pods={pods} agent_rss_bytes={rss} agent_cached_pods={objects}"
    )?;
    Ok(())
}
