//! `flowmap-bench`: flowmap's benchmarks, outside the agent binary.
//! `datapath` measures the kernel program per packet with
//! BPF_PROG_TEST_RUN; `scale …` is the load harness at node scale. Each
//! prints stable, greppable lines: `bench datapath case=… program=…
//! ns_per_packet=…` and `bench scale <name> <metric>=<value>`.

use flowmap_bench::{datapath, drops, health, names, page, procs, realpath, scale, store};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flowmap-bench", version, about = "flowmap's benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure the kernel program per packet with BPF_PROG_TEST_RUN.
    Datapath {
        /// Packets per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        /// Measurements per case and program (the median is printed).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// The load harness: flows, pipeline, attach, churn, realpath, throughput, kube.
    Scale {
        #[command(subcommand)]
        what: ScaleWhat,
    },
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
        /// The agent's own interval instead (`Pipeline::interval`: fake
        /// drain, ingest, graph, fold, spool and SQLite store sinks).
        #[arg(long)]
        agent: bool,
    },
    /// Kubernetes mode against a stand-in API server listing this many pods.
    Kube {
        #[arg(long, default_value_t = 5_000)]
        pods: u32,
    },
    /// The kernel program's own cost per packet on real packets (kernel BPF
    /// statistics, next to an empty TCX program on the same hooks).
    Realpath {
        /// Seconds of traffic per UDP and bulk TCP case.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Connections of the tcp_short case.
        #[arg(long, default_value_t = 3_000)]
        short: u32,
        /// Only the kernel program in this process; not also the agent.
        #[arg(long)]
        kernel_only: bool,
        /// A/B: object files of variants of bpf/flows.bpf.c, attached all
        /// at once next to the empty program, for `--rounds` rounds.
        #[arg(long = "object")]
        objects: Vec<std::path::PathBuf>,
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// The kernel-drops tracepoint program's cost per event while nftables
    /// drops this many UDP datagrams (kernel BPF statistics).
    Drops {
        #[arg(long, default_value_t = 100_000)]
        packets: u32,
    },
    /// What name capture costs the TC program per packet: the program
    /// with capture on and off, the datapath frames through
    /// BPF_PROG_TEST_RUN, interleaved.
    Names {
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        #[arg(long, default_value_t = 9)]
        rounds: usize,
    },
    /// The process-attribution programs' cost per connection (kernel BPF
    /// statistics) while this many loopback TCP connections open.
    Procs {
        #[arg(long, default_value_t = 10_000)]
        connections: u32,
    },
    /// A fleet of agents writing into one PostgreSQL on this machine (real
    /// write path, synthetic rows, compressed time), then the cluster map
    /// read over 15 min, 1 h and 24 h.
    Store {
        #[arg(long, default_value_t = 100)]
        agents: u32,
        #[arg(long, default_value_t = 1000)]
        edges: u32,
        /// Intervals of every agent (2880 of 30 s: one day).
        #[arg(long, default_value_t = 120)]
        intervals: u32,
        #[arg(long, default_value_t = 30)]
        interval_seconds: u64,
        /// Database connections writing.
        #[arg(long, default_value_t = 4)]
        writers: u32,
        /// Reads per window.
        #[arg(long, default_value_t = 20)]
        queries: u32,
    },
    /// The map page in headless Chromium over a store of a synthetic
    /// cluster: milliseconds until it is usable (drawn and answering a search).
    Page {
        #[arg(long, default_value_t = 5_000)]
        endpoints: u32,
        #[arg(long, default_value_t = 20_000)]
        edges: u32,
        /// Page loads measured (the median is printed, and the slowest).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// The socket tracepoint programs' cost per event (retransmits, SYN/ACK
    /// retransmits, RTT sampling) at steady state (kernel BPF statistics).
    Health {
        /// Seconds of each bulk transfer (tcp_loss, tcp_bulk).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Connects whose SYN/ACKs are dropped (synack_lost).
        #[arg(long, default_value_t = 1_000)]
        attempts: u32,
        /// Short connections (tcp_short).
        #[arg(long, default_value_t = 2_000)]
        short: u32,
    },
    /// 64-byte UDP through a veth pair, without and with flowmap.
    Throughput {
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let r = match cli.cmd {
        Cmd::Datapath { repeat, rounds } => datapath::run(repeat, rounds.max(1), &mut out),
        Cmd::Scale { what } => match what {
            ScaleWhat::Flows {
                udp,
                tcp,
                services,
                rate,
            } => scale::flows(udp, tcp, services, rate, &mut out),
            ScaleWhat::Pipeline {
                flows,
                services,
                agent: false,
            } => scale::pipeline(flows, services, &mut out),
            ScaleWhat::Pipeline {
                flows,
                services,
                agent: true,
            } => scale::pipeline_agent(flows, services, &mut out),
            ScaleWhat::Attach { pairs } => scale::attach(pairs, &mut out),
            ScaleWhat::Kube { pods } => scale::kube(pods, &mut out),
            ScaleWhat::Churn { cycles } => scale::churn(cycles, &mut out).map(|_| ()),
            ScaleWhat::Realpath {
                seconds,
                short,
                kernel_only,
                objects,
                rounds,
            } => {
                if objects.is_empty() {
                    realpath::realpath(seconds, short, kernel_only, &mut out)
                } else {
                    realpath::compare(&objects, rounds.max(1), seconds, short, &mut out)
                }
            }
            ScaleWhat::Drops { packets } => drops::drops(packets, &mut out),
            ScaleWhat::Names { repeat, rounds } => names::names(repeat, rounds.max(1), &mut out),
            ScaleWhat::Procs { connections } => procs::procs(connections, &mut out),
            ScaleWhat::Store {
                agents,
                edges,
                intervals,
                interval_seconds,
                writers,
                queries,
            } => store::store(
                agents,
                edges,
                intervals,
                std::time::Duration::from_secs(interval_seconds.max(1)),
                writers,
                queries,
                &mut out,
            ),
            ScaleWhat::Page {
                endpoints,
                edges,
                rounds,
            } => page::page(endpoints, edges, rounds, &mut out),
            ScaleWhat::Health {
                seconds,
                attempts,
                short,
            } => health::health(seconds, attempts, short, &mut out),
            ScaleWhat::Throughput { rounds, seconds } => {
                scale::throughput(rounds.max(1), seconds, &mut out)
            }
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
