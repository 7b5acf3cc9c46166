//! `flowmap-bench scale`: the load harness. Each run builds its own network
//! namespaces and veth pairs, drives the real agent binary (or the datapath
//! in-process for throughput), prints `bench scale <name> <metric>=<value>`
//! lines, and removes everything it created.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use flowmap_testkit::agent::{
    flowmap_links, http_get, proc_fds, proc_rss, wait_until, Agent, AgentBuilder,
};
use flowmap_testkit::net::{Link, Netns};

/// The agent binary the harness runs (unless FLOWMAP_BIN names another):
/// `flowmap` next to this one (cargo builds both into the same directory).
pub fn flowmap_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("flowmap")))
        .unwrap_or_else(|| PathBuf::from("flowmap"))
}

/// The agent as the harness runs it: data source `scale` on `iface`,
/// nothing on stdout, the datapath's debug lines in the log.
pub fn agent(bin: impl AsRef<Path>, iface: &str, interval: &str) -> AgentBuilder {
    Agent::builder(bin)
        .id("scale")
        .iface(iface)
        .interval(interval)
        .output("none")
        .env("RUST_LOG", "info,flowmap::datapath=debug")
}

/// The harness's test network: the root end 10.231.0.1/16 and fd31::1/64
/// plus `clients` client addresses of each family (10.231.2.x,
/// fd31::1:x); the namespace end 10.231.0.2 and fd31::2.
pub fn test_net(clients: u32) -> Result<Netns> {
    let mut b = Netns::builder()
        .v4("10.231.0.1", "10.231.0.2", 16)
        .v6("fd31::1", "fd31::2", 64);
    for i in 0..clients {
        b = b
            .host_addr(&format!("10.231.2.{}/16", i + 1))
            .host_addr(&format!("fd31::1:{i:x}/64"));
    }
    b.build()
}

/// Asks /healthz every 5 ms on a thread of its own and keeps each answer's
/// latency in milliseconds (a failed request counts as 10 s).
struct HealthProbe {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<f64>>,
}

impl HealthProbe {
    fn start(port: u16) -> HealthProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut lat = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = matches!(http_get(port, "/healthz"), Ok((200, _)));
                lat.push(if ok {
                    t.elapsed().as_secs_f64() * 1000.0
                } else {
                    10_000.0
                });
                std::thread::sleep(Duration::from_millis(5));
            }
            lat
        });
        HealthProbe { stop, thread }
    }

    fn stop(self) -> Vec<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The value at quantile `q` (0..=1) of `v`; 0 when empty.
fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Opens `udp` distinct UDP flows (one datagram each, IPv4 and IPv6 alike,
/// to `services` server ports) and `tcp` TCP connections into the
/// namespace, at `rate` flows/s (0: as fast as possible). Returns the TCP
/// connections, kept open.
pub fn generate(
    net: &Netns,
    udp: u32,
    tcp: u32,
    services: u32,
    rate: u32,
) -> Result<Vec<TcpStream>> {
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
    let net = test_net(udp / 2 / 50_000 + 1)?;
    let max_flows = ((udp + tcp + 1024) * 5 / 4).next_power_of_two().max(1024);
    let agent = agent(flowmap_bin(), &net.host, "5s")
        .option("max_flows", max_flows)
        .start()?;
    let rss0 = proc_rss(agent.pid());
    let probe = HealthProbe::start(agent.port());
    let t = Instant::now();
    let conns = generate(&net, udp, tcp, services, rate)?;
    let gen = t.elapsed();
    // The next interval carries them all; the probe has run through its
    // processing.
    let seen = agent.count_log("interval ");
    wait_until(
        Instant::now() + Duration::from_secs(15),
        "an interval after the flows were sent",
        || agent.count_log("interval ") > seen,
    )?;
    let lat = probe.stop();
    // The pipeline thread gives the interval's memory back right after
    // logging it: read RSS once that is done (the next interval is 5 s
    // away), and the peak the interval reached.
    std::thread::sleep(Duration::from_millis(500));
    let flows = agent.metric("flowmap_flows_last_interval ")?;
    let secs = agent.metric("flowmap_interval_processing_seconds ")?;
    let rss = agent.metric("flowmap_resident_memory_bytes ")?;
    let peak = peak_rss_of(&agent.pid().to_string());
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
    writeln!(
        out,
        "bench scale flows healthz_p99_ms={:.1} healthz_max_ms={:.1} healthz_requests={}",
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        lat.len()
    )?;
    if let Some(line) = agent.last_log("interval ") {
        let parts: Vec<&str> = line
            .split_whitespace()
            .filter(|w| w.ends_with("_ms") || w.contains("_ms="))
            .collect();
        writeln!(out, "bench scale flows phases {}", parts.join(" "))?;
    }
    if let Some(line) = agent.last_log("flow maps swapped") {
        let w: Vec<&str> = line
            .split_whitespace()
            .filter(|w| w.starts_with("wait_us="))
            .collect();
        writeln!(out, "bench scale flows swap {}", w.join(" "))?;
    }
    writeln!(
        out,
        "bench scale flows agent_rss_bytes={rss:.0} agent_rss_start_bytes={rss0} agent_rss_peak_bytes={peak}"
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
    let links = (0..n)
        .map(|_| Link::veth_pair())
        .collect::<Result<Vec<Link>>>()?;
    let t = Instant::now();
    let agent = agent(flowmap_bin(), "all", "30s")
        .option("max_flows", 32768)
        .start()?;
    let end = Instant::now() + Duration::from_secs(60);
    wait_until(end, "every interface attached", || {
        links
            .iter()
            .all(|l| agent.count_log(&format!("interface={} ", l.name)) > 0)
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
    let t = Instant::now();
    let late = Link::veth_pair()?;
    agent.wait_log(
        &format!("interface={} ", late.name),
        Duration::from_secs(10),
    )?;
    writeln!(
        out,
        "bench scale attach new_interface_ms={}",
        t.elapsed().as_millis()
    )?;
    agent.stop()?;
    drop(late);
    drop(links);
    Ok(())
}

/// Creates and deletes a veth pair `cycles` times while the agent runs with
/// `all`; compares file descriptors, TCX links and memory before and after.
pub fn churn(cycles: u32, out: &mut dyn Write) -> Result<ChurnResult> {
    let agent = agent(flowmap_bin(), "all", "30s")
        .option("max_flows", 32768)
        .start()?;
    let pid = agent.pid();
    std::thread::sleep(Duration::from_millis(500));
    let (fd0, links0, rss0) = (proc_fds(pid), flowmap_links(), proc_rss(pid));
    let mut worst = Duration::ZERO;
    let mut total = Duration::ZERO;
    for _ in 0..cycles {
        let t = Instant::now();
        let link = Link::veth_pair()?;
        let r = agent.wait_log(
            &format!("interface={} ", link.name),
            Duration::from_secs(10),
        );
        drop(link);
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
/// rounds rotating between nothing attached, the empty program, flowmap,
/// and flowmap with the empty program on the same hooks and the kernel's
/// BPF statistics on (that round's packets give the per-packet line
/// `bench scale realpath case=udp64_one_flow ...`; its rate is not used
/// in the ratios, as the statistics' clock reads slow every program).
pub fn throughput(rounds: u32, secs: f64, out: &mut dyn Write) -> Result<()> {
    let net = test_net(0)?;
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
    let mut dp = flowmap::datapath::Datapath::load(&flowmap::datapath::Options::default())?;
    let floor = crate::datapath::Floor::load()?;
    let floor_ids = floor.ids()?;
    let iface = flowmap::datapath::ifaces::list()?
        .into_iter()
        .find(|i| i.name == net.host)
        .ok_or_else(|| anyhow!("veth {} not found", net.host))?;
    // Rounds rotate: nothing attached, the empty program, flowmap, both.
    let mut pps: [Vec<f64>; 3] = Default::default();
    let (mut ns_fm, mut ns_empty, mut packets) = (Vec::new(), Vec::new(), 0u64);
    for round in 0..rounds * 4 {
        let mode = (round % 4) as usize;
        dp.detach_all();
        let floor_hook = if mode == 1 || mode == 3 {
            Some(floor.attach(iface.ifindex)?)
        } else {
            None
        };
        if mode >= 2 {
            dp.attach(&iface)?;
        }
        let stats = (mode == 3)
            .then(crate::realpath::StatsOn::enable)
            .transpose()?;
        let fm_ids = if mode == 3 {
            use std::os::fd::AsFd;
            let p = dp.program(flowmap::datapath::Entry::EthEgress);
            vec![libbpf_rs::Program::id_from_fd(p.as_fd())?]
        } else {
            Vec::new()
        };
        let snap = crate::realpath::stats_by_id();
        let before = received.load(Ordering::Relaxed);
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < secs {
            for _ in 0..256 {
                let _ = tx.send(&payload);
            }
        }
        std::thread::sleep(Duration::from_millis(150));
        let got = received.load(Ordering::Relaxed) - before;
        if mode == 3 {
            let after = crate::realpath::stats_by_id();
            let (f, n) = crate::realpath::cost_of(&snap, &after, &fm_ids);
            let (e, _) = crate::realpath::cost_of(&snap, &after, &floor_ids);
            ns_fm.push(f);
            ns_empty.push(e);
            packets += n;
        } else {
            pps[mode].push(got as f64 / secs);
        }
        drop(stats);
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
    // Ratios per round (each mode's round against the nearest rounds of
    // the others), so a slow moment of the machine cancels out.
    let ratios = |num: &[f64], den: &[f64]| -> Vec<f64> {
        num.iter().zip(den).map(|(a, b)| a / b.max(1.0)).collect()
    };
    let mut r_with = ratios(&pps[2], &pps[0]);
    let mut r_empty = ratios(&pps[1], &pps[0]);
    let mut r_over = ratios(&pps[2], &pps[1]);
    let lo_hi = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        (lo, hi)
    };
    let (wl, wh) = lo_hi(&r_with);
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
        "bench scale throughput ratio={:.3} ratio_min={wl:.3} ratio_max={wh:.3} empty_program_ratio={:.3} flowmap_over_empty={:.3}",
        median(&mut r_with),
        median(&mut r_empty),
        median(&mut r_over)
    )?;
    let (f, e) = (median(&mut ns_fm), median(&mut ns_empty));
    writeln!(
        out,
        "bench scale realpath case=udp64_one_flow ns_flowmap={f:.1} ns_empty={e:.1} ns_over_empty={:.1} packets={packets}",
        f - e
    )?;
    Ok(())
}

/// The user-space half of an interval on `n` synthetic flows (no kernel):
/// ingest, graph build, encoding and serialisation, timed apart.
/// `services`: distinct server ports the flows go to (0: every flow its own
/// port, so every flow is its own edge: the worst case).
pub fn pipeline(n: u32, services: u32, out: &mut dyn Write) -> Result<()> {
    use flowmap::datapath::clock::Clock;
    use flowmap::enrich::server::ServerResolver;
    use flowmap::flow::{Context, FlowTable};
    use flowmap::graph::Graph;
    let host = bench_host()?;
    let entries = synthetic_flows(n, services);
    let mut table = FlowTable::new(n as usize * 2, Duration::from_secs(120), 0);
    // As the agent does: one name per interface, shared.
    let eth0: Arc<str> = "eth0".into();
    let name = |_: u32| -> Arc<str> { eth0.clone() };
    let cx = Context {
        now_mono_ns: 30,
        clock: Clock::now(),
        host: &host,
        name: &name,
    };
    let rss0 = flowmap::serve::metrics::resident_bytes();
    // CPU time of this thread too.
    let cpu = thread_cpu_ms;
    let c0 = cpu();
    let t = Instant::now();
    let records = table.ingest(&entries, &cx);
    let c_ingest = cpu();
    let t_ingest = t.elapsed();
    let resolver = ServerResolver {
        data_source_id: "bench",
        host: &host,
    };
    let graph = Graph::build(&records, &resolver);
    let t_graph = t.elapsed();
    let c_graph = cpu();
    let src = flowmap::config::FlowsSource::default_server();
    let now = std::time::SystemTime::now();
    // The body as the agent writes it: elements encoded straight into JSON.
    let mut body = Vec::new();
    flowmap::sinks::coordimap::write_body(
        &mut body,
        &graph,
        &[resolver.host_endpoint()],
        &src,
        &[],
        (now, now),
    )?;
    let t_encode = t.elapsed();
    let c_encode = cpu();
    let rss1 = flowmap::serve::metrics::resident_bytes();
    writeln!(
        out,
        "bench scale pipeline flows={n} services={services} edges={} body_bytes={}",
        graph.edges.len(),
        body.len()
    )?;
    writeln!(
        out,
        "bench scale pipeline ingest_ms={} graph_ms={} encode_ms={} total_ms={}",
        t_ingest.as_millis(),
        (t_graph - t_ingest).as_millis(),
        (t_encode - t_graph).as_millis(),
        t_encode.as_millis()
    )?;
    writeln!(
        out,
        "bench scale pipeline cpu_ingest_ms={:.1} cpu_graph_ms={:.1} cpu_encode_ms={:.1} cpu_total_ms={:.1}",
        c_ingest - c0,
        c_graph - c_ingest,
        c_encode - c_graph,
        c_encode - c0
    )?;
    writeln!(
        out,
        "bench scale pipeline rss_growth_bytes={}",
        rss1.saturating_sub(rss0)
    )?;
    Ok(())
}

/// The host of `pipeline`'s synthetic flows (their clients' address).
fn bench_host() -> Result<flowmap::enrich::host::HostView> {
    Ok(flowmap::enrich::host::HostView {
        hostname: "bench".into(),
        addrs: vec!["10.231.0.1".parse()?],
        ..Default::default()
    })
}

/// This thread's CPU time in ms: on a machine shared with builds the wall
/// clock also counts the time other processes ran.
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain syscall writing into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// This process's peak resident memory (VmHWM).
fn peak_rss_bytes() -> u64 {
    peak_rss_of("self")
}

/// A process's peak resident memory (VmHWM), `pid` a number or `self`.
fn peak_rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// One interval as the agent runs it, on `pipeline`'s synthetic flows:
/// `Pipeline::interval` with a fake drain (the entries handed over as the
/// kernel drain hands them), the agent's default data source settings,
/// and its sinks: the spool (the collector's hand-off) and a SQLite store
/// (its hand-off; the writer thread's own work is not in the figures),
/// in a temporary directory. Two intervals: in the first every flow is
/// new (the connection table empty, as after a start or for short-lived
/// flows); the second drains the same flows again (long-lived
/// connections: the table already holds them). Prints, per interval, this
/// thread's CPU time and the wall time, what it spooled, and the process's
/// resident memory after it and at its peak.
pub fn pipeline_agent(n: u32, services: u32, out: &mut dyn Write) -> Result<()> {
    use flowmap::agent::pipeline::{HostSource, Pipeline};
    use flowmap::serve::metrics::Metrics;
    use flowmap::sinks::coordimap::spool::{DeliveryStats, Spool};
    use flowmap::sinks::coordimap::SpoolSink;
    use flowmap::sinks::store::{self, Location};
    use flowmap::sinks::Sink;
    use flowmap_testkit::source::FakeSource;
    use std::sync::Mutex;
    let cfg = flowmap::config::parse(
        "coordimap:\n  data_sources:\n    - type: flows\n      data_source_id: bench\n      config:\n        - name: interface_name\n          value: all\n",
        &|_| None,
    )
    .map_err(|e| anyhow!("the bench's configuration: {e}"))?;
    let dir = flowmap_testkit::tempdir::TempDir::new("bench-pipeline");
    let stats = Arc::new(DeliveryStats::default());
    let metrics = Arc::new(Metrics::new(stats.clone()));
    let spool = Arc::new(Mutex::new(Spool::open(
        &dir.path().join("spool"),
        256 << 20,
        stats,
    )?));
    let counters = store::Counters {
        written: metrics.store_written.clone(),
        errors: metrics.store_errors.clone(),
        dropped: metrics.store_dropped.clone(),
        healthy: metrics.health.store_ok.clone(),
    };
    let writer = store::Writer::start(
        Location::Sqlite(dir.path().join("flowmap.db")),
        Duration::from_secs(3600),
        8,
        counters,
    )?;
    let sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(SpoolSink {
            spool: spool.clone(),
            wake: Arc::new(tokio::sync::Notify::new()),
        }),
        Box::new(writer),
    ];
    let mut p = Pipeline::new(
        &cfg,
        (Duration::from_secs(5), (n * 2).next_power_of_two()),
        sinks,
        metrics.clone(),
        None,
    );
    p.set_host(HostSource::Fixed(bench_host()?));
    p.set_started(0);
    let mut src = FakeSource::new(&[(2, "eth0")]);
    // Seen just now, so the table keeps them between the two intervals.
    let now = flowmap::datapath::clock::clock_ns(libc::CLOCK_MONOTONIC);
    let mut flows = synthetic_flows(n, services);
    for (_, s) in &mut flows {
        s.first_seen_ns = now - 2_000_000;
        s.last_seen_ns = now - 1_000_000;
    }
    for round in 1..=2 {
        src.push(flowmap::datapath::Drained {
            flows: flows.clone(),
            ..Default::default()
        });
        let rss0 = flowmap::serve::metrics::resident_bytes();
        let c0 = thread_cpu_ms();
        let t = Instant::now();
        let report = p.interval(&mut src)?;
        let wall = t.elapsed();
        let cpu = thread_cpu_ms() - c0;
        // As the agent's pipeline thread does after each interval.
        let c1 = thread_cpu_ms();
        flowmap::agent::give_back_memory();
        let trim = thread_cpu_ms() - c1;
        let rss1 = flowmap::serve::metrics::resident_bytes();
        let peak = peak_rss_bytes();
        let mut spool = spool.lock().map_err(|_| anyhow!("spool lock poisoned"))?;
        let spooled = spool.oldest().map(|(_, b)| b.len()).unwrap_or(0);
        if let Some((seq, _)) = spool.oldest() {
            spool.remove(seq);
        }
        drop(spool);
        writeln!(
            out,
            "bench scale pipeline_agent interval={round} flows={n} services={services} records={} spooled_bytes={spooled}",
            report.flows
        )?;
        writeln!(
            out,
            "bench scale pipeline_agent interval={round} interval_ms={:.1} cpu_interval_ms={cpu:.1} cpu_trim_ms={trim:.1}",
            wall.as_secs_f64() * 1e3
        )?;
        writeln!(
            out,
            "bench scale pipeline_agent interval={round} rss_before_bytes={rss0} rss_after_bytes={rss1} rss_peak_bytes={peak}"
        )?;
    }
    p.close();
    Ok(())
}

/// `n` synthetic drained entries (UDP, one datagram each, from this host
/// 10.231.0.1): `services` server ports, or with 0 every flow its own
/// server port (so its own edge).
fn synthetic_flows(n: u32, services: u32) -> Vec<(flowmap::flow::FlowKey, flowmap::flow::Sample)> {
    use flowmap::flow::{proto, ConnKey, FlowKey, Sample};
    let mut entries = Vec::with_capacity(n as usize);
    for i in 0..n {
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
        let k = FlowKey {
            ifindex: 2,
            conn: ConnKey {
                proto: proto::UDP,
                addr: [
                    std::net::Ipv4Addr::new(10, 231, 0, 1).into(),
                    std::net::Ipv4Addr::new(10, 231, 0, 2 + (i / 60_000) as u8).into(),
                ],
                port: [sport, dport],
            },
        };
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
    entries
}

/// Kubernetes mode at cluster scale: a stand-in API server lists `pods`
/// pods (with a ReplicaSet per 5 pods, a Service per 10, a Node per 100);
/// prints how long the first sync took, what the caches cost in memory,
/// in this process and in a real agent, and the cost of one resolution.
pub fn kube(pods: u32, out: &mut dyn Write) -> Result<()> {
    use flowmap::enrich::kube::index::Cluster;
    use flowmap_testkit::standin::{self, StandIn};
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
    let rss0 = flowmap::serve::metrics::resident_bytes();
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
        let metrics = Arc::new(flowmap::serve::metrics::Metrics::new(Arc::new(
            flowmap::sinks::coordimap::spool::DeliveryStats::default(),
        )));
        let t0 = Instant::now();
        let tasks = flowmap::enrich::kube::watch::start(client, cluster.clone(), metrics);
        if !flowmap::enrich::kube::watch::wait_synced(&cluster, Duration::from_secs(120)).await {
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
    let rss1 = flowmap::serve::metrics::resident_bytes();
    let c = flowmap::enrich::kube::watch::read(&cluster);
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
    let host = flowmap::enrich::host::HostView::default();
    let resolver = flowmap::enrich::kube::KubeResolver {
        cluster: &c,
        cluster_uid: "bench-cluster",
        data_source_id: "bench",
        node: "node-0",
        host: &host,
    };
    let records: Vec<flowmap::flow::FlowRecord> = (0..100_000u32)
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
            flowmap::flow::FlowRecord {
                opened: true,
                ..flowmap_testkit::records::between(
                    "tcp",
                    (ip(ip_of(a)), 1024 + (i % 60_000) as u16),
                    (ip(dst), if via { 80 } else { 8080 }),
                    now,
                )
            }
        })
        .collect();
    let t = Instant::now();
    let graph = flowmap::graph::Graph::build(&records, &resolver);
    let graph_ms = t.elapsed().as_secs_f64() * 1000.0;
    let server = flowmap::enrich::server::ServerResolver {
        data_source_id: "bench",
        host: &host,
    };
    let t = Instant::now();
    let plain = flowmap::graph::Graph::build(&records, &server);
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
    let b = agent(flowmap_bin(), "lo", "1s")
        .option("deployedAt", "kubernetes")
        .option("external_mappings", "\"*@bench-cluster\"")
        .arg("--no-store");
    let kc = b.file("kubeconfig", &kubeconfig);
    let agent = b
        .env("KUBECONFIG", kc.to_string_lossy())
        .env("NODE_NAME", "node-0")
        .start()?;
    agent.wait_log("interval", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(2));
    let rss = flowmap::serve::metrics::resident_bytes_of(&agent.pid().to_string());
    let objects = agent.metric("flowmap_kube_objects{kind=\"pods\"}")?;
    agent.stop()?;
    writeln!(
        out,
        "bench scale kube pods={pods} agent_rss_bytes={rss} agent_cached_pods={objects}"
    )?;
    Ok(())
}
