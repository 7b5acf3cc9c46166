//! Kernel clocks: CLOCK_MONOTONIC readings and their conversion to wall
//! time (the kernel program stamps flows with the monotonic clock).

use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context, Result};
use libbpf_rs::ProgramInput;
use tracing::debug;

/// Converts CLOCK_MONOTONIC nanoseconds (the kernel's clock) to wall time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Clock {
            offset_ns: real as i128 - mono as i128,
        }
    }
    /// A clock whose wall time is `offset_ns` after the monotonic value (tests).
    pub fn fixed(offset_ns: i128) -> Clock {
        Clock { offset_ns }
    }
    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.offset_ns).max(0) as u64;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
    }
}

pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl super::Datapath {
    /// One reading of (CLOCK_MONOTONIC ns, jiffies) from the kernel.
    pub(super) fn clock_sample(&self) -> Result<(u64, u64)> {
        let input = ProgramInput {
            data_in: Some(&[0u8; 64]),
            repeat: 1,
            ..Default::default()
        };
        self.skel
            .progs
            .flowmap_clock
            .test_run(input)
            .context("reading the kernel clock")?;
        let bss = self
            .skel
            .maps
            .bss_data
            .as_deref()
            .ok_or_else(|| anyhow!("the program's .bss is not memory-mapped"))?;
        // SAFETY: plain integers in the mmap'ed .bss, written by the program.
        let c = unsafe { std::ptr::read_volatile(&bss.clock) };
        Ok((c.ns, c.jiffies))
    }

    /// The kernel tick length: ticks counted over at least 100 ms since
    /// load, rounded to the nearest CONFIG_HZ Linux offers (100, 250, 300,
    /// 1000). Measured once.
    pub(super) fn ns_per_tick(&mut self) -> Result<u64> {
        if self.ns_per_tick != 0 {
            return Ok(self.ns_per_tick);
        }
        let (n0, j0, t0) = self.tick_start;
        if let Some(rest) = Duration::from_millis(100).checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
        let (n1, j1) = self.clock_sample()?;
        let hz = (j1 - j0) as f64 * 1e9 / (n1 - n0).max(1) as f64;
        let best = [100u64, 250, 300, 1000]
            .into_iter()
            .min_by(|a, b| (*a as f64 - hz).abs().total_cmp(&(*b as f64 - hz).abs()))
            .unwrap_or(250);
        self.ns_per_tick = 1_000_000_000 / best;
        debug!(ns_per_tick = self.ns_per_tick, "kernel tick measured");
        Ok(self.ns_per_tick)
    }
}
