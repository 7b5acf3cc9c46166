//! Processes, units and containers of local sockets (issue 14), through
//! the agent binary and real namespaces. This host runs the agent, and
//! servers and clients started from copies of perl under distinct names,
//! each in a cgroup of its own: a plain one, one named like a systemd unit
//! (`…/orders.service`) and ones named like containerd containers
//! (cgroupfs and systemd drivers). A peer namespace behind a veth talks to
//! them. The flow records and the batches the agent ships must
//! name exactly those processes, units and container IDs; a connection
//! opened before the agent started is attributed through sock_diag and
//! /proc.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use flowmap_testkit::agent::Agent;
use flowmap_testkit::collector;
use flowmap_testkit::net::{privileged_serial, Netns};
use flowmap_testkit::tempdir::TempDir;
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

const CTR_A: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
const CTR_B: &str = "fedcba98765432100123456789abcdeffedcba98765432100123456789abcdef";

/// Test cgroups under the cgroup v2 hierarchy, removed on drop (their
/// processes are killed first).
struct Cgroups {
    base: PathBuf,
}

impl Cgroups {
    fn new() -> Cgroups {
        let mount =
            flowmap::enrich::process::cgroup2_mount().expect("a cgroup v2 hierarchy is mounted");
        let name = format!("flowmap-test-{}", std::process::id());
        let base = mount.join(&name);
        std::fs::create_dir_all(&base).unwrap();
        Cgroups { base }
    }

    /// Creates `sub` (a relative path) and returns its directory.
    fn make(&self, sub: &str) -> PathBuf {
        let d = self.base.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // Deepest first; a cgroup with a process left is killed empty.
        let mut dirs = Vec::new();
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        walk(&e.path(), out);
                    }
                }
            }
            out.push(d.to_path_buf());
        }
        walk(&self.base, &mut dirs);
        for d in &dirs {
            if let Ok(pids) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for p in pids.lines().filter_map(|l| l.parse::<i32>().ok()) {
                    // SAFETY: kill(2) on a pid read from our own test cgroup.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

/// A process of this host started in cgroup `cg` from `exe` (a copy of
/// perl) running `script` with `args`; killed on drop.
struct Proc {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    stdin: Option<ChildStdin>,
}

impl Proc {
    fn start(cg: &Path, exe: &Path, script: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(cg)
            .arg(exe)
            .args(["-MIO::Socket::INET", "-e", script])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        Proc { child, out, stdin }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line the process prints.
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    /// Waits until it exits; its stdout rest.
    fn wait(mut self) -> String {
        drop(self.stdin.take());
        let mut rest = String::new();
        let _ = self.out.read_to_string(&mut rest);
        let _ = self.child.wait();
        rest
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Listens on `port`, says `ready`, and reads every accepted connection to
/// its end.
const SERVER: &str = r#"$| = 1;
my $l = IO::Socket::INET->new(LocalPort => $ARGV[0], Listen => 8, ReuseAddr => 1) or die "listen: $!";
print "ready\n";
while (my $c = $l->accept) { my $b; while (sysread($c, $b, 4096)) {} close $c; }"#;

/// Connects to `addr` `port`, says `connected`; with a third argument waits
/// for a line on stdin first; then sends 100 bytes, closes and (with a
/// fourth) stays a while, so it can still be read in /proc.
const CLIENT: &str = r#"$| = 1;
my $s = IO::Socket::INET->new(PeerAddr => $ARGV[0], PeerPort => $ARGV[1]) or die "connect: $!";
print "connected\n";
if ($ARGV[2]) { my $go = <STDIN>; }
syswrite($s, "x" x 100); close $s;
sleep($ARGV[3]) if $ARGV[3];"#;

/// Copies perl to `dir/name`: a distinct executable, so a distinct comm.
fn perl_as(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy("/usr/bin/perl", &p).unwrap();
    p
}

/// Connections opened on the edge `src` → `dst`, by port, over every batch.
fn opened(els: &[(String, String, String, Value)], src: &str, dst: &str) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for (id, _, _, p) in els {
        if *id != format!("{src}.{dst}") || p["relation_type"] != 104 {
            continue;
        }
        for f in p["flows"].as_array().unwrap() {
            *out.entry(f["port"].as_u64().unwrap()).or_default() +=
                f["connections_opened"].as_u64().unwrap();
        }
    }
    out
}

#[test]
fn processes_units_and_containers_name_both_ends() {
    let Some(_g) = privileged_serial("processes_units_and_containers_name_both_ends", &SERIAL)
    else {
        return;
    };
    let peer = Netns::builder().no_v6().build().unwrap();
    let (node_ip, peer_ip) = (peer.host_v4.as_str(), peer.peer_v4.as_str());
    let bins = TempDir::new("procs-bins");
    let cg = Cgroups::new();
    let plain = cg.make("plain");
    let unit = cg.make("orders.service");
    let ctr = cg.make(&format!("kubepods/besteffort/pod0c1d/{CTR_A}"));
    let billing = cg.make("billing.service");
    let ctr_b = cg.make(&format!(
        "kubepods.slice/kubepods-besteffort.slice/cri-containerd-{CTR_B}.scope"
    ));
    let old = cg.make("old");

    // The peer's servers, one port per client of the node.
    let (tx, rx) = std::sync::mpsc::channel();
    let peer_srv = peer.spawn_in(move || {
        let ls: Vec<TcpListener> = (7201..=7203)
            .map(|p| TcpListener::bind(("0.0.0.0", p)).unwrap())
            .collect();
        tx.send(()).unwrap();
        for l in ls {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();

    // Opened before the agent starts: only sock_diag and /proc know it.
    let old_exe = perl_as(bins.path(), "fm-old-cli");
    let mut old_cli = Proc::start(&old, &old_exe, CLIENT, &[peer_ip, "7203", "wait", "2"]);
    assert_eq!(old_cli.line(), "connected");

    let col = collector::Server::start();
    let agent = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        .id("procs")
        .iface(&peer.host)
        .interval("1s")
        .api_key("k")
        .args(&["--endpoint", &col.url(), "--retry-max", "1s"])
        .output("flows")
        .no_web()
        .start()
        .unwrap();

    // Servers of the node; the peer connects to each.
    let srv_exes = [
        perl_as(bins.path(), "fm-plain-srv"),
        perl_as(bins.path(), "fm-unit-srv"),
        perl_as(bins.path(), "fm-ctr-srv"),
    ];
    let mut servers = Vec::new();
    for ((exe, cgd), port) in srv_exes.iter().zip([&plain, &unit, &ctr]).zip(7101..) {
        let mut s = Proc::start(cgd, exe, SERVER, &[&port.to_string()]);
        assert_eq!(s.line(), "ready");
        servers.push(s);
    }
    let to = node_ip.to_string();
    peer.run_in(move || {
        for port in 7101..=7103u16 {
            let mut s = std::net::TcpStream::connect((to.as_str(), port)).unwrap();
            s.write_all(&[7u8; 100]).unwrap();
        }
    })
    .unwrap();

    // Clients of the node: one in a unit that stays a while (read in
    // /proc), one in a container that exits at once (its cgroup found by
    // the kernel's cgroup id), and the old one.
    let cli_exe = perl_as(bins.path(), "fm-unit-cli");
    let mut unit_cli = Proc::start(&billing, &cli_exe, CLIENT, &[peer_ip, "7201", "", "2"]);
    assert_eq!(unit_cli.line(), "connected");
    let ctr_exe = perl_as(bins.path(), "fm-ctr-cli");
    let mut ctr_cli = Proc::start(&ctr_b, &ctr_exe, CLIENT, &[peer_ip, "7202"]);
    assert_eq!(ctr_cli.line(), "connected");
    let pids = (
        servers.iter().map(Proc::pid).collect::<Vec<_>>(),
        unit_cli.pid(),
        ctr_cli.pid(),
        old_cli.pid(),
    );
    writeln!(old_cli.stdin.as_mut().unwrap(), "go").unwrap();
    ctr_cli.wait();
    unit_cli.wait();
    old_cli.wait();
    peer_srv.join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (out, err) = agent.stop().unwrap();
    drop(servers);
    let recs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // Flow records: the local end's process, exactly.
    let one = |src: &str, dst: &str, port: u64| -> &Value {
        let rs: Vec<&Value> = recs
            .iter()
            .filter(|r| r["src_ip"] == src && r["dst_ip"] == dst && r["dst_port"] == port)
            .collect();
        assert!(!rs.is_empty(), "no record {src} -> {dst}:{port}:\n{err}");
        for r in &rs[1..] {
            assert_eq!(
                (&r["src_process"], &r["dst_process"]),
                (&rs[0]["src_process"], &rs[0]["dst_process"]),
                "{r}"
            );
        }
        rs[0]
    };
    let (srv, unit_pid, ctr_pid, old_pid) = pids;
    let want_dst = [
        json!({"pid": srv[0], "comm": "fm-plain-srv"}),
        json!({"pid": srv[1], "comm": "fm-unit-srv", "unit": "orders.service"}),
        json!({"pid": srv[2], "comm": "fm-ctr-srv", "container_id": CTR_A}),
    ];
    for (port, want) in (7101..).zip(&want_dst) {
        let r = one(peer_ip, node_ip, port);
        assert_eq!(r["dst_process"], *want, "{r}");
        assert!(r.get("src_process").is_none(), "{r}");
    }
    let want_src = [
        (
            7201,
            json!({"pid": unit_pid, "comm": "fm-unit-cli", "unit": "billing.service"}),
        ),
        (
            7202,
            json!({"pid": ctr_pid, "comm": "fm-ctr-cli", "container_id": CTR_B}),
        ),
        (7203, json!({"pid": old_pid, "comm": "fm-old-cli"})),
    ];
    for (port, want) in &want_src {
        let r = one(node_ip, peer_ip, *port);
        assert_eq!(r["src_process"], *want, "{r}");
        assert!(r.get("dst_process").is_none(), "{r}");
    }

    // The graph: process endpoints, children of the host, on the edges.
    let els = col.elements();
    let hostname = flowmap::enrich::host::hostname();
    let host = format!("procs-flows.host-{hostname}");
    let ext = format!("procs-flows.external-{peer_ip}");
    let pid_of = |p: &Value| p["pid"].as_u64().unwrap();
    let proc_id = |name: &str| format!("procs-flows.process-{hostname}-{name}");
    let exe = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    let endpoints = [
        (
            "fm-plain-srv",
            json!({"comm": "fm-plain-srv", "exe": exe(&srv_exes[0]), "pids": [pid_of(&want_dst[0])]}),
            7101,
        ),
        (
            "orders.service",
            json!({"comm": "fm-unit-srv", "exe": exe(&srv_exes[1]), "pids": [pid_of(&want_dst[1])], "unit": "orders.service"}),
            7102,
        ),
        (
            &CTR_A[..12],
            json!({"comm": "fm-ctr-srv", "exe": exe(&srv_exes[2]), "pids": [pid_of(&want_dst[2])], "container_id": CTR_A}),
            7103,
        ),
    ];
    for (name, fields, port) in &endpoints {
        let id = proc_id(name);
        let mut want = json!({
            "id": id, "kind": "process", "name": name,
            "addresses": [node_ip], "hostname": hostname,
        });
        want.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let got: Vec<&Value> = els.iter().filter(|e| e.0 == id).map(|e| &e.3).collect();
        assert!(!got.is_empty(), "no endpoint {id}");
        for (i, kind, n, _) in els.iter().filter(|e| e.0 == id) {
            assert_eq!((kind.as_str(), n.as_str()), ("flows.process", *name), "{i}");
        }
        for p in got {
            assert_eq!(*p, want);
        }
        assert_eq!(opened(&els, &ext, &id), BTreeMap::from([(*port, 1)]));
        // Contained in the host.
        let rel = format!("{host}.{id}");
        let rels: Vec<&Value> = els.iter().filter(|e| e.0 == rel).map(|e| &e.3).collect();
        assert!(!rels.is_empty(), "no relationship {rel}");
        for p in rels {
            assert_eq!(
                *p,
                json!({"source_id": host, "destination_id": id,
                       "relationship_type": "coordimap.relationship_skipinsert", "relation_type": 3})
            );
        }
    }
    // The clients, by unit, container and command name.
    for (name, port) in [
        ("billing.service", 7201),
        (&CTR_B[..12], 7202),
        ("fm-old-cli", 7203),
    ] {
        assert_eq!(
            opened(&els, &proc_id(name), &ext),
            BTreeMap::from([(port, 1)]),
            "{name}"
        );
    }
    // Every connection went to a process: none stayed on the host.
    assert!(
        opened(&els, &ext, &host).is_empty() && opened(&els, &host, &ext).is_empty(),
        "edges left on the host: {:?}",
        els.iter().map(|e| &e.0).collect::<Vec<_>>()
    );
}

// ---- Without the kernel: the graph of known processes ----------------

use flowmap::enrich::host::HostView;
use flowmap::enrich::process::Process;
use flowmap::flow::FlowRecord;
use flowmap::graph::Graph;
use flowmap_testkit::records::{at, record};
use std::sync::Arc;

fn process(pid: u32, comm: &str, unit: Option<&str>, ctr: Option<&str>) -> Arc<Process> {
    Arc::new(Process {
        pid,
        comm: comm.into(),
        exe: Some(format!("/usr/bin/{comm}").into()),
        unit: unit.map(Into::into),
        container_id: ctr.map(Into::into),
    })
}

fn rec(src: (&str, u16), dst: (&str, u16)) -> FlowRecord {
    FlowRecord {
        opened: true,
        ..record("tcp", src, dst, 1, (3, 300), (2, 200))
    }
}

#[test]
fn processes_of_one_host_talk_to_each_other_and_belong_to_it() {
    let h = HostView {
        hostname: "node-a".into(),
        addrs: vec!["10.0.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        ..Default::default()
    };
    let r = flowmap::enrich::server::ServerResolver {
        data_source_id: "ds",
        host: &h,
    };
    let app = process(100, "app", Some("app.service"), None);
    let app2 = process(101, "app", Some("app.service"), None);
    let pg = process(200, "postgres", Some("postgresql.service"), None);
    let ctr = process(300, "nginx", None, Some(CTR_A));
    let mut a = rec(("127.0.0.1", 40000), ("127.0.0.1", 5432));
    a.src_process = Some(app.clone());
    a.dst_process = Some(pg.clone());
    let mut b = rec(("127.0.0.1", 40001), ("127.0.0.1", 5432));
    b.src_process = Some(app2);
    b.dst_process = Some(pg.clone());
    // A client of this host whose process is not known: the host.
    let mut c = rec(("10.0.0.1", 40002), ("10.0.0.1", 5432));
    c.dst_process = Some(pg);
    // A remote client of the container's server.
    let mut d = rec(("198.51.100.7", 50000), ("10.0.0.1", 80));
    d.dst_process = Some(ctr);
    let g = Graph::build(&[a, b, c, d], &r);
    let host = "ds-flows.host-node-a";
    let (papp, ppg, pctr) = (
        "ds-flows.process-node-a-app.service",
        "ds-flows.process-node-a-postgresql.service",
        format!("ds-flows.process-node-a-{}", &CTR_A[..12]),
    );
    let edges: Vec<(&str, &str, u16, u64)> = g
        .edges
        .iter()
        .map(|(k, s)| (&*k.client, &*k.server, k.port, s.connections_opened))
        .collect();
    assert_eq!(
        edges,
        vec![
            ("ds-flows.external-198.51.100.7", pctr.as_str(), 80, 1),
            (host, ppg, 5432, 1),
            (papp, ppg, 5432, 2),
        ]
    );
    assert_eq!(
        g.children
            .iter()
            .map(|(p, c)| (&**p, &**c))
            .collect::<Vec<_>>(),
        vec![(host, pctr.as_str()), (host, papp), (host, ppg)]
    );
    let ep = serde_json::to_value(&g.endpoints[papp]).unwrap();
    assert_eq!(
        ep,
        json!({"id": papp, "kind": "process", "name": "app.service",
               "addresses": ["127.0.0.1"], "hostname": "node-a", "unit": "app.service",
               "comm": "app", "exe": "/usr/bin/app", "pids": [100, 101]})
    );

    // On the wire: the containment relationships, type 3.
    let mut src = flowmap::config::FlowsSource::default_server();
    src.id = "ds".into();
    let hep = r.host_endpoint();
    let batch = flowmap::sinks::coordimap::encode(&g, &[hep], &src, &[], at(0), at(30)).unwrap();
    let rels: Vec<(String, Value)> = batch
        .cloud_crawl_data
        .crawled_data
        .data
        .iter()
        .filter_map(|e| {
            let p: Value = serde_json::from_slice(&e.payload()?).ok()?;
            (p["relation_type"] == 3).then(|| (e.id.clone(), p))
        })
        .collect();
    let want: Vec<(String, Value)> = [pctr.as_str(), papp, ppg]
        .iter()
        .map(|c| {
            (
                format!("{host}.{c}"),
                json!({"source_id": host, "destination_id": c,
                       "relationship_type": "coordimap.relationship_skipinsert",
                       "relation_type": 3}),
            )
        })
        .collect();
    assert_eq!(rels, want);
}

#[test]
fn a_host_network_pods_sockets_go_to_the_pod() {
    use flowmap::enrich::kube::index::{Cluster, Kind};
    use flowmap::enrich::kube::KubeResolver;
    use flowmap_testkit::standin;
    let mut c = Cluster::new(Duration::from_secs(120));
    for k in Kind::ALL {
        c.begin_list(k);
        c.end_list(k, at(0));
    }
    c.apply_node(&serde_json::from_value(standin::node("node-a", "192.0.2.1")).unwrap());
    let mut hn = standin::pod(
        "monitoring",
        "node-exporter-x",
        "1",
        "192.0.2.1",
        "node-a",
        Some(("DaemonSet", "node-exporter")),
    );
    hn["spec"]["hostNetwork"] = json!(true);
    hn["status"]["containerStatuses"] = json!([{
        "name": "exporter", "image": "exporter:1", "imageID": "", "ready": true,
        "restartCount": 0, "containerID": format!("containerd://{CTR_A}"),
    }]);
    c.apply_pod(&serde_json::from_value(hn.clone()).unwrap(), at(1));
    let h = HostView {
        hostname: "node-a".into(),
        addrs: vec!["192.0.2.1".parse().unwrap()],
        ..Default::default()
    };
    const UID: &str = "5f0c4d2a-8e1b-4c3d-9a7f-2b6e1d0c9f84";
    let r = KubeResolver {
        cluster: &c,
        cluster_uid: UID,
        data_source_id: "k8s",
        node: "node-a",
        host: &h,
    };
    // The pod's container serves; another process of the node (not in a
    // pod) and an unknown one stay the node.
    let mut a = rec(("198.51.100.7", 50000), ("192.0.2.1", 9100));
    a.dst_process = Some(process(10, "node_exporter", None, Some(CTR_A)));
    let mut b = rec(("192.0.2.1", 40000), ("198.51.100.7", 443));
    b.src_process = Some(process(11, "kubelet", Some("kubelet.service"), None));
    let d = rec(("198.51.100.7", 50001), ("192.0.2.1", 22));
    let g = Graph::build(&[a, b, d], &r);
    let pod = format!("{UID}-monitoring-kubernetes.pod-node-exporter-x");
    let node = format!("{UID}--kubernetes.node-node-a");
    let ext = "k8s-flows.external-198.51.100.7";
    let edges: Vec<(String, String, u16)> = g
        .edges
        .keys()
        .map(|k| (k.client.to_string(), k.server.to_string(), k.port))
        .collect();
    assert_eq!(
        edges,
        vec![
            (node.clone(), ext.to_string(), 443),
            (ext.to_string(), node.clone(), 22),
            (ext.to_string(), pod.clone(), 9100),
        ]
    );
    assert_eq!(
        g.endpoints[pod.as_str()].workload.as_deref(),
        Some("DaemonSet/node-exporter")
    );
    assert!(g.children.is_empty());
    // Deleted: its containers are no longer its.
    c.delete_pod(&serde_json::from_value(hn).unwrap(), at(2));
    assert!(c.host_network_pod(CTR_A).is_none());
}

/// Kubernetes mode through the binary: a hostNetwork pod's process (in the
/// cgroup of its containerd container, on the node's network) connects to
/// a pod; the edge starts at that pod, found by the container ID of its
/// `status.containerStatuses`. A process of the node outside any pod stays
/// the node.
#[test]
fn a_host_network_pods_connection_starts_at_the_pod_through_the_binary() {
    use flowmap_testkit::net::Link;
    use flowmap_testkit::standin::{self, StandIn};
    let Some(_g) = privileged_serial(
        "a_host_network_pods_connection_starts_at_the_pod_through_the_binary",
        &SERIAL,
    ) else {
        return;
    };
    const UID: &str = "0d9e4c2b-7a61-4f3e-8c5d-1b2a3c4d5e6f";
    let net = format!("10.213.{}", 200 + std::process::id() % 20);
    let (node_ip, web_ip) = (format!("{net}.1"), format!("{net}.11"));
    let br = Link::bridge(&format!("{node_ip}/24")).unwrap();
    let web = Netns::builder()
        .pod()
        .bridge(&br)
        .v4("", &web_ip, 24)
        .no_v6()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let web_srv = web.spawn_in(move || {
        let l = TcpListener::bind(("0.0.0.0", 7301)).unwrap();
        tx.send(()).unwrap();
        for _ in 0..2 {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let api = StandIn::start().unwrap();
    api.set_cluster_uid(UID);
    api.upsert(standin::node("node-hn", &node_ip));
    api.upsert(standin::pod("shop", "web", "1", &web_ip, "node-hn", None));
    let mut hn = standin::pod(
        "monitoring",
        "exporter",
        "1",
        &node_ip,
        "node-hn",
        Some(("DaemonSet", "exporter")),
    );
    hn["spec"]["hostNetwork"] = json!(true);
    hn["status"]["containerStatuses"][0]["containerID"] = json!(format!("containerd://{CTR_B}"));
    api.upsert(hn);

    let col = collector::Server::start();
    let state = TempDir::new("procs-kube");
    let b = Agent::builder(env!("CARGO_BIN_EXE_flowmap"))
        .id("procs")
        .iface("all")
        .interval("1s")
        .api_key("k")
        .option("deployedAt", "kubernetes")
        .option("external_mappings", format!("\"*@{UID}\""))
        .args(&["--endpoint", &col.url(), "--retry-max", "1s"])
        .state_dir(state.path())
        .output("none")
        .no_web()
        .env("NODE_NAME", "node-hn");
    let kubeconfig = b.file("kubeconfig", &api.kubeconfig());
    let agent = b
        .env("KUBECONFIG", kubeconfig.to_str().unwrap())
        .start()
        .unwrap();
    assert!(agent.stderr().contains("Kubernetes watch caches in sync"));

    let bins = TempDir::new("procs-bins");
    let cg = Cgroups::new();
    let ctr = cg.make(&format!(
        "kubepods.slice/kubepods-besteffort.slice/cri-containerd-{CTR_B}.scope"
    ));
    let node_cg = cg.make("node-agent.service");
    let mut pod_cli = Proc::start(
        &ctr,
        &perl_as(bins.path(), "fm-hn-cli"),
        CLIENT,
        &[&web_ip, "7301"],
    );
    assert_eq!(pod_cli.line(), "connected");
    pod_cli.wait();
    let mut node_cli = Proc::start(
        &node_cg,
        &perl_as(bins.path(), "fm-node-cli"),
        CLIENT,
        &[&web_ip, "7301"],
    );
    assert_eq!(node_cli.line(), "connected");
    node_cli.wait();
    web_srv.join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (_, err) = agent.stop().unwrap();

    let els = col.elements();
    let pod = |ns: &str, name: &str| format!("{UID}-{ns}-kubernetes.pod-{name}");
    let node = format!("{UID}--kubernetes.node-node-hn");
    let web_pod = pod("shop", "web");
    let edges: BTreeMap<String, BTreeMap<u64, u64>> = els
        .iter()
        .filter(|e| e.0.ends_with(&format!(".{web_pod}")))
        .map(|e| {
            let src = e.0.trim_end_matches(&format!(".{web_pod}")).to_string();
            let o = opened(&els, &src, &web_pod);
            (src, o)
        })
        .filter(|(_, o)| !o.is_empty())
        .collect();
    assert_eq!(
        edges,
        BTreeMap::from([
            (pod("monitoring", "exporter"), BTreeMap::from([(7301, 1)])),
            (node, BTreeMap::from([(7301, 1)])),
        ]),
        "{err}"
    );
    drop(web);
}
