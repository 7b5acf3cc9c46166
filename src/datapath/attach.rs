//! Attaching one program pair (ingress + egress) to one interface, with
//! TCX where the kernel has it and a classic clsact filter otherwise.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tracing::{debug, info, warn};

use super::ifaces::{Interface, Selection};
use super::{AttachMode, Attached};
use libbpf_rs::{Program, TcHook, TcHookBuilder, TC_EGRESS, TC_INGRESS};

/// Handle and priority of flowmap's classic TC filters. A fixed pair lets a
/// new agent find and remove the filters a killed one left behind.
pub const TC_HANDLE: u32 = 0xF10B;
pub const TC_PRIORITY: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    Tcx,
    Tc,
}

impl std::fmt::Display for HookKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HookKind::Tcx => "tcx",
            HookKind::Tc => "tc",
        })
    }
}

/// What is attached to one interface. Dropping it detaches, with the same
/// kind of hook it was attached with.
pub enum Hook {
    /// TCX link fds: closing them detaches.
    Tcx { _ingress: OwnedFd, _egress: OwnedFd },
    Tc {
        ingress: TcHook,
        egress: TcHook,
        /// The clsact qdisc (ingress and egress), when it was made for
        /// these filters (not there before).
        made_qdisc: Option<TcHook>,
        ifindex: u32,
    },
}

impl Hook {
    pub fn kind(&self) -> HookKind {
        match self {
            Hook::Tcx { .. } => HookKind::Tcx,
            Hook::Tc { .. } => HookKind::Tc,
        }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        if let Hook::Tc {
            ingress,
            egress,
            made_qdisc,
            ifindex,
        } = self
        {
            // The interface may be gone already; nothing is left then.
            let _ = ingress.detach();
            let _ = egress.detach();
            // A clsact qdisc flowmap made goes too, unless someone else's
            // filters are on it now.
            if let Some(q) = made_qdisc {
                if tc_filter_count(*ifindex, true) == Some(0)
                    && tc_filter_count(*ifindex, false) == Some(0)
                {
                    let _ = q.destroy();
                }
            }
        }
        // TCX links detach when their fd is closed.
    }
}

/// Creates one TCX link. This is the one place that calls libbpf directly:
/// libbpf-rs 0.27 has no TCX wrapper. The link is its fd: closing it
/// detaches, and a killed agent's links go with its fds.
fn tcx_link(prog_fd: RawFd, ifindex: u32, ingress: bool) -> Result<OwnedFd> {
    let opts = libbpf_sys::bpf_link_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as _,
        // Go first, so flowmap sees each packet before another program can
        // redirect it; the program always returns TCX_NEXT, so whatever
        // runs after it (Cilium, Calico, ...) still sees every packet.
        flags: libbpf_sys::BPF_F_BEFORE,
        ..Default::default()
    };
    let kind = if ingress {
        libbpf_sys::BPF_TCX_INGRESS
    } else {
        libbpf_sys::BPF_TCX_EGRESS
    };
    // SAFETY: plain syscall wrapper with a valid, correctly sized opts struct.
    let fd = unsafe { libbpf_sys::bpf_link_create(prog_fd, ifindex as i32, kind, &opts) };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd).into());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches ingress and egress of one interface with TCX; the two link fds.
fn tcx_pair(ingress: RawFd, egress: RawFd, ifindex: u32) -> Result<(OwnedFd, OwnedFd)> {
    let i = tcx_link(ingress, ifindex, true).context("TCX ingress")?;
    let e = tcx_link(egress, ifindex, false).context("TCX egress")?;
    Ok((i, e))
}

pub fn attach_tcx(ingress: &Program<'_>, egress: &Program<'_>, ifindex: u32) -> Result<Hook> {
    let (i, e) = tcx_pair(
        ingress.as_fd().as_raw_fd(),
        egress.as_fd().as_raw_fd(),
        ifindex,
    )?;
    Ok(Hook::Tcx {
        _ingress: i,
        _egress: e,
    })
}

fn tc_builder(prog: &Program<'_>, ifindex: u32) -> TcHookBuilder<'static> {
    // SAFETY of the lifetime: TcHookBuilder only keeps the raw fd number,
    // and the program outlives every hook made here (Datapath owns both and
    // drops the hooks first).
    let fd = unsafe {
        std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&prog.as_fd()))
    };
    let mut b = TcHookBuilder::new(fd);
    b.ifindex(ifindex as i32)
        .replace(true)
        .handle(TC_HANDLE)
        .priority(TC_PRIORITY);
    b
}

pub fn attach_tc(ingress: &Program<'_>, egress: &Program<'_>, ifindex: u32) -> Result<Hook> {
    let mut qdisc = tc_builder(ingress, ifindex).hook(TC_INGRESS | TC_EGRESS);
    // clsact may exist already (another tool, or us): that is fine.
    let made_qdisc = match qdisc.create() {
        Ok(_) => Some(qdisc),
        Err(e) if e.kind() == libbpf_rs::ErrorKind::AlreadyExists => None,
        Err(e) => return Err(anyhow!("creating clsact qdisc: {e}")),
    };
    let mut i = tc_builder(ingress, ifindex).hook(TC_INGRESS);
    if let Err(err) = i.attach() {
        if let Some(mut q) = made_qdisc {
            let _ = q.destroy();
        }
        return Err(anyhow!("TC ingress filter: {err}"));
    }
    let mut e = tc_builder(egress, ifindex).hook(TC_EGRESS);
    if let Err(err) = e.attach() {
        let _ = i.detach();
        if let Some(mut q) = made_qdisc {
            let _ = q.destroy();
        }
        return Err(anyhow!("TC egress filter: {err}"));
    }
    Ok(Hook::Tc {
        ingress: i,
        egress: e,
        made_qdisc,
        ifindex,
    })
}

/// How many TC filters are on an interface's clsact ingress or egress,
/// by a netlink dump (libbpf can only look up one handle). None when the
/// dump fails.
pub fn tc_filter_count(ifindex: u32, ingress: bool) -> Option<usize> {
    const HDR: usize = 16;
    const TCMSG: usize = 20;
    // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)
    let parent: u32 = if ingress { 0xFFFF_FFF2 } else { 0xFFFF_FFF3 };
    // SAFETY: a plain socket; closed by OwnedFd.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a new, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; HDR + TCMSG];
    req[0..4].copy_from_slice(&((HDR + TCMSG) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETTFILTER.to_ne_bytes());
    req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // tcmsg: family, pads, ifindex, handle, parent, info
    req[HDR + 4..HDR + 8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    req[HDR + 12..HDR + 16].copy_from_slice(&parent.to_ne_bytes());
    // SAFETY: sending a buffer we own to the kernel (pid 0).
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent != req.len() as isize {
        return None;
    }
    let mut buf = vec![0u8; 32 * 1024];
    let mut count = 0;
    loop {
        // SAFETY: receiving into a buffer we own, within its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return None;
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + HDR <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?);
            if len < HDR || off + len > n {
                return None;
            }
            match kind as i32 {
                x if x == libc::NLMSG_DONE => return Some(count),
                x if x == libc::NLMSG_ERROR => {
                    // No clsact (ENOENT/EINVAL): no filters.
                    return Some(count);
                }
                x if x == libc::RTM_NEWTFILTER as i32 => count += 1,
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// Removes classic TC filters with flowmap's handle and priority that a
/// killed agent left on this interface. Returns how many were removed.
pub fn remove_stale_tc(any_prog: &Program<'_>, ifindex: u32) -> usize {
    let mut removed = 0;
    for point in [TC_INGRESS, TC_EGRESS] {
        let mut h = tc_builder(any_prog, ifindex).hook(point);
        if h.query().is_ok() && h.detach().is_ok() {
            removed += 1;
        }
    }
    // The clsact qdisc the killed agent made for them goes too, when no
    // other filter is on it.
    if removed > 0
        && tc_filter_count(ifindex, true) == Some(0)
        && tc_filter_count(ifindex, false) == Some(0)
    {
        let _ = tc_builder(any_prog, ifindex)
            .hook(TC_INGRESS | TC_EGRESS)
            .destroy();
    }
    removed
}

/// Attaching the datapath to interfaces, following them, and the
/// hand-over from classic filters to TCX.
impl super::Datapath {
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
            HookKind::Tcx => attach_tcx(p, p, iface.ifindex),
            HookKind::Tc => attach_tc(p, p, iface.ifindex),
        }
    }

    /// Removes classic TC filters that a killed flowmap left on these
    /// interfaces. TCX links cannot outlive their process.
    pub fn remove_stale(&self, ifaces: &[Interface]) -> usize {
        let mut n = 0;
        for i in ifaces {
            let removed = remove_stale_tc(&self.skel.progs.flowmap_eth, i.ifindex);
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
}
