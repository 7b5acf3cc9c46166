//! `flowmap-bench scale realpath`: the kernel program's own cost on real
//! packets. flowmap's programs and an empty TCX program are attached to the
//! same hooks of a veth at the same time, so both see the same packets; the
//! kernel's BPF statistics (run_time_ns / run_cnt per program, enabled with
//! BPF_ENABLE_STATS only while the benchmark holds the returned descriptor)
//! give each one's average cost per packet. Prints
//! `bench scale realpath mode=<kernel|agent> case=<case> ns_flowmap=<N>
//! ns_empty=<M> ns_over_empty=<N-M> packets=<P>`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::query::{LinkInfoIter, LinkTypeInfo, ProgInfoIter};
use libbpf_rs::{Object, ObjectBuilder};

use flowmap_testkit::net::Netns;

use crate::datapath::Floor;
use crate::scale::{agent, flowmap_bin, test_net};

/// The cases, in the order they run.
pub const CASES: [&str; 5] = [
    "udp64_one_flow",
    "udp100_128_flows",
    "udp100_4096_flows",
    "tcp_bulk",
    "tcp_short",
];

/// Kernel BPF statistics on, for as long as this lives (the kernel counts
/// while any BPF_ENABLE_STATS descriptor is open; the sysctl is untouched).
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

impl StatsOn {
    pub fn enable() -> Result<StatsOn> {
        // SAFETY: a plain syscall wrapper; a non-negative return is a new fd
        // that we own.
        let fd = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
        if fd < 0 {
            bail!(
                "BPF_ENABLE_STATS: {}",
                std::io::Error::from_raw_os_error(-fd)
            );
        }
        // SAFETY: fd is a fresh descriptor returned to us above.
        Ok(StatsOn(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

/// run_time_ns and run_cnt summed per program name, over the programs of
/// the TCX links on `ifindex` (a program on both hooks counts once).
fn hook_stats(ifindex: u32) -> HashMap<String, (u64, u64)> {
    let mut ids: Vec<u32> = LinkInfoIter::default()
        .filter_map(|l| match l.info {
            LinkTypeInfo::Tcx(t) if t.ifindex == ifindex => Some(l.prog_id),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out: HashMap<String, (u64, u64)> = HashMap::new();
    for p in ProgInfoIter::default().filter(|p| ids.contains(&p.id)) {
        let e = out
            .entry(p.name.to_string_lossy().into_owned())
            .or_default();
        e.0 += p.run_time_ns;
        e.1 += p.run_cnt;
    }
    out
}

/// Average ns per run of the programs whose names start with `prefix`,
/// between two snapshots, and the runs.
fn cost(
    before: &HashMap<String, (u64, u64)>,
    after: &HashMap<String, (u64, u64)>,
    prefix: &str,
) -> (f64, u64) {
    let (mut ns, mut runs) = (0u64, 0u64);
    for (name, (t, c)) in after.iter().filter(|(n, _)| n.starts_with(prefix)) {
        let (t0, c0) = before.get(name).copied().unwrap_or_default();
        ns += t - t0;
        runs += c - c0;
    }
    (ns as f64 / runs.max(1) as f64, runs)
}

/// A server in the test namespace that reads and drops: UDP on port 9, TCP
/// on port 7001 (each connection read to its end, then closed).
struct Sink {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Result<Result<()>>>>,
}

impl Sink {
    fn start(net: &Netns) -> Result<Sink> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let udp = net.spawn_in(move || -> Result<()> {
            let sock = UdpSocket::bind("10.231.0.2:9")?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let _ = sock.recv(&mut buf);
            }
            Ok(())
        });
        let s = stop.clone();
        let tcp = net.spawn_in(move || -> Result<()> {
            let l = TcpListener::bind("10.231.0.2:7001")?;
            l.set_nonblocking(true)?;
            let mut buf = vec![0u8; 1 << 16];
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false)?;
                        c.set_read_timeout(Some(Duration::from_secs(5)))?;
                        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            Ok(())
        });
        std::thread::sleep(Duration::from_millis(200));
        Ok(Sink {
            stop,
            threads: vec![udp, tcp],
        })
    }

    fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().map_err(|_| anyhow!("sink thread panicked"))???;
        }
        Ok(())
    }
}

/// UDP datagrams of `frame` bytes on the wire over `flows` source ports,
/// round robin, `burst` datagrams per port in a row, for `secs` seconds.
fn udp(frame: usize, flows: usize, burst: usize, secs: f64) -> Result<()> {
    let socks: Vec<UdpSocket> = (0..flows)
        .map(|i| -> Result<UdpSocket> {
            let s = UdpSocket::bind("10.231.0.1:0")
                .with_context(|| format!("the socket of flow {i} of {flows} (ulimit -n?)"))?;
            s.connect("10.231.0.2:9")?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    // Ethernet 14 + IPv4 20 + UDP 8 before the payload.
    let payload = vec![0u8; frame - 42];
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        for s in &socks {
            for _ in 0..burst {
                let _ = s.send(&payload);
            }
        }
    }
    Ok(())
}

/// One TCP connection writing as fast as it can for `secs` seconds.
fn tcp_bulk(secs: f64) -> Result<()> {
    let mut c = TcpStream::connect("10.231.0.2:7001")?;
    let chunk = vec![0u8; 1 << 16];
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        c.write_all(&chunk)?;
    }
    Ok(())
}

/// `n` short connections in turn: connect, 100 bytes, close.
fn tcp_short(n: u32) -> Result<()> {
    let to: SocketAddr = "10.231.0.2:7001".parse()?;
    for i in 0..n {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .with_context(|| format!("short connection {i}"))?;
        c.write_all(&[0u8; 100])?;
        c.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    }
    Ok(())
}

fn drive(case: &str, secs: f64, short: u32) -> Result<()> {
    match case {
        "udp64_one_flow" => udp(64, 1, 16, secs),
        "udp100_128_flows" => udp(100, 128, 16, secs),
        // More flows than the per-CPU flow cache has slots (512), one
        // datagram each in turn: the cache's worst case.
        "udp100_4096_flows" => udp(100, 4096, 1, secs),
        "tcp_bulk" => tcp_bulk(secs),
        "tcp_short" => tcp_short(short),
        other => bail!("unknown case {other}; cases: {}", CASES.join(", ")),
    }
}

/// Each case once with flowmap in this process (`kernel`: its programs, no
/// user space reading the maps) and, unless `kernel_only`, once with the
/// agent binary running on the veth (`agent`: drains every second, with
/// its defaults) and once more with name capture and processes off
/// (`agent_quiet`: what the agent's own activity costs the packet path
/// apart from those two).
pub fn realpath(secs: f64, short: u32, kernel_only: bool, out: &mut dyn Write) -> Result<()> {
    let net = test_net(0)?;
    let iface = flowmap::datapath::ifaces::list()?
        .into_iter()
        .find(|i| i.name == net.host)
        .ok_or_else(|| anyhow!("veth {} not found", net.host))?;
    let sink = Sink::start(&net)?;
    let _stats = StatsOn::enable()?;
    let floor = Floor::load()?;
    let _floor_hook = floor.attach(iface.ifindex)?;
    let mut modes = vec!["kernel"];
    if !kernel_only {
        modes.extend(["agent", "agent_quiet"]);
    }
    for mode in modes {
        let mut dp = None;
        let mut running = None;
        if mode == "kernel" {
            let mut d = flowmap::datapath::Datapath::load(&flowmap::datapath::Options::default())?;
            d.attach(&iface)?;
            dp = Some(d);
        } else {
            let mut a = agent(flowmap_bin(), &net.host, "1s");
            if mode == "agent_quiet" {
                a = a
                    .option("capture_names", "false")
                    .option("processes", "false");
            }
            running = Some(a.start()?);
        }
        for case in CASES {
            let before = hook_stats(iface.ifindex);
            drive(case, secs, short)?;
            std::thread::sleep(Duration::from_millis(100));
            let after = hook_stats(iface.ifindex);
            let (fm, packets) = cost(&before, &after, "flowmap_");
            let (empty, _) = cost(&before, &after, "floor_");
            writeln!(
                out,
                "bench scale realpath mode={mode} case={case} ns_flowmap={fm:.1} ns_empty={empty:.1} ns_over_empty={:.1} packets={packets}",
                fm - empty
            )?;
        }
        if let Some(mut d) = dp {
            d.detach_all();
        }
        if let Some(a) = running {
            a.stop()?;
        }
    }
    sink.stop()
}

/// run_time_ns and run_cnt of every loaded program, by program id.
pub fn stats_by_id() -> HashMap<u32, (u64, u64)> {
    ProgInfoIter::default()
        .map(|p| (p.id, (p.run_time_ns, p.run_cnt)))
        .collect()
}

/// Average ns per run of the programs `ids` between two snapshots, and
/// their runs.
pub fn cost_of(
    before: &HashMap<u32, (u64, u64)>,
    after: &HashMap<u32, (u64, u64)>,
    ids: &[u32],
) -> (f64, u64) {
    let (mut ns, mut runs) = (0u64, 0u64);
    for id in ids {
        let (t, c) = after.get(id).copied().unwrap_or_default();
        let (t0, c0) = before.get(id).copied().unwrap_or_default();
        ns += t - t0;
        runs += c - c0;
    }
    (ns as f64 / runs.max(1) as f64, runs)
}

/// Median, lowest and highest of `v`.
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// A/B of builds of the kernel program (`--object A.o --object B.o`, each
/// an object file built from a variant of bpf/flows.bpf.c with the same
/// clang flags as build.rs): every object's `flowmap_eth` and the empty
/// program are attached to the same hooks at the same time, so all see the
/// same packets; each round attaches them in another order (the first to
/// run meets the coldest caches) and runs every case. Prints per object and
/// case the median `ns_over_empty` over the rounds with its lowest and
/// highest: `bench scale realpath_ab case=<case> object=<file>
/// ns_over_empty=<median> min=<N> max=<N> rounds=<R>`.
pub fn compare(
    objects: &[std::path::PathBuf],
    rounds: u32,
    secs: f64,
    short: u32,
    out: &mut dyn Write,
) -> Result<()> {
    let net = test_net(0)?;
    let iface = flowmap::datapath::ifaces::list()?
        .into_iter()
        .find(|i| i.name == net.host)
        .ok_or_else(|| anyhow!("veth {} not found", net.host))?;
    let sink = Sink::start(&net)?;
    let _stats = StatsOn::enable()?;
    let floor = Floor::load()?;
    let _floor_hook = floor.attach(iface.ifindex)?;
    let floor_ids = floor.ids()?;
    let objs: Vec<Object> = objects
        .iter()
        .map(|p| -> Result<Object> {
            ObjectBuilder::default()
                .open_file(p)
                .and_then(|o| o.load())
                .with_context(|| format!("loading {}", p.display()))
        })
        .collect::<Result<_>>()?;
    let prog = |o: &Object| -> Result<u32> {
        let p = o
            .progs()
            .find(|p| p.name() == "flowmap_eth")
            .ok_or_else(|| anyhow!("no flowmap_eth program"))?;
        Ok(libbpf_rs::Program::id_from_fd(std::os::fd::AsFd::as_fd(
            &p,
        ))?)
    };
    let ids: Vec<u32> = objs.iter().map(prog).collect::<Result<_>>()?;
    let n = objs.len();
    let mut res: HashMap<(&str, usize), Vec<f64>> = HashMap::new();
    for round in 0..rounds as usize {
        let mut hooks = Vec::new();
        for j in 0..n {
            let o = &objs[(round + j) % n];
            let p = o
                .progs()
                .find(|p| p.name() == "flowmap_eth")
                .ok_or_else(|| anyhow!("no flowmap_eth program"))?;
            hooks.push(flowmap::datapath::attach::attach_tcx(
                &p,
                &p,
                iface.ifindex,
            )?);
        }
        for case in CASES {
            let before = stats_by_id();
            drive(case, secs, short)?;
            std::thread::sleep(Duration::from_millis(100));
            let after = stats_by_id();
            let (empty, _) = cost_of(&before, &after, &floor_ids);
            for (i, id) in ids.iter().enumerate() {
                let ns = cost_of(&before, &after, &[*id]).0 - empty;
                writeln!(
                    out,
                    "bench scale realpath_ab round={round} case={case} object={} ns_over_empty={ns:.1} ns_empty={empty:.1}",
                    objects[i].display()
                )?;
                res.entry((case, i)).or_default().push(ns);
            }
        }
        drop(hooks);
    }
    for case in CASES {
        for (i, o) in objects.iter().enumerate() {
            let (m, lo, hi) = spread(res.get_mut(&(case, i)).expect("every case ran"));
            writeln!(
                out,
                "bench scale realpath_ab case={case} object={} ns_over_empty={m:.1} min={lo:.1} max={hi:.1} rounds={rounds}",
                o.display()
            )?;
        }
    }
    sink.stop()
}
