use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::info;

use flowmap::agent::{self, Output, RunOptions};
use flowmap::config::{self, format_duration, Config, DeployedAt};
use flowmap::datapath::ifaces::Selection;
use flowmap::datapath::AttachMode;
use flowmap::store::{Location, Store};

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
enum OutputArg {
    /// One JSON object per flow per interval.
    #[value(alias = "jsonl")]
    Flows,
    /// Each interval's Coordimap batch, one JSON document per line.
    Graph,
    None,
}

#[derive(Subcommand)]
enum ScaleWhat {
    /// Open UDP flows and TCP connections (IPv4 and IPv6) into a test namespace.
    Flows {
        #[arg(long, default_value_t = 99_000)]
        udp: u32,
        #[arg(long, default_value_t = 1_000)]
        tcp: u32,
        /// Distinct server ports of the UDP flows.
        #[arg(long, default_value_t = 100)]
        services: u32,
        /// Flows per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
    /// Attach to many interfaces at start, and to one more while running.
    Attach {
        /// veth pairs to create (two interfaces each).
        #[arg(long, default_value_t = 100)]
        pairs: u32,
    },
    /// Create and delete veth pairs while the agent runs with `all`.
    Churn {
        #[arg(long, default_value_t = 100)]
        cycles: u32,
    },
    /// The user-space half of an interval on synthetic flows (no kernel).
    Pipeline {
        #[arg(long, default_value_t = 100_000)]
        flows: u32,
        /// Distinct server ports (0: every flow its own, the worst case).
        #[arg(long, default_value_t = 100)]
        services: u32,
    },
    /// Kubernetes mode against a stand-in API server listing this many pods.
    Kube {
        #[arg(long, default_value_t = 5_000)]
        pods: u32,
    },
    /// 64-byte UDP through a veth pair, without and with flowmap.
    Throughput {
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Json,
    Dot,
    Mermaid,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Auto,
    Tcx,
    Tc,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        /// What to write to stdout each interval (default: graph without an
        /// endpoint, none with one).
        #[arg(long, value_enum)]
        output: Option<OutputArg>,
        /// Flush and exit after this long (e.g. 30s, 5m).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Override the hook type (default: the config's attach_mode, else auto).
        #[arg(long, value_enum)]
        attach_mode: Option<ModeArg>,
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
        /// Address of the map page, its API, /metrics and /healthz
        /// (`10.0.0.5:9464`, `[fd00::5]:9464`, or `fd00::5:9464` as the
        /// DaemonSet writes `$(HOST_IP):9464`).
        #[arg(long, env = "FLOWMAP_LISTEN", default_value = "127.0.0.1:9464", value_parser = parse_listen)]
        listen: std::net::SocketAddr,
        /// Do not serve the map page, /metrics and /healthz.
        #[arg(long)]
        no_web: bool,
        /// Do not keep a local store.
        #[arg(long)]
        no_store: bool,
        /// How long the local store keeps intervals.
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        retention: Duration,
    },
    /// The busiest edges of the local store.
    Top {
        #[arg(long, value_parser = parse_duration, default_value = "15m")]
        since: Duration,
        #[arg(long, value_enum, default_value = "bytes")]
        by: flowmap::view::By,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, env = "FLOWMAP_STATE_DIR", default_value = "/var/lib/flowmap")]
        state_dir: PathBuf,
    },
    /// Export the graph of the local store.
    Graph {
        #[arg(long, value_parser = parse_duration, default_value = "15m")]
        since: Duration,
        #[arg(long, value_enum, default_value = "json")]
        format: GraphFormat,
        #[arg(long, env = "FLOWMAP_STATE_DIR", default_value = "/var/lib/flowmap")]
        state_dir: PathBuf,
    },
    /// Validate the configuration and print what it resolves to.
    Check,
    /// The load harness: flows, attach, churn and throughput at node scale.
    BenchScale {
        #[command(subcommand)]
        what: ScaleWhat,
    },
    /// Measure the kernel program per packet with BPF_PROG_TEST_RUN.
    Bench {
        /// Packets per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        /// Measurements per case and program (the median is printed).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match config::parse_go_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be more than zero".into()),
        Err(e) => Err(format!("{s:?} is not a duration ({e}); like 30s, 5m")),
    }
}

/// Where the configuration comes from, as the user asked.
fn load_config(path: Option<&PathBuf>) -> Result<(Config, String), ExitCode> {
    let (path, explicit) = match path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.yaml"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((
                Config::builtin_default(),
                "built-in default (no config.yaml here)".into(),
            ));
        }
        Err(e) => {
            eprintln!("error: reading configuration {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    match config::parse(&text, &|n| std::env::var(n).ok()) {
        Ok(c) => Ok((c, path.display().to_string())),
        Err(errs) => {
            eprintln!("{}: invalid configuration", path.display());
            eprintln!("{errs}");
            Err(ExitCode::from(2))
        }
    }
}

fn check_endpoint(cfg: &Config, endpoint: Option<&str>) -> Result<(), ExitCode> {
    if endpoint.is_some_and(|e| !e.is_empty()) && cfg.api_key.is_none() {
        eprintln!("error: coordimap.api_key: required when an endpoint is configured (--endpoint / COORDIMAP_ENDPOINT)");
        return Err(ExitCode::from(2));
    }
    Ok(())
}

fn print_check(cfg: &Config, source: &str, endpoint: Option<&str>) {
    println!("configuration: {source}");
    println!(
        "api_key: {}",
        if cfg.api_key.is_some() {
            "set (hidden)"
        } else {
            "not set"
        }
    );
    println!(
        "endpoint: {}",
        endpoint
            .filter(|e| !e.is_empty())
            .unwrap_or("none (data stays local)")
    );
    if !cfg.skip_fields.is_empty() {
        println!("skip_fields: {}", cfg.skip_fields.join(", "));
    }
    if let Some(db) = &cfg.database {
        println!("database: {:?} (connection string hidden)", db.driver);
    }
    for f in &cfg.flows {
        println!("data source {:?} (flows)", f.id);
        let ifs = match &f.interfaces {
            Selection::All => "all".to_string(),
            Selection::Names(n) => n.join(","),
        };
        println!("  interface_name: {ifs}");
        println!(
            "  deployedAt: {}",
            match f.deployed_at {
                DeployedAt::Server => "server",
                DeployedAt::Kubernetes => "kubernetes",
            }
        );
        let maps: Vec<String> = f
            .external_mappings
            .iter()
            .map(|m| format!("{}@{}", m.key, m.value))
            .collect();
        println!(
            "  external_mappings: {}",
            if maps.is_empty() {
                "(none)".into()
            } else {
                maps.join(" ")
            }
        );
        println!("  crawl_interval: {}", format_duration(f.crawl_interval));
        println!("  max_flows: {}", f.max_flows);
        println!(
            "  attach_mode: {}",
            match f.attach_mode {
                AttachMode::Auto => "auto",
                AttachMode::Tcx => "tcx",
                AttachMode::Tc => "tc",
            }
        );
    }
    for o in &cfg.others {
        println!(
            "not run by flowmap: data source {:?} of type {:?}",
            o.id, o.kind
        );
    }
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
}

/// `top` and `graph`: opens the store the configuration names (or the
/// SQLite file of the state directory) and prints what `view` makes of the
/// window that ends now.
fn read_store(
    config: Option<&PathBuf>,
    state_dir: &std::path::Path,
    since: Duration,
    view: impl FnOnce(&mut Store, std::time::SystemTime) -> anyhow::Result<String>,
) -> ExitCode {
    let (cfg, _) = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let loc = Location::from_config(cfg.database.as_ref(), state_dir);
    let from = std::time::SystemTime::now()
        .checked_sub(since)
        .unwrap_or(std::time::UNIX_EPOCH);
    match Store::open(&loc).and_then(|mut s| view(&mut s, from)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: reading the store ({}): {e:#}", loc.describe());
            ExitCode::FAILURE
        }
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

fn main() -> ExitCode {
    // Few malloc arenas: the agent's threads are few and mostly idle, and
    // every arena keeps memory of its own.
    // SAFETY: mallopt with a valid parameter, before any thread starts.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let cli = Cli::parse();
    let filter = if cli.debug { "debug" } else { "info" };
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
    let endpoint = cli.endpoint.as_deref();
    match cli.cmd {
        Cmd::Check => {
            let (cfg, source) = match load_config(cli.config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(code) = check_endpoint(&cfg, endpoint) {
                return code;
            }
            print_check(&cfg, &source, endpoint);
            ExitCode::SUCCESS
        }
        Cmd::Run {
            output,
            duration,
            attach_mode,
            state_dir,
            spool_max_bytes,
            retry_max,
            shutdown_timeout,
            listen,
            no_web,
            no_store,
            retention,
        } => {
            let (cfg, source) = match load_config(cli.config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(code) = check_endpoint(&cfg, endpoint) {
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
            let output = output.unwrap_or(if has_endpoint || !no_store {
                OutputArg::None
            } else {
                OutputArg::Graph
            });
            let opts = RunOptions {
                output: match output {
                    OutputArg::Flows => Output::Flows,
                    OutputArg::Graph => Output::Graph,
                    OutputArg::None => Output::None,
                },
                endpoint: endpoint.map(str::to_string),
                store: (!no_store)
                    .then(|| Location::from_config(cfg.database.as_ref(), &state_dir)),
                retention,
                listen: (!no_web).then_some(listen),
                state_dir,
                spool_max_bytes,
                retry: flowmap::delivery::Retry {
                    max: retry_max,
                    ..Default::default()
                },
                shutdown_timeout,
                duration,
                attach_mode: attach_mode.map(|m| match m {
                    ModeArg::Auto => AttachMode::Auto,
                    ModeArg::Tcx => AttachMode::Tcx,
                    ModeArg::Tc => AttachMode::Tc,
                }),
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
        Cmd::Top {
            since,
            by,
            limit,
            state_dir,
        } => read_store(cli.config.as_ref(), &state_dir, since, |s, from| {
            let (edges, nodes) = flowmap::view::top(s, from, by, limit)?;
            Ok(flowmap::view::top_table(&edges, &nodes))
        }),
        Cmd::Graph {
            since,
            format,
            state_dir,
        } => read_store(cli.config.as_ref(), &state_dir, since, |s, from| {
            let v = flowmap::view::graph(s, from, &Default::default())?;
            Ok(match format {
                GraphFormat::Json => serde_json::to_string_pretty(&v)? + "\n",
                GraphFormat::Dot => flowmap::view::to_dot(&v),
                GraphFormat::Mermaid => flowmap::view::to_mermaid(&v),
            })
        }),
        Cmd::BenchScale { what } => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let r = match what {
                ScaleWhat::Flows {
                    udp,
                    tcp,
                    services,
                    rate,
                } => flowmap::scale::flows(udp, tcp, services, rate, &mut out),
                ScaleWhat::Pipeline { flows, services } => {
                    flowmap::scale::pipeline(flows, services, &mut out)
                }
                ScaleWhat::Attach { pairs } => flowmap::scale::attach(pairs, &mut out),
                ScaleWhat::Kube { pods } => flowmap::scale::kube(pods, &mut out),
                ScaleWhat::Churn { cycles } => flowmap::scale::churn(cycles, &mut out).map(|_| ()),
                ScaleWhat::Throughput { rounds, seconds } => {
                    flowmap::scale::throughput(rounds.max(1), seconds, &mut out)
                }
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Bench { repeat, rounds } => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            match flowmap::datapath::bench::run(repeat, rounds.max(1), &mut out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
