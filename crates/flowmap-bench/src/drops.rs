//! `flowmap-bench scale drops`: the cost of the kernel-drops tracepoint
//! program (`flowmap_kfree_skb`, on skb:kfree_skb) per event, from the
//! kernel's BPF statistics (run_time_ns / run_cnt, BPF_ENABLE_STATS held
//! only while measuring), while an nftables rule in the test namespace drops
//! `packets` UDP datagrams of one flow. The program runs for every freed
//! skb of the host, so `runs` counts the skipped "not a drop" events too.
//! Prints `bench scale drops case=<case> ns_per_run=<N> runs=<R>
//! dropped=<D>`.

use std::io::Write;
use std::net::UdpSocket;
use std::time::Duration;

use anyhow::{bail, Result};
use libbpf_rs::query::ProgInfoIter;

use crate::realpath::StatsOn;
use crate::scale::test_net;

/// The program's name as the kernel keeps it (15 characters).
const PROG: &str = "flowmap_kfree_s";

/// run_time_ns and run_cnt of the programs named [`PROG`].
fn prog_stats() -> (u64, u64) {
    ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy() == PROG)
        .fold((0, 0), |(t, c), p| (t + p.run_time_ns, c + p.run_cnt))
}

pub fn drops(packets: u32, out: &mut dyn Write) -> Result<()> {
    let net = test_net(0)?;
    let _dp = flowmap::datapath::Datapath::load(&flowmap::datapath::Options::default())?;
    net.exec(&["nft", "add table inet fmbench"]);
    net.exec(&[
        "nft",
        "add chain inet fmbench in { type filter hook input priority 0; }",
    ]);
    net.exec(&["nft", "add rule inet fmbench in udp dport 9 counter drop"]);
    let _stats = StatsOn::enable()?;
    for case in ["idle", "netfilter_drop_one_flow"] {
        let before = prog_stats();
        let mut dropped = 0u64;
        if case == "idle" {
            std::thread::sleep(Duration::from_secs(1));
        } else {
            let sock = UdpSocket::bind("10.231.0.1:0")?;
            let buf = [0u8; 64];
            for _ in 0..packets {
                sock.send_to(&buf, "10.231.0.2:9")?;
            }
            std::thread::sleep(Duration::from_millis(200));
            let listed = net.exec(&["nft", "list", "table", "inet", "fmbench"]);
            dropped = listed
                .split("counter packets ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
        let after = prog_stats();
        let runs = after.1 - before.1;
        if runs == 0 && case != "idle" {
            bail!("{PROG} did not run: is the tracepoint attached?");
        }
        writeln!(
            out,
            "bench scale drops case={case} ns_per_run={:.1} runs={runs} dropped={dropped}",
            (after.0 - before.0) as f64 / runs.max(1) as f64
        )?;
    }
    Ok(())
}
