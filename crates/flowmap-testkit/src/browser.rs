//! A real headless Chromium driven through WebDriver (Debian's
//! `chromium-driver`, which scripts/setup.sh installs next to `chromium`):
//! the map page's browser tests and the page benchmark open it, type,
//! click and read what the page drew. The protocol is plain HTTP with JSON
//! bodies, spoken here over a loopback TCP connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::net::free_port;
use crate::tempdir::TempDir;

/// The WebDriver key code of Enter.
pub const ENTER: &str = "\u{E007}";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// True when both `chromium` and `chromedriver` run; under `CI=true` their
/// absence is a failure (panics), otherwise the caller skips `test`.
pub fn available(test: &str) -> bool {
    let ok = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ok("chromium") && ok("chromedriver") {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: chromium and chromedriver are required (scripts/setup.sh installs them) and CI=true forbids skipping");
    }
    eprintln!("SKIP {test}: chromium or chromedriver is not installed");
    false
}

/// One browser session (its own empty profile), ended on drop.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless
    /// Chromium session of `width`×`height` pixels.
    pub fn start(width: u32, height: u32) -> Result<Browser> {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver (scripts/setup.sh installs chromium-driver)")?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let profile = TempDir::new("browser-profile");
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = b.call("GET", "/status", None) {
                if v["value"]["ready"].as_bool() == Some(true) {
                    break;
                }
            }
            if Instant::now() > end {
                bail!("chromedriver did not become ready on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            format!("--user-data-dir={}", b._profile.path().display()),
            format!("--window-size={width},{height}"),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
            "timeouts": {"script": 60000, "pageLoad": 60000}
        }}});
        let v = b.call("POST", "/session", Some(&caps))?;
        b.session = v["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session in {v}"))?
            .to_string();
        Ok(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut s = TcpStream::connect(self.addr)
            .with_context(|| format!("connecting to chromedriver on {}", self.addr))?;
        s.set_read_timeout(Some(Duration::from_secs(90)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes())?;
        // chromedriver keeps the connection open: read the head, then
        // Content-Length bytes of body.
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut buf)?;
            if n == 0 {
                bail!("{method} {path}: connection closed before the response head");
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while raw.len() < head_end + len {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let body = String::from_utf8_lossy(&raw[head_end..]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("{method} {path}: not JSON: {body}"))?;
        if status != 200 {
            bail!("{method} {path}: {status} {}", v["value"]);
        }
        Ok(v)
    }

    fn session_call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let v = self.call(method, &format!("/session/{}{path}", self.session), body)?;
        Ok(v["value"].clone())
    }

    /// Opens `url` and returns once its load event fired.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.session_call("POST", "/url", Some(&json!({ "url": url })))?;
        Ok(())
    }

    /// Runs `script` (a function body: `return …`) in the page; its value.
    pub fn eval(&self, script: &str) -> Result<Value> {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": []})),
        )
    }

    /// Evaluates `script` every 20 ms until it returns something other
    /// than null or false; that value.
    pub fn wait_for(&self, script: &str, timeout: Duration) -> Result<Value> {
        let end = Instant::now() + timeout;
        loop {
            let v = self.eval(script)?;
            if !v.is_null() && v != Value::Bool(false) {
                return Ok(v);
            }
            if Instant::now() > end {
                bail!("timed out after {timeout:?} waiting for: {script}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn element(&self, css: &str) -> Result<String> {
        let v = self.session_call(
            "POST",
            "/element",
            Some(&json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no element {css}: {v}"))
    }

    /// Clicks the element `css` selects (as a user would: WebDriver
    /// scrolls it into view and clicks its centre).
    pub fn click(&self, css: &str) -> Result<()> {
        let id = self.element(css)?;
        self.session_call("POST", &format!("/element/{id}/click"), Some(&json!({})))?;
        Ok(())
    }

    /// Empties the input `css` selects and types `keys` into it.
    pub fn type_into(&self, css: &str, keys: &str) -> Result<()> {
        let id = self.element(css)?;
        self.session_call("POST", &format!("/element/{id}/clear"), Some(&json!({})))?;
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            Some(&json!({ "text": keys })),
        )?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
