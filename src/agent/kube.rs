//! Kubernetes mode at start: the node's name, the cluster UID of each
//! kubernetes data source, the API client and the watch caches, in sync
//! before anything is attached.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

use crate::config::{Config, DeployedAt, FlowsSource};
use crate::enrich::host::HostView;
use crate::enrich::kube::{index, watch};
use crate::serve::metrics::Metrics;

/// What the pipeline needs of Kubernetes mode: the watch caches, this
/// node's name and the cluster UID of each kubernetes data source.
pub struct KubeView {
    pub cluster: watch::Shared,
    pub node: String,
    pub uids: HashMap<String, String>,
}

impl KubeView {
    /// Once per interval: forget what is past its grace, publish sizes.
    pub fn refresh(&self, now: SystemTime, metrics: &Metrics) {
        let mut c = watch::write(&self.cluster);
        c.prune(now);
        watch::publish(&c, metrics);
        if !c.all_synced() {
            warn!("the Kubernetes watch caches are not in sync yet; addresses they do not know yet resolve as external");
        }
    }
}

/// How long the agent waits for the first full list of every watched kind
/// before it attaches anyway.
pub const KUBE_SYNC_WAIT: Duration = Duration::from_secs(30);

/// The node this agent runs on: `NODE_NAME` (the DaemonSet sets it from
/// `spec.nodeName`), else the host name.
pub fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| HostView::read().hostname)
}

/// The cluster UID of each kubernetes data source, for this node.
fn cluster_uids(sources: &[&FlowsSource], node: &str) -> Result<HashMap<String, String>> {
    let mut uids = HashMap::new();
    for src in sources {
        let uid = src.cluster_uid(node).with_context(|| {
            format!(
                "data source {:?}: no external_mappings key matches this node {node:?}; add \"*@<cluster UID>\" or \"{node}@<cluster UID>\"",
                src.id
            )
        })?;
        uids.insert(src.id.clone(), uid.to_string());
    }
    Ok(uids)
}

/// Starts Kubernetes mode when a data source asks for it: the view for the
/// pipeline and the watch tasks (aborted at exit).
pub async fn start(
    cfg: &Config,
    interval: Duration,
    metrics: &Arc<Metrics>,
) -> Result<Option<(KubeView, Vec<tokio::task::JoinHandle<()>>)>> {
    let kube_sources: Vec<&FlowsSource> = cfg
        .flows
        .iter()
        .filter(|f| f.deployed_at == DeployedAt::Kubernetes)
        .collect();
    if kube_sources.is_empty() {
        return Ok(None);
    }
    let node = node_name();
    let uids = cluster_uids(&kube_sources, &node)?;
    let client = watch::client().await?;
    // A wrong UID would file every edge under objects the Kubernetes
    // crawler never made: say so (it may be a deliberate scope_id).
    if let Some(actual) = watch::cluster_uid(&client).await {
        for (id, uid) in uids.iter().filter(|(_, uid)| **uid != actual) {
            warn!(data_source = %id, configured = %uid, cluster = %actual,
                "external_mappings names a cluster UID that differs from this cluster's (the kube-system namespace UID); flow edges will not attach to the Kubernetes crawler's objects unless its scope_id is the configured value");
        }
    }
    let cluster = Arc::new(std::sync::RwLock::new(index::Cluster::new(
        interval * 2 + Duration::from_secs(60),
    )));
    let tasks = watch::start(client, cluster.clone(), metrics.clone());
    if watch::wait_synced(&cluster, KUBE_SYNC_WAIT).await {
        let c = watch::read(&cluster);
        watch::publish(&c, metrics);
        info!(node = %node, counts = ?c.counts(), "Kubernetes watch caches in sync");
    } else {
        warn!(wait = ?KUBE_SYNC_WAIT, "the Kubernetes watch caches are not in sync yet; attaching anyway, they keep trying");
    }
    Ok(Some((
        KubeView {
            cluster,
            node,
            uids,
        },
        tasks,
    )))
}
