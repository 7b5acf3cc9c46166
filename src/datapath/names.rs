//! Names (issue 14): the records of the `names` ring buffer (DNS answers,
//! segments of TLS ClientHellos, heads of HTTP requests, QUIC Initials;
//! bpf/names.bpf.h) become plain
//! [`Captured`] records, queued (bounded) until the next drain hands them
//! to the name resolver (enrich/names.rs). Nothing here looks inside the
//! bytes, logs them or keeps them past the drain.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::skel::types::name_event as RawNameEvent;
use super::{from_bytes, Plain};

// SAFETY: generated from bpf/flows.h: integers and integer arrays only.
unsafe impl Plain for RawNameEvent {}

/// Records a second each CPU may hand over (DNS answers and ClientHello
/// segments together); more are counted as `names_limited`.
pub const NAMES_PER_SEC_PER_CPU: u32 = 2000;

/// What a captured record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturedKind {
    /// A DNS message over UDP from port 53.
    DnsUdp,
    /// A TCP segment from port 53 (2-byte length, then the message).
    DnsTcp,
    /// A segment of a client's TLS ClientHello.
    Tls,
    /// The first segment of a plain HTTP/1 request (its head, for Host).
    Http,
    /// A client's datagram to UDP port 443 that starts a QUIC Initial.
    Quic,
}

/// One captured packet: who sent it to whom, and its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub kind: CapturedKind,
    pub sender: (IpAddr, u16),
    pub receiver: (IpAddr, u16),
    /// TCP: the sequence number of the first byte.
    pub seq: u32,
    pub bytes: Vec<u8>,
}

/// Captured records waiting for the next drain, bounded in records and
/// bytes; what does not fit is counted.
#[derive(Debug, Default)]
pub(super) struct NameQueue {
    pub(super) items: Vec<Captured>,
    pub(super) bytes: usize,
    pub(super) dropped: u64,
}

/// At most this many records and bytes wait for a drain.
const QUEUE_MAX: usize = 65_536;
const QUEUE_MAX_BYTES: usize = 16 << 20;

impl NameQueue {
    /// One record of the ring buffer.
    pub(super) fn add(&mut self, data: &[u8]) {
        let Some(e) = from_bytes::<RawNameEvent>(data) else {
            return;
        };
        let head = std::mem::size_of::<RawNameEvent>();
        let len = (e.len as usize).min(data.len().saturating_sub(head));
        if self.items.len() >= QUEUE_MAX || self.bytes + len > QUEUE_MAX_BYTES {
            self.dropped += 1;
            return;
        }
        let kind = match e.kind {
            1 => CapturedKind::DnsUdp,
            2 => CapturedKind::DnsTcp,
            3 => CapturedKind::Tls,
            4 => CapturedKind::Http,
            5 => CapturedKind::Quic,
            _ => return,
        };
        let ip = |raw: &[u8; 16]| -> IpAddr {
            if e.family == 4 {
                IpAddr::V4(Ipv4Addr::new(raw[12], raw[13], raw[14], raw[15]))
            } else {
                IpAddr::V6(Ipv6Addr::from(*raw))
            }
        };
        self.bytes += len;
        self.items.push(Captured {
            kind,
            sender: (ip(&e.addr[0]), e.port[0]),
            receiver: (ip(&e.addr[1]), e.port[1]),
            seq: e.seq,
            bytes: data[head..head + len].to_vec(),
        });
    }

    pub(super) fn take(&mut self) -> (Vec<Captured>, u64) {
        self.bytes = 0;
        (
            std::mem::take(&mut self.items),
            std::mem::take(&mut self.dropped),
        )
    }
}
