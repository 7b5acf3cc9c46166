//! Known traffic through a veth and the two ways of counting it: the
//! agent's JSON flow records, and an independent AF_PACKET capture of the
//! same interface (the oracle).
//!
//! [`Server`] answers in a [`Netns`] on TCP port 5001 (reads to the end,
//! then sends 1000 bytes back) and UDP port 5002 (answers each datagram
//! with 50 bytes); [`traffic`] sends it [`TCP_BYTES`] over one TCP
//! connection, one datagram of each of [`UDP_SIZES`] from one UDP socket,
//! and three pings of 56 bytes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::net::{sh, Netns};

/// Packets and bytes (Ethernet frames, headers included) one way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dir {
    pub packets: u64,
    pub bytes: u64,
}

/// What is known of one flow: counts both ways, and what the agent says of
/// it (handshake time, orientation, interface).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub s2d: Dir,
    pub d2s: Dir,
    pub rtt_us: Option<f64>,
    pub orientation: String,
    pub interface: String,
}

/// (protocol, src, sport, dst, dport); ICMP has ports 0.
pub type Tuple = (String, String, u16, String, u16);

/// The agent's JSON lines (`--output flows`), summed per flow.
pub fn agent_totals(jsonl: &str) -> HashMap<Tuple, Totals> {
    let mut m: HashMap<Tuple, Totals> = HashMap::new();
    for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad line {line}: {e}"));
        let t = (
            v["protocol"].as_str().unwrap().to_string(),
            v["src_ip"].as_str().unwrap().to_string(),
            v["src_port"].as_u64().unwrap() as u16,
            v["dst_ip"].as_str().unwrap().to_string(),
            v["dst_port"].as_u64().unwrap() as u16,
        );
        let e = m.entry(t).or_default();
        e.s2d.packets += v["src_to_dst"]["packets"].as_u64().unwrap();
        e.s2d.bytes += v["src_to_dst"]["bytes"].as_u64().unwrap();
        e.d2s.packets += v["dst_to_src"]["packets"].as_u64().unwrap();
        e.d2s.bytes += v["dst_to_src"]["bytes"].as_u64().unwrap();
        if let Some(r) = v["handshake_rtt_us"].as_f64() {
            e.rtt_us = Some(r);
        }
        e.orientation = v["orientation"].as_str().unwrap().to_string();
        e.interface = v["interface"].as_str().unwrap().to_string();
        assert!(v["first_seen"].as_str().unwrap().ends_with('Z'));
        assert!(v["last_seen"].as_str().unwrap() >= v["first_seen"].as_str().unwrap());
    }
    m
}

/// One captured frame: its length on the wire, and its first 256 bytes.
pub type Frame = (usize, Vec<u8>);

/// An AF_PACKET capture of one interface (both directions): the
/// independent oracle.
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Frame>>,
}

/// `setsockopt(fd, SOL_SOCKET, opt, v)`, panicking when it fails.
fn set_opt<T>(fd: &OwnedFd, opt: libc::c_int, v: &T, what: &str) {
    // SAFETY: `v` is a live value of the size passed; `fd` is open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{what}: {}", std::io::Error::last_os_error());
}

impl Capture {
    /// Starts capturing every frame of interface `ifindex` (of this
    /// thread's namespace).
    pub fn start(ifindex: u32) -> Capture {
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket has no memory preconditions.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all as i32) };
        assert!(
            raw >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a socket we just opened and nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "bind AF_PACKET to ifindex {ifindex}: {}",
            std::io::Error::last_os_error()
        );
        // Wake every 100 ms to see whether to stop; a buffer that holds
        // the whole test's traffic.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        set_opt(&fd, libc::SO_RCVTIMEO, &tv, "SO_RCVTIMEO");
        let buf: libc::c_int = 16 << 20;
        set_opt(&fd, libc::SO_RCVBUFFORCE, &buf, "SO_RCVBUFFORCE");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut b = [0u8; 256];
            let mut recv = |flags: libc::c_int| {
                // SAFETY: `b` is a buffer of the length passed; `fd` is
                // open for the whole closure.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        b.as_mut_ptr().cast(),
                        b.len(),
                        libc::MSG_TRUNC | flags,
                    )
                };
                if n <= 0 {
                    return None;
                }
                // MSG_TRUNC: n is the frame's whole length.
                let n = n as usize;
                Some((n, b[..n.min(b.len())].to_vec()))
            };
            while !flag.load(Ordering::SeqCst) {
                got.extend(recv(0));
            }
            // Drain what is still queued.
            while let Some(f) = recv(libc::MSG_DONTWAIT) {
                got.push(f);
            }
            got
        });
        Capture { stop, handle }
    }

    /// Stops the capture; the frames, in arrival order.
    pub fn finish(self) -> Vec<Frame> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

/// (proto name, src, sport, dst, dport) of a captured Ethernet frame.
pub fn tuple_of(f: &[u8]) -> Option<Tuple> {
    let et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (proto, src, dst, l4): (u8, IpAddr, IpAddr, usize) = match et {
        0x0800 => {
            let ihl = (f.get(14)? & 0xf) as usize * 4;
            let s: [u8; 4] = f.get(26..30)?.try_into().ok()?;
            let d: [u8; 4] = f.get(30..34)?.try_into().ok()?;
            (f[23], IpAddr::from(s), IpAddr::from(d), 14 + ihl)
        }
        0x86dd => {
            let s: [u8; 16] = f.get(22..38)?.try_into().ok()?;
            let d: [u8; 16] = f.get(38..54)?.try_into().ok()?;
            (f[20], IpAddr::from(s), IpAddr::from(d), 54)
        }
        _ => return None,
    };
    let (sp, dp) = if proto == 6 || proto == 17 {
        let p = f.get(l4..l4 + 4)?;
        (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        )
    } else {
        (0, 0)
    };
    let name = match proto {
        6 => "tcp",
        17 => "udp",
        1 => "icmp",
        58 => "icmpv6",
        _ => return None,
    };
    Some((name.into(), src.to_string(), sp, dst.to_string(), dp))
}

/// Totals of the captured frames of one connection, oriented like `t`.
pub fn oracle(cap: &[Frame], t: &Tuple) -> Totals {
    let mut o = Totals::default();
    for (len, f) in cap {
        let Some(c) = tuple_of(f) else { continue };
        if c == *t {
            o.s2d.packets += 1;
            o.s2d.bytes += *len as u64;
        } else if (c.0.as_str(), c.1.as_str(), c.2, c.3.as_str(), c.4)
            == (t.0.as_str(), t.3.as_str(), t.4, t.1.as_str(), t.2)
        {
            o.d2s.packets += 1;
            o.d2s.bytes += *len as u64;
        }
    }
    o
}

/// The servers [`traffic`] talks to, in Python: TCP on 5001, UDP on
/// 5002, both families; "ready" on stdout once listening; exits when its
/// stdin closes.
pub const SERVER: &str = r#"
import socket, sys, threading
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("::", 5001)); t.listen(8)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(("::", 5002))
def tcp():
    while True:
        c, _ = t.accept()
        while c.recv(65536):
            pass
        c.sendall(b"r" * 1000)
        c.close()
def udp():
    while True:
        _, a = u.recvfrom(65536)
        u.sendto(b"a" * 50, a)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"#;

/// The servers of [`SERVER`] running in a namespace; dropped: killed.
pub struct Server(pub Child);

impl Server {
    /// The TCP and UDP servers of [`SERVER`] in namespace `ns`, listening
    /// when this returns.
    pub fn start(ns: &Netns) -> Server {
        let mut c = Command::new("ip")
            .args(["netns", "exec", &ns.ns, "python3", "-c", SERVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting python3 in {}: {e}", ns.ns));
        let mut line = String::new();
        let read = BufReader::new(c.stdout.as_mut().expect("piped stdout")).read_line(&mut line);
        let s = Server(c);
        read.unwrap_or_else(|e| panic!("the server in {}: {e}", ns.ns));
        assert_eq!(line.trim(), "ready", "the server in {}", ns.ns);
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What [`traffic`] sends over TCP.
pub const TCP_BYTES: usize = 256 * 1024;
/// The UDP payloads [`traffic`] sends, one datagram each.
pub const UDP_SIZES: [usize; 10] = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000];

/// Sends the known traffic to `dst` (where a [`Server`] runs); returns
/// the client's TCP and UDP ports.
pub fn traffic(dst: IpAddr) -> (u16, u16) {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::new(dst, 5001), Duration::from_secs(5)).unwrap();
    let tcp_port = s.local_addr().unwrap().port();
    s.write_all(&vec![7u8; TCP_BYTES]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), 1000);
    drop(s);

    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let u = UdpSocket::bind(bind).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let udp_port = u.local_addr().unwrap().port();
    for size in UDP_SIZES {
        u.send_to(&vec![1u8; size], SocketAddr::new(dst, 5002))
            .unwrap();
        let mut b = [0u8; 100];
        assert_eq!(u.recv(&mut b).unwrap(), 50);
        // Spread over more than one drain of the agent (1 s interval).
        std::thread::sleep(Duration::from_millis(150));
    }
    let fam = if dst.is_ipv4() { "-4" } else { "-6" };
    sh(&[
        "ping",
        fam,
        "-c",
        "3",
        "-i",
        "0.2",
        "-s",
        "56",
        "-W",
        "2",
        &dst.to_string(),
    ]);
    (tcp_port, udp_port)
}

/// Writes each of `frames` (whole Ethernet frames) onto interface `dev`
/// of namespace `ns` with an AF_PACKET socket: traffic with any source
/// address (spoofed floods), seen by the other end of a veth. Every 256
/// frames it pauses 2 ms so the receiving end's backlog never overflows
/// (a frame dropped there would never reach the agent's hook). The number
/// of frames written.
pub fn inject(ns: &Netns, dev: &str, frames: Vec<Vec<u8>>) -> anyhow::Result<usize> {
    let dev = std::ffi::CString::new(dev)?;
    ns.run_in(move || -> anyhow::Result<usize> {
        // SAFETY: if_nametoindex reads a NUL-terminated name we own.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no interface {dev:?} in the namespace");
        // SAFETY: socket has no memory preconditions.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        anyhow::ensure!(
            raw >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a socket we just opened and nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        for (i, f) in frames.iter().enumerate() {
            // SAFETY: `f` is a live buffer of the length passed and `sll`
            // a sockaddr_ll of the size passed.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            anyhow::ensure!(
                n == f.len() as isize,
                "sending frame {i}: {}",
                std::io::Error::last_os_error()
            );
            if i % 256 == 255 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(frames.len())
    })?
}
