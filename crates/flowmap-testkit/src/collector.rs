//! A Coordimap collector on loopback, started by a test: it speaks
//! Coordimap's reply format, keeps every request it accepts, and can be
//! told to fail, be slow, or be down. [`Chaos`] is one that misbehaves at
//! random (500s, slow answers, resets, redirects to a [`Trap`]) and keeps
//! what it accepts once per idempotency key.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Mode {
    Ok,
    Fail500,
    Slow(Duration),
}

/// (headers, body) of one accepted request.
pub type Request = (Vec<(String, String)>, Vec<u8>);

#[derive(Default)]
pub struct Log {
    /// Each accepted request, in arrival order.
    pub accepted: Vec<Request>,
    pub refused: u64,
}

#[derive(Clone)]
struct Shared {
    mode: Arc<Mutex<Mode>>,
    log: Arc<Mutex<Log>>,
}

pub struct Server {
    pub port: u16,
    mode: Arc<Mutex<Mode>>,
    pub log: Arc<Mutex<Log>>,
    rt: tokio::runtime::Runtime,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn collect(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let mode = *st.mode.lock().unwrap();
    match mode {
        Mode::Fail500 => {
            st.log.lock().unwrap().refused += 1;
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "{\"status\":{\"http_code\":500,\"message\":\"boom\"}}".into(),
            );
        }
        Mode::Slow(d) => tokio::time::sleep(d).await,
        Mode::Ok => {}
    }
    let h = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    st.log.lock().unwrap().accepted.push((h, body.to_vec()));
    (
        StatusCode::OK,
        "{\"status\":{\"http_code\":200,\"message\":\"ok\",\"error_code\":\"\"}}".into(),
    )
}

impl Server {
    pub fn start() -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut s = Server {
            port: 0,
            mode: Arc::new(Mutex::new(Mode::Ok)),
            log: Arc::new(Mutex::new(Log::default())),
            rt,
            task: None,
        };
        s.up();
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api/crawl", self.port)
    }

    /// The bodies of the accepted requests, in arrival order.
    pub fn bodies(&self) -> Vec<Vec<u8>> {
        let log = self.log.lock().unwrap();
        log.accepted.iter().map(|(_, b)| b.clone()).collect()
    }

    /// Every element of every batch received: (id, type, name, payload
    /// decoded from the wire's base64).
    pub fn elements(&self) -> Vec<(String, String, String, serde_json::Value)> {
        let mut out = Vec::new();
        for b in self.bodies() {
            let batch: flowmap::sinks::coordimap::Batch =
                serde_json::from_slice(&b).expect("a batch on the wire");
            for e in batch.cloud_crawl_data.crawled_data.data {
                let p = e.payload().expect("base64 payload");
                let v = serde_json::from_slice(&p).expect("JSON payload");
                out.push((e.id, e.kind, e.name, v));
            }
        }
        out
    }

    pub fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    /// Listens again (on the same port after `down`).
    pub fn up(&mut self) {
        let shared = Shared {
            mode: self.mode.clone(),
            log: self.log.clone(),
        };
        let port = self.port;
        let listener = self.rt.block_on(async move {
            for _ in 0..50 {
                if let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                    return l;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("cannot listen on 127.0.0.1:{port}");
        });
        self.port = listener.local_addr().unwrap().port();
        let app = Router::new()
            .route("/api/crawl", post(collect))
            .with_state(shared);
        self.task = Some(self.rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    /// Closes the listener and every connection.
    pub fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = self.rt.block_on(t);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.down();
    }
}

/// The value of header `name` (lower case) of an accepted request; empty
/// when absent.
pub fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// What the [`Chaos`] collector does with one request.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Act {
    /// Accepts (once per idempotency key) and answers 200.
    Ok,
    /// Answers 500 without accepting.
    Fail500,
    /// Waits, then acts as `Ok`.
    Slow,
    /// Resets the connection (RST) before accepting.
    ResetBefore,
    /// Accepts, then resets the connection: the reply is lost.
    ResetAfter,
    /// Answers 307 to the [`Trap`] listener.
    Redirect,
}

/// The acts and how many of each are in every 20 requests (drawn in a
/// seeded shuffled order, so 20 requests see every act).
const ACTS: [(Act, usize); 6] = [
    (Act::Ok, 7),
    (Act::Fail500, 3),
    (Act::Slow, 2),
    (Act::ResetBefore, 2),
    (Act::ResetAfter, 3),
    (Act::Redirect, 3),
];

/// What the chaos collector saw.
#[derive(Default, Debug)]
pub struct ChaosLog {
    /// `Idempotency-Key`s in the order they were first accepted, each once
    /// (a real collector de-duplicates by key the same way).
    pub keys: Vec<String>,
    /// Requests whose key had been accepted before (answered 200, not kept).
    pub duplicates: u64,
    /// Every `Api-Key` value of a request.
    pub api_keys: std::collections::BTreeSet<String>,
    /// Requests per act.
    pub acts: std::collections::HashMap<Act, u64>,
}

/// A second loopback listener, the target of the chaos collector's
/// redirects: it must never be reached (the key would go with it).
pub struct Trap {
    pub port: u16,
    /// Connections it accepted, and the header lines they sent.
    pub connections: Arc<std::sync::atomic::AtomicU64>,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl Trap {
    pub fn start() -> Trap {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (connections.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { break };
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let s = s.clone();
                std::thread::spawn(move || {
                    if let Some(req) = read_request(&conn) {
                        s.lock().unwrap().extend(req.head);
                        let _ = reply(&conn, "200 OK", OK_REPLY, "");
                    }
                });
            }
        });
        Trap {
            port,
            connections,
            seen,
        }
    }
}

const OK_REPLY: &str = "{\"status\":{\"http_code\":200,\"message\":\"ok\",\"error_code\":\"\"}}";

struct RawRequest {
    /// Header lines, lower-cased names.
    head: Vec<String>,
    body_len: usize,
}

impl RawRequest {
    fn header(&self, name: &str) -> String {
        self.head
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or("")
            .to_string()
    }
}

/// Reads one HTTP/1.1 request (head and Content-Length body); None at the
/// end of the connection.
fn read_request(mut conn: &std::net::TcpStream) -> Option<RawRequest> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        if byte[0] != b'\n' {
            line.push(byte[0]);
            continue;
        }
        let l = String::from_utf8_lossy(&line).trim_end().to_string();
        line.clear();
        if l.is_empty() {
            break;
        }
        let l = match l.split_once(':') {
            Some((k, v)) => format!("{}: {}", k.to_ascii_lowercase(), v.trim()),
            None => l,
        };
        head.push(l);
    }
    let mut req = RawRequest { head, body_len: 0 };
    req.body_len = req.header("content-length").parse().unwrap_or(0);
    let mut body = vec![0u8; req.body_len];
    conn.read_exact(&mut body).ok()?;
    Some(req)
}

fn reply(
    mut conn: &std::net::TcpStream,
    status: &str,
    body: &str,
    extra: &str,
) -> std::io::Result<()> {
    use std::io::Write;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
}

/// Closes `conn` with a reset (SO_LINGER 0) instead of an orderly close.
fn reset(conn: std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(conn);
}

/// A Coordimap collector on loopback that misbehaves: each request, by a
/// seeded draw, is accepted, failed with 500, answered slowly, reset
/// before or after being accepted, or redirected to a [`Trap`]. It keeps
/// what it accepted once per `Idempotency-Key`. [`Chaos::calm`] makes it
/// accept everything.
pub struct Chaos {
    pub port: u16,
    pub log: Arc<Mutex<ChaosLog>>,
    pub trap: Trap,
    calm: Arc<std::sync::atomic::AtomicBool>,
}

struct ChaosShared {
    log: Arc<Mutex<ChaosLog>>,
    calm: Arc<std::sync::atomic::AtomicBool>,
    /// (random state, the acts left of this round of 20).
    rng: Mutex<(u64, Vec<Act>)>,
    trap: u16,
    slow: Duration,
}

impl ChaosShared {
    fn draw(&self) -> Act {
        if self.calm.load(std::sync::atomic::Ordering::SeqCst) {
            return Act::Ok;
        }
        let mut g = self.rng.lock().unwrap();
        let (state, bag) = &mut *g;
        if bag.is_empty() {
            *bag = ACTS
                .iter()
                .flat_map(|(a, n)| std::iter::repeat_n(*a, *n))
                .collect();
        }
        // xorshift64*
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33;
        bag.swap_remove(r as usize % bag.len())
    }

    fn accept(&self, req: &RawRequest) {
        let mut log = self.log.lock().unwrap();
        let key = req.header("idempotency-key");
        if log.keys.contains(&key) {
            log.duplicates += 1;
        } else {
            log.keys.push(key);
        }
    }

    /// Serves one connection until it ends or is reset.
    fn serve(&self, conn: std::net::TcpStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        while let Some(req) = read_request(&conn) {
            let act = self.draw();
            {
                let mut log = self.log.lock().unwrap();
                log.api_keys.insert(req.header("api-key"));
                *log.acts.entry(act).or_default() += 1;
            }
            let fail = "{\"status\":{\"http_code\":500,\"message\":\"chaos\"}}";
            let sent = match act {
                Act::Ok => {
                    self.accept(&req);
                    reply(&conn, "200 OK", OK_REPLY, "")
                }
                Act::Slow => {
                    std::thread::sleep(self.slow);
                    self.accept(&req);
                    reply(&conn, "200 OK", OK_REPLY, "")
                }
                Act::Fail500 => reply(&conn, "500 Internal Server Error", fail, ""),
                Act::Redirect => {
                    let to = format!("Location: http://127.0.0.1:{}/api/crawl\r\n", self.trap);
                    reply(&conn, "307 Temporary Redirect", "", &to)
                }
                Act::ResetBefore => return reset(conn),
                Act::ResetAfter => {
                    self.accept(&req);
                    return reset(conn);
                }
            };
            if sent.is_err() {
                return;
            }
        }
    }
}

impl Chaos {
    /// Starts the collector (and its trap); `seed` fixes the draws, `slow`
    /// is how long a slow answer waits.
    pub fn start(seed: u64, slow: Duration) -> Chaos {
        let trap = Trap::start();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(ChaosLog::default()));
        let calm = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shared = Arc::new(ChaosShared {
            log: log.clone(),
            calm: calm.clone(),
            rng: Mutex::new((seed.max(1), Vec::new())),
            trap: trap.port,
            slow,
        });
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { break };
                let s = shared.clone();
                std::thread::spawn(move || s.serve(conn));
            }
        });
        Chaos {
            port,
            log,
            trap,
            calm,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api/crawl", self.port)
    }

    /// Requests so far.
    pub fn requests(&self) -> u64 {
        self.log.lock().unwrap().acts.values().sum()
    }

    /// From now on every request is accepted (or wild again).
    pub fn calm(&self, calm: bool) {
        self.calm.store(calm, std::sync::atomic::Ordering::SeqCst);
    }
}
