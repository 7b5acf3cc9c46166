//! Attaching one program pair (ingress + egress) to one interface, with
//! TCX where the kernel has it and a classic clsact filter otherwise.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{anyhow, Context, Result};
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

/// Names of the programs attached to an interface with TCX links, one per
/// link, read from the kernel (bpftool 7.1 does not show TCX links).
pub fn tcx_programs(ifindex: u32) -> Vec<String> {
    use libbpf_rs::query::{LinkInfoIter, LinkTypeInfo, ProgInfoIter};
    let ids: Vec<u32> = LinkInfoIter::default()
        .filter_map(|l| match l.info {
            LinkTypeInfo::Tcx(t) if t.ifindex == ifindex => Some(l.prog_id),
            _ => None,
        })
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    // One name per link: the same program may be on both hooks.
    let names: std::collections::HashMap<u32, String> = ProgInfoIter::default()
        .filter(|p| ids.contains(&p.id))
        .map(|p| (p.id, p.name.to_string_lossy().into_owned()))
        .collect();
    ids.iter().filter_map(|id| names.get(id).cloned()).collect()
}
