//! `flowmap-bench datapath`: the kernel program's cost per packet, measured with
//! BPF_PROG_TEST_RUN next to two reference programs from crates/flowmap-bench/bpf/.

use std::mem::MaybeUninit;
use std::net::IpAddr;

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ProgramInput, ProgramMut as Program};

use flowmap::datapath::{attach, Datapath, Entry, Options};
use flowmap_testkit::frames::{eth_frame, L4, TCP_ACK, TCP_PSH, TCP_SYN};

#[allow(clippy::all, non_camel_case_types, dead_code, unused_imports)]
mod floor_skel {
    include!(concat!(env!("OUT_DIR"), "/floor.skel.rs"));
}
#[allow(clippy::all, non_camel_case_types, dead_code, unused_imports)]
mod min_skel {
    include!(concat!(env!("OUT_DIR"), "/min_counter.skel.rs"));
}

/// The fixed frames of the benchmark.
pub fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let a: IpAddr = "10.1.0.1".parse().unwrap();
    let b: IpAddr = "10.1.0.2".parse().unwrap();
    let a6: IpAddr = "fd00::1".parse().unwrap();
    let b6: IpAddr = "fd00::2".parse().unwrap();
    vec![
        (
            "ipv4_tcp_established",
            eth_frame(
                a,
                b,
                &L4::Tcp {
                    sport: 40000,
                    dport: 443,
                    flags: TCP_ACK | TCP_PSH,
                    payload: 1400,
                },
                &[],
            ),
        ),
        (
            "ipv4_tcp_syn",
            eth_frame(
                a,
                b,
                &L4::Tcp {
                    sport: 40001,
                    dport: 443,
                    flags: TCP_SYN,
                    payload: 0,
                },
                &[],
            ),
        ),
        (
            "ipv6_udp",
            eth_frame(
                a6,
                b6,
                &L4::Udp {
                    sport: 40002,
                    dport: 53,
                    payload: 512,
                },
                &[],
            ),
        ),
        (
            "vlan_ipv4_tcp",
            eth_frame(
                a,
                b,
                &L4::Tcp {
                    sport: 40003,
                    dport: 443,
                    flags: TCP_ACK,
                    payload: 1400,
                },
                &[(0x8100, 100)],
            ),
        ),
    ]
}

fn run_ns(prog: &Program<'_>, frame: &[u8], repeat: u32) -> Result<f64> {
    let input = ProgramInput {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    };
    let out = prog.test_run(input).context("BPF_PROG_TEST_RUN")?;
    // The kernel reports the mean duration of one run.
    Ok(out.duration.as_nanos() as f64)
}

/// Medians over `rounds` runs of `repeat` packets for each program, the
/// programs interleaved round by round (after one warm-up run each) so a
/// slow moment of the machine hits all of them alike.
pub fn medians(
    progs: &[&Program<'_>],
    frame: &[u8],
    repeat: u32,
    rounds: usize,
) -> Result<Vec<f64>> {
    for p in progs {
        run_ns(p, frame, repeat)?;
    }
    let mut all = vec![Vec::with_capacity(rounds); progs.len()];
    for _ in 0..rounds {
        for (i, p) in progs.iter().enumerate() {
            all[i].push(run_ns(p, frame, repeat)?);
        }
    }
    Ok(all
        .into_iter()
        .map(|mut v| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        })
        .collect())
}

/// Prints `bench datapath case=<case> program=<p> ns_per_packet=<N>` lines
/// and the memory the flowmap maps take.
pub fn run(repeat: u32, rounds: usize, out: &mut dyn std::io::Write) -> Result<()> {
    // As the agent runs by default: name capture on (issue 14).
    let dp = Datapath::load(&Options {
        capture_names: true,
        ..Options::default()
    })?;
    let mut s1 = MaybeUninit::uninit();
    let floor = floor_skel::FloorSkelBuilder::default()
        .open(&mut s1)?
        .load()?;
    let mut s2 = MaybeUninit::uninit();
    let minc = min_skel::MinCounterSkelBuilder::default()
        .open(&mut s2)?
        .load()?;
    for (name, frame) in cases() {
        let m = medians(
            &[
                dp.program(Entry::EthIngress),
                &floor.progs.floor_prog,
                &minc.progs.min_counter,
            ],
            &frame,
            repeat,
            rounds,
        )?;
        let (fm, fl, mc) = (m[0], m[1], m[2]);
        for (p, ns) in [("flowmap", fm), ("floor", fl), ("min_counter", mc)] {
            writeln!(
                out,
                "bench datapath case={name} program={p} ns_per_packet={ns:.1}"
            )?;
        }
        writeln!(
            out,
            "bench datapath case={name} flowmap_over_min_counter={:.2}",
            fm / mc.max(0.1)
        )?;
    }
    let total: u64 = dp.map_memory().iter().map(|(_, b)| *b).sum();
    for (map, bytes) in dp.map_memory() {
        writeln!(out, "bench memory map={map} bytes={bytes}")?;
    }
    writeln!(out, "bench memory map=total bytes={total}")?;
    Ok(())
}

/// The empty reference program, loaded for attaching to a real interface.
pub struct Floor {
    skel: floor_skel::FloorSkel<'static>,
}

impl Floor {
    pub fn load() -> Result<Floor> {
        // One small allocation per load, kept for the process's life (the
        // skeleton borrows it).
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let skel = floor_skel::FloorSkelBuilder::default()
            .open(storage)?
            .load()?;
        Ok(Floor { skel })
    }

    /// The ids of its two TCX programs (for the kernel's statistics).
    pub fn ids(&self) -> Result<Vec<u32>> {
        use std::os::fd::AsFd;
        Ok(vec![
            libbpf_rs::Program::id_from_fd(self.skel.progs.floor_in.as_fd())?,
            libbpf_rs::Program::id_from_fd(self.skel.progs.floor_out.as_fd())?,
        ])
    }

    pub fn attach(&self, ifindex: u32) -> Result<attach::Hook> {
        attach::attach_tcx(
            &self.skel.progs.floor_in,
            &self.skel.progs.floor_out,
            ifindex,
        )
    }
}
