//! The privileged part: loads bpf/flows.bpf.c, attaches it to interfaces,
//! follows interfaces that come and go, and drains the kernel flow map.

pub mod attach;
pub mod bench;
pub mod ifaces;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, ProgramInput, RingBuffer, RingBufferBuilder};
use tracing::{debug, info, warn};

use attach::{Hook, HookKind};
use ifaces::{Interface, Selection};

#[allow(clippy::all, non_camel_case_types, dead_code, unused_imports)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/flows.skel.rs"));
}

pub use skel::types::{flow_event as RawEvent, flow_key as RawKey, flow_stats as RawStats};

/// One flow entry of one drain period, with kernel ticks turned into
/// CLOCK_MONOTONIC nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub first_seen_ns: u64,
    /// Resolution: one kernel tick (1 to 10 ms).
    pub last_seen_ns: u64,
    pub syn_ns: u64,
    pub synack_ns: u64,
    pub tcp_flags: [u32; 2],
    /// 0 unknown, 1/2: side 0/1 opened (SYN, echo request).
    pub open_side: u8,
    /// 1/2: the side whose packet created the entry.
    pub first_side: u8,
}

impl Sample {
    fn from_raw(s: &RawStats, ns_per_tick: u64) -> Sample {
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
        }
    }
}
use skel::{FlowsSkel, FlowsSkelBuilder};

/// Names of the kernel statistics, in the order of `enum flow_stat`.
pub const STAT_NAMES: [&str; 7] = [
    "non_ip",
    "truncated",
    "bad_header",
    "ext_chain_too_long",
    "frag_no_head",
    "map_full",
    "ring_lost",
];

/// How to hook the program into an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// TCX when the kernel has it, classic clsact otherwise.
    #[default]
    Auto,
    Tcx,
    Tc,
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(AttachMode::Auto),
            "tcx" => Ok(AttachMode::Tcx),
            "tc" => Ok(AttachMode::Tc),
            other => Err(format!(
                "unknown attach mode {other:?}; allowed: auto, tcx, tc"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Entries of each of the two flow maps.
    pub max_flows: u32,
    pub mode: AttachMode,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_flows: DEFAULT_MAX_FLOWS,
            mode: AttachMode::Auto,
        }
    }
}

pub const DEFAULT_MAX_FLOWS: u32 = 32768;

/// User space keeps at least this many overflow flows per drain period (more
/// when max_flows is larger); beyond that, overflow packets are counted as
/// dropped.
pub const OVERFLOW_MIN_FLOWS: usize = 4096;

/// One entry point of the kernel program, for BPF_PROG_TEST_RUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    EthIngress,
    EthEgress,
    L3Ingress,
    L3Egress,
}

/// What one drain returns: every flow entry of the drain period, the
/// overflow packets merged per flow, and the kernel counters so far.
#[derive(Debug, Default)]
pub struct Drained {
    pub flows: Vec<(RawKey, Sample)>,
    /// Kernel statistics since load (cumulative), indexed like STAT_NAMES.
    pub stats: [u64; STAT_NAMES.len()],
    /// Overflow packets that user space could not keep (its table full).
    pub overflow_dropped: u64,
}

/// Overflow packets merged per flow, bounded.
#[derive(Default)]
struct Overflow {
    flows: HashMap<KeyBytes, Sample>,
    cap: usize,
    dropped: u64,
}

type KeyBytes = [u8; std::mem::size_of::<RawKey>()];

fn key_bytes(k: &RawKey) -> KeyBytes {
    let mut out = [0u8; std::mem::size_of::<RawKey>()];
    out.copy_from_slice(as_bytes(k));
    out
}

/// Reads a plain repr(C) struct from the bytes the kernel returned.
fn from_bytes<T: Copy + Default>(b: &[u8]) -> Option<T> {
    if b.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: T is one of the generated plain-data structs (integers and
    // arrays of integers), valid for any bit pattern; the length is checked.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: plain-data struct, read as bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

impl Overflow {
    fn add(&mut self, e: &RawEvent) {
        let kb = key_bytes(&e.key);
        let len = self.flows.len();
        let side = (e.side & 1) as usize;
        let entry = match self.flows.get_mut(&kb) {
            Some(s) => s,
            None if len >= self.cap => {
                self.dropped += 1;
                return;
            }
            None => {
                let s = Sample {
                    first_seen_ns: e.ts_ns,
                    first_side: side as u8 + 1,
                    ..Default::default()
                };
                self.flows.entry(kb).or_insert(s)
            }
        };
        entry.packets[side] += 1;
        entry.bytes[side] += e.bytes;
        entry.tcp_flags[side] |= e.tcp_flags;
        entry.first_seen_ns = entry.first_seen_ns.min(e.ts_ns);
        entry.last_seen_ns = entry.last_seen_ns.max(e.ts_ns);
        if e.opens != 0 && entry.open_side == 0 {
            entry.open_side = side as u8 + 1;
            if e.key.proto == 6 {
                entry.syn_ns = e.ts_ns;
            }
        }
        if e.synack != 0 && entry.synack_ns == 0 {
            entry.synack_ns = e.ts_ns;
        }
    }
}

pub struct Attached {
    pub iface: Interface,
    hook: Hook,
}

impl Attached {
    pub fn kind(&self) -> HookKind {
        self.hook.kind()
    }
}

/// Why loading was refused, from what this process holds: the capabilities
/// it lacks, else (all held, refused anyway) a seccomp filter, which is
/// what podman's and CRI-O's default profiles do to bpf() without
/// CAP_SYS_ADMIN.
fn load_hint(denied: bool) -> String {
    const NEEDS: &str = "flowmap needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON";
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let Some(eff) = field("CapEff:").and_then(|v| u64::from_str_radix(v, 16).ok()) else {
        return NEEDS.into();
    };
    // CAP_SYS_ADMIN (21) also grants what CAP_BPF (39) and CAP_PERFMON (38) do.
    let has = |bit: u32| eff & (1 << bit) != 0 || (bit != 12 && eff & (1 << 21) != 0);
    let missing: Vec<&str> = [(39, "CAP_BPF"), (12, "CAP_NET_ADMIN"), (38, "CAP_PERFMON")]
        .into_iter()
        .filter(|(bit, _)| !has(*bit))
        .map(|(_, name)| name)
        .collect();
    if !missing.is_empty() {
        format!("missing capability {}: {NEEDS}", missing.join(", "))
    } else if denied && field("Seccomp:").is_some_and(|m| m != "0") {
        "CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON are all held, so a seccomp filter likely refused bpf() \
         (podman's and CRI-O's default profiles allow it only with CAP_SYS_ADMIN); use \
         deploy/seccomp/flowmap-seccomp.json (see README, \"Container image\")"
            .into()
    } else {
        NEEDS.into()
    }
}

/// The loaded kernel program and everything attached. Dropping it detaches
/// every interface (fields drop in order: hooks before the programs).
pub struct Datapath {
    attached: HashMap<u32, Attached>,
    ring: Option<RingBuffer<'static>>,
    overflow: Arc<Mutex<Overflow>>,
    skel: FlowsSkel<'static>,
    active: u32,
    mode: AttachMode,
    tcx_works: Option<bool>,
    /// Nanoseconds per kernel tick (1e9 / CONFIG_HZ), measured over the
    /// first 100 ms after load (0 until then).
    ns_per_tick: u64,
    /// The clock reading the tick measurement starts from.
    tick_start: (u64, u64, std::time::Instant),
    /// Interfaces attached with classic filters, to be moved to TCX.
    handover: std::collections::VecDeque<u32>,
}

impl Datapath {
    /// Loads the program and its maps. Needs CAP_BPF + CAP_NET_ADMIN (root).
    pub fn load(opts: &Options) -> Result<Datapath> {
        if opts.max_flows == 0 {
            bail!("max_flows must be at least 1");
        }
        // The skeleton borrows its object storage for its whole life; one
        // small allocation per loaded datapath, released at process exit.
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = FlowsSkelBuilder::default()
            .open(storage)
            .context("opening the BPF object")?;
        open.maps.flows_a.set_max_entries(opts.max_flows)?;
        open.maps.flows_b.set_max_entries(opts.max_flows)?;
        let skel = open.load().map_err(|e| {
            let denied = e.kind() == libbpf_rs::ErrorKind::PermissionDenied;
            anyhow!(
                "loading the BPF program failed: {e} ({}; --debug shows libbpf's log)",
                load_hint(denied)
            )
        })?;
        let overflow = Arc::new(Mutex::new(Overflow {
            cap: (opts.max_flows as usize).max(OVERFLOW_MIN_FLOWS),
            ..Default::default()
        }));
        let sink = overflow.clone();
        let mut rb = RingBufferBuilder::new();
        rb.add(&skel.maps.overflow, move |data: &[u8]| {
            if let Some(e) = from_bytes::<RawEvent>(data) {
                if let Ok(mut o) = sink.lock() {
                    o.add(&e);
                }
            }
            0
        })?;
        let ring = rb.build()?;
        let mut dp = Datapath {
            attached: HashMap::new(),
            ring: Some(ring),
            overflow,
            skel,
            active: 0,
            mode: opts.mode,
            tcx_works: None,
            ns_per_tick: 0,
            tick_start: (0, 0, std::time::Instant::now()),
            handover: Default::default(),
        };
        // The tick is measured over 100 ms; the agent attaches meanwhile
        // and the first drain finishes the measurement.
        let (n0, j0) = dp.clock_sample()?;
        dp.tick_start = (n0, j0, std::time::Instant::now());
        Ok(dp)
    }

    /// One reading of (CLOCK_MONOTONIC ns, jiffies) from the kernel.
    fn clock_sample(&self) -> Result<(u64, u64)> {
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
    fn ns_per_tick(&mut self) -> Result<u64> {
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

    /// The program for an interface and a kind of hook (the TCX one marks
    /// packets for the hand-over, the classic one skips marked packets).
    fn prog_for(&self, l3: bool, kind: HookKind) -> &libbpf_rs::ProgramMut<'static> {
        let p = &self.skel.progs;
        match (l3, kind) {
            (true, HookKind::Tcx) => &p.flowmap_l3,
            (false, HookKind::Tcx) => &p.flowmap_eth,
            (true, HookKind::Tc) => &p.flowmap_l3_tc,
            (false, HookKind::Tc) => &p.flowmap_eth_tc,
        }
    }

    fn hook(&self, iface: &Interface, kind: HookKind) -> Result<Hook> {
        let p = self.prog_for(iface.l3, kind);
        match kind {
            HookKind::Tcx => attach::attach_tcx(p, p, iface.ifindex),
            HookKind::Tc => attach::attach_tc(p, p, iface.ifindex),
        }
    }

    /// Removes classic TC filters that a killed flowmap left on these
    /// interfaces. TCX links cannot outlive their process.
    pub fn remove_stale(&self, ifaces: &[Interface]) -> usize {
        let mut n = 0;
        for i in ifaces {
            let removed = attach::remove_stale_tc(&self.skel.progs.flowmap_eth, i.ifindex);
            if removed > 0 {
                info!(interface = %i.name, removed, "removed TC filters left by an earlier flowmap");
            }
            n += removed;
        }
        n
    }

    /// Attaches ingress and egress to one interface.
    pub fn attach(&mut self, iface: &Interface) -> Result<HookKind> {
        if let Some(a) = self.attached.get(&iface.ifindex) {
            if a.iface.name == iface.name {
                return Ok(a.kind());
            }
        }
        let hook = match self.mode {
            AttachMode::Tcx => self.hook(iface, HookKind::Tcx)?,
            AttachMode::Tc => self.hook(iface, HookKind::Tc)?,
            AttachMode::Auto if self.tcx_works == Some(false) => self.hook(iface, HookKind::Tc)?,
            AttachMode::Auto => self.hook_tcx_or_tc(iface)?,
        };
        let kind = hook.kind();
        self.attached.insert(
            iface.ifindex,
            Attached {
                iface: iface.clone(),
                hook,
            },
        );
        Ok(kind)
    }

    /// Auto mode: TCX, or classic filters if the kernel has no TCX (found
    /// out once).
    fn hook_tcx_or_tc(&mut self, iface: &Interface) -> Result<Hook> {
        match self.hook(iface, HookKind::Tcx) {
            Ok(h) => {
                self.tcx_works = Some(true);
                Ok(h)
            }
            Err(err) if self.tcx_works.is_none() => {
                info!(error = %format!("{err:#}"), "TCX not available; using classic clsact filters");
                self.tcx_works = Some(false);
                self.hook(iface, HookKind::Tc)
            }
            Err(err) => Err(err),
        }
    }

    /// Attaches one interface with the given kind of hook, whatever the
    /// mode (for the hand-over and its tests).
    pub fn attach_as(&mut self, iface: &Interface, kind: HookKind) -> Result<()> {
        let hook = self.hook(iface, kind)?;
        self.attached.insert(
            iface.ifindex,
            Attached {
                iface: iface.clone(),
                hook,
            },
        );
        Ok(())
    }

    /// Moves one interface from its classic filters to TCX: the TCX link
    /// first, then the filters go. Packets in between are counted once
    /// (see the hand-over in bpf/flows.bpf.c). Returns false when the
    /// interface is not attached with classic filters.
    pub fn hand_over(&mut self, ifindex: u32) -> Result<bool> {
        let Some(a) = self.attached.get(&ifindex) else {
            return Ok(false);
        };
        if a.kind() != HookKind::Tc {
            return Ok(false);
        }
        let iface = a.iface.clone();
        let tcx = self.hook(&iface, HookKind::Tcx)?;
        // Dropping the old hook removes the classic filters.
        if let Some(a) = self.attached.get_mut(&ifindex) {
            a.hook = tcx;
        }
        Ok(true)
    }

    /// Hands over queued interfaces from classic filters to TCX for at most
    /// `budget`. Returns how many moved.
    pub fn hand_over_some(&mut self, budget: Duration) -> usize {
        let t = std::time::Instant::now();
        let mut moved = 0;
        while t.elapsed() < budget {
            let Some(idx) = self.handover.pop_front() else {
                break;
            };
            match self.hand_over(idx) {
                Ok(true) => {
                    moved += 1;
                    self.tcx_works = Some(true);
                }
                Ok(false) => {}
                Err(e) => {
                    // No TCX after all: the classic filters stay, and so
                    // does everything else.
                    if self.tcx_works.is_none() {
                        info!(error = %format!("{e:#}"), "TCX not available; keeping classic clsact filters");
                        self.tcx_works = Some(false);
                        self.handover.clear();
                    } else {
                        debug!(ifindex = idx, error = %format!("{e:#}"), "hand-over to TCX failed; keeping the classic filters");
                    }
                }
            }
        }
        if moved > 0 {
            info!(
                moved,
                left = self.handover.len(),
                "interfaces moved from classic filters to TCX"
            );
        }
        moved
    }

    /// Brings the attachments in line with the interfaces that exist now:
    /// attaches new wanted ones, forgets vanished ones. Returns (attached,
    /// forgotten) names.
    pub fn reconcile(
        &mut self,
        sel: &Selection,
        present: &[Interface],
    ) -> (Vec<String>, Vec<String>) {
        let mut gone = Vec::new();
        let keep: Vec<u32> = present
            .iter()
            .filter(|i| sel.wants(i))
            .map(|i| i.ifindex)
            .collect();
        let stale: Vec<u32> = self
            .attached
            .iter()
            .filter(|(idx, a)| {
                !keep.contains(idx)
                    || !present
                        .iter()
                        .any(|p| p.ifindex == **idx && p.name == a.iface.name)
            })
            .map(|(idx, _)| *idx)
            .collect();
        for idx in stale {
            if let Some(a) = self.attached.remove(&idx) {
                debug!(interface = %a.iface.name, "interface gone; forgotten");
                gone.push(a.iface.name.clone());
            }
        }
        let mut added = Vec::new();
        let todo: Vec<&Interface> = present
            .iter()
            .filter(|i| sel.wants(i) && !self.attached.contains_key(&i.ifindex))
            .collect();
        // The kernel serialises TCX attaches and each waits for an RCU
        // grace period (about 17 ms per interface here), so threads do not
        // help. In auto mode a batch of interfaces (the start, or many new
        // veths at once) is attached with classic filters, which take well
        // under a millisecond each, and then handed over to TCX a few at a
        // time (`hand_over_some`), without losing or double-counting a
        // packet.
        let batch =
            self.mode == AttachMode::Auto && self.tcx_works != Some(false) && todo.len() > 1;
        for i in todo {
            let r = if batch {
                self.attach_as(i, HookKind::Tc).map(|_| {
                    self.handover.push_back(i.ifindex);
                    HookKind::Tc
                })
            } else {
                self.attach(i)
            };
            match r {
                Ok(kind) => {
                    info!(interface = %i.name, ifindex = i.ifindex, hook = %kind, "attached");
                    added.push(i.name.clone());
                }
                // A veth can vanish between listing and attaching.
                Err(e) => warn!(interface = %i.name, error = %format!("{e:#}"), "attach failed"),
            }
        }
        (added, gone)
    }

    pub fn attached(&self) -> impl Iterator<Item = &Attached> {
        self.attached.values()
    }

    /// Detaches everything.
    pub fn detach_all(&mut self) {
        self.handover.clear();
        self.attached.clear();
    }

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
        let map = if old == 0 {
            &self.skel.maps.flows_a
        } else {
            &self.skel.maps.flows_b
        };
        let mut flows = Vec::new();
        drain_map(map, &mut |k, v| {
            if let (Some(key), Some(val)) = (from_bytes::<RawKey>(k), from_bytes::<RawStats>(v)) {
                flows.push((key, Sample::from_raw(&val, ns_per_tick)));
            }
        })?;
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
                flows.push((k, s));
            }
        }
        Ok(Drained {
            flows,
            stats: self.stats()?,
            overflow_dropped: dropped,
        })
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

    /// One entry point of the program (for BPF_PROG_TEST_RUN).
    pub fn program(&self, entry: Entry) -> &libbpf_rs::ProgramMut<'static> {
        let p = &self.skel.progs;
        match entry {
            Entry::EthIngress | Entry::EthEgress => &p.flowmap_eth,
            Entry::L3Ingress | Entry::L3Egress => &p.flowmap_l3,
        }
    }

    /// Runs one entry point on a frame with BPF_PROG_TEST_RUN and returns
    /// the program's verdict. The run's ifindex is the loopback's (1).
    pub fn test_run(&self, entry: Entry, frame: &[u8]) -> Result<u32> {
        let input = ProgramInput {
            data_in: Some(frame),
            repeat: 1,
            ..Default::default()
        };
        let out = self
            .program(entry)
            .test_run(input)
            .context("BPF_PROG_TEST_RUN")?;
        Ok(out.return_value)
    }

    /// Bytes of kernel memory the maps of this datapath are charged for
    /// (the `memlock` the kernel reports for each map).
    pub fn map_memory(&self) -> Vec<(String, u64)> {
        let m = &self.skel.maps;
        [&m.flows_a, &m.flows_b, &m.frags, &m.stats, &m.overflow]
            .iter()
            .map(|map| {
                (
                    map.name().to_string_lossy().into_owned(),
                    memlock_of(map.as_fd()),
                )
            })
            .collect()
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.attached.clear();
        self.ring = None;
    }
}

use std::os::fd::AsFd;

/// Reads and deletes every entry of a map no program writes any more, in
/// batches of 8192 (one syscall per batch); element by element if the
/// kernel refuses batches.
fn drain_map(map: &libbpf_rs::MapMut<'_>, each: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
    use std::os::fd::AsRawFd;
    const BATCH: u32 = 8192;
    let (ks, vs) = (
        std::mem::size_of::<RawKey>(),
        std::mem::size_of::<RawStats>(),
    );
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

/// Reads the kernel's `memlock:` line for a map from /proc/self/fdinfo.
pub fn memlock_of(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("memlock:")
                        .map(|v| v.trim().parse::<u64>().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
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

    fn event(port: u16, side: u32) -> RawEvent {
        RawEvent {
            key: RawKey {
                ifindex: 3,
                port: [port, 53],
                proto: 17,
                family: 4,
                ..Default::default()
            },
            side,
            bytes: 100,
            ts_ns: 1000 + port as u64,
            jiffies: 0,
            tcp_flags: 0,
            opens: 0,
            synack: 0,
            pad: [0; 2],
        }
    }

    #[test]
    fn the_overflow_table_is_bounded_and_counts_what_it_cannot_keep() {
        let mut o = Overflow {
            cap: 2,
            ..Default::default()
        };
        for p in [1, 1, 2, 3, 3, 2] {
            o.add(&event(p, 0));
        }
        o.add(&event(1, 1));
        assert_eq!(o.flows.len(), 2);
        assert_eq!(
            o.dropped, 2,
            "both packets of flow 3 are counted as dropped"
        );
        let f1 = o.flows[&key_bytes(&event(1, 0).key)];
        assert_eq!(
            (f1.packets, f1.bytes, f1.first_seen_ns, f1.last_seen_ns),
            ([2, 1], [200, 100], 1001, 1001)
        );
        let f2 = o.flows[&key_bytes(&event(2, 0).key)];
        assert_eq!(f2.packets, [2, 0]);
    }
}
