//! The agent binary as a child process, for the load harness and the
//! tests, and what they measure of it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

/// The agent binary, run as a child with its log collected.
pub struct AgentProc {
    child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    stdout: Option<std::thread::JoinHandle<String>>,
    pub port: u16,
    _cfg: TempFile,
    state: std::path::PathBuf,
}

pub struct TempFile(pub std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Polls `done` every 5 ms until it holds (returns when) or `end` passes.
pub fn wait_until(end: Instant, what: &str, mut done: impl FnMut() -> bool) -> Result<Instant> {
    loop {
        if done() {
            return Ok(Instant::now());
        }
        if Instant::now() > end {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn free_port_checked() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl AgentProc {
    pub fn start(iface: &str, interval: &str, max_flows: u32) -> Result<AgentProc> {
        AgentProc::start_with(iface, interval, max_flows, &["--output", "none"])
    }

    /// `extra`: more `flowmap run` arguments; stdout is collected.
    pub fn start_with(
        iface: &str,
        interval: &str,
        max_flows: u32,
        extra: &[&str],
    ) -> Result<AgentProc> {
        AgentProc::start_config(
            &format!(
                "coordimap:\n  data_sources:\n    - type: flows\n      id: scale\n      config:\n        - name: interface_name\n          value: {iface}\n        - name: crawl_interval\n          value: {interval}\n        - name: max_flows\n          value: {max_flows}\n"
            ),
            extra,
            &[],
        )
    }

    /// Starts the agent on a whole configuration file's text, with more
    /// arguments and environment variables.
    pub fn start_config(config: &str, extra: &[&str], envs: &[(&str, &str)]) -> Result<AgentProc> {
        let cfg = std::env::temp_dir().join(format!("flowmap-scale-{}.yaml", std::process::id()));
        std::fs::write(&cfg, config)?;
        let port = free_port_checked()?;
        let state =
            std::env::temp_dir().join(format!("flowmap-scale-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        // The agent binary: this one, or FLOWMAP_BIN (tests run from their
        // own binaries).
        let bin = match std::env::var_os("FLOWMAP_BIN") {
            Some(b) => std::path::PathBuf::from(b),
            None => std::env::current_exe()?,
        };
        let mut child = Command::new(bin)
            .args([
                "run",
                "--config",
                cfg.to_str().unwrap_or_default(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--state-dir", state.to_str().unwrap_or_default()])
            .args(extra)
            .env("RUST_LOG", "info,flowmap::datapath=debug")
            .envs(envs.iter().copied())
            .env_remove("COORDIMAP_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let stdout = Some(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = so.read_to_string(&mut s);
            s
        }));
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let err = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let a = AgentProc {
            child,
            log,
            stdout,
            port,
            _cfg: TempFile(cfg),
            state,
        };
        a.wait_log("flowmap running", Duration::from_secs(30))?;
        Ok(a)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<Instant> {
        wait_until(
            Instant::now() + timeout,
            &format!("the agent logging {needle:?}"),
            || self.count_log(needle) > 0,
        )
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .map(|l| l.iter().filter(|s| s.contains(needle)).count())
            .unwrap_or(0)
    }

    /// One sample of /metrics.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .ok_or_else(|| anyhow!("metric {name} not found"))
    }

    /// SIGTERM, wait; returns what the agent wrote to stdout.
    pub fn stop(mut self) -> Result<String> {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait()?;
        if !st.success() {
            bail!("the agent exited with {st}");
        }
        Ok(self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

pub fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn proc_rss(pid: u32) -> u64 {
    flowmap::serve::metrics::resident_bytes_of(&pid.to_string())
}

/// TCX links of flowmap programs, on any interface.
pub fn flowmap_links() -> usize {
    use libbpf_rs::query::{LinkInfoIter, LinkTypeInfo, ProgInfoIter};
    let ids: Vec<u32> = LinkInfoIter::default()
        .filter(|l| matches!(l.info, LinkTypeInfo::Tcx(_)))
        .map(|l| l.prog_id)
        .collect();
    if ids.is_empty() {
        return 0;
    }
    let ours: Vec<u32> = ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy().starts_with("flowmap_"))
        .map(|p| p.id)
        .collect();
    ids.iter().filter(|id| ours.contains(id)).count()
}
