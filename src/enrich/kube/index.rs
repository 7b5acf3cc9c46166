//! What the agent knows of the cluster: pods by IP over time, the owners
//! of ReplicaSets and Jobs, Services by ClusterIP and Nodes by address.
//! Filled from the watch caches; read once per interval to resolve the
//! interval's flows. Only the few fields resolution needs are kept, so
//! memory follows the number of objects, not their size.
//!
//! A pod IP is held by one pod at a time, but pods come and go: each IP
//! keeps the list of the pods that held it, with when they did. A flow is
//! resolved at its own time, so traffic of a deleted pod stays with that
//! pod, and traffic after the IP was reused goes to the new one. Deleted
//! pods are forgotten `grace` after they went.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Serialize;

/// A pod's workload: the top of its owner chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Deployment, ReplicaSet, StatefulSet, DaemonSet, CronJob, Job, Pod,
    /// or the kind of any other controller.
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: Option<String>,
    /// The controller owner reference: (kind, name).
    pub owner: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMeta {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone)]
struct Occupant {
    pod: Arc<PodMeta>,
    from: SystemTime,
    until: Option<SystemTime>,
}

impl Occupant {
    /// How far `at` lies outside the time this pod held the IP.
    fn distance(&self, at: SystemTime) -> Duration {
        if at < self.from {
            return self.from.duration_since(at).unwrap_or_default();
        }
        match self.until {
            Some(u) if at >= u => at.duration_since(u).unwrap_or_default(),
            _ => Duration::ZERO,
        }
    }
}

/// What an address is in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Pod(Arc<PodMeta>),
    Service(Arc<ServiceMeta>),
    Node(Arc<str>),
}

/// Which of the watched kinds an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    ReplicaSet,
    Job,
    Service,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Pod,
        Kind::ReplicaSet,
        Kind::Job,
        Kind::Service,
        Kind::Node,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::ReplicaSet => "replicasets",
            Kind::Job => "jobs",
            Kind::Service => "services",
            Kind::Node => "nodes",
        }
    }
}

/// An object's key: `namespace/name`, or the name of a cluster-scoped one.
fn key_of(m: &ObjectMeta) -> Option<String> {
    let name = m.name.as_deref()?;
    Some(match &m.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    })
}

/// Objects that own addresses (Services by ClusterIP, Nodes), by key and
/// by address.
#[derive(Debug)]
struct IpIndex<V: ?Sized> {
    by_key: HashMap<String, (Arc<V>, Vec<IpAddr>)>,
    by_ip: HashMap<IpAddr, Arc<V>>,
}

impl<V: ?Sized> Default for IpIndex<V> {
    fn default() -> Self {
        IpIndex {
            by_key: HashMap::new(),
            by_ip: HashMap::new(),
        }
    }
}

impl<V: ?Sized> IpIndex<V> {
    fn set(&mut self, key: String, v: Arc<V>, ips: Vec<IpAddr>) {
        self.remove(&key);
        for ip in &ips {
            self.by_ip.insert(*ip, v.clone());
        }
        self.by_key.insert(key, (v, ips));
    }

    fn remove(&mut self, key: &str) {
        if let Some((v, ips)) = self.by_key.remove(key) {
            for ip in ips {
                // Another object may have taken the address since.
                if self.by_ip.get(&ip).is_some_and(|m| Arc::ptr_eq(m, &v)) {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    /// Keeps only the objects a (re)list named.
    fn keep_listed(&mut self, seen: &HashSet<String>) {
        let gone: Vec<String> = self
            .by_key
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }
}

#[derive(Debug)]
pub struct Cluster {
    /// Current pods by UID, with the IPs each holds now.
    pods: HashMap<String, (Arc<PodMeta>, Vec<IpAddr>)>,
    by_ip: HashMap<IpAddr, Vec<Occupant>>,
    /// Controllers of ReplicaSets and Jobs, by `namespace/name`.
    rs_owner: HashMap<String, Option<(String, String)>>,
    job_owner: HashMap<String, Option<(String, String)>>,
    services: IpIndex<ServiceMeta>,
    nodes: IpIndex<str>,
    /// How long a deleted pod stays resolvable for flows of its time.
    pub grace: Duration,
    /// At most this many IP records of deleted pods are kept, however
    /// fast pods churn; beyond it the oldest go before their grace ends.
    pub max_deleted: usize,
    /// Pods on the host network, by the IDs of their containers (issue
    /// 14: their traffic is this node's address, their sockets are theirs).
    by_container: HashMap<String, Arc<PodMeta>>,
    /// Kinds whose first full list has been applied.
    synced: HashSet<Kind>,
    /// Keys seen since the current (re)list began, per kind.
    relist: HashMap<Kind, HashSet<String>>,
}

fn controller(refs: &Option<Vec<OwnerReference>>) -> Option<(String, String)> {
    let refs = refs.as_ref()?;
    refs.iter()
        .find(|r| r.controller == Some(true))
        .or_else(|| refs.first())
        .map(|r| (r.kind.clone(), r.name.clone()))
}

/// The IDs of a pod's running containers, from
/// `status.containerStatuses[].containerID` (`containerd://<id>`,
/// `cri-o://<id>`, `docker://<id>`), lower case.
fn container_ids(pod: &Pod) -> Vec<String> {
    let Some(st) = pod.status.as_ref() else {
        return Vec::new();
    };
    st.container_statuses
        .iter()
        .flatten()
        .chain(st.init_container_statuses.iter().flatten())
        .filter_map(|c| c.container_id.as_deref())
        .filter_map(|id| id.rsplit_once("://").map(|(_, h)| h.to_ascii_lowercase()))
        .filter(|h| !h.is_empty())
        .collect()
}

fn parse_ips<'a>(it: impl Iterator<Item = &'a str>) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = it.filter_map(|s| s.trim().parse().ok()).collect();
    v.sort();
    v.dedup();
    v
}

impl Cluster {
    pub fn new(grace: Duration) -> Cluster {
        Cluster {
            pods: HashMap::new(),
            by_ip: HashMap::new(),
            rs_owner: HashMap::new(),
            job_owner: HashMap::new(),
            services: IpIndex::default(),
            nodes: IpIndex::default(),
            by_container: HashMap::new(),
            grace,
            max_deleted: DEFAULT_MAX_DELETED,
            synced: HashSet::new(),
            relist: HashMap::new(),
        }
    }

    pub fn is_synced(&self, k: Kind) -> bool {
        self.synced.contains(&k)
    }

    pub fn all_synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.synced.contains(k))
    }

    /// Object counts: current pods, pod IP records (current and deleted
    /// within grace), ReplicaSets, Jobs, Services, Nodes.
    pub fn counts(&self) -> [(&'static str, usize); 6] {
        [
            ("pods", self.pods.len()),
            ("pod_ip_records", self.by_ip.values().map(Vec::len).sum()),
            ("replicasets", self.rs_owner.len()),
            ("jobs", self.job_owner.len()),
            ("services", self.services.by_key.len()),
            ("nodes", self.nodes.by_key.len()),
        ]
    }

    // ---- list/watch bookkeeping ------------------------------------

    /// A (re)list of `k` begins: objects it does not list again are gone.
    pub fn begin_list(&mut self, k: Kind) {
        self.relist.insert(k, HashSet::new());
    }

    fn listed(&mut self, k: Kind, key: String) {
        if let Some(s) = self.relist.get_mut(&k) {
            s.insert(key);
        }
    }

    /// The (re)list of `k` is complete: whatever it did not name was
    /// deleted while the agent was not watching.
    pub fn end_list(&mut self, k: Kind, now: SystemTime) {
        let seen = self.relist.remove(&k).unwrap_or_default();
        match k {
            Kind::Pod => {
                let gone: Vec<String> = self
                    .pods
                    .keys()
                    .filter(|u| !seen.contains(*u))
                    .cloned()
                    .collect();
                for uid in gone {
                    self.remove_pod_uid(&uid, now);
                }
            }
            Kind::ReplicaSet => self.rs_owner.retain(|k, _| seen.contains(k)),
            Kind::Job => self.job_owner.retain(|k, _| seen.contains(k)),
            Kind::Service => self.services.keep_listed(&seen),
            Kind::Node => self.nodes.keep_listed(&seen),
        }
        self.synced.insert(k);
    }

    // ---- pods ---------------------------------------------------------

    /// A pod was added or changed, observed at `now`. Its IPs are those
    /// of `status.podIPs` while it runs; a pod on the host network, or one
    /// that has finished, holds no pod IP of its own.
    pub fn apply_pod(&mut self, pod: &Pod, now: SystemTime) {
        let m = &pod.metadata;
        let Some(uid) = m.uid.clone() else { return };
        let (Some(namespace), Some(name)) = (m.namespace.clone(), m.name.clone()) else {
            return;
        };
        self.listed(Kind::Pod, uid.clone());
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        );
        let ips = if host_network || finished {
            Vec::new()
        } else {
            let from_list = status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|v| parse_ips(v.iter().map(|p| p.ip.as_str())))
                .unwrap_or_default();
            if from_list.is_empty() {
                parse_ips(status.and_then(|s| s.pod_ip.as_deref()).into_iter())
            } else {
                from_list
            }
        };
        let meta = PodMeta {
            namespace,
            name,
            uid: uid.clone(),
            node: spec.and_then(|s| s.node_name.clone()),
            owner: controller(&m.owner_references),
        };
        // The first list: these pods held their IPs before the agent
        // looked, as far as anyone here can tell.
        let from = if self.is_synced(Kind::Pod) {
            now
        } else {
            SystemTime::UNIX_EPOCH
        };
        let (meta, old_ips) = match self.pods.remove(&uid) {
            Some((old, old_ips)) if *old == meta => (old, old_ips),
            Some((_, old_ips)) => (Arc::new(meta), old_ips),
            None => (Arc::new(meta), Vec::new()),
        };
        for ip in old_ips.iter().filter(|ip| !ips.contains(ip)) {
            self.close(*ip, &uid, now);
        }
        for ip in &ips {
            let occ = self.by_ip.entry(*ip).or_default();
            match occ
                .iter_mut()
                .find(|o| o.pod.uid == uid && o.until.is_none())
            {
                // Same pod, same IP: keep when it began, take new metadata.
                Some(o) => o.pod = meta.clone(),
                None => {
                    // A new holder: whoever held it before has let it go.
                    for o in occ.iter_mut().filter(|o| o.until.is_none()) {
                        o.until = Some(now);
                    }
                    occ.push(Occupant {
                        pod: meta.clone(),
                        from,
                        until: None,
                    });
                }
            }
        }
        self.by_container.retain(|_, p| p.uid != uid);
        if host_network && !finished {
            for id in container_ids(pod) {
                self.by_container.insert(id, meta.clone());
            }
        }
        self.pods.insert(uid, (meta, ips));
    }

    /// The pod on the host network that runs container `id` (64 hex
    /// digits), issue 14.
    pub fn host_network_pod(&self, id: &str) -> Option<Arc<PodMeta>> {
        self.by_container.get(id).cloned()
    }

    pub fn delete_pod(&mut self, pod: &Pod, now: SystemTime) {
        if let Some(uid) = &pod.metadata.uid {
            self.remove_pod_uid(uid, now);
        }
    }

    fn remove_pod_uid(&mut self, uid: &str, now: SystemTime) {
        if let Some((_, ips)) = self.pods.remove(uid) {
            self.by_container.retain(|_, p| p.uid != uid);
            for ip in ips {
                self.close(ip, uid, now);
            }
        }
    }

    fn close(&mut self, ip: IpAddr, uid: &str, now: SystemTime) {
        if let Some(occ) = self.by_ip.get_mut(&ip) {
            for o in occ
                .iter_mut()
                .filter(|o| o.pod.uid == uid && o.until.is_none())
            {
                o.until = Some(now);
            }
        }
    }

    /// Forgets pods that left more than `grace` ago, and the oldest
    /// deleted ones beyond `max_deleted`.
    pub fn prune(&mut self, now: SystemTime) {
        let grace = self.grace;
        let mut ends: Vec<SystemTime> = Vec::new();
        self.by_ip.retain(|_, occ| {
            occ.retain(|o| match o.until {
                Some(u) => now.duration_since(u).map(|d| d <= grace).unwrap_or(true),
                None => true,
            });
            ends.extend(occ.iter().filter_map(|o| o.until));
            !occ.is_empty()
        });
        if ends.len() > self.max_deleted {
            // Keep the newest max_deleted: drop those that ended before
            // the cut (and, on a tie at the cut, keep them all).
            let drop_n = ends.len() - self.max_deleted;
            let (_, cut, _) = ends.select_nth_unstable(drop_n);
            let cut = *cut;
            self.by_ip.retain(|_, occ| {
                occ.retain(|o| o.until.is_none_or(|u| u >= cut));
                !occ.is_empty()
            });
        }
    }

    // ---- owners -------------------------------------------------------

    pub fn apply_replicaset(&mut self, rs: &ReplicaSet) {
        if let Some(k) = key_of(&rs.metadata) {
            self.listed(Kind::ReplicaSet, k.clone());
            self.rs_owner
                .insert(k, controller(&rs.metadata.owner_references));
        }
    }

    pub fn delete_replicaset(&mut self, rs: &ReplicaSet) {
        if let Some(k) = key_of(&rs.metadata) {
            self.rs_owner.remove(&k);
        }
    }

    pub fn apply_job(&mut self, job: &Job) {
        if let Some(k) = key_of(&job.metadata) {
            self.listed(Kind::Job, k.clone());
            self.job_owner
                .insert(k, controller(&job.metadata.owner_references));
        }
    }

    pub fn delete_job(&mut self, job: &Job) {
        if let Some(k) = key_of(&job.metadata) {
            self.job_owner.remove(&k);
        }
    }

    /// The workload of a pod: ReplicaSet→Deployment, Job→CronJob,
    /// StatefulSet, DaemonSet, another controller, or the bare pod.
    pub fn workload(&self, pod: &PodMeta) -> Workload {
        let Some((kind, name)) = &pod.owner else {
            return Workload {
                kind: "Pod".into(),
                name: pod.name.clone(),
            };
        };
        let parent = match kind.as_str() {
            "ReplicaSet" => self.rs_owner.get(&format!("{}/{name}", pod.namespace)),
            "Job" => self.job_owner.get(&format!("{}/{name}", pod.namespace)),
            _ => None,
        };
        match parent {
            Some(Some((pk, pn)))
                if (kind == "ReplicaSet" && pk == "Deployment")
                    || (kind == "Job" && pk == "CronJob") =>
            {
                Workload {
                    kind: pk.clone(),
                    name: pn.clone(),
                }
            }
            _ => Workload {
                kind: kind.clone(),
                name: name.clone(),
            },
        }
    }

    // ---- services and nodes -------------------------------------------

    /// A Service's ClusterIPs (`spec.clusterIPs`, or `spec.clusterIP`);
    /// a headless service has none.
    pub fn apply_service(&mut self, svc: &Service) {
        let m = &svc.metadata;
        let (Some(key), Some(namespace), Some(name)) =
            (key_of(m), m.namespace.clone(), m.name.clone())
        else {
            return;
        };
        self.listed(Kind::Service, key.clone());
        let spec = svc.spec.as_ref();
        let mut ips = spec
            .and_then(|s| s.cluster_ips.as_ref())
            .map(|v| parse_ips(v.iter().map(String::as_str)))
            .unwrap_or_default();
        if ips.is_empty() {
            ips = parse_ips(spec.and_then(|s| s.cluster_ip.as_deref()).into_iter());
        }
        self.services
            .set(key, Arc::new(ServiceMeta { namespace, name }), ips);
    }

    pub fn delete_service(&mut self, svc: &Service) {
        if let Some(key) = key_of(&svc.metadata) {
            self.services.remove(&key);
        }
    }

    /// A Node's InternalIP and ExternalIP addresses.
    pub fn apply_node(&mut self, node: &Node) {
        let Some(name) = node.metadata.name.clone() else {
            return;
        };
        self.listed(Kind::Node, name.clone());
        let ips = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(|v| {
                parse_ips(
                    v.iter()
                        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                        .map(|a| a.address.as_str()),
                )
            })
            .unwrap_or_default();
        let n: Arc<str> = name.as_str().into();
        self.nodes.set(name, n, ips);
    }

    pub fn delete_node(&mut self, node: &Node) {
        if let Some(name) = &node.metadata.name {
            self.nodes.remove(name);
        }
    }

    // ---- resolution ---------------------------------------------------

    /// What `ip` was at time `at`: the pod that held it then (or, when
    /// `at` falls between holders, the one whose time is nearest: a watch
    /// event may arrive a moment after the pod's first packet), else a
    /// Service ClusterIP, else a node address.
    pub fn resolve(&self, ip: IpAddr, at: SystemTime) -> Option<Target> {
        if let Some(occ) = self.by_ip.get(&ip) {
            // Ties go to the later holder.
            if let Some(o) = occ.iter().rev().min_by_key(|o| o.distance(at)) {
                return Some(Target::Pod(o.pod.clone()));
            }
        }
        if let Some(s) = self.services.by_ip.get(&ip) {
            return Some(Target::Service(s.clone()));
        }
        self.nodes.by_ip.get(&ip).map(|n| Target::Node(n.clone()))
    }

    pub fn node_addresses(&self, name: &str) -> &[IpAddr] {
        self.nodes
            .by_key
            .get(name)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }
}

/// The internal ID the Kubernetes crawler gives an object:
/// `<cluster uid>-<namespace>-<type>-<name>` (namespace empty for nodes).
pub fn internal_id(cluster_uid: &str, namespace: &str, kind: &str, name: &str) -> String {
    format!("{cluster_uid}-{namespace}-{kind}-{name}")
}

/// Default cap on IP records of deleted pods (about 200 bytes each).
pub const DEFAULT_MAX_DELETED: usize = 50_000;

pub const POD_TYPE: &str = "kubernetes.pod";
pub const SERVICE_TYPE: &str = "kubernetes.service";
pub const NODE_TYPE: &str = "kubernetes.node";
