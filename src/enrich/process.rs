//! Processes of local sockets (issue 14): which process, systemd unit and
//! container owns each local end of a connection.
//!
//! - New TCP connections and listeners: the kernel hands over (connection
//!   or listener, task, cgroup id) from the task that connected or called
//!   listen() (bpf/procs.bpf.h); the process is identified at once
//!   (`Identify`), while it still runs. The server end of a connection is
//!   the process of the socket listening on its port.
//! - Connections older than the agent, UDP sockets and listeners: a
//!   sock_diag dump (one inode per socket) joined with the /proc/<pid>/fd
//!   links (`scan`), once at start and again for local ends still unknown.
//!
//! The executable comes from /proc/<pid>/exe; the unit and the container
//! ID from the cgroup path (/proc/<pid>/cgroup, or, once the process is
//! gone, the cgroup its kernel id names). Every table is bounded in entries
//! and age.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::enrich::host::HostView;
use crate::flow::{proto, FlowRecord};

/// A process that owns a local socket. In flow records it shows as
/// `{pid, comm, unit, container_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Process {
    /// The process (thread group) id.
    pub pid: u32,
    /// The process's command name (its main thread's, as the kernel keeps
    /// it: at most 15 bytes).
    pub comm: Arc<str>,
    /// The executable, when the process could be read before it exited.
    #[serde(skip)]
    pub exe: Option<Arc<str>>,
    /// The systemd service of its cgroup (`nginx.service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<Arc<str>>,
    /// The container of its cgroup (containerd, CRI-O, Docker, podman):
    /// the full 64 hex digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<Arc<str>>,
}

impl Process {
    /// The name a process endpoint goes by: its unit, else its container ID
    /// (12 hex digits), else its command name.
    pub fn service_name(&self) -> &str {
        if let Some(u) = &self.unit {
            return u;
        }
        if let Some(c) = &self.container_id {
            return &c[..c.len().min(12)];
        }
        &self.comm
    }
}

/// A local socket of a connection: protocol, local address and port,
/// remote address and port.
pub type SockKey = (u8, IpAddr, u16, IpAddr, u16);

/// A listening (or bound, unconnected UDP) socket: protocol, address (None:
/// any), port.
pub type ListenKey = (u8, Option<IpAddr>, u16);

/// A socket the kernel program saw a process connect or listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    Conn(SockKey),
    Listen(ListenKey),
}

/// Sockets remembered with their process.
const SOCKETS_MAX: usize = 65_536;
/// A socket not seen in a record for this long is forgotten.
const SOCKET_IDLE: Duration = Duration::from_secs(600);
/// Processes identified, by pid, and how long an identification is reused.
const PIDS_MAX: usize = 4096;
const PID_TTL: Duration = Duration::from_secs(30);
/// cgroup id → path entries, and how often the hierarchy is walked at most.
const CGROUPS_MAX: usize = 16_384;
const CGROUP_WALK_EVERY: Duration = Duration::from_secs(5);
/// Sockets read from one sock_diag dump at most.
const SCAN_MAX_SOCKETS: usize = 65_536;
/// Local ends still unknown are looked for again at most this often.
pub const RESCAN_EVERY: Duration = Duration::from_secs(30);

/// The systemd unit and the container ID a cgroup path names.
///
/// The container ID is the first path component, from the leaf up, that
/// is one: `cri-containerd-<64 hex>.scope`, `crio-<64 hex>.scope`,
/// `docker-<64 hex>.scope`, `libpod-<64 hex>.scope` (systemd driver) or a
/// bare `<64 hex>` (cgroupfs driver: `/kubepods/.../pod<uid>/<id>`,
/// `/docker/<id>`). The unit is the first `*.service` component from the
/// leaf up that is below the container (a service inside a container is
/// that service; the container runtime's own service is not the
/// container's unit).
pub fn unit_and_container(path: &str) -> (Option<String>, Option<String>) {
    let mut unit = None;
    let mut container = None;
    for part in path.rsplit('/').filter(|p| !p.is_empty()) {
        if container.is_none() {
            if let Some(id) = container_id_of(part) {
                container = Some(id);
                continue;
            }
            if unit.is_none() && part.ends_with(".service") && part.len() > ".service".len() {
                unit = Some(part.to_string());
            }
        }
    }
    (unit, container)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn container_id_of(part: &str) -> Option<String> {
    if is_hex64(part) {
        return Some(part.to_ascii_lowercase());
    }
    let body = part.strip_suffix(".scope")?;
    for prefix in ["cri-containerd-", "crio-", "docker-", "libpod-"] {
        if let Some(id) = body.strip_prefix(prefix).filter(|id| is_hex64(id)) {
            return Some(id.to_ascii_lowercase());
        }
    }
    None
}

/// The cgroup path of a /proc/<pid>/cgroup file: the unified (v2)
/// hierarchy's, else (hybrid hosts, where v2 may be empty) the systemd
/// hierarchy's, else the first.
pub fn cgroup_path(text: &str) -> Option<String> {
    let mut v2 = None;
    let mut systemd = None;
    let mut first = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if id == "0" && ctrl.is_empty() {
            v2 = Some(path);
        } else if ctrl == "name=systemd" {
            systemd = Some(path);
        } else if first.is_none() {
            first = Some(path);
        }
    }
    let pick = match (v2, systemd) {
        (Some(p), _) if p != "/" => Some(p),
        (_, Some(p)) => Some(p),
        (Some(p), None) => Some(p),
        (None, None) => first,
    };
    pick.map(str::to_string)
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts): in this mount namespace,
/// else (a container, or `ip netns exec`, that did not mount it) in that
/// of the host's init, through /proc/1/root.
pub fn cgroup2_mount() -> Option<PathBuf> {
    // A mount listed but hidden by a later mount over a parent (`ip netns
    // exec` mounts a new /sys) has no cgroup.controllers where it is listed.
    let find = |mountinfo: &str, root: &Path| -> Option<PathBuf> {
        let text = std::fs::read_to_string(mountinfo).ok()?;
        text.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let m = PathBuf::from(pre.split_whitespace().nth(4)?);
            let p = root.join(m.strip_prefix("/").unwrap_or(&m));
            p.join("cgroup.controllers").exists().then_some(p)
        })
    };
    find("/proc/self/mountinfo", Path::new("/"))
        .or_else(|| find("/proc/1/mountinfo", Path::new("/proc/1/root")))
}

/// Identifies processes by pid, with a short cache; also resolves the
/// kernel's cgroup ids to paths for processes already gone.
#[derive(Default)]
pub struct Identify {
    pids: HashMap<u32, (Arc<Process>, Instant)>,
    cgroups: HashMap<u64, Arc<str>>,
    last_walk: Option<Instant>,
    mount: Option<Option<PathBuf>>,
}

impl Identify {
    /// The process `pid`, whose command name the kernel gave as `comm` and
    /// whose cgroup id as `cgroup_id` (0: unknown).
    pub fn process(&mut self, pid: u32, comm: &str, cgroup_id: u64, now: Instant) -> Arc<Process> {
        if let Some((p, at)) = self.pids.get(&pid) {
            if now.duration_since(*at) < PID_TTL && (comm.is_empty() || *p.comm == *comm) {
                return p.clone();
            }
        }
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let live_comm = std::fs::read_to_string(proc_dir.join("comm"))
            .ok()
            .map(|c| c.trim_end_matches('\n').to_string());
        // The pid still names this process (not one that reused it).
        let live = live_comm
            .as_deref()
            .is_some_and(|c| comm.is_empty() || c == comm);
        let (exe, path) = if live {
            (
                std::fs::read_link(proc_dir.join("exe")).ok().map(|p| {
                    let s = p.to_string_lossy();
                    s.strip_suffix(" (deleted)").unwrap_or(&s).to_string()
                }),
                std::fs::read_to_string(proc_dir.join("cgroup"))
                    .ok()
                    .and_then(|t| cgroup_path(&t)),
            )
        } else {
            (None, None)
        };
        let path = path.or_else(|| self.cgroup(cgroup_id, now).map(|p| p.to_string()));
        let (unit, container) = path.as_deref().map(unit_and_container).unwrap_or_default();
        let comm = if comm.is_empty() {
            live_comm.unwrap_or_default()
        } else {
            comm.to_string()
        };
        let p = Arc::new(Process {
            pid,
            comm: comm.into(),
            exe: exe.map(Into::into),
            unit: unit.map(Into::into),
            container_id: container.map(Into::into),
        });
        if self.pids.len() >= PIDS_MAX {
            self.pids
                .retain(|_, (_, at)| now.duration_since(*at) < PID_TTL);
            if self.pids.len() >= PIDS_MAX {
                self.pids.clear();
            }
        }
        self.pids.insert(pid, (p.clone(), now));
        p
    }

    /// The path of the cgroup with kernel id `id` (v2: its directory's
    /// inode number), walking the hierarchy again (at most every
    /// CGROUP_WALK_EVERY) when it is not known.
    fn cgroup(&mut self, id: u64, now: Instant) -> Option<Arc<str>> {
        if id == 0 {
            return None;
        }
        if let Some(p) = self.cgroups.get(&id) {
            return Some(p.clone());
        }
        if self
            .last_walk
            .is_some_and(|t| now.duration_since(t) < CGROUP_WALK_EVERY)
        {
            return None;
        }
        self.last_walk = Some(now);
        let mount = self.mount.get_or_insert_with(cgroup2_mount).clone()?;
        self.cgroups.clear();
        walk_cgroups(&mount, &mount, &mut self.cgroups);
        self.cgroups.get(&id).cloned()
    }
}

fn walk_cgroups(root: &Path, dir: &Path, out: &mut HashMap<u64, Arc<str>>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if out.len() >= CGROUPS_MAX {
            return;
        }
        let Ok(md) = e.metadata() else { continue };
        if !md.is_dir() {
            continue;
        }
        let p = e.path();
        let rel = format!("/{}", p.strip_prefix(root).unwrap_or(&p).display());
        out.insert(md.ino(), rel.into());
        walk_cgroups(root, &p, out);
    }
}

/// One socket of a sock_diag dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    pub proto: u8,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    /// A TCP socket in LISTEN, or a UDP socket without a peer.
    pub listening: bool,
    pub inode: u32,
}

/// An IPv4 peer of a dual-stack socket is keyed as IPv4, as the kernel
/// program and the flow records key it.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v) => v.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Every TCP and UDP socket of this network namespace, from the kernel's
/// sock_diag netlink interface (netlink-packet-sock-diag).
pub fn diag_sockets() -> anyhow::Result<Vec<DiagSocket>> {
    use anyhow::Context as _;
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

    let mut out = Vec::new();
    for (family, protocol) in [
        (AF_INET, IPPROTO_TCP),
        (AF_INET6, IPPROTO_TCP),
        (AF_INET, IPPROTO_UDP),
        (AF_INET6, IPPROTO_UDP),
    ] {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
        socket.bind_auto().context("binding the sock_diag socket")?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut req = NetlinkMessage::new(
            hdr,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            })
            .into(),
        );
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        socket
            .send(&buf, 0)
            .context("sending the sock_diag request")?;
        let mut rx = vec![0u8; 64 * 1024];
        'dump: loop {
            let n = socket
                .recv(&mut &mut rx[..], 0)
                .context("reading the sock_diag dump")?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[off..n])
                    .context("parsing the sock_diag dump")?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let h = &r.header;
                        let id = &h.socket_id;
                        let udp = protocol == IPPROTO_UDP;
                        out.push(DiagSocket {
                            proto: if udp { proto::UDP } else { proto::TCP },
                            local: (unmap(id.source_address), id.source_port),
                            remote: (unmap(id.destination_address), id.destination_port),
                            listening: if udp {
                                id.destination_port == 0
                            } else {
                                h.state == 10 /* TCP_LISTEN */
                            },
                            inode: h.inode,
                        });
                        if out.len() >= SCAN_MAX_SOCKETS {
                            break 'dump;
                        }
                    }
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => {
                        anyhow::bail!("sock_diag dump refused: {e:?}")
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }
    Ok(out)
}

/// The inode → process id of every socket some process holds open, from
/// the /proc/<pid>/fd links, for the inodes in `wanted`.
pub fn socket_owners(wanted: &HashSet<u32>) -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u32>().ok())
            else {
                continue;
            };
            if wanted.contains(&inode) {
                out.entry(inode).or_insert(pid);
            }
        }
    }
    out
}

/// The pipeline's table of local sockets and their processes.
#[derive(Default)]
pub struct Processes {
    /// Looked up for each record's local ends: foldhash, not SipHash
    /// (issue 16's profile). Nothing depends on their order.
    sockets: HashMap<SockKey, (Arc<Process>, Instant), foldhash::fast::RandomState>,
    listeners: HashMap<ListenKey, Arc<Process>, foldhash::fast::RandomState>,
    identify: Identify,
    last_scan: Option<Instant>,
    /// A local end was not found since the last scan.
    unknown: bool,
    pub counts: ProcessCounts,
}

/// What the process table did, for /metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessCounts {
    pub scans: u64,
    pub scan_errors: u64,
    pub evicted: u64,
}

impl Processes {
    /// Sockets from the kernel program (already identified).
    pub fn learn(&mut self, seen: &[(Socket, Arc<Process>)], now: Instant) {
        for (s, p) in seen {
            match s {
                Socket::Conn(k) => self.insert(*k, p.clone(), now),
                Socket::Listen(k) => {
                    if self.listeners.len() >= SOCKETS_MAX && !self.listeners.contains_key(k) {
                        self.counts.evicted += self.listeners.len() as u64;
                        self.listeners.clear();
                    }
                    self.listeners.insert(*k, p.clone());
                }
            }
        }
    }

    fn insert(&mut self, k: SockKey, p: Arc<Process>, now: Instant) {
        if self.sockets.len() >= SOCKETS_MAX && !self.sockets.contains_key(&k) {
            let before = self.sockets.len();
            self.sockets
                .retain(|_, (_, at)| now.duration_since(*at) < SOCKET_IDLE / 4);
            if self.sockets.len() >= SOCKETS_MAX {
                self.sockets.clear();
            }
            self.counts.evicted += (before - self.sockets.len()) as u64;
        }
        self.sockets.insert(k, (p, now));
    }

    /// Reads every socket of this namespace and its owner (sock_diag and
    /// /proc): at start, and when a local end was not found and the last
    /// scan is RESCAN_EVERY old.
    pub fn scan_if_due(&mut self, now: Instant) {
        let due = match self.last_scan {
            None => true,
            Some(t) => self.unknown && now.duration_since(t) >= RESCAN_EVERY,
        };
        if due {
            self.scan(now);
        }
    }

    pub fn scan(&mut self, now: Instant) {
        self.last_scan = Some(now);
        self.unknown = false;
        self.counts.scans += 1;
        let socks = match diag_sockets() {
            Ok(s) => s,
            Err(e) => {
                self.counts.scan_errors += 1;
                tracing::warn!(error = %format!("{e:#}"), "reading sockets (sock_diag) failed; connections older than the agent get no process");
                return;
            }
        };
        let wanted: HashSet<u32> = socks.iter().map(|s| s.inode).filter(|i| *i != 0).collect();
        let owners = socket_owners(&wanted);
        let mut listeners = HashMap::default();
        for s in &socks {
            let Some(pid) = owners.get(&s.inode) else {
                continue;
            };
            let p = self.identify.process(*pid, "", 0, now);
            if s.listening {
                let ip = (!s.local.0.is_unspecified()).then_some(s.local.0);
                listeners.insert((s.proto, ip, s.local.1), p);
            } else {
                self.insert(
                    (s.proto, s.local.0, s.local.1, s.remote.0, s.remote.1),
                    p,
                    now,
                );
            }
        }
        self.listeners = listeners;
    }

    /// The process of a local socket, refreshing its age.
    fn socket(&mut self, k: &SockKey, now: Instant) -> Option<Arc<Process>> {
        let (p, at) = self.sockets.get_mut(k)?;
        *at = now;
        Some(p.clone())
    }

    fn listener(&self, proto: u8, ip: IpAddr, port: u16) -> Option<Arc<Process>> {
        self.listeners
            .get(&(proto, Some(ip), port))
            .or_else(|| self.listeners.get(&(proto, None, port)))
            .cloned()
    }

    /// Sets `src_process` / `dst_process` of the records' local ends (an
    /// address of this host). The server end falls back on the socket
    /// listening on its port.
    pub fn label(&mut self, records: &mut [FlowRecord], host: &HostView, now: Instant) {
        for r in records.iter_mut() {
            let p = match r.protocol.as_ref() {
                "tcp" => proto::TCP,
                "udp" => proto::UDP,
                _ => continue,
            };
            if host.is_local(r.src_ip) {
                r.src_process = self.socket(&(p, r.src_ip, r.src_port, r.dst_ip, r.dst_port), now);
                self.unknown |= r.src_process.is_none();
            }
            if host.is_local(r.dst_ip) {
                r.dst_process = self
                    .socket(&(p, r.dst_ip, r.dst_port, r.src_ip, r.src_port), now)
                    .or_else(|| self.listener(p, r.dst_ip, r.dst_port));
                self.unknown |= r.dst_process.is_none();
            }
        }
        self.sockets
            .retain(|_, (_, at)| now.duration_since(*at) < SOCKET_IDLE);
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4b8e9f1c2d3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c";

    #[test]
    fn units_and_containers_from_cgroup_paths() {
        let cases = [
            ("/system.slice/nginx.service", Some("nginx.service"), None),
            ("/", None, None),
            ("/user.slice/user-0.slice/session-3.scope", None, None),
            (
                &format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-{ID}.scope"),
                None,
                Some(ID),
            ),
            (&format!("/kubepods/besteffort/pod0b1c/{ID}"), None, Some(ID)),
            (&format!("/kubepods.slice/crio-{ID}.scope"), None, Some(ID)),
            (&format!("/system.slice/docker-{ID}.scope"), None, Some(ID)),
            (&format!("/docker/{ID}"), None, Some(ID)),
            (
                &format!("/system.slice/containerd.service/kubepods/pod1/{ID}"),
                None,
                Some(ID),
            ),
            (
                &format!("/kubepods/pod1/{ID}/system.slice/nginx.service"),
                Some("nginx.service"),
                Some(ID),
            ),
            (&format!("/kubepods/pod1/crio-conmon-{ID}.scope"), None, None),
            ("/x/.service", None, None),
        ];
        for (path, unit, ctr) in cases {
            let (u, c) = unit_and_container(path);
            assert_eq!((u.as_deref(), c.as_deref()), (unit, ctr), "{path}");
        }
    }

    #[test]
    fn the_cgroup_path_prefers_v2_then_systemd() {
        assert_eq!(
            cgroup_path("0::/system.slice/a.service\n").as_deref(),
            Some("/system.slice/a.service")
        );
        let hybrid = "9:name=systemd:/system.slice/b.service\n4:memory:/x\n0::/\n";
        assert_eq!(
            cgroup_path(hybrid).as_deref(),
            Some("/system.slice/b.service")
        );
        let v2 = "9:name=systemd:/\n0::/flowmap-test-1/c.service\n";
        assert_eq!(
            cgroup_path(v2).as_deref(),
            Some("/flowmap-test-1/c.service")
        );
        assert_eq!(cgroup_path("4:memory:/m\n").as_deref(), Some("/m"));
        assert_eq!(cgroup_path("garbage"), None);
    }

    #[test]
    fn service_names_prefer_unit_then_container_then_comm() {
        let mut p = Process {
            pid: 1,
            comm: "nginx".into(),
            exe: None,
            unit: Some("nginx.service".into()),
            container_id: Some(ID.into()),
        };
        assert_eq!(p.service_name(), "nginx.service");
        p.unit = None;
        assert_eq!(p.service_name(), &ID[..12]);
        p.container_id = None;
        assert_eq!(p.service_name(), "nginx");
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"pid": 1, "comm": "nginx"})
        );
    }

    #[test]
    fn this_process_is_identified_from_proc() {
        let mut id = Identify::default();
        let me = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let p = id.process(me, comm.trim_end(), 0, Instant::now());
        assert_eq!(p.pid, me);
        assert_eq!(&*p.comm, comm.trim_end());
        assert_eq!(
            p.exe.as_deref().map(PathBuf::from),
            Some(std::env::current_exe().unwrap())
        );
    }
}
