//! Attaching one program pair (ingress + egress) to one interface, with
//! TCX where the kernel has it and a classic clsact filter otherwise.

use std::os::fd::AsFd;
use std::ptr::NonNull;

use anyhow::{anyhow, Context, Result};
use libbpf_rs::{AsRawLibbpf, Link, Program, TcHook, TcHookBuilder, TC_EGRESS, TC_INGRESS};

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
    Tcx { _ingress: Link, _egress: Link },
    Tc { ingress: TcHook, egress: TcHook },
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
        if let Hook::Tc { ingress, egress } = self {
            // The interface may be gone already; nothing is left then.
            let _ = ingress.detach();
            let _ = egress.detach();
        }
        // TCX links detach when their Link (fd) is dropped.
    }
}

/// Attaches with TCX. This is the one place that calls libbpf directly:
/// libbpf-rs 0.27 has no safe wrapper for TCX links.
fn attach_tcx_one(prog: &Program<'_>, ifindex: u32) -> Result<Link> {
    let opts = libbpf_sys::bpf_tcx_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_tcx_opts>() as _,
        // Go first, so flowmap sees each packet before another program can
        // redirect it; the program always returns TCX_NEXT, so whatever
        // runs after it (Cilium, Calico, ...) still sees every packet.
        flags: libbpf_sys::BPF_F_BEFORE,
        ..Default::default()
    };
    // SAFETY: the program pointer comes from a loaded libbpf object that
    // outlives this call, and opts is a valid, correctly sized struct.
    let ptr = unsafe {
        libbpf_sys::bpf_program__attach_tcx(prog.as_libbpf_object().as_ptr(), ifindex as i32, &opts)
    };
    let ptr = NonNull::new(ptr).ok_or_else(|| anyhow!("bpf_program__attach_tcx returned NULL"))?;
    // libbpf returns errors as small negative pointers.
    let raw = ptr.as_ptr() as isize;
    if (-4095..0).contains(&raw) {
        return Err(std::io::Error::from_raw_os_error(-raw as i32).into());
    }
    // SAFETY: a valid bpf_link from libbpf, owned from here on by Link.
    Ok(unsafe { Link::from_ptr(ptr) })
}

pub fn attach_tcx(ingress: &Program<'_>, egress: &Program<'_>, ifindex: u32) -> Result<Hook> {
    let i = attach_tcx_one(ingress, ifindex).context("TCX ingress")?;
    let e = attach_tcx_one(egress, ifindex).context("TCX egress")?;
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
    let mut qdisc = tc_builder(ingress, ifindex).hook(TC_INGRESS);
    // clsact may exist already (another tool, or us): that is fine.
    if let Err(e) = qdisc.create() {
        if e.kind() != libbpf_rs::ErrorKind::AlreadyExists {
            return Err(anyhow!("creating clsact qdisc: {e}"));
        }
    }
    let mut i = tc_builder(ingress, ifindex).hook(TC_INGRESS);
    i.attach().context("TC ingress filter")?;
    let mut e = tc_builder(egress, ifindex).hook(TC_EGRESS);
    if let Err(err) = e.attach() {
        let _ = i.detach();
        return Err(anyhow!("TC egress filter: {err}"));
    }
    Ok(Hook::Tc {
        ingress: i,
        egress: e,
    })
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
    removed
}

/// Names of the programs attached to an interface with TCX links, read
/// from the kernel (bpftool 7.1 does not show TCX links).
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
    ProgInfoIter::default()
        .filter(|p| ids.contains(&p.id))
        .map(|p| p.name.to_string_lossy().into_owned())
        .collect()
}
