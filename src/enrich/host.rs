//! What flowmap knows of the host it runs on: its name, its addresses and
//! its listening sockets (for orienting connections whose start it missed).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::flow::proto;

/// A snapshot of the host, refreshed every interval.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    pub hostname: String,
    /// Addresses of this network namespace, sorted.
    pub addrs: Vec<IpAddr>,
    /// (protocol, address or None for a wildcard bind, port) of listening
    /// TCP sockets and bound, unconnected UDP sockets.
    pub listeners: HashSet<(u8, Option<IpAddr>, u16)>,
}

impl HostView {
    pub fn read() -> HostView {
        let mut addrs: Vec<IpAddr> = if_addrs::get_if_addrs()
            .map(|v| v.into_iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        addrs.sort();
        addrs.dedup();
        let mut listeners = HashSet::new();
        let ephemeral = ephemeral_ports();
        for (file, proto, state) in [
            ("/proc/net/tcp", proto::TCP, "0A"),
            ("/proc/net/tcp6", proto::TCP, "0A"),
            ("/proc/net/udp", proto::UDP, "07"),
            ("/proc/net/udp6", proto::UDP, "07"),
        ] {
            if let Ok(text) = std::fs::read_to_string(file) {
                listeners.extend(
                    parse_proc_net(&text, proto, state)
                        .into_iter()
                        .filter(|l| is_server_socket(l, ephemeral)),
                );
            }
        }
        HostView {
            hostname: hostname(),
            addrs,
            listeners,
        }
    }

    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.addrs.binary_search(&ip).is_ok()
    }

    /// Whether a local socket listens on (ip, port) for this protocol.
    pub fn is_listening(&self, proto: u8, ip: IpAddr, port: u16) -> bool {
        self.is_local(ip)
            && (self.listeners.contains(&(proto, Some(ip), port))
                || self.listeners.contains(&(proto, None, port)))
    }
}

/// The kernel's ephemeral port range (ip_local_port_range).
pub fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().filter_map(|p| p.parse::<u16>().ok());
            Some((it.next()?, it.next()?))
        })
        .unwrap_or((32768, 60999))
}

/// A TCP socket in LISTEN is a server. A bound, unconnected UDP socket is
/// one only outside the ephemeral range: every UDP client that has not
/// called connect() looks the same in /proc, on a port the kernel picked.
pub fn is_server_socket(l: &(u8, Option<IpAddr>, u16), ephemeral: (u16, u16)) -> bool {
    l.0 != proto::UDP || l.2 < ephemeral.0 || l.2 > ephemeral.1
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn hex_addr(s: &str) -> Option<IpAddr> {
    match s.len() {
        8 => {
            let v = u32::from_str_radix(s, 16).ok()?;
            // /proc prints the address as a host-order number.
            Some(IpAddr::V4(Ipv4Addr::from(v.to_ne_bytes())))
        }
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&s[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Listening entries of one /proc/net/{tcp,udp}[6] file.
pub fn parse_proc_net(text: &str, p: u8, listen_state: &str) -> Vec<(u8, Option<IpAddr>, u16)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[3] != listen_state {
            continue;
        }
        let (Some((la, lp)), Some((_, rp))) = (f[1].split_once(':'), f[2].split_once(':')) else {
            continue;
        };
        // A UDP socket in state 07 with a remote port is connected, not bound.
        if p == proto::UDP && rp != "0000" {
            continue;
        }
        let (Some(ip), Ok(port)) = (hex_addr(la), u16::from_str_radix(lp, 16)) else {
            continue;
        };
        let ip = match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED))
            }
            other => other,
        };
        out.push((p, if ip.is_unspecified() { None } else { Some(ip) }, port));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_listeners() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n\
   2: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0\n";
        let got = parse_proc_net(tcp, 6, "0A");
        assert_eq!(
            got,
            vec![(6, None, 8080), (6, Some("127.0.0.1".parse().unwrap()), 53)]
        );
        let tcp6 = "sl local rem st\n   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A x\n";
        assert_eq!(
            parse_proc_net(tcp6, 6, "0A"),
            vec![(6, Some("::1".parse().unwrap()), 22)]
        );
        let udp = "sl local rem st\n 1: 00000000:0035 00000000:0000 07 x\n 2: 0100007F:A000 0100007F:0035 07 x\n";
        assert_eq!(parse_proc_net(udp, 17, "07"), vec![(17, None, 53)]);
    }

    #[test]
    fn unconnected_udp_clients_on_ephemeral_ports_are_no_servers() {
        let r = (32768, 60999);
        assert!(is_server_socket(&(17, None, 53), r));
        assert!(is_server_socket(&(17, None, 61000), r));
        assert!(!is_server_socket(&(17, None, 41327), r));
        assert!(
            is_server_socket(&(6, None, 41327), r),
            "a TCP LISTEN socket is a server on any port"
        );
    }

    #[test]
    fn listening_needs_a_local_address() {
        let mut h = HostView {
            addrs: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        h.listeners.insert((6, None, 443));
        assert!(h.is_listening(6, "10.0.0.1".parse().unwrap(), 443));
        assert!(
            !h.is_listening(6, "10.0.0.9".parse().unwrap(), 443),
            "a remote address never listens here"
        );
        assert!(!h.is_listening(17, "10.0.0.1".parse().unwrap(), 443));
    }
}
