//! `flowmap-bench scale health`: the cost per event of flowmap's socket
//! tracepoint programs at steady state, from the kernel's BPF statistics
//! (run_time_ns / run_cnt per program; BPF_ENABLE_STATS held only while
//! measuring), next to an empty `tp_btf` program on the same tracepoint
//! (bpf/trace_floor.bpf.c: what the statistics cost by themselves).
//!
//! Two namespaces joined by a veth: a client and a server. Cases:
//! - `tcp_loss`: a bulk transfer for `seconds` while the server's input
//!   chain drops one in 20 data segments (nftables): `flowmap_retransmit`
//!   runs once per retransmitted skb; `kernel_retrans_segs` is the client
//!   namespace's TcpRetransSegs delta.
//! - `synack_lost`: `attempts` connects whose SYN/ACKs the client's input
//!   chain drops, held 3.5 s: the server sends each SYN/ACK again (timer
//!   and answer to the client's own SYN retransmits), `flowmap_retransmit_synack`.
//! - `tcp_bulk`: a clean bulk transfer for `seconds`: `flowmap_rtt` on every
//!   segment both sockets receive (sampled once per socket and period,
//!   else one socket-storage lookup).
//! - `tcp_short`: `short` connections one after another (100 bytes each
//!   way): `flowmap_rtt` sampling new sockets, `flowmap_sock_state` on
//!   every state change.
//!
//! Each program that ran prints `bench scale health case=<case>
//! program=<name> ns_per_run=<N> ns_floor=<F> ns_over_floor=<N-F>
//! runs=<R>` (programs run host-wide: other traffic of the host counts too).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use libbpf_rs::query::ProgInfoIter;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};

use flowmap_testkit::net::Netns;

use crate::realpath::StatsOn;

mod floor_skel {
    #![allow(clippy::all, non_camel_case_types, dead_code, unused_imports)]
    include!(concat!(env!("OUT_DIR"), "/trace_floor.skel.rs"));
}

const LOSS_PORT: u16 = 7002;
const SYNACK_PORT: u16 = 7003;
const BULK_PORT: u16 = 7004;
const SHORT_PORT: u16 = 7005;

/// flowmap's program and the empty program on the same tracepoint.
const PAIRS: [(&str, &str); 4] = [
    ("flowmap_retransmit", "floor_retransmit"),
    ("flowmap_retransmit_synack", "floor_synack"),
    ("flowmap_sock_state", "floor_sock_state"),
    ("flowmap_rtt", "floor_rtt"),
];

/// (run_time_ns, run_cnt) of the programs by kernel ID.
fn snapshot(ids: &HashMap<&'static str, u32>) -> HashMap<&'static str, (u64, u64)> {
    let by_id: HashMap<u32, (u64, u64)> = ProgInfoIter::default()
        .map(|p| (p.id, (p.run_time_ns, p.run_cnt)))
        .collect();
    ids.iter()
        .filter_map(|(name, id)| Some((*name, *by_id.get(id)?)))
        .collect()
}

/// A kernel counter of `/proc/net/snmp` (e.g. Tcp RetransSegs) in `ns`.
fn snmp(ns: &Netns, group: &str, name: &str) -> Result<u64> {
    let text = ns.exec(&["cat", "/proc/net/snmp"]);
    let mut lines = text.lines().filter(|l| l.starts_with(&format!("{group}:")));
    let (Some(head), Some(vals)) = (lines.next(), lines.next()) else {
        bail!("no {group} in /proc/net/snmp");
    };
    let i = head
        .split_whitespace()
        .position(|h| h == name)
        .ok_or_else(|| anyhow!("no {group} {name} in /proc/net/snmp"))?;
    Ok(vals
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// A listener in `ns` with a backlog of 4096 (std's is 128).
fn listen(ns: &Netns, addr: String, port: u16) -> Result<TcpListener> {
    ns.run_in(move || -> Result<TcpListener> {
        let l = TcpListener::bind((addr.as_str(), port))?;
        // SAFETY: listen(2) again on our own listening socket raises its backlog.
        if unsafe { libc::listen(l.as_raw_fd(), 4096) } != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        Ok(l)
    })?
}

/// Writes 64 KiB blocks to `dst` from `ns` for `seconds`, then closes.
fn bulk(ns: &Netns, dst: String, port: u16, seconds: f64) -> Result<()> {
    ns.run_in(move || -> Result<()> {
        let mut s = TcpStream::connect((dst.as_str(), port))?;
        let buf = vec![7u8; 1 << 16];
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        while Instant::now() < end {
            s.write_all(&buf)?;
        }
        Ok(())
    })?
}

/// Accepts connections and reads each to its end (one thread).
fn drain_server(l: TcpListener, conns: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        for _ in 0..conns {
            let Ok((mut c, _)) = l.accept() else { return };
            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        }
    })
}

/// Starts `n` connects from `ns` without waiting for them (non-blocking
/// sockets, kept open until the returned descriptors drop).
fn connects(ns: &Netns, dst: Ipv4Addr, port: u16, n: u32) -> Result<Vec<OwnedFd>> {
    ns.run_in(move || -> Result<Vec<OwnedFd>> {
        let mut out = Vec::new();
        for _ in 0..n {
            // SAFETY: plain socket(2); a non-negative result is ours.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(dst).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sa is a valid sockaddr_in of the stated length.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            let err = std::io::Error::last_os_error();
            if rc != 0 && err.raw_os_error() != Some(libc::EINPROGRESS) {
                bail!("connect: {err}");
            }
            out.push(fd);
        }
        Ok(out)
    })?
}

pub fn health(seconds: f64, attempts: u32, short: u32, out: &mut dyn Write) -> Result<()> {
    let client = Netns::builder().no_link().build()?;
    let server = Netns::builder().host_in(&client).no_v6().build()?;
    let dst = server.peer_v4.clone();
    let dst_ip: Ipv4Addr = dst.parse()?;
    let dp = flowmap::datapath::Datapath::load(&flowmap::datapath::Options::default())?;
    let mut storage = MaybeUninit::uninit();
    let floor = floor_skel::TraceFloorSkelBuilder::default()
        .open(&mut storage)?
        .load()?;
    let f = &floor.progs;
    let mut links = Vec::new();
    let mut ids: HashMap<&'static str, u32> = dp.trace_programs().into_iter().collect();
    for (name, prog) in [
        ("floor_retransmit", &f.floor_retransmit),
        ("floor_synack", &f.floor_synack),
        ("floor_sock_state", &f.floor_sock_state),
        ("floor_rtt", &f.floor_rtt),
    ] {
        links.push(prog.attach()?);
        ids.insert(name, libbpf_rs::Program::id_from_fd(prog.as_fd())?);
    }
    server.exec(&["nft", "add table inet fmbench"]);
    server.exec(&[
        "nft",
        "add chain inet fmbench in { type filter hook input priority 0; }",
    ]);
    server.exec(&[
        "nft",
        &format!(
            "add rule inet fmbench in tcp dport {LOSS_PORT} meta length gt 200 numgen random mod 20 == 0 drop"
        ),
    ]);
    client.exec(&["nft", "add table inet fmbench"]);
    client.exec(&[
        "nft",
        "add chain inet fmbench in { type filter hook input priority 0; }",
    ]);
    client.exec(&[
        "nft",
        &format!(
            "add rule inet fmbench in tcp sport {SYNACK_PORT} tcp flags & (syn|ack) == syn|ack drop"
        ),
    ]);
    let _stats = StatsOn::enable()?;
    for case in ["tcp_loss", "synack_lost", "tcp_bulk", "tcp_short"] {
        let before = snapshot(&ids);
        // The kernel's own count, on the line of the program it matches.
        let mut extra = ("", String::new());
        match case {
            "tcp_loss" => {
                let l = listen(&server, dst.clone(), LOSS_PORT)?;
                let t = drain_server(l, 1);
                let r0 = snmp(&client, "Tcp", "RetransSegs")?;
                bulk(&client, dst.clone(), LOSS_PORT, seconds)?;
                t.join().map_err(|_| anyhow!("server thread panicked"))?;
                let r1 = snmp(&client, "Tcp", "RetransSegs")?;
                extra = (
                    "flowmap_retransmit",
                    format!(" kernel_retrans_segs={}", r1 - r0),
                );
            }
            "synack_lost" => {
                let _l = listen(&server, dst.clone(), SYNACK_PORT)?;
                let r0 = snmp(&server, "Tcp", "RetransSegs")?;
                let fds = connects(&client, dst_ip, SYNACK_PORT, attempts)?;
                std::thread::sleep(Duration::from_millis(3500));
                drop(fds);
                let r1 = snmp(&server, "Tcp", "RetransSegs")?;
                extra = (
                    "flowmap_retransmit_synack",
                    format!(" kernel_retrans_segs={}", r1 - r0),
                );
            }
            "tcp_bulk" => {
                let l = listen(&server, dst.clone(), BULK_PORT)?;
                let t = drain_server(l, 1);
                bulk(&client, dst.clone(), BULK_PORT, seconds)?;
                t.join().map_err(|_| anyhow!("server thread panicked"))?;
            }
            _ => {
                let l = listen(&server, dst.clone(), SHORT_PORT)?;
                let t = std::thread::spawn(move || {
                    let mut buf = [0u8; 100];
                    for _ in 0..short {
                        let Ok((mut c, _)) = l.accept() else { return };
                        if c.read_exact(&mut buf).is_ok() {
                            let _ = c.write_all(&buf);
                        }
                    }
                });
                let d = dst.clone();
                client.run_in(move || -> Result<()> {
                    for _ in 0..short {
                        let mut s = TcpStream::connect((d.as_str(), SHORT_PORT))?;
                        s.write_all(&[1u8; 100])?;
                        let mut back = [0u8; 100];
                        s.read_exact(&mut back)?;
                    }
                    Ok(())
                })??;
                t.join().map_err(|_| anyhow!("server thread panicked"))?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let after = snapshot(&ids);
        let delta = |name: &str| -> (u64, u64) {
            let (t1, c1) = after.get(name).copied().unwrap_or_default();
            let (t0, c0) = before.get(name).copied().unwrap_or_default();
            (t1 - t0, c1 - c0)
        };
        for (prog, fl) in PAIRS {
            let (t, runs) = delta(prog);
            if runs == 0 {
                continue;
            }
            let (ft, fruns) = delta(fl);
            let ns = t as f64 / runs as f64;
            let fns = ft as f64 / fruns.max(1) as f64;
            let extra = if prog == extra.0 {
                extra.1.as_str()
            } else {
                ""
            };
            writeln!(
                out,
                "bench scale health case={case} program={prog} ns_per_run={ns:.1} ns_floor={fns:.1} ns_over_floor={:.1} runs={runs}{extra}",
                ns - fns
            )?;
        }
    }
    drop(links);
    Ok(())
}
