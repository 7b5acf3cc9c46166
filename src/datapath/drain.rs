//! The drain: swaps the two flow maps, waits until no program writes the
//! old one, reads it out in batches and turns kernel entries into the
//! plain records the flow model takes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{anyhow, Result};
use libbpf_rs::{MapCore, MapFlags};
use tracing::debug;

use super::overflow::KeyBytes;
use super::{
    as_bytes, from_bytes, Datapath, Drained, Plain, RawConnHealth, RawConnKey, RawConnRtt,
    RawDropKey, RawKey, RawKey4, RawSlot, RawStats, STAT_NAMES,
};
use crate::flow::{ConnKey, FlowKey, Sample};

impl Datapath {
    /// Pulls overflow packets out of the ring buffer.
    pub fn poll_overflow(&self) {
        if let Some(r) = &self.ring {
            let _ = r.consume();
        }
    }

    fn set_active(&mut self, v: u32) -> Result<()> {
        let bss = self
            .skel
            .maps
            .bss_data
            .as_deref_mut()
            .ok_or_else(|| anyhow!("the program's .bss is not memory-mapped"))?;
        // SAFETY: a plain u32 in the mmap'ed .bss the program reads.
        unsafe { std::ptr::write_volatile(&mut bss.active_map, v) };
        // The RTT sampler's period (bpf/flows.bpf.c): the next one whose
        // parity is the new active map's.
        // SAFETY: as above.
        let p = unsafe { std::ptr::read_volatile(&bss.rtt_period) }.wrapping_add(1);
        let p = if p & 1 == v { p } else { p.wrapping_add(1) };
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(&mut bss.rtt_period, p) };
        self.active = v;
        Ok(())
    }

    /// Swaps the flow maps and reads out the one the program no longer
    /// writes. Counts that arrive meanwhile go to the other map and are
    /// returned by the next drain, so nothing is lost.
    pub fn drain(&mut self) -> Result<Drained> {
        let ns_per_tick = self.ns_per_tick()?;
        let old = self.active;
        self.set_active(1 - old)?;
        let t = std::time::Instant::now();
        wait_for_programs();
        debug!(
            wait_us = t.elapsed().as_micros() as u64,
            "flow maps swapped; readers gone"
        );
        let m = &self.skel.maps;
        let mut flows = Vec::new();
        drain_as(
            pick(old, &m.flows_a, &m.flows_b),
            |key: RawKey, val: RawStats| flows.push((flow_key(&key), sample_of(&val, ns_per_tick))),
        )?;
        let mut cached = drain_cache(pick(old, &m.cache_a, &m.cache_b))?;
        drain_as(
            pick(old, &m.flows4_a, &m.flows4_b),
            |key: RawKey4, mut val: RawStats| {
                if !cached.is_empty() {
                    if let Some(c) = cached.remove(&key4_bytes(&key)) {
                        add_counts(&mut val, &c);
                    }
                }
                flows.push((flow_key4(&key), sample_of(&val, ns_per_tick)))
            },
        )?;
        if !cached.is_empty() {
            // Not expected: the program fills a slot only for a flow whose
            // entry is in the same period's map. Counted all the same.
            debug!(slots = cached.len(), "cached counts without their entry");
            let (now_ns, now_j) = self.clock_sample()?;
            for (key, mut val) in cached {
                val.first_seen_jiffies = val.last_seen_jiffies;
                val.first_seen_ns = now_ns.saturating_sub(
                    now_j
                        .saturating_sub(val.last_seen_jiffies)
                        .saturating_mul(ns_per_tick),
                );
                val.first_side = if val.packets[0] > 0 { 1 } else { 2 };
                if let Some(k) = from_bytes::<RawKey4>(&key) {
                    flows.push((flow_key4(&k), sample_of(&val, ns_per_tick)));
                }
            }
        }
        let mut retransmits = Vec::new();
        drain_as(
            pick(old, &m.health_a, &m.health_b),
            |key: RawConnKey, val: RawConnHealth| retransmits.push((conn_key(&key), val.retrans)),
        )?;
        let drops = self.drain_drops(old)?;
        let mut srtt = Vec::new();
        drain_as(
            pick(old, &m.srtt_a, &m.srtt_b),
            |key: RawConnKey, val: RawConnRtt| srtt.push((conn_key(&key), val.srtt_us)),
        )?;
        self.poll_overflow();
        let (extra, dropped) = {
            let mut o = self
                .overflow
                .lock()
                .map_err(|_| anyhow!("overflow lock poisoned"))?;
            let extra: Vec<(KeyBytes, Sample)> = o.flows.drain().collect();
            (extra, std::mem::take(&mut o.dropped))
        };
        for (kb, s) in extra {
            if let Some(k) = from_bytes::<RawKey>(&kb) {
                flows.push((flow_key(&k), s));
            }
        }
        let (names, names_dropped) = self
            .names
            .lock()
            .map_err(|_| anyhow!("names lock poisoned"))?
            .take();
        let (procs, procs_dropped) = self
            .procs
            .lock()
            .map_err(|_| anyhow!("procs lock poisoned"))?
            .take();
        Ok(Drained {
            flows,
            stats: self.stats()?,
            overflow_dropped: dropped,
            retransmits,
            names,
            names_dropped,
            drops,
            srtt,
            procs,
            procs_dropped,
        })
    }

    /// Reads out the drops map the program no longer writes (see `drain`).
    fn drain_drops(&self, old: u32) -> Result<Vec<super::drops::Dropped>> {
        let Some(reasons) = &self.drop_reasons else {
            return Ok(Vec::new());
        };
        let m = &self.skel.maps;
        let mut out = Vec::new();
        drain_as(
            pick(old, &m.drops_a, &m.drops_b),
            |key: RawDropKey, count: u64| {
                out.push(super::drops::Dropped {
                    conn: (key.conn.family != 0).then(|| conn_key(&key.conn)),
                    reason: reasons.name(key.reason),
                    count,
                })
            },
        )?;
        Ok(out)
    }

    /// Records a second each CPU may hand over through the names ring
    /// (bpf/names.bpf.h; capture itself is set at load).
    pub fn set_names_rate(&mut self, per_sec: u32) -> Result<()> {
        let bss = self
            .skel
            .maps
            .bss_data
            .as_deref_mut()
            .ok_or_else(|| anyhow!("the program's .bss is not memory-mapped"))?;
        // SAFETY: a plain u32 in the mmap'ed .bss the program reads.
        unsafe { std::ptr::write_volatile(&mut bss.names_per_sec, per_sec) };
        Ok(())
    }

    /// Kernel statistics since load, summed over CPUs.
    pub fn stats(&self) -> Result<[u64; STAT_NAMES.len()]> {
        let mut out = [0u64; STAT_NAMES.len()];
        for (i, slot) in out.iter_mut().enumerate() {
            let key = (i as u32).to_ne_bytes();
            if let Some(per_cpu) = self.skel.maps.stats.lookup_percpu(&key, MapFlags::ANY)? {
                *slot = per_cpu.iter().filter_map(|b| from_bytes::<u64>(b)).sum();
            }
        }
        Ok(out)
    }
}

fn sizes<K, V>() -> (usize, usize) {
    (std::mem::size_of::<K>(), std::mem::size_of::<V>())
}

/// The per-CPU flow cache of the old period (bpf/flows.bpf.c, account4):
/// the counts every CPU's slots hold, summed by flow (packets, bytes, TCP
/// flags and last tick of an entry), and the cache zeroed for the period
/// it serves next (a slot's flow must have its entry in the map of the
/// slot's period).
fn drain_cache(map: &libbpf_rs::MapMut<'_>) -> Result<HashMap<[u8; 16], RawStats>> {
    let mut out: HashMap<[u8; 16], RawStats> = HashMap::new();
    let mut zero: Option<Vec<Vec<u8>>> = None;
    for elem in 0..map.max_entries() {
        let key = elem.to_ne_bytes();
        let Some(per_cpu) = map.lookup_percpu(&key, MapFlags::ANY)? else {
            continue;
        };
        for cpu in &per_cpu {
            for b in cpu.chunks_exact(std::mem::size_of::<RawSlot>()) {
                let Some(s) = from_bytes::<RawSlot>(b) else {
                    continue;
                };
                if s.packets == [0, 0] {
                    continue;
                }
                let sum = out.entry(key4_bytes(&s.key)).or_default();
                add_counts(
                    sum,
                    &RawStats {
                        packets: s.packets,
                        bytes: s.bytes,
                        tcp_flags: s.tcp_flags.map(u32::from),
                        last_seen_jiffies: s.last_seen_jiffies,
                        ..Default::default()
                    },
                );
            }
        }
        let zero = zero.get_or_insert_with(|| vec![vec![0u8; cpu_len(&per_cpu)]; per_cpu.len()]);
        map.update_percpu(&key, zero, MapFlags::ANY)?;
    }
    Ok(out)
}

fn cpu_len(per_cpu: &[Vec<u8>]) -> usize {
    per_cpu.first().map_or(0, Vec::len)
}

fn key4_bytes(k: &RawKey4) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&as_bytes(k)[..16]);
    out
}

/// Adds cached counts to a flow's entry, as the program does when it
/// evicts a slot (flush_slot).
fn add_counts(v: &mut RawStats, c: &RawStats) {
    for i in 0..2 {
        v.packets[i] += c.packets[i];
        v.bytes[i] += c.bytes[i];
        v.tcp_flags[i] |= c.tcp_flags[i];
    }
    v.last_seen_jiffies = v.last_seen_jiffies.max(c.last_seen_jiffies);
}

/// The map of a swapped pair that programs wrote before the swap.
fn pick<'a, M>(old: u32, a: &'a M, b: &'a M) -> &'a M {
    if old == 0 {
        a
    } else {
        b
    }
}

/// Drains `map` (a flow, health, drops or RTT map) as typed entries.
fn drain_as<K: Plain, V: Plain>(
    map: &libbpf_rs::MapMut<'_>,
    mut each: impl FnMut(K, V),
) -> Result<()> {
    drain_map(map, sizes::<K, V>(), &mut |k, v| {
        if let (Some(k), Some(v)) = (from_bytes::<K>(k), from_bytes::<V>(v)) {
            each(k, v)
        }
    })
}

/// The plain key of a health map entry (a connection without interface).
fn conn_key(k: &RawConnKey) -> ConnKey {
    let f = flow_key(&RawKey {
        addr: k.addr,
        port: k.port,
        proto: k.proto,
        family: k.family,
        ..Default::default()
    });
    f.conn
}

/// The plain record of a kernel key.
fn flow_key(k: &RawKey) -> FlowKey {
    let ip = |raw: &[u8; 16]| -> IpAddr {
        if k.family == 4 {
            IpAddr::V4(Ipv4Addr::new(raw[12], raw[13], raw[14], raw[15]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*raw))
        }
    };
    FlowKey {
        ifindex: k.ifindex,
        conn: ConnKey {
            proto: k.proto,
            addr: [ip(&k.addr[0]), ip(&k.addr[1])],
            port: k.port,
        },
    }
}

/// The plain record of a kernel IPv4 key (struct flow_key4): the same
/// record its struct flow_key would give.
fn flow_key4(k: &RawKey4) -> FlowKey {
    FlowKey {
        ifindex: k.ifindex_proto >> 8,
        conn: ConnKey {
            proto: k.ifindex_proto as u8,
            addr: [
                IpAddr::V4(Ipv4Addr::from(k.addr[0])),
                IpAddr::V4(Ipv4Addr::from(k.addr[1])),
            ],
            port: k.port,
        },
    }
}

/// A kernel entry as a plain sample, its ticks turned into nanoseconds.
fn sample_of(s: &RawStats, ns_per_tick: u64) -> Sample {
    let ticks = s.last_seen_jiffies.saturating_sub(s.first_seen_jiffies);
    Sample {
        packets: s.packets,
        bytes: s.bytes,
        first_seen_ns: s.first_seen_ns,
        last_seen_ns: s.first_seen_ns + ticks.saturating_mul(ns_per_tick),
        syn_ns: s.syn_ns,
        synack_ns: s.synack_ns,
        tcp_flags: s.tcp_flags,
        open_side: s.open_side,
        first_side: s.first_side,
        syns: s.syns,
        unreach: s.unreach,
        unreach_side: s.unreach_side as u8,
    }
}

/// Reads and deletes every entry of a map no program writes any more, in
/// batches of 8192 (one syscall per batch); element by element if the
/// kernel refuses batches.
fn drain_map(
    map: &libbpf_rs::MapMut<'_>,
    (ks, vs): (usize, usize),
    each: &mut dyn FnMut(&[u8], &[u8]),
) -> Result<()> {
    use std::os::fd::AsRawFd;
    const BATCH: u32 = 8192;
    let mut keys = vec![0u8; ks * BATCH as usize];
    let mut vals = vec![0u8; vs * BATCH as usize];
    // The kernel's batch cursor for hash maps is opaque; key-sized is enough.
    let mut cursor = vec![0u8; ks.max(8)];
    let mut next = vec![0u8; ks.max(8)];
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        ..Default::default()
    };
    let mut first = true;
    loop {
        let mut count = BATCH;
        // SAFETY: the buffers hold BATCH keys and values of the map's sizes,
        // the cursors are at least key-sized, and count tells the kernel so.
        let ret = unsafe {
            libbpf_sys::bpf_map_lookup_and_delete_batch(
                map.as_fd().as_raw_fd(),
                if first {
                    std::ptr::null_mut()
                } else {
                    cursor.as_mut_ptr().cast()
                },
                next.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                vals.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let err = if ret < 0 { -ret } else { 0 };
        if err == 0 || err == libc::ENOENT {
            for i in 0..count as usize {
                each(&keys[i * ks..(i + 1) * ks], &vals[i * vs..(i + 1) * vs]);
            }
        }
        match err {
            0 => {
                cursor.copy_from_slice(&next);
                first = false;
            }
            libc::ENOENT => return Ok(()),
            libc::EINTR => {}
            _ => {
                debug!(errno = err, "batch drain refused; draining entry by entry");
                let left: Vec<Vec<u8>> = map.keys().collect();
                for k in &left {
                    if let Some(v) = map.lookup(k, MapFlags::ANY)? {
                        each(k, &v);
                    }
                    map.delete(k)?;
                }
                return Ok(());
            }
        }
    }
}

/// Waits until no program still runs with the old `active_map` value: TC
/// programs run inside RCU read-side sections, and membarrier's GLOBAL
/// command waits for an RCU grace period. A short sleep backs it up on
/// kernels where that command returns at once (nohz_full).
fn wait_for_programs() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: a plain syscall with integer arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_GLOBAL,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if rc != 0 {
        std::thread::sleep(Duration::from_millis(20));
    } else {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_key_gives_the_record_of_its_full_key() {
        let mut full = RawKey {
            ifindex: 0x00ab_cdef,
            port: [40000, 443],
            proto: 6,
            family: 4,
            ..Default::default()
        };
        full.addr[0][10..].copy_from_slice(&[0xff, 0xff, 10, 1, 0, 1]);
        full.addr[1][10..].copy_from_slice(&[0xff, 0xff, 192, 168, 7, 254]);
        let short = RawKey4 {
            addr: [[10, 1, 0, 1], [192, 168, 7, 254]],
            port: [40000, 443],
            ifindex_proto: 0x00ab_cdef << 8 | 6,
        };
        assert_eq!(flow_key4(&short), flow_key(&full));
        assert_eq!(flow_key4(&short).ifindex, 0x00ab_cdef);
        assert_eq!(
            flow_key4(&short).conn.addr[1],
            "192.168.7.254".parse::<IpAddr>().unwrap()
        );
    }
}
