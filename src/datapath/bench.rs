//! `flowmap bench`: the kernel program's cost per packet, measured with
//! BPF_PROG_TEST_RUN next to two reference programs from bpf/bench/.

use std::mem::MaybeUninit;
use std::net::IpAddr;

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{ProgramInput, ProgramMut as Program};

use super::{Datapath, Entry, Options};
use crate::frames::{eth_frame, L4, TCP_ACK, TCP_PSH, TCP_SYN};

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

/// Median over `rounds` runs of `repeat` packets each.
fn median_ns(prog: &Program<'_>, frame: &[u8], repeat: u32, rounds: usize) -> Result<f64> {
    let mut v = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        v.push(run_ns(prog, frame, repeat)?);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Ok(v[v.len() / 2])
}

/// Prints `bench datapath case=<case> program=<p> ns_per_packet=<N>` lines
/// and the memory the flowmap maps take.
pub fn run(repeat: u32, rounds: usize, out: &mut dyn std::io::Write) -> Result<()> {
    let dp = Datapath::load(&Options::default())?;
    let mut s1 = MaybeUninit::uninit();
    let floor = floor_skel::FloorSkelBuilder::default()
        .open(&mut s1)?
        .load()?;
    let mut s2 = MaybeUninit::uninit();
    let minc = min_skel::MinCounterSkelBuilder::default()
        .open(&mut s2)?
        .load()?;
    for (name, frame) in cases() {
        let fm = median_ns(dp.program(Entry::EthIngress), &frame, repeat, rounds)?;
        let fl = median_ns(&floor.progs.floor_prog, &frame, repeat, rounds)?;
        let mc = median_ns(&minc.progs.min_counter, &frame, repeat, rounds)?;
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
