//! A stand-in Kubernetes API server for tests and benchmarks: no real API
//! server can be installed on the machines this project is built on.
//! It speaks the parts of the real protocol the watch caches use, over
//! plain HTTP on 127.0.0.1:
//! - list (`limit`/`continue` paging, `metadata.resourceVersion`),
//! - chunked watch streams of ADDED, MODIFIED, DELETED and BOOKMARK events
//!   from a resourceVersion (`timeoutSeconds`, `allowWatchBookmarks`),
//! - "410 Gone" (an ERROR event with an Expired Status on a watch, HTTP 410
//!   on a list continuation) once history is expired with [`StandIn::expire`],
//! - connections dropped mid-stream with [`StandIn::drop_connections`].
//!
//! Objects are served as `kubectl get -o json` prints them; the builders
//! below make such objects.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// The five kinds the agent watches, as (kind, apiVersion, path).
pub const KINDS: [(&str, &str, &str); 5] = [
    ("Pod", "v1", "/api/v1/pods"),
    ("ReplicaSet", "apps/v1", "/apis/apps/v1/replicasets"),
    ("Job", "batch/v1", "/apis/batch/v1/jobs"),
    ("Service", "v1", "/api/v1/services"),
    ("Node", "v1", "/api/v1/nodes"),
];

#[derive(Clone, Debug)]
struct Ev {
    rv: u64,
    kind: String,
    kind_type: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: HashMap<String, BTreeMap<String, Value>>,
    log: Vec<Ev>,
    /// Watches and continuations from a resourceVersion below this get 410.
    expired_below: u64,
    /// Bumped to cut every open watch.
    generation: u64,
    requests: Vec<String>,
    /// Interval between BOOKMARK events on watches that allow them.
    bookmark_every: Option<Duration>,
    /// The UID of the kube-system namespace (None: no such namespace).
    cluster_uid: Option<String>,
}

struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Ev>,
    cut: broadcast::Sender<u64>,
}

pub struct StandIn {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn key_of(obj: &Value) -> String {
    let m = &obj["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap_or("")),
        None => m["name"].as_str().unwrap_or("").to_string(),
    }
}

impl StandIn {
    /// Starts the server on 127.0.0.1 (a free port) in its own thread.
    pub fn start() -> Result<StandIn> {
        let (events, _) = broadcast::channel(65536);
        let (cut, _) = broadcast::channel(16);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 1000,
                bookmark_every: Some(Duration::from_millis(500)),
                ..Default::default()
            }),
            events,
            cut,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("binding the stand-in API server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let st = shared.clone();
        let thread = std::thread::Builder::new()
            .name("standin-api".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(_) => return,
                };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let app = Router::new().fallback(handle).with_state(st);
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })?;
        Ok(StandIn {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds or replaces an object (ADDED or MODIFIED); returns its new
    /// resourceVersion.
    pub fn upsert(&self, mut obj: Value) -> u64 {
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = obj["kind"].as_str().unwrap_or("").to_string();
        let key = key_of(&obj);
        let old = s
            .objects
            .entry(kind.clone())
            .or_default()
            .insert(key, obj.clone());
        let ev = Ev {
            rv,
            kind,
            kind_type: if old.is_some() { "MODIFIED" } else { "ADDED" },
            object: obj,
        };
        s.log.push(ev.clone());
        let _ = self.shared.events.send(ev);
        rv
    }

    /// Deletes an object (DELETED, carrying its last state).
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let mut s = self.lock();
        let key = match namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        };
        let Some(mut obj) = s.objects.get_mut(kind).and_then(|m| m.remove(&key)) else {
            return false;
        };
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = Ev {
            rv,
            kind: kind.to_string(),
            kind_type: "DELETED",
            object: obj,
        };
        s.log.push(ev.clone());
        let _ = self.shared.events.send(ev);
        true
    }

    /// Deletes an object without any event, as if the DELETED event had
    /// been compacted away while nobody watched. Only a relist shows it.
    pub fn delete_unseen(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let mut s = self.lock();
        let key = match namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        };
        s.rv += 1;
        s.objects
            .get_mut(kind)
            .and_then(|m| m.remove(&key))
            .is_some()
    }

    /// Forgets all history: every watch or list continuation from a
    /// resourceVersion before now gets "410 Gone".
    pub fn expire(&self) {
        let mut s = self.lock();
        s.rv += 1;
        s.expired_below = s.rv;
        s.log.clear();
    }

    /// Cuts every open watch connection mid-stream.
    pub fn drop_connections(&self) {
        let mut s = self.lock();
        s.generation += 1;
        let _ = self.shared.cut.send(s.generation);
    }

    /// Expires history and cuts the watches: the clients' next watch from
    /// their last resourceVersion gets 410 and they must list again.
    pub fn expire_and_drop(&self) {
        self.expire();
        self.drop_connections();
    }

    /// Serves the kube-system namespace with this UID.
    pub fn set_cluster_uid(&self, uid: &str) {
        self.lock().cluster_uid = Some(uid.to_string());
    }

    pub fn set_bookmark_every(&self, every: Option<Duration>) {
        self.lock().bookmark_every = every;
    }

    /// Every request so far, as `<path>?<query>`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// A kubeconfig that points kube clients at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n\
             current-context: standin\nusers:\n- name: standin\n  user:\n    token: standin-token\n",
            self.addr
        )
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.drop_connections();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn reply(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

async fn handle(
    State(st): State<Arc<Shared>>,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let path = uri.path().to_string();
    st.inner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .requests
        .push(format!("{path}?{}", uri.query().unwrap_or("")));
    if path == "/api/v1/namespaces/kube-system" {
        let uid = st
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cluster_uid
            .clone();
        return match uid {
            Some(uid) => reply(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": "kube-system", "uid": uid, "resourceVersion": "1", "creationTimestamp": CREATED},
                        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
            ),
            None => reply(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", "namespaces \"kube-system\" not found"),
            ),
        };
    }
    let Some((kind, api_version, _)) = KINDS.iter().find(|(_, _, p)| *p == path) else {
        return reply(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            ),
        );
    };
    let watch = matches!(q.get("watch").map(String::as_str), Some("true") | Some("1"));
    if watch {
        return watch_stream(st, kind, api_version, &q);
    }
    let mut s = st.inner.lock().unwrap_or_else(|p| p.into_inner());
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let (list_rv, offset) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let Some((rv, off)) = c
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<usize>().ok()?)))
            else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    &status(400, "BadRequest", "invalid continue token"),
                );
            };
            if rv < s.expired_below {
                return reply(
                    StatusCode::GONE,
                    &status(410, "Expired", "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."),
                );
            }
            (rv, off)
        }
        None => (s.rv, 0),
    };
    let all = s.objects.entry(kind.to_string()).or_default();
    let items: Vec<Value> = all.values().skip(offset).take(limit).cloned().collect();
    let more = all.len().saturating_sub(offset + items.len());
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if more > 0 {
        meta["continue"] = json!(format!("{list_rv}-{}", offset + items.len()));
        meta["remainingItemCount"] = json!(more);
    }
    let body = json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": meta, "items": items});
    drop(s);
    reply(StatusCode::OK, &body)
}

fn line(kind_type: &str, object: &Value) -> Result<Bytes, std::io::Error> {
    let mut v = json!({"type": kind_type, "object": object}).to_string();
    v.push('\n');
    Ok(v.into())
}

fn watch_stream(
    st: Arc<Shared>,
    kind: &'static str,
    api_version: &'static str,
    q: &HashMap<String, String>,
) -> Response {
    let from: Option<u64> = q
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    // Subscribe before reading history: nothing falls between the two.
    let mut live = st.events.subscribe();
    let mut cut = st.cut.subscribe();
    let (backlog, gone, bookmark_every) = {
        let s = st.inner.lock().unwrap_or_else(|p| p.into_inner());
        match from {
            Some(rv) if rv < s.expired_below => (Vec::new(), Some(rv), None),
            Some(rv) => (
                s.log
                    .iter()
                    .filter(|e| e.kind == kind && e.rv > rv)
                    .map(|e| (e.kind_type, e.object.clone()))
                    .collect::<Vec<_>>(),
                None,
                s.bookmark_every,
            ),
            // No resourceVersion: the current state as ADDED events.
            None => (
                s.objects
                    .get(kind)
                    .map(|m| m.values().map(|o| ("ADDED", o.clone())).collect())
                    .unwrap_or_default(),
                None,
                s.bookmark_every,
            ),
        }
    };
    let last_sent = backlog
        .iter()
        .filter_map(|(_, o)| {
            o["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|r| r.parse::<u64>().ok())
        })
        .max()
        .or(from)
        .unwrap_or(0);
    let stream = async_stream(
        move |tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>| async move {
            if let Some(rv) = gone {
                let _ = tx
                    .send(line(
                        "ERROR",
                        &status(410, "Expired", &format!("too old resource version: {rv}")),
                    ))
                    .await;
                return;
            }
            let mut last = last_sent;
            for (t, o) in backlog {
                if tx.send(line(t, &o)).await.is_err() {
                    return;
                }
            }
            let end = tokio::time::sleep(timeout);
            tokio::pin!(end);
            let every = bookmark_every
                .filter(|_| bookmarks)
                .unwrap_or(Duration::from_secs(3600));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = &mut end => return,
                    _ = cut.recv() => {
                        let _ = tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "stand-in dropped the connection"))).await;
                        return;
                    }
                    _ = tick.tick() => {
                        // Events get their version and enter the channel
                        // under the lock: once the version is read, every
                        // event up to it is queued. Send those first, so
                        // the bookmark never claims one not yet delivered.
                        let rv = st.inner.lock().unwrap_or_else(|p| p.into_inner()).rv;
                        loop {
                            match live.try_recv() {
                                Ok(e) if e.kind == kind && e.rv > last => {
                                    last = e.rv;
                                    if tx.send(line(e.kind_type, &e.object)).await.is_err() { return; }
                                }
                                Ok(_) => {}
                                Err(broadcast::error::TryRecvError::Empty) => break,
                                Err(_) => {
                                    let _ = tx.send(Err(std::io::Error::other("watcher too slow"))).await;
                                    return;
                                }
                            }
                        }
                        let bm = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.max(last).to_string()}});
                        if tx.send(line("BOOKMARK", &bm)).await.is_err() { return; }
                    }
                    ev = live.recv() => match ev {
                        Ok(e) if e.kind == kind && e.rv > last => {
                            last = e.rv;
                            if tx.send(line(e.kind_type, &e.object)).await.is_err() { return; }
                        }
                        Ok(_) => {}
                        // A watcher that falls this far behind is cut, as a
                        // real server would.
                        Err(_) => {
                            let _ = tx.send(Err(std::io::Error::other("watcher too slow"))).await;
                            return;
                        }
                    }
                }
            }
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(stream)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A body fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    Body::from_stream(tokio_stream_rx(rx))
}

fn tokio_stream_rx<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

// ---- objects as `kubectl get -o json` prints them ------------------------

/// A deterministic UID for a name.
pub fn uid(seed: &str) -> String {
    let h = flowmap::sinks::coordimap::hex_sha256(seed.as_bytes());
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

const CREATED: &str = "2026-11-24T10:00:00Z";

fn owner_refs(owner: Option<(&str, &str)>, api_version: &str) -> Value {
    match owner {
        Some((kind, name)) => json!([{"apiVersion": api_version, "kind": kind, "name": name,
            "uid": uid(&format!("{kind}/{name}")), "controller": true, "blockOwnerDeletion": true}]),
        None => json!([]),
    }
}

/// A running pod with one container. `owner` is its controller, e.g.
/// `("ReplicaSet", "web-7d4b9c")`. `seed` makes its UID (a pod recreated
/// under the same name gets a new one).
pub fn pod(
    namespace: &str,
    name: &str,
    seed: &str,
    ip: &str,
    node: &str,
    owner: Option<(&str, &str)>,
) -> Value {
    let api = match owner.map(|o| o.0) {
        Some("Job") | Some("CronJob") => "batch/v1",
        _ => "apps/v1",
    };
    let mut p = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "creationTimestamp": CREATED,
            "generateName": format!("{name}-"),
            "labels": {"app": name},
            "name": name,
            "namespace": namespace,
            "resourceVersion": "1",
            "uid": uid(&format!("pod/{namespace}/{name}/{seed}"))
        },
        "spec": {
            "containers": [{
                "image": "registry.example/app:1.0",
                "imagePullPolicy": "IfNotPresent",
                "name": "app",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File"
            }],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": true,
            "nodeName": node,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccount": "default",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30
        },
        "status": {
            "conditions": [
                {"lastProbeTime": null, "lastTransitionTime": CREATED, "status": "True", "type": "Initialized"},
                {"lastProbeTime": null, "lastTransitionTime": CREATED, "status": "True", "type": "Ready"},
                {"lastProbeTime": null, "lastTransitionTime": CREATED, "status": "True", "type": "ContainersReady"},
                {"lastProbeTime": null, "lastTransitionTime": CREATED, "status": "True", "type": "PodScheduled"}
            ],
            "containerStatuses": [{
                "containerID": "containerd://0a1b2c3d",
                "image": "registry.example/app:1.0",
                "imageID": "registry.example/app@sha256:00",
                "lastState": {},
                "name": "app",
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": CREATED}}
            }],
            "hostIP": "192.0.2.1",
            "hostIPs": [{"ip": "192.0.2.1"}],
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "qosClass": "BestEffort",
            "startTime": CREATED
        }
    });
    if owner.is_some() {
        p["metadata"]["ownerReferences"] = owner_refs(owner, api);
    }
    p
}

/// A ReplicaSet, owned by a Deployment when `deployment` is given.
pub fn replicaset(namespace: &str, name: &str, deployment: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"creationTimestamp": CREATED, "name": name, "namespace": namespace,
                     "resourceVersion": "1", "uid": uid(&format!("ReplicaSet/{name}")), "generation": 1},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": "registry.example/app:1.0"}]}}},
        "status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "fullyLabeledReplicas": 1, "observedGeneration": 1}
    });
    if let Some(d) = deployment {
        v["metadata"]["ownerReferences"] = owner_refs(Some(("Deployment", d)), "apps/v1");
    }
    v
}

/// A Job, owned by a CronJob when `cronjob` is given.
pub fn job(namespace: &str, name: &str, cronjob: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"creationTimestamp": CREATED, "name": name, "namespace": namespace,
                     "resourceVersion": "1", "uid": uid(&format!("Job/{name}")), "generation": 1},
        "spec": {"backoffLimit": 6, "completions": 1, "parallelism": 1,
                 "template": {"metadata": {}, "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "job", "image": "registry.example/job:1.0"}]}}},
        "status": {"active": 1, "startTime": CREATED}
    });
    if let Some(c) = cronjob {
        v["metadata"]["ownerReferences"] = owner_refs(Some(("CronJob", c)), "batch/v1");
    }
    v
}

/// A ClusterIP Service on `port`, forwarding to `target_port`.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    port: u16,
    target_port: u16,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"creationTimestamp": CREATED, "name": name, "namespace": namespace,
                     "resourceVersion": "1", "uid": uid(&format!("Service/{namespace}/{name}"))},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "internalTrafficPolicy": "Cluster",
                 "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": target_port}],
                 "selector": {"app": name}, "sessionAffinity": "None", "type": "ClusterIP"},
        "status": {"loadBalancer": {}}
    })
}

/// A Node with one InternalIP.
pub fn node(name: &str, internal_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"creationTimestamp": CREATED, "name": name, "resourceVersion": "1",
                     "uid": uid(&format!("Node/{name}")),
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {
            "addresses": [{"address": internal_ip, "type": "InternalIP"}, {"address": name, "type": "Hostname"}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": CREATED, "lastTransitionTime": CREATED, "message": "kubelet is posting ready status"}],
            "nodeInfo": {"architecture": "amd64", "kernelVersion": "6.1.0", "kubeletVersion": "v1.33.0",
                         "operatingSystem": "linux", "osImage": "Debian GNU/Linux 12 (bookworm)",
                         "containerRuntimeVersion": "containerd://1.7.0", "kubeProxyVersion": "v1.33.0",
                         "machineID": "0", "systemUUID": "0", "bootID": "0"}
        }
    })
}
