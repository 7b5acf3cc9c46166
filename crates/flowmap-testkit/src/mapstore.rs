//! A synthetic Kubernetes cluster's intervals written into a real store
//! through the agent's own write path: pods in namespaces and workloads
//! (Deployments through their ReplicaSets) in flowmap's watch cache, flow
//! records between their addresses resolved by the Kubernetes resolver,
//! the graph built and judged (status) as the pipeline does, and
//! `Store::write`. The map page's browser tests and `flowmap-bench scale
//! page` fill their stores with it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use flowmap::enrich::host::HostView;
use flowmap::enrich::kube::index::{internal_id, Cluster, Kind};
use flowmap::enrich::kube::KubeResolver;
use flowmap::flow::{Counters, Failure, FlowRecord};
use flowmap::graph::Graph;
use flowmap::sinks::store::Store;

use crate::records::between;
use crate::standin;

pub const CLUSTER_UID: &str = "7c1e2f0a-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
pub const DATA_SOURCE: &str = "cluster";

/// A pod of the synthetic cluster.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub namespace: String,
    /// `Deployment/<name>`.
    pub workload: String,
    pub name: String,
    pub ip: IpAddr,
    /// Its element ID (the Kubernetes crawler's internal ID).
    pub id: String,
}

/// The cluster: namespaces, Deployments and their pods on one node.
pub struct SynthCluster {
    cluster: Cluster,
    host: HostView,
    pub node: String,
    pub node_ip: IpAddr,
    pub pods: Vec<PodInfo>,
}

/// One connection of an interval: client pod (or any address) → server
/// address and port, packets and bytes each way, and how it failed.
#[derive(Debug, Clone)]
pub struct Conn {
    pub client: IpAddr,
    pub server: IpAddr,
    pub protocol: &'static str,
    pub port: u16,
    pub c2s: (u64, u64),
    pub s2c: (u64, u64),
    pub failure: Option<Failure>,
}

impl Conn {
    pub fn tcp(
        client: IpAddr,
        server: IpAddr,
        port: u16,
        c2s: (u64, u64),
        s2c: (u64, u64),
    ) -> Conn {
        Conn {
            client,
            server,
            protocol: "tcp",
            port,
            c2s,
            s2c,
            failure: None,
        }
    }
}

impl SynthCluster {
    /// `workloads`: (namespace, Deployment, pods). Pods are
    /// `<deployment>-<i>`, addressed 10.<n/65536>.<n/256%256>.<n%256> + 10.0.0.0
    /// in order, on node `node-a` (192.0.2.1); known from `since`.
    pub fn new(workloads: &[(&str, &str, usize)], since: SystemTime) -> Result<SynthCluster> {
        let mut cluster = Cluster::new(Duration::from_secs(120));
        for k in Kind::ALL {
            cluster.begin_list(k);
            cluster.end_list(k, since);
        }
        let node = "node-a".to_string();
        let node_ip: IpAddr = "192.0.2.1".parse().unwrap();
        cluster.apply_node(
            &serde_json::from_value(standin::node(&node, &node_ip.to_string()))
                .context("a node")?,
        );
        let mut pods = Vec::new();
        for (ns, deploy, n) in workloads {
            let rs = format!("{deploy}-5d8f7c");
            cluster.apply_replicaset(
                &serde_json::from_value(standin::replicaset(ns, &rs, Some(deploy)))
                    .context("a ReplicaSet")?,
            );
            for i in 0..*n {
                let k = pods.len() as u32 + 10;
                let ip = IpAddr::from([10, (k >> 16) as u8, (k >> 8) as u8, k as u8]);
                let name = format!("{deploy}-{i}");
                let p = standin::pod(
                    ns,
                    &name,
                    "1",
                    &ip.to_string(),
                    &node,
                    Some(("ReplicaSet", &rs)),
                );
                cluster.apply_pod(&serde_json::from_value(p).context("a pod")?, since);
                pods.push(PodInfo {
                    namespace: ns.to_string(),
                    workload: format!("Deployment/{deploy}"),
                    id: internal_id(CLUSTER_UID, ns, "kubernetes.pod", &name),
                    name,
                    ip,
                });
            }
        }
        let host = HostView {
            hostname: node.clone(),
            addrs: vec![node_ip],
            ..Default::default()
        };
        Ok(SynthCluster {
            cluster,
            host,
            node,
            node_ip,
            pods,
        })
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> &PodInfo {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .unwrap_or_else(|| panic!("no pod {namespace}/{name}"))
    }

    /// The node's element ID.
    pub fn node_id(&self) -> String {
        internal_id(CLUSTER_UID, "", "kubernetes.node", &self.node)
    }

    /// Writes one interval [start, end) of `conns` into `store` as the
    /// agent does: resolve, build, judge the status, store.
    pub fn write(
        &self,
        store: &mut Store,
        start: SystemTime,
        end: SystemTime,
        conns: &[Conn],
    ) -> Result<()> {
        let resolver = KubeResolver {
            cluster: &self.cluster,
            cluster_uid: CLUSTER_UID,
            data_source_id: DATA_SOURCE,
            node: &self.node,
            host: &self.host,
        };
        let mid = start + (end.duration_since(start).unwrap_or_default() / 2);
        let records: Vec<FlowRecord> = conns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut r = between(
                    c.protocol,
                    (c.client, 30000 + (i % 30000) as u16),
                    (c.server, c.port),
                    mid,
                );
                r.src_to_dst = Counters {
                    packets: c.c2s.0,
                    bytes: c.c2s.1,
                };
                r.dst_to_src = Counters {
                    packets: c.s2c.0,
                    bytes: c.s2c.1,
                };
                r.opened = true;
                r.health.failure = c.failure;
                r
            })
            .collect();
        let mut g = Graph::build(&records, &resolver);
        flowmap::status::apply(&mut g, &Default::default());
        store.write(
            DATA_SOURCE,
            start,
            end,
            &g,
            &[resolver.node_endpoint(&self.node)],
        )?;
        Ok(())
    }
}

/// Sums of the connections of `conns` by a key of each (for exact
/// expected totals): (packets, bytes, connections).
pub fn totals<K: Ord>(
    conns: &[Conn],
    key: impl Fn(&Conn) -> Option<K>,
) -> BTreeMap<K, (u64, u64, u64)> {
    let mut m = BTreeMap::new();
    for c in conns {
        if let Some(k) = key(c) {
            let t: &mut (u64, u64, u64) = m.entry(k).or_default();
            t.0 += c.c2s.0 + c.s2c.0;
            t.1 += c.c2s.1 + c.s2c.1;
            t.2 += 1;
        }
    }
    m
}

/// `flowmap serve --database <db>` (no root, no datapath) on a free
/// loopback port, stopped on drop.
pub struct Served {
    child: std::process::Child,
    pub port: u16,
}

impl Served {
    /// Starts `bin serve` over the SQLite file `db` with `args` more, and
    /// waits until /healthz answers.
    pub fn start(
        bin: impl AsRef<std::path::Path>,
        db: &std::path::Path,
        args: &[&str],
    ) -> Result<Served> {
        let port = crate::net::free_port();
        let child = std::process::Command::new(bin.as_ref())
            .arg("serve")
            .arg("--database")
            .arg(db)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting flowmap serve")?;
        let mut s = Served { child, port };
        let end = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if crate::agent::http_get(port, "/healthz").is_ok_and(|(c, _)| c != 0) {
                return Ok(s);
            }
            if let Some(st) = s.child.try_wait()? {
                anyhow::bail!("flowmap serve exited: {st}");
            }
            if std::time::Instant::now() > end {
                anyhow::bail!("flowmap serve did not answer on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
