//! The privileged part: loads bpf/flows.bpf.c, attaches it to interfaces,
//! follows interfaces that come and go, and drains the kernel flow map and
//! the captured DNS answers and ClientHellos (names.rs).

pub mod attach;
pub mod clock;
mod drain;
pub mod drops;
pub mod ifaces;
pub mod names;
mod overflow;
pub mod procs;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, ProgramInput, RingBuffer, RingBufferBuilder};

use crate::flow::{FlowKey, Sample};

use attach::{Hook, HookKind};
use ifaces::Interface;

#[allow(clippy::all, non_camel_case_types, dead_code, unused_imports)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/flows.skel.rs"));
}

pub use skel::types::{
    conn_health as RawConnHealth, conn_key as RawConnKey, conn_rtt as RawConnRtt,
    drop_key as RawDropKey, flow_event as RawEvent, flow_key as RawKey, flow_key4 as RawKey4,
    flow_slot as RawSlot, flow_stats as RawStats,
};

use overflow::Overflow;
use skel::{FlowsSkel, FlowsSkelBuilder};

use skel::types::flow_stat as Stat;

/// The kernel statistics by their value in the generated `enum flow_stat`
/// (bpf/flows.h), with the names /metrics and the logs use.
const STATS: [(Stat, &str); 12] = [
    (Stat::STAT_NON_IP, "non_ip"),
    (Stat::STAT_TRUNCATED, "truncated"),
    (Stat::STAT_BAD_HEADER, "bad_header"),
    (Stat::STAT_EXT_CHAIN_TOO_LONG, "ext_chain_too_long"),
    (Stat::STAT_FRAG_NO_HEAD, "frag_no_head"),
    (Stat::STAT_MAP_FULL, "map_full"),
    (Stat::STAT_RING_LOST, "ring_lost"),
    (Stat::STAT_NAMES_LIMITED, "names_limited"),
    (Stat::STAT_NAMES_LOST, "names_lost"),
    (Stat::STAT_DROPS_LOST, "drops_lost"),
    (Stat::STAT_SRTT_LOST, "srtt_lost"),
    (Stat::STAT_PROCS_LOST, "procs_lost"),
];

/// Names of the kernel statistics, indexed by their enum value. A
/// statistic added in C without a name here fails the build.
pub const STAT_NAMES: [&str; Stat::STAT_MAX.0 as usize] = {
    let mut out = [""; Stat::STAT_MAX.0 as usize];
    let mut i = 0;
    while i < STATS.len() {
        out[STATS[i].0 .0 as usize] = STATS[i].1;
        i += 1;
    }
    let mut j = 0;
    while j < out.len() {
        assert!(
            !out[j].is_empty(),
            "a kernel statistic of enum flow_stat has no name"
        );
        j += 1;
    }
    out
};

/// How to hook the program into an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
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
    /// Entries of each of the two flow maps, for IPv4 flows and for the
    /// others (IPv6) each.
    pub max_flows: u32,
    pub mode: AttachMode,
    /// Hand DNS answers and TLS ClientHellos to user space to name peers
    /// (the `capture_names` option).
    pub capture_names: bool,
    /// Hand the processes that connect and listen to user space (the
    /// `processes` option; bpf/procs.bpf.h).
    pub processes: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_flows: DEFAULT_MAX_FLOWS,
            mode: AttachMode::Auto,
            capture_names: false,
            processes: true,
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
    pub flows: Vec<(FlowKey, Sample)>,
    /// Kernel statistics since load (cumulative), indexed like STAT_NAMES.
    pub stats: [u64; STAT_NAMES.len()],
    /// Overflow packets that user space could not keep (its table full).
    pub overflow_dropped: u64,
    /// TCP segments sent again per connection (side 0/1 of its key) in the
    /// drain period, from the socket tracepoints.
    pub retransmits: Vec<(crate::flow::ConnKey, [u64; 2])>,
    /// DNS answers and ClientHello segments since the last drain, for the
    /// name resolver, and how many did not fit user space's queue.
    pub names: Vec<names::Captured>,
    pub names_dropped: u64,
    /// Packets the kernel dropped in the drain period, by connection (when
    /// their headers parsed) and reason (skb:kfree_skb).
    pub drops: Vec<drops::Dropped>,
    /// Smoothed RTT (µs) per TCP connection, from each local socket of side
    /// 0/1 of its key as it left ESTABLISHED in the drain period (0: none).
    pub srtt: Vec<(crate::flow::ConnKey, [u32; 2])>,
    /// Local TCP sockets that connected or listen since the last drain and
    /// the process that did it (bpf/procs.bpf.h), and how many did not fit
    /// user space's queue.
    pub procs: Vec<(
        crate::enrich::process::Socket,
        Arc<crate::enrich::process::Process>,
    )>,
    pub procs_dropped: u64,
}

/// Plain-data structs shared with the kernel: integers and arrays of
/// integers without padding invariants, valid for any bit pattern.
///
/// # Safety
/// Implement only for such types (the skeleton's generated mirrors of
/// bpf/flows.h and plain integers).
pub unsafe trait Plain: Copy + Default {}
// SAFETY: generated from bpf/flows.h: integers and integer arrays only.
unsafe impl Plain for RawKey {}
// SAFETY: as above.
unsafe impl Plain for RawKey4 {}
// SAFETY: as above.
unsafe impl Plain for RawStats {}
// SAFETY: as above.
unsafe impl Plain for RawEvent {}
// SAFETY: as above.
unsafe impl Plain for RawSlot {}
// SAFETY: the generated mirrors of struct conn_key / conn_health: integers.
unsafe impl Plain for RawConnKey {}
unsafe impl Plain for RawConnHealth {}
// SAFETY: the generated mirror of struct drop_key: integers.
unsafe impl Plain for RawDropKey {}
// SAFETY: the generated mirror of struct conn_rtt: integers.
unsafe impl Plain for RawConnRtt {}
// SAFETY: an integer.
unsafe impl Plain for u64 {}

/// Reads a plain struct from the bytes the kernel returned; None when
/// there are too few.
pub fn from_bytes<T: Plain>(b: &[u8]) -> Option<T> {
    if b.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: T is Plain (valid for any bit pattern); the length is checked
    // and the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

/// The bytes of a plain struct.
pub fn as_bytes<T: Plain>(v: &T) -> &[u8] {
    // SAFETY: T is Plain: every byte is initialised integer data.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
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
    /// The socket tracepoint programs' links (retransmits, drops, RTT).
    traces: Vec<libbpf_rs::Link>,
    ring: Option<RingBuffer<'static>>,
    overflow: Arc<Mutex<Overflow>>,
    names: Arc<Mutex<names::NameQueue>>,
    procs: Arc<Mutex<procs::ProcQueue>>,
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
    /// Names of the kernel's drop reasons; None when drops are not counted
    /// (no enum skb_drop_reason in the kernel's BTF).
    drop_reasons: Option<drops::DropReasons>,
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
        open.maps.flows4_a.set_max_entries(opts.max_flows)?;
        open.maps.flows4_b.set_max_entries(opts.max_flows)?;
        open.maps
            .srtt_a
            .set_max_entries(srtt_entries(opts.max_flows))?;
        open.maps
            .srtt_b
            .set_max_entries(srtt_entries(opts.max_flows))?;
        open.maps
            .rodata_data
            .as_deref_mut()
            .ok_or_else(|| anyhow!("the program's .rodata is not memory-mapped"))?
            .names_enabled = opts.capture_names as u32;
        let drop_reasons = drop_reasons(&mut open)?;
        if !opts.processes {
            open.progs.flowmap_proc_state.set_autoload(false);
        }
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
        let names = Arc::new(Mutex::new(names::NameQueue::default()));
        let queue = names.clone();
        rb.add(&skel.maps.names, move |data: &[u8]| {
            if let Ok(mut q) = queue.lock() {
                q.add(data);
            }
            0
        })?;
        let procs = Arc::new(Mutex::new(procs::ProcQueue::default()));
        let queue = procs.clone();
        rb.add(&skel.maps.procs, move |data: &[u8]| {
            if let Ok(mut q) = queue.lock() {
                q.add(data);
            }
            0
        })?;
        let ring = rb.build()?;
        let traces = attach_traces(&skel, drop_reasons.is_some(), opts.processes);
        let mut dp = Datapath {
            attached: HashMap::new(),
            traces,
            ring: Some(ring),
            overflow,
            names,
            procs,
            skel,
            active: 0,
            mode: opts.mode,
            tcx_works: None,
            ns_per_tick: 0,
            tick_start: (0, 0, std::time::Instant::now()),
            handover: Default::default(),
            drop_reasons,
        };
        dp.set_names_rate(names::NAMES_PER_SEC_PER_CPU)?;
        // The tick is measured over 100 ms; the agent attaches meanwhile
        // and the first drain finishes the measurement.
        let (n0, j0) = dp.clock_sample()?;
        dp.tick_start = (n0, j0, std::time::Instant::now());
        Ok(dp)
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
        [
            &m.flows_a,
            &m.flows_b,
            &m.flows4_a,
            &m.flows4_b,
            &m.cache_a,
            &m.cache_b,
            &m.frags,
            &m.stats,
            &m.overflow,
            &m.health_a,
            &m.health_b,
            &m.drops_a,
            &m.drops_b,
            &m.srtt_a,
            &m.srtt_b,
            &m.rtt_seen,
            &m.rtt_last,
            &m.names,
            &m.name_scratch,
            &m.name_budget,
            &m.hellos,
            &m.procs,
            &m.connecting,
        ]
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

impl Datapath {
    /// The kernel IDs of the socket tracepoint programs by their full name
    /// (the kernel keeps 15 characters: `flowmap_retransmit` and
    /// `flowmap_retransmit_synack` look alike there), for the benchmarks'
    /// per-program BPF statistics.
    pub fn trace_programs(&self) -> Vec<(&'static str, u32)> {
        let p = &self.skel.progs;
        [
            ("flowmap_retransmit", &p.flowmap_retransmit),
            ("flowmap_retransmit_synack", &p.flowmap_retransmit_synack),
            ("flowmap_kfree_skb", &p.flowmap_kfree_skb),
            ("flowmap_sock_state", &p.flowmap_sock_state),
            ("flowmap_rtt", &p.flowmap_rtt),
        ]
        .into_iter()
        .filter_map(|(name, prog)| Some((name, libbpf_rs::Program::id_from_fd(prog.as_fd()).ok()?)))
        .collect()
    }
}

/// Entries of each smoothed-RTT map: TCP connections sampled in one drain
/// period, a quarter of the flow map's entries and at least 4096.
pub fn srtt_entries(max_flows: u32) -> u32 {
    (max_flows / 4).max(4096)
}

/// The kernel's drop reasons, and the values the program skips set in its
/// read-only data; without them the drops program is not loaded.
fn drop_reasons(open: &mut skel::OpenFlowsSkel<'static>) -> Result<Option<drops::DropReasons>> {
    match drops::DropReasons::from_kernel() {
        Ok(r) => {
            open.maps
                .rodata_data
                .as_deref_mut()
                .ok_or_else(|| anyhow!("the program's .rodata is not memory-mapped"))?
                .drop_skip = r.skip;
            Ok(Some(r))
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "kernel drops are not counted");
            open.progs.flowmap_kfree_skb.set_autoload(false);
            Ok(None)
        }
    }
}

/// Attaches the socket tracepoint programs. One that fails to attach is
/// logged and left out: flows are still counted, without that signal.
fn attach_traces(skel: &FlowsSkel<'static>, drops: bool, procs: bool) -> Vec<libbpf_rs::Link> {
    let p = &skel.progs;
    let mut out = Vec::new();
    for (name, prog) in [
        ("tcp_retransmit_skb", &p.flowmap_retransmit),
        ("tcp_retransmit_synack", &p.flowmap_retransmit_synack),
        ("kfree_skb", &p.flowmap_kfree_skb),
        ("inet_sock_set_state", &p.flowmap_sock_state),
        ("tcp_probe", &p.flowmap_rtt),
        ("inet_sock_set_state (processes)", &p.flowmap_proc_state),
    ] {
        if !drops && name == "kfree_skb" || !procs && name == "inet_sock_set_state (processes)" {
            continue;
        }
        match prog.attach() {
            Ok(l) => out.push(l),
            Err(e) => {
                tracing::warn!(tracepoint = name, error = %e, "tracepoint not attached; its signal (retransmits, drops, RTT or new connections' processes) is not counted")
            }
        }
    }
    out
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.traces.clear();
        self.attached.clear();
        self.ring = None;
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
