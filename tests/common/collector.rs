//! A collector on loopback, started by the test: it speaks Coordimap's
//! reply format and can be told to fail, be slow, or be down.

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
