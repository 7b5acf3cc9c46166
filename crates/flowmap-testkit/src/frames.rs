//! Builders of raw frames, for BPF_PROG_TEST_RUN in tests and benchmarks.
//! Checksums are left zero: the program never reads them.

use std::net::IpAddr;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_FIN: u8 = 0x01;

/// An L4 header plus payload length.
#[derive(Debug, Clone)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: usize,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: usize,
    },
    /// ICMP or ICMPv6 (by the address family) with type and code.
    Icmp { kind: u8, code: u8, payload: usize },
    /// Any other protocol number, raw payload.
    Raw { proto: u8, payload: usize },
}

impl L4 {
    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Icmp { .. } => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            L4::Raw { proto, .. } => *proto,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        match *self {
            L4::Tcp {
                sport,
                dport,
                flags,
                payload,
            } => {
                let mut h = vec![0u8; 20 + payload];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&65535u16.to_be_bytes());
                h
            }
            L4::Udp {
                sport,
                dport,
                payload,
            } => {
                let mut h = vec![0u8; 8 + payload];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
                h
            }
            L4::Icmp {
                kind,
                code,
                payload,
            } => {
                let mut h = vec![0u8; 8 + payload];
                h[0] = kind;
                h[1] = code;
                h
            }
            L4::Raw { payload, .. } => vec![0xabu8; payload],
        }
    }
}

pub fn ipv4_header(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    payload_len: usize,
    options: &[u8],
    frag: u16,
    id: u16,
) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let ihl = 20 + options.len();
    let mut h = vec![0u8; ihl];
    h[0] = 0x40 | (ihl / 4) as u8;
    h[2..4].copy_from_slice(&((ihl + payload_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    h[20..].copy_from_slice(options);
    h
}

pub fn ipv6_header(src: [u8; 16], dst: [u8; 16], next: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);
    h
}

/// An Ethernet header with optional in-band tags (TPID, VLAN id) outermost first.
pub fn ethernet(ethertype: u16, tags: &[(u16, u16)]) -> Vec<u8> {
    let mut h = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    for (tpid, vid) in tags {
        h.extend_from_slice(&tpid.to_be_bytes());
        h.extend_from_slice(&vid.to_be_bytes());
    }
    h.extend_from_slice(&ethertype.to_be_bytes());
    h
}

/// A whole IPv4 or IPv6 packet (no link-layer header).
pub fn ip_packet(src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    let body = l4.bytes();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = ipv4_header(
                s.octets(),
                d.octets(),
                l4.proto(false),
                body.len(),
                &[],
                0,
                1,
            );
            p.extend_from_slice(&body);
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = ipv6_header(s.octets(), d.octets(), l4.proto(true), body.len());
            p.extend_from_slice(&body);
            p
        }
        _ => panic!("mixed address families"),
    }
}

/// An Ethernet frame around an IP packet.
pub fn eth_frame(src: IpAddr, dst: IpAddr, l4: &L4, tags: &[(u16, u16)]) -> Vec<u8> {
    let et = if src.is_ipv4() { 0x0800 } else { 0x86dd };
    let mut f = ethernet(et, tags);
    f.extend_from_slice(&ip_packet(src, dst, l4));
    f
}
