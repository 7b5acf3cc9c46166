//! The commands: `run` the agent, `check` a configuration, read the store
//! with `top` and `graph`. Parsing only; the work is in the stages.

mod check;
mod read;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::info;

use crate::agent::{self, Output, RunOptions};
use crate::config;
use crate::datapath::AttachMode;
use crate::serve::view;
use crate::sinks::coordimap::sender::Retry;
use crate::sinks::store::{Location, Window};

#[derive(Parser)]
#[command(
    name = "flowmap",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("FLOWMAP_GIT_COMMIT"), ")"),
    about = "eBPF network-flow agent for Coordimap"
)]
struct Cli {
    /// Configuration file (Coordimap's YAML format).
    #[arg(long, global = true, env = "COORDIMAP_CONFIG_PATH")]
    config: Option<PathBuf>,
    /// Coordimap collector URL.
    #[arg(long, global = true, env = "COORDIMAP_ENDPOINT")]
    endpoint: Option<String>,
    /// Debug logs.
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DiffFormat {
    Table,
    Json,
}

/// A time on the command line: RFC 3339 in UTC (`2026-12-07T01:00:00Z`),
/// relative to now (`-1h`, `-90s`, `now`), or Unix milliseconds; in Unix ms.
fn parse_time(s: &str) -> Result<i64, String> {
    let now = crate::sinks::store::unix_ms(std::time::SystemTime::now());
    let t = s.trim();
    if t == "now" {
        return Ok(now);
    }
    if let Some(rel) = t.strip_prefix('-') {
        return config::parse_go_duration(rel)
            .map(|d| now - d.as_millis() as i64)
            .map_err(|e| format!("{s:?} is not a time before now like -1h ({e})"));
    }
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(t)
        .map(crate::sinks::store::unix_ms)
        .map_err(|e| {
            format!("{s:?} is not a time: RFC 3339 (2026-12-07T01:00:00Z), relative (-1h) or Unix ms ({e})")
        })
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Json,
    Dot,
    Mermaid,
}

/// The map page's listener options, shared by `run` and `serve`.
#[derive(clap::Args)]
struct WebArgs {
    /// Address of the map page and its API, and of /metrics and /healthz
    /// unless --metrics-listen is given (`127.0.0.1:9464`, `[::1]:9464`,
    /// or `fd00::5:9464` as a DaemonSet writes `$(HOST_IP):9464`). Off
    /// loopback it needs --web-token-file.
    #[arg(long, env = "FLOWMAP_LISTEN", default_value = "127.0.0.1:9464", value_parser = parse_listen)]
    listen: SocketAddr,
    /// Address of /metrics and /healthz alone (no flow data there), e.g.
    /// the node's `$(HOST_IP):9464` for probes and Prometheus.
    #[arg(long, env = "FLOWMAP_METRICS_LISTEN", value_parser = parse_listen)]
    metrics_listen: Option<SocketAddr>,
    /// File holding the bearer token the map page and its API require
    /// (`Authorization: Bearer <token>`); required when --listen is not
    /// loopback. A mounted Secret works.
    #[arg(long, env = "FLOWMAP_WEB_TOKEN_FILE")]
    web_token_file: Option<PathBuf>,
    /// A host name the map page is served under, besides its address and
    /// localhost (others are refused, against DNS rebinding). Repeatable;
    /// the variable takes a comma-separated list.
    #[arg(long = "web-host", env = "FLOWMAP_WEB_HOSTS", value_delimiter = ',')]
    web_hosts: Vec<String>,
    /// Longest a request to the map page or its API may take.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    web_timeout: Duration,
    /// Edges of a window /api/graph reads at most (the busiest by bytes).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    web_max_edges: u32,
}

impl WebArgs {
    fn options(&self) -> crate::serve::WebOptions {
        crate::serve::WebOptions {
            listen: self.listen,
            token_file: self.web_token_file.clone(),
            hosts: self.web_hosts.clone(),
            timeout: self.web_timeout,
            max_edges: self.web_max_edges as usize,
            readers: 2,
        }
    }
}

/// Which store `top`, `graph` and `diff` read.
#[derive(clap::Args)]
struct StoreArgs {
    /// The store: a PostgreSQL connection string (`host=… dbname=…` or
    /// `postgresql://…`) or a SQLite file. Default: `coordimap.database`
    /// of --config, else `<state-dir>/flowmap.db`.
    #[arg(long, env = "FLOWMAP_DATABASE", hide_env_values = true)]
    database: Option<String>,
    #[arg(long, env = "FLOWMAP_STATE_DIR", default_value = "/var/lib/flowmap")]
    state_dir: PathBuf,
}

/// `flowmap run`'s options.
#[derive(clap::Args)]
struct RunArgs {
    /// What to write to stdout each interval (default: graph without an
    /// endpoint and store, none otherwise).
    #[arg(long, value_enum)]
    output: Option<Output>,
    /// Flush and exit after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Override the hook type (default: the config's attach_mode, else auto).
    #[arg(long, value_enum)]
    attach_mode: Option<AttachMode>,
    /// Where flowmap keeps its state (the delivery spool).
    #[arg(long, env = "FLOWMAP_STATE_DIR", default_value = "/var/lib/flowmap")]
    state_dir: PathBuf,
    /// Bytes of undelivered batches kept on disk; the oldest go first.
    #[arg(long, env = "FLOWMAP_SPOOL_MAX_BYTES", default_value_t = 64 << 20)]
    spool_max_bytes: u64,
    /// Longest wait between two delivery attempts.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    retry_max: Duration,
    /// How long a stopping agent keeps trying to deliver the spool.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    shutdown_timeout: Duration,
    #[command(flatten)]
    web: WebArgs,
    /// Accept an http:// endpoint that is not loopback (the API key then
    /// travels in clear text).
    #[arg(long)]
    allow_plain_http: bool,
    /// Do not serve the map page and its API (nor /metrics and /healthz,
    /// unless --metrics-listen gives them a listener).
    #[arg(long)]
    no_web: bool,
    /// Do not keep a local store.
    #[arg(long)]
    no_store: bool,
    /// How long the local store keeps intervals.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    retention: Duration,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run(RunArgs),
    /// The busiest edges of the store.
    Top {
        #[arg(long, value_parser = parse_duration, default_value = "15m")]
        since: Duration,
        #[arg(long, value_enum, default_value = "bytes")]
        by: view::By,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Export the graph of the store.
    Graph {
        #[arg(long, value_parser = parse_duration, default_value = "15m")]
        since: Duration,
        #[arg(long, value_enum, default_value = "json")]
        format: GraphFormat,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// What changed between two windows of the store: endpoints and edges
    /// that appeared or vanished, edges whose status worsened or whose
    /// bytes changed by more than --factor. Times are RFC 3339 (UTC, `Z`),
    /// relative to now (`-1h`, `-30m`, `now`) or Unix milliseconds.
    Diff {
        #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
        a_from: i64,
        #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
        a_to: i64,
        #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
        b_from: i64,
        #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
        b_to: i64,
        #[arg(long, default_value = "2", value_parser = crate::serve::parse_factor)]
        factor: f64,
        #[arg(long, value_enum, default_value = "table")]
        format: DiffFormat,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Serve the map page, its API, /metrics and /healthz for a whole store
    /// (every agent writing to one PostgreSQL): no root, no datapath.
    Serve {
        /// The store: a PostgreSQL connection string or a SQLite file.
        #[arg(long, env = "FLOWMAP_DATABASE", hide_env_values = true)]
        database: String,
        #[command(flatten)]
        web: WebArgs,
        /// How often the page refreshes.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        refresh: Duration,
    },
    /// Validate the configuration and print what it resolves to.
    Check,
}

/// Where `top`, `graph` and `diff` read: `--database`, else the
/// configuration's store, else the state directory's SQLite file.
pub(crate) enum StoreAt {
    Given(Location),
    Configured(PathBuf),
}

impl StoreArgs {
    fn at(&self) -> StoreAt {
        match &self.database {
            Some(d) if !d.trim().is_empty() => StoreAt::Given(Location::parse(d)),
            _ => StoreAt::Configured(self.state_dir.clone()),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match config::parse_go_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be more than zero".into()),
        Err(e) => Err(format!("{s:?} is not a duration ({e}); like 30s, 5m")),
    }
}

/// A socket address; an IPv6 address without brackets takes the part
/// after its last colon as the port.
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.rsplit_once(':')
        .and_then(|(ip, port)| {
            Some(std::net::SocketAddr::new(
                ip.parse().ok()?,
                port.parse().ok()?,
            ))
        })
        .ok_or_else(|| {
            format!("{s:?} is not an address and port (e.g. 127.0.0.1:9464 or [::1]:9464)")
        })
}

fn init_logging(debug: bool) {
    let filter = if debug { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .init();
    // libbpf's own messages (verifier logs, netlink notes) at debug level.
    libbpf_rs::set_print(Some((
        libbpf_rs::PrintLevel::Debug,
        |_level, msg: String| tracing::debug!(target: "libbpf", "{}", msg.trim_end()),
    )));
}

pub fn main() -> ExitCode {
    // Few malloc arenas: the agent's threads are few and mostly idle, and
    // every arena keeps memory of its own.
    // SAFETY: mallopt with a valid parameter, before any thread starts.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let cli = Cli::parse();
    init_logging(cli.debug);
    let endpoint = cli.endpoint.as_deref();
    let config = cli.config.as_ref();
    match cli.cmd {
        Cmd::Check => {
            let (cfg, source) = match check::load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(code) = check::check_endpoint(&cfg, endpoint) {
                return code;
            }
            check::print_check(&cfg, &source, endpoint);
            ExitCode::SUCCESS
        }
        Cmd::Run(args) => run(config, endpoint, args),
        Cmd::Top {
            since,
            by,
            limit,
            store,
        } => read::read_store(config, &store.at(), |s| {
            let (edges, nodes) = view::top_in(s, &Window::last(since), by, limit)?;
            Ok(view::top_table(&edges, &nodes))
        }),
        Cmd::Graph {
            since,
            format,
            store,
        } => read::read_store(config, &store.at(), |s| {
            let v = view::graph_in(s, &Window::last(since), &Default::default())?;
            Ok(match format {
                GraphFormat::Json => serde_json::to_string_pretty(&v)? + "\n",
                GraphFormat::Dot => view::to_dot(&v),
                GraphFormat::Mermaid => view::to_mermaid(&v),
            })
        }),
        Cmd::Diff {
            a_from,
            a_to,
            b_from,
            b_to,
            factor,
            format,
            store,
        } => {
            for (n, f, t) in [("a", a_from, a_to), ("b", b_from, b_to)] {
                if t < f {
                    eprintln!("error: --{n}-to is before --{n}-from");
                    return ExitCode::from(2);
                }
            }
            read::read_store(config, &store.at(), |s| {
                let d = crate::serve::diff::diff(
                    s,
                    &Window::between(a_from, a_to),
                    &Window::between(b_from, b_to),
                    factor,
                    None,
                )?;
                Ok(match format {
                    DiffFormat::Table => crate::serve::diff::table(&d),
                    DiffFormat::Json => serde_json::to_string_pretty(&d)? + "\n",
                })
            })
        }
        Cmd::Serve {
            database,
            web,
            refresh,
        } => serve::serve(
            Location::parse(&database),
            web.options(),
            web.metrics_listen,
            refresh,
        ),
    }
}

/// `flowmap run`: loads the configuration, then runs the agent on a
/// runtime of its own until it stops.
fn run(config: Option<&PathBuf>, endpoint: Option<&str>, a: RunArgs) -> ExitCode {
    let (cfg, source) = match check::load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(code) = check::check_endpoint(&cfg, endpoint) {
        return code;
    }
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    for o in &cfg.others {
        info!(id = %o.id, kind = %o.kind, "data source not run by flowmap");
    }
    info!(config = %source, "configuration loaded");
    let has_endpoint = endpoint.is_some_and(|e| !e.is_empty());
    let quiet = has_endpoint || !a.no_store;
    let opts = RunOptions {
        output: a
            .output
            .unwrap_or(if quiet { Output::None } else { Output::Graph }),
        endpoint: endpoint.map(str::to_string),
        allow_plain_http: a.allow_plain_http,
        store: (!a.no_store).then(|| Location::from_config(cfg.database.as_ref(), &a.state_dir)),
        retention: a.retention,
        web: (!a.no_web).then(|| a.web.options()),
        metrics_listen: a.web.metrics_listen,
        state_dir: a.state_dir,
        spool_max_bytes: a.spool_max_bytes,
        retry: Retry {
            max: a.retry_max,
            ..Default::default()
        },
        shutdown_timeout: a.shutdown_timeout,
        duration: a.duration,
        attach_mode: a.attach_mode,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(agent::run(&cfg, opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
