//! The agent binary as a child process, for the tests and the load
//! harness, and what they measure of it.

use std::fmt::Display;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::net::{free_port, Netns};
use crate::tempdir::TempDir;

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

/// One HTTP/1.0 GET on loopback `port`; (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_request(
        ([127, 0, 0, 1], port).into(),
        path,
        &[("Host", "127.0.0.1")],
    )
}

/// One HTTP/1.0 GET of `path` on `addr` with exactly these header lines
/// (no Host unless given); (status, body).
pub fn http_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.0\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// How to start an [`Agent`]: `flowmap run` on a generated configuration
/// (one `flows` data source), with its own state directory and a free
/// loopback port for `--listen` (and, when asked, another for
/// `--metrics-listen`), unless told otherwise.
pub struct AgentBuilder {
    bin: PathBuf,
    dir: TempDir,
    config: Option<String>,
    id: String,
    iface: String,
    interval: String,
    api_key: Option<String>,
    options: Vec<(String, String)>,
    output: String,
    state_dir: Option<PathBuf>,
    web: bool,
    web_ip: IpAddr,
    /// No `--listen`: the binary's default address.
    web_default: bool,
    metrics_listen: bool,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    netns: Option<String>,
}

impl AgentBuilder {
    /// `data_source_id` of the data source (default `test`).
    pub fn id(mut self, id: &str) -> Self {
        self.id = id.into();
        self
    }

    /// `interface_name` (default `all`).
    pub fn iface(mut self, iface: &str) -> Self {
        self.iface = iface.into();
        self
    }

    /// `crawl_interval` (default `1s`).
    pub fn interval(mut self, interval: &str) -> Self {
        self.interval = interval.into();
        self
    }

    /// `coordimap.api_key`, as written in the file (e.g. `${VAR}`).
    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// One more option of the data source; `value` as written in YAML.
    pub fn option(mut self, name: &str, value: impl Display) -> Self {
        self.options.push((name.into(), value.to_string()));
        self
    }

    /// The whole configuration file, instead of the generated one.
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.into());
        self
    }

    /// `--output` (default `flows`: stdout is collected).
    pub fn output(mut self, output: &str) -> Self {
        self.output = output.into();
        self
    }

    /// `--state-dir` (default: a directory of the agent's own, removed
    /// with it).
    pub fn state_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.state_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// `--no-web` instead of `--listen` on a free port.
    pub fn no_web(mut self) -> Self {
        self.web = false;
        self
    }

    /// `--listen` on `ip` (default 127.0.0.1) and a free port.
    pub fn listen_on(mut self, ip: &str) -> Self {
        self.web_ip = ip.parse().expect("an IP address");
        self
    }

    /// No `--listen` at all: the map page where the binary puts it by
    /// default (127.0.0.1:9464, a fixed port).
    pub fn default_listen(mut self) -> Self {
        self.web_default = true;
        self
    }

    /// `--metrics-listen` on a free loopback port of its own.
    pub fn metrics_listen(mut self) -> Self {
        self.metrics_listen = true;
        self
    }

    /// One more argument of `flowmap run`.
    pub fn arg(mut self, arg: impl AsRef<str>) -> Self {
        self.args.push(arg.as_ref().into());
        self
    }

    /// More arguments of `flowmap run`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// An environment variable of the agent.
    pub fn env(mut self, name: &str, value: impl AsRef<str>) -> Self {
        self.envs.push((name.into(), value.as_ref().into()));
        self
    }

    /// Runs the agent in network namespace `ns` (`ip netns exec`).
    pub fn netns(mut self, ns: &Netns) -> Self {
        self.netns = Some(ns.ns.clone());
        self
    }

    /// Writes a file of the agent's own directory (removed with the agent),
    /// e.g. a kubeconfig; its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        self.dir.file(name, text)
    }

    fn config_text(&self) -> String {
        if let Some(c) = &self.config {
            return c.clone();
        }
        let mut c = String::from("coordimap:\n");
        if let Some(k) = &self.api_key {
            c += &format!("  api_key: {k}\n");
        }
        c += &format!(
            "  data_sources:\n    - type: flows\n      data_source_id: {}\n      config:\n",
            self.id
        );
        let fixed = [
            ("interface_name", &self.iface),
            ("crawl_interval", &self.interval),
        ];
        for (name, value) in fixed
            .into_iter()
            .chain(self.options.iter().map(|(n, v)| (n.as_str(), v)))
        {
            c += &format!("        - name: {name}\n          value: {value}\n");
        }
        c
    }

    /// Starts the agent and waits (30 s at most) until it logs
    /// `flowmap running`.
    pub fn start(self) -> Result<Agent> {
        let cfg = self.dir.file("config.yaml", &self.config_text());
        let state = self
            .state_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("state"));
        let web = if self.web_default {
            SocketAddr::from(([127, 0, 0, 1], 9464))
        } else {
            SocketAddr::new(self.web_ip, free_port())
        };
        let metrics_port = if self.metrics_listen {
            free_port()
        } else {
            web.port()
        };
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .args(["--output", &self.output])
            .arg("--state-dir")
            .arg(&state)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env_remove("COORDIMAP_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !self.web {
            cmd.arg("--no-web");
        } else if !self.web_default {
            cmd.args(["--listen", &web.to_string()]);
        }
        if self.metrics_listen {
            cmd.args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")]);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let mut so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = so.read_to_string(&mut s);
            s
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let err = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let stderr = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let mut a = Agent {
            child,
            web,
            metrics_port,
            log,
            stdout: Some(stdout),
            stderr: Some(stderr),
            _dir: self.dir,
        };
        let end = Instant::now() + Duration::from_secs(30);
        while a.count_log("flowmap running") == 0 {
            if let Some(st) = a.child.try_wait()? {
                a.join_stderr();
                bail!("the agent exited with {st} before running:\n{}", a.stderr());
            }
            if Instant::now() > end {
                bail!("the agent did not start within 30 s:\n{}", a.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(a)
    }
}

/// The agent binary as a child process: stdout collected, stderr collected
/// line by line as it comes. Dropped: killed.
pub struct Agent {
    child: Child,
    web: SocketAddr,
    metrics_port: u16,
    log: Arc<Mutex<Vec<String>>>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl Agent {
    /// The agent binary `FLOWMAP_BIN`, else `bin` (a test passes
    /// `env!("CARGO_BIN_EXE_flowmap")`, the bench its sibling `flowmap`).
    pub fn builder(bin: impl AsRef<Path>) -> AgentBuilder {
        let bin = std::env::var_os("FLOWMAP_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin.as_ref().to_path_buf());
        AgentBuilder {
            bin,
            dir: TempDir::new("agent"),
            config: None,
            id: "test".into(),
            iface: "all".into(),
            interval: "1s".into(),
            api_key: None,
            options: Vec::new(),
            output: "flows".into(),
            state_dir: None,
            web: true,
            web_ip: IpAddr::from([127, 0, 0, 1]),
            web_default: false,
            metrics_listen: false,
            args: Vec::new(),
            envs: Vec::new(),
            netns: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port of `--listen` (the map page, and /metrics and /healthz
    /// without [`AgentBuilder::metrics_listen`]); nobody listens there
    /// after [`AgentBuilder::no_web`].
    pub fn port(&self) -> u16 {
        self.web.port()
    }

    /// The address of `--listen`.
    pub fn web_addr(&self) -> SocketAddr {
        self.web
    }

    /// The loopback port of /metrics and /healthz.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// What the agent wrote to stderr so far, a line each.
    pub fn stderr(&self) -> String {
        self.log
            .lock()
            .map(|l| l.iter().map(|s| format!("{s}\n")).collect())
            .unwrap_or_default()
    }

    /// The last stderr line that contains `needle`.
    pub fn last_log(&self, needle: &str) -> Option<String> {
        self.log
            .lock()
            .ok()
            .and_then(|l| l.iter().rev().find(|s| s.contains(needle)).cloned())
    }

    /// How many stderr lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .map(|l| l.iter().filter(|s| s.contains(needle)).count())
            .unwrap_or(0)
    }

    /// Waits until a stderr line contains `needle`; when it came.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<Instant> {
        wait_until(
            Instant::now() + timeout,
            &format!("the agent logging {needle:?}"),
            || self.count_log(needle) > 0,
        )
    }

    /// One sample of /metrics: the value on the line that starts with
    /// `name`.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let (_, body) = http_get(self.metrics_port, "/metrics")?;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .ok_or_else(|| anyhow!("metric {name} not found"))
    }

    /// Waits (2 s at most) until the stderr reader has read to the end.
    fn join_stderr(&mut self) {
        if let Some(h) = self.stderr.take() {
            let end = Instant::now() + Duration::from_secs(2);
            while !h.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    /// SIGTERM, and waits for the exit; (stdout, stderr). An exit other
    /// than a clean one is an error that carries stderr.
    pub fn stop(mut self) -> Result<(String, String)> {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait()?;
        let out = self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        self.join_stderr();
        let err = self.stderr();
        if !st.success() {
            bail!("the agent exited with {st}\n{err}");
        }
        Ok((out, err))
    }

    /// SIGKILL, and waits for the exit.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    tcx_link_programs(|_| true)
        .iter()
        .filter(|n| n.starts_with("flowmap_"))
        .count()
}

/// Names of the programs attached to an interface with TCX links, one per
/// link, read from the kernel (bpftool 7.1 does not show TCX links).
pub fn tcx_programs(ifindex: u32) -> Vec<String> {
    tcx_link_programs(|i| i == ifindex)
}

/// The program name of every TCX link on the interfaces `on` takes.
fn tcx_link_programs(on: impl Fn(u32) -> bool) -> Vec<String> {
    use libbpf_rs::query::{LinkInfoIter, LinkTypeInfo, ProgInfoIter};
    let ids: Vec<u32> = LinkInfoIter::default()
        .filter_map(|l| match l.info {
            LinkTypeInfo::Tcx(t) if on(t.ifindex) => Some(l.prog_id),
            _ => None,
        })
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    // One name per link: the same program may be on both hooks.
    let names: std::collections::HashMap<u32, String> = ProgInfoIter::default()
        .filter(|p| ids.contains(&p.id))
        .map(|p| (p.id, p.name.to_string_lossy().into_owned()))
        .collect();
    ids.iter().filter_map(|id| names.get(id).cloned()).collect()
}
