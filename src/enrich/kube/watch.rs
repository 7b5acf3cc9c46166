//! The watch caches: one list + watch per kind, resumed after a dropped
//! connection, listed again after "410 Gone", each event applied to the
//! shared [`Cluster`]. No API call is ever made per flow.

use std::fmt::Debug;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::index::{Cluster, Kind};
use crate::serve::metrics::{KindLabel, Metrics};

pub type Shared = Arc<RwLock<Cluster>>;

/// A client from the kubeconfig (`KUBECONFIG`, else `~/.kube/config`) or,
/// without one, the in-cluster service account. Neither: an error that
/// says so, before anything is attached.
pub async fn client() -> Result<Client> {
    let cfg = kube::Config::infer().await.map_err(|e| {
        anyhow::anyhow!(
            "deployedAt kubernetes: no Kubernetes API to talk to ({e}); run in a pod with a service account, \
             or set KUBECONFIG (or ~/.kube/config)"
        )
    })?;
    info!(api = %cfg.cluster_url, "Kubernetes API");
    Client::try_from(cfg).context("building the Kubernetes client")
}

pub fn write(c: &Shared) -> std::sync::RwLockWriteGuard<'_, Cluster> {
    // A panic while holding the lock would be a bug elsewhere; the data
    // is still consistent per object, so keep using it.
    c.write().unwrap_or_else(|p| p.into_inner())
}

pub fn read(c: &Shared) -> std::sync::RwLockReadGuard<'_, Cluster> {
    c.read().unwrap_or_else(|p| p.into_inner())
}

type Apply<K> = fn(&mut Cluster, &K, SystemTime);

/// What every watch cache shares.
struct Watch {
    client: Client,
    cluster: Shared,
    metrics: Arc<Metrics>,
}

impl Watch {
    fn spawn<K>(&self, kind: Kind, apply: Apply<K>, delete: Apply<K>) -> JoinHandle<()>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        tokio::spawn(watch_kind(
            self.client.clone(),
            self.cluster.clone(),
            kind,
            apply,
            delete,
            self.metrics.clone(),
        ))
    }
}

async fn watch_kind<K>(
    client: Client,
    cluster: Shared,
    kind: Kind,
    apply: Apply<K>,
    delete: Apply<K>,
    metrics: Arc<Metrics>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let api: Api<K> = Api::all(client);
    let cfg = watcher::Config::default().page_size(500);
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        let now = SystemTime::now();
        match ev {
            Ok(Event::Init) => {
                metrics.kube_relists.inc();
                write(&cluster).begin_list(kind);
            }
            Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) => apply(&mut write(&cluster), &o, now),
            Ok(Event::Delete(o)) => delete(&mut write(&cluster), &o, now),
            Ok(Event::InitDone) => {
                let mut c = write(&cluster);
                c.end_list(kind, now);
                let synced = c.all_synced();
                drop(c);
                info!(kind = kind.name(), "watch cache listed");
                if synced && !metrics.health.kube_synced.swap(true, Ordering::Relaxed) {
                    info!("every Kubernetes watch cache is in sync");
                }
            }
            Err(e) => {
                metrics.kube_watch_errors.inc();
                warn!(kind = kind.name(), error = %e, "Kubernetes watch failed; retrying with backoff");
            }
        }
    }
    debug!(kind = kind.name(), "watch stream ended");
}

/// Starts the five watch caches.
pub fn start(client: Client, cluster: Shared, metrics: Arc<Metrics>) -> Vec<JoinHandle<()>> {
    metrics.health.kube_enabled.store(true, Ordering::Relaxed);
    let w = Watch {
        client,
        cluster,
        metrics,
    };
    vec![
        w.spawn::<Pod>(Kind::Pod, Cluster::apply_pod, Cluster::delete_pod),
        w.spawn::<ReplicaSet>(
            Kind::ReplicaSet,
            |c, o, _| c.apply_replicaset(o),
            |c, o, _| c.delete_replicaset(o),
        ),
        w.spawn::<Job>(
            Kind::Job,
            |c, o, _| c.apply_job(o),
            |c, o, _| c.delete_job(o),
        ),
        w.spawn::<Service>(
            Kind::Service,
            |c, o, _| c.apply_service(o),
            |c, o, _| c.delete_service(o),
        ),
        w.spawn::<Node>(
            Kind::Node,
            |c, o, _| c.apply_node(o),
            |c, o, _| c.delete_node(o),
        ),
    ]
}

/// The cluster's UID as Coordimap's Kubernetes crawler takes it: the UID
/// of the kube-system namespace. None when it cannot be read (no such
/// namespace, or RBAC without `get` on it).
pub async fn cluster_uid(client: &Client) -> Option<String> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    match tokio::time::timeout(Duration::from_secs(5), api.get_opt("kube-system")).await {
        Ok(Ok(ns)) => ns.and_then(|n| n.metadata.uid),
        Ok(Err(e)) => {
            debug!(error = %e, "reading the kube-system namespace failed");
            None
        }
        Err(_) => {
            debug!("reading the kube-system namespace timed out");
            None
        }
    }
}

/// Waits until every cache has had its first list, at most `timeout`.
pub async fn wait_synced(cluster: &Shared, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if read(cluster).all_synced() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes the cache sizes as metrics.
pub fn publish(cluster: &Cluster, metrics: &Metrics) {
    for (name, n) in cluster.counts() {
        metrics
            .kube_objects
            .get_or_create(&KindLabel { kind: name.into() })
            .set(n as i64);
    }
}
