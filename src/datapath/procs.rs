//! Processes of local sockets (issue 14): the records of the `procs` ring
//! buffer (bpf/procs.bpf.h: a TCP connection's local socket and the task
//! that connected it, or a listener and the task that listens) become
//! (socket, process) pairs, queued
//! (bounded) until the next drain. The process is identified as soon as the
//! ring is read (every poll period), while it most likely still runs: a
//! short-lived client is gone by the next drain.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use super::skel::types::proc_event as RawProcEvent;
use super::{from_bytes, Plain};
use crate::enrich::process::{Identify, Process, SockKey, Socket};

// SAFETY: generated from bpf/procs.bpf.h: integers and integer arrays only.
unsafe impl Plain for RawProcEvent {}

/// At most this many sockets wait for a drain; more are counted.
const QUEUE_MAX: usize = 65_536;

/// Identified sockets waiting for the next drain.
#[derive(Default)]
pub(super) struct ProcQueue {
    items: Vec<(Socket, Arc<Process>)>,
    dropped: u64,
    identify: Identify,
}

/// The local socket of a ring record, from its own side: (protocol, local
/// address and port, remote address and port).
pub fn sock_key(e: &RawProcEvent) -> SockKey {
    let c = &e.conn;
    let ip = |raw: &[u8; 16]| -> IpAddr {
        if c.family == 4 {
            IpAddr::V4(Ipv4Addr::new(raw[12], raw[13], raw[14], raw[15]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*raw))
        }
    };
    let (l, r) = if e.side == 0 { (0, 1) } else { (1, 0) };
    (
        c.proto,
        ip(&c.addr[l]),
        c.port[l],
        ip(&c.addr[r]),
        c.port[r],
    )
}

impl ProcQueue {
    /// One record of the ring buffer.
    pub(super) fn add(&mut self, data: &[u8]) {
        let Some(e) = from_bytes::<RawProcEvent>(data) else {
            return;
        };
        if self.items.len() >= QUEUE_MAX {
            self.dropped += 1;
            return;
        }
        let t = &e.task;
        let end = t.comm.iter().position(|b| *b == 0).unwrap_or(t.comm.len());
        let comm = String::from_utf8_lossy(&t.comm[..end]);
        let p = self
            .identify
            .process(t.tgid, &comm, t.cgroup_id, Instant::now());
        let (proto, ip, port, _, _) = sock_key(&e);
        let sock = if e.kind == 1 {
            Socket::Listen((proto, (!ip.is_unspecified()).then_some(ip), port))
        } else {
            Socket::Conn(sock_key(&e))
        };
        self.items.push((sock, p));
    }

    pub(super) fn take(&mut self) -> (Vec<(Socket, Arc<Process>)>, u64) {
        (
            std::mem::take(&mut self.items),
            std::mem::take(&mut self.dropped),
        )
    }
}
