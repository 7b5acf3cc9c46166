//! `flowmap-bench scale procs`: the cost of the process-attribution
//! program (bpf/procs.bpf.h, `flowmap_proc_state` on
//! sock:inet_sock_set_state) per run and per connection, from the kernel's
//! BPF statistics (run_time_ns / run_cnt, BPF_ENABLE_STATS held only while
//! measuring), while this process opens and accepts `connections` TCP
//! connections over loopback. It runs on every TCP state change of the
//! host (a few per connection, never per packet). Prints `bench scale
//! procs ns_per_run=<N> runs=<R> runs_per_connection=<C>
//! ns_per_connection=<N> lost=<L>` (`procs_lost`, the kernel statistic).

use std::io::Write;
use std::net::{TcpListener, TcpStream};

use anyhow::{bail, Result};
use libbpf_rs::query::ProgInfoIter;

use crate::realpath::StatsOn;

/// The program's name as the kernel keeps it (15 characters).
const PROG: &str = "flowmap_proc_st";

/// run_time_ns and run_cnt of the programs named `name`.
fn prog_stats(name: &str) -> (u64, u64) {
    ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy() == name)
        .fold((0, 0), |(t, c), p| (t + p.run_time_ns, c + p.run_cnt))
}

pub fn procs(connections: u32, out: &mut dyn Write) -> Result<()> {
    let dp = flowmap::datapath::Datapath::load(&flowmap::datapath::Options::default())?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let _stats = StatsOn::enable()?;
    let before = prog_stats(PROG);
    for i in 0..connections {
        let c = TcpStream::connect(addr)?;
        let (s, _) = l.accept()?;
        drop((c, s));
        // The ring (256 KiB) is read as the agent reads it, every few
        // hundred connections here.
        if i % 256 == 0 {
            dp.poll_overflow();
        }
    }
    dp.poll_overflow();
    let lost_idx = flowmap::datapath::STAT_NAMES
        .iter()
        .position(|n| *n == "procs_lost")
        .unwrap_or(0);
    let lost = dp.stats()?[lost_idx];
    let a = prog_stats(PROG);
    let (ns, runs) = (a.0 - before.0, a.1 - before.1);
    if runs == 0 {
        bail!("{PROG} did not run: is it attached?");
    }
    let n = connections.max(1) as f64;
    writeln!(
        out,
        "bench scale procs ns_per_run={:.1} runs={runs} runs_per_connection={:.1} ns_per_connection={:.1} lost={lost}",
        ns as f64 / runs as f64,
        runs as f64 / n,
        ns as f64 / n,
    )?;
    Ok(())
}
