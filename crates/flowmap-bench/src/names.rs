//! `flowmap-bench scale names`: what name capture (issue 14) costs the TC
//! program per packet. The kernel program is loaded twice, as the agent
//! loads it with `capture_names: true` and with `false` (then the verifier
//! removes the capture path), and both run the fixed frames of
//! `flowmap-bench datapath` through BPF_PROG_TEST_RUN, interleaved round by
//! round. None of those frames is a DNS answer, a young connection's
//! payload or a QUIC Initial: they are the packets that must not pay for
//! names. Prints `bench scale names case=<case> ns_on=<N> ns_off=<M>
//! over_pct=<(N-M)/M in %>`.

use std::io::Write;

use anyhow::Result;
use flowmap::datapath::{Datapath, Entry, Options};

use crate::datapath::{cases, medians};

pub fn names(repeat: u32, rounds: usize, out: &mut dyn Write) -> Result<()> {
    let on = Datapath::load(&Options {
        capture_names: true,
        ..Options::default()
    })?;
    let off = Datapath::load(&Options {
        capture_names: false,
        ..Options::default()
    })?;
    for (name, frame) in cases() {
        let m = medians(
            &[
                on.program(Entry::EthIngress),
                off.program(Entry::EthIngress),
            ],
            &frame,
            repeat,
            rounds,
        )?;
        writeln!(
            out,
            "bench scale names case={name} ns_on={:.1} ns_off={:.1} over_pct={:.1}",
            m[0],
            m[1],
            (m[0] - m[1]) / m[1].max(0.1) * 100.0
        )?;
    }
    Ok(())
}
