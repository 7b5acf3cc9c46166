//! Kubernetes mode without the network: owner chains, pod IP reuse over
//! time, ClusterIP and node resolution, relists, the cluster UID mapping
//! and the exact internal IDs on the wire.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use base64::Engine;
use flowmap::config::parse;
use flowmap::enrich::host::HostView;
use flowmap::enrich::kube::index::{Cluster, Kind, Target};
use flowmap::enrich::kube::KubeResolver;
use flowmap::flow::FlowRecord;
use flowmap::graph::{EdgeKey, Graph};
use flowmap::sinks::coordimap::encode;
use flowmap_testkit::records::{at, record};
use flowmap_testkit::standin;
use flowmap_testkit::tempdir::TempDir;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use serde_json::json;

const UID: &str = "5f0c4d2a-8e1b-4c3d-9a7f-2b6e1d0c9f84";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pod(ns: &str, name: &str, seed: &str, addr: &str, owner: Option<(&str, &str)>) -> Pod {
    serde_json::from_value(standin::pod(ns, name, seed, addr, "node-a", owner)).unwrap()
}

/// A cluster whose first list of every kind is done (at time 0).
fn synced() -> Cluster {
    let mut c = Cluster::new(Duration::from_secs(120));
    for k in Kind::ALL {
        c.begin_list(k);
        c.end_list(k, at(0));
    }
    c
}

/// What `addr` was at `t`: `namespace/name` of a pod, the Debug form of
/// another target, `-` for nothing.
fn pod_name(c: &Cluster, addr: &str, t: SystemTime) -> String {
    match c.resolve(ip(addr), t) {
        Some(Target::Pod(p)) => format!("{}/{}", p.namespace, p.name),
        Some(other) => format!("{other:?}"),
        None => "-".into(),
    }
}

#[test]
fn owner_chain_gives_the_workload() {
    let mut c = synced();
    let rs = |ns: &str, n: &str, d: Option<&str>| -> ReplicaSet {
        serde_json::from_value(standin::replicaset(ns, n, d)).unwrap()
    };
    let job = |ns: &str, n: &str, cj: Option<&str>| -> Job {
        serde_json::from_value(standin::job(ns, n, cj)).unwrap()
    };
    c.apply_replicaset(&rs("shop", "web-7d4b9c", Some("web")));
    c.apply_replicaset(&rs("shop", "orphan-rs", None));
    c.apply_job(&job("batch", "report-2911", Some("report")));
    c.apply_job(&job("batch", "oneoff", None));
    let cases = [
        (Some(("ReplicaSet", "web-7d4b9c")), "shop", "Deployment/web"),
        (
            Some(("ReplicaSet", "orphan-rs")),
            "shop",
            "ReplicaSet/orphan-rs",
        ),
        // Not (yet) in the cache: the ReplicaSet itself.
        (
            Some(("ReplicaSet", "unknown-rs")),
            "shop",
            "ReplicaSet/unknown-rs",
        ),
        // The same name in another namespace is another ReplicaSet.
        (
            Some(("ReplicaSet", "web-7d4b9c")),
            "other",
            "ReplicaSet/web-7d4b9c",
        ),
        (Some(("Job", "report-2911")), "batch", "CronJob/report"),
        (Some(("Job", "oneoff")), "batch", "Job/oneoff"),
        (Some(("StatefulSet", "db")), "shop", "StatefulSet/db"),
        (
            Some(("DaemonSet", "agent")),
            "kube-system",
            "DaemonSet/agent",
        ),
        (Some(("Rollout", "canary")), "shop", "Rollout/canary"),
        (None, "shop", "Pod/bare"),
    ];
    for (i, (owner, ns, want)) in cases.iter().enumerate() {
        let name = if owner.is_none() {
            "bare".to_string()
        } else {
            format!("p{i}")
        };
        let addr = format!("10.244.0.{}", 10 + i);
        c.apply_pod(&pod(ns, &name, "1", &addr, *owner), at(1));
        let Some(Target::Pod(p)) = c.resolve(ip(&addr), at(2)) else {
            panic!("{addr} not a pod")
        };
        let w = c.workload(&p);
        assert_eq!(format!("{}/{}", w.kind, w.name), *want, "case {i}");
    }
    // The Deployment's ReplicaSet goes: its pods fall back to the ReplicaSet.
    c.delete_replicaset(&rs("shop", "web-7d4b9c", Some("web")));
    let Some(Target::Pod(p)) = c.resolve(ip("10.244.0.10"), at(3)) else {
        panic!()
    };
    assert_eq!(c.workload(&p).kind, "ReplicaSet");
}

#[test]
fn a_reused_pod_ip_keeps_old_flows_with_the_old_pod() {
    let mut c = Cluster::new(Duration::from_secs(120));
    c.begin_list(Kind::Pod);
    c.apply_pod(&pod("shop", "old", "1", "10.244.0.7", None), at(0));
    c.end_list(Kind::Pod, at(0));
    // Held since before the agent looked.
    assert_eq!(
        pod_name(&c, "10.244.0.7", at(0) - Duration::from_secs(3600)),
        "shop/old"
    );
    c.delete_pod(&pod("shop", "old", "1", "10.244.0.7", None), at(100));
    c.apply_pod(&pod("shop", "new", "1", "10.244.0.7", None), at(110));
    assert_eq!(pod_name(&c, "10.244.0.7", at(50)), "shop/old");
    assert_eq!(pod_name(&c, "10.244.0.7", at(99)), "shop/old");
    assert_eq!(pod_name(&c, "10.244.0.7", at(110)), "shop/new");
    assert_eq!(pod_name(&c, "10.244.0.7", at(200)), "shop/new");
    // Between the two, the nearer: the new pod's first packet may come a
    // moment before its watch event.
    assert_eq!(pod_name(&c, "10.244.0.7", at(109)), "shop/new");
    assert_eq!(pod_name(&c, "10.244.0.7", at(101)), "shop/old");
    // Within grace the old pod stays; after it, it is forgotten.
    c.prune(at(220));
    assert_eq!(pod_name(&c, "10.244.0.7", at(50)), "shop/old");
    c.prune(at(221));
    assert_eq!(pod_name(&c, "10.244.0.7", at(50)), "shop/new");
    assert_eq!(c.counts()[1], ("pod_ip_records", 1));

    // A pod that finishes lets its IP go at that moment.
    let mut done: serde_json::Value = standin::pod(
        "batch",
        "job-x",
        "1",
        "10.244.0.8",
        "node-a",
        Some(("Job", "x")),
    );
    c.apply_pod(&serde_json::from_value(done.clone()).unwrap(), at(300));
    done["status"]["phase"] = json!("Succeeded");
    c.apply_pod(&serde_json::from_value(done).unwrap(), at(310));
    c.apply_pod(&pod("shop", "next", "1", "10.244.0.8", None), at(320));
    assert_eq!(pod_name(&c, "10.244.0.8", at(305)), "batch/job-x");
    assert_eq!(pod_name(&c, "10.244.0.8", at(321)), "shop/next");

    // A pod recreated under the same name is another pod (another UID).
    c.delete_pod(&pod("shop", "new", "1", "10.244.0.7", None), at(400));
    c.apply_pod(&pod("shop", "new", "2", "10.244.0.9", None), at(401));
    assert_eq!(pod_name(&c, "10.244.0.7", at(399)), "shop/new");
    assert_eq!(pod_name(&c, "10.244.0.9", at(402)), "shop/new");
    assert_eq!(c.counts()[0], ("pods", 3));
}

#[test]
fn services_nodes_and_host_network_pods() {
    let mut c = synced();
    let svc: Service =
        serde_json::from_value(standin::service("shop", "web", "10.96.0.10", 80, 8080)).unwrap();
    c.apply_service(&svc);
    let mut headless = standin::service("shop", "db", "None", 5432, 5432);
    headless["spec"]["clusterIPs"] = json!(["None"]);
    c.apply_service(&serde_json::from_value(headless).unwrap());
    let node: Node = serde_json::from_value(standin::node("node-a", "192.0.2.1")).unwrap();
    c.apply_node(&node);
    let mut hn = standin::pod(
        "kube-system",
        "kube-proxy-x",
        "1",
        "192.0.2.1",
        "node-a",
        Some(("DaemonSet", "kube-proxy")),
    );
    hn["spec"]["hostNetwork"] = json!(true);
    c.apply_pod(&serde_json::from_value(hn).unwrap(), at(1));

    assert_eq!(
        pod_name(&c, "10.96.0.10", at(2)),
        r#"Service(ServiceMeta { namespace: "shop", name: "web" })"#
    );
    assert_eq!(pod_name(&c, "192.0.2.1", at(2)), r#"Node("node-a")"#);
    assert_eq!(pod_name(&c, "10.0.0.99", at(2)), "-");
    assert_eq!(
        c.counts(),
        [
            ("pods", 1),
            ("pod_ip_records", 0),
            ("replicasets", 0),
            ("jobs", 0),
            ("services", 2),
            ("nodes", 1)
        ]
    );

    // A changed ClusterIP moves; a deleted service and node are gone.
    c.apply_service(
        &serde_json::from_value(standin::service("shop", "web", "10.96.0.11", 80, 8080)).unwrap(),
    );
    assert_eq!(pod_name(&c, "10.96.0.10", at(3)), "-");
    assert_eq!(
        pod_name(&c, "10.96.0.11", at(3)),
        r#"Service(ServiceMeta { namespace: "shop", name: "web" })"#
    );
    c.delete_service(&svc);
    c.delete_node(&node);
    assert_eq!(pod_name(&c, "10.96.0.11", at(4)), "-");
    assert_eq!(pod_name(&c, "192.0.2.1", at(4)), "-");
}

#[test]
fn a_relist_removes_what_was_deleted_unseen() {
    let mut c = synced();
    c.apply_pod(&pod("shop", "a", "1", "10.244.1.1", None), at(1));
    c.apply_pod(&pod("shop", "b", "1", "10.244.1.2", None), at(1));
    c.apply_service(
        &serde_json::from_value(standin::service("shop", "web", "10.96.0.10", 80, 8080)).unwrap(),
    );
    // The watch broke; the relist no longer names b or the service.
    for k in Kind::ALL {
        c.begin_list(k);
    }
    c.apply_pod(&pod("shop", "a", "1", "10.244.1.1", None), at(50));
    for k in Kind::ALL {
        c.end_list(k, at(50));
    }
    assert_eq!(pod_name(&c, "10.244.1.1", at(60)), "shop/a");
    // b's flows from before the relist are still b's.
    assert_eq!(pod_name(&c, "10.244.1.2", at(40)), "shop/b");
    assert_eq!(c.counts()[0], ("pods", 1));
    assert_eq!(pod_name(&c, "10.96.0.10", at(60)), "-");
}

#[test]
fn the_cluster_uid_comes_from_external_mappings() {
    let cfg = |m: &str| {
        let text = format!(
            "coordimap:\n  data_sources:\n    - type: flows\n      data_source_id: f1\n      config:\n        - name: deployedAt\n          value: kubernetes\n        - name: external_mappings\n          value: \"{m}\"\n"
        );
        parse(&text, &|_| None).unwrap().flows.remove(0)
    };
    let f = cfg("node-a@uid-a node-b*@uid-b *@uid-any");
    assert_eq!(f.cluster_uid("node-a"), Some("uid-a"));
    assert_eq!(f.cluster_uid("node-b-17"), Some("uid-b"));
    assert_eq!(f.cluster_uid("node-c"), Some("uid-any"));
    let f = cfg("node-a@uid-a");
    assert_eq!(f.cluster_uid("node-c"), None);
}

fn rec(
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    t: u64,
    c2s: (u64, u64),
    s2c: (u64, u64),
) -> FlowRecord {
    FlowRecord {
        opened: true,
        ..record("tcp", (src, sport), (dst, dport), t, c2s, s2c)
    }
}

#[test]
fn edges_between_pods_services_nodes_and_external_with_exact_ids() {
    let mut c = synced();
    c.apply_replicaset(
        &serde_json::from_value(standin::replicaset("shop", "web-7d4b9c", Some("web"))).unwrap(),
    );
    c.apply_pod(&pod("shop", "client", "1", "10.244.0.5", None), at(1));
    c.apply_pod(
        &pod(
            "shop",
            "web-7d4b9c-x1",
            "1",
            "10.244.0.6",
            Some(("ReplicaSet", "web-7d4b9c")),
        ),
        at(1),
    );
    c.apply_service(
        &serde_json::from_value(standin::service("shop", "web", "10.96.0.10", 80, 8080)).unwrap(),
    );
    c.apply_node(&serde_json::from_value(standin::node("node-a", "192.0.2.1")).unwrap());
    let host = HostView {
        hostname: "node-a".into(),
        addrs: vec![ip("192.0.2.1"), ip("10.244.0.1")],
        ..Default::default()
    };
    let r = KubeResolver {
        cluster: &c,
        cluster_uid: UID,
        data_source_id: "flows-k8s",
        node: "node-a",
        host: &host,
    };
    let records = vec![
        // Through the ClusterIP: before DNAT, then after it (same client port).
        rec(
            "10.244.0.5",
            41000,
            "10.96.0.10",
            80,
            5,
            (6, 600),
            (4, 4000),
        ),
        rec(
            "10.244.0.5",
            41000,
            "10.244.0.6",
            8080,
            5,
            (6, 600),
            (4, 4000),
        ),
        // Straight to the pod.
        rec(
            "10.244.0.5",
            41001,
            "10.244.0.6",
            8080,
            5,
            (2, 200),
            (1, 100),
        ),
        // The kubelet probing from the CNI bridge address of this node.
        rec(
            "10.244.0.1",
            50000,
            "10.244.0.6",
            8080,
            5,
            (3, 180),
            (3, 300),
        ),
        // Out of the cluster.
        rec(
            "10.244.0.6",
            42000,
            "203.0.113.9",
            443,
            5,
            (5, 500),
            (5, 5000),
        ),
    ];
    let g = Graph::build(&records, &r);
    let pod_c = format!("{UID}-shop-kubernetes.pod-client");
    let pod_w = format!("{UID}-shop-kubernetes.pod-web-7d4b9c-x1");
    let svc = format!("{UID}-shop-kubernetes.service-web");
    let node = format!("{UID}--kubernetes.node-node-a");
    let ext = "flows-k8s-flows.external-203.0.113.9".to_string();
    let edges: Vec<(String, String, u16, u64, u64)> = g
        .edges
        .iter()
        .map(|(k, s): (&EdgeKey, _)| {
            (
                k.client.to_string(),
                k.server.to_string(),
                k.port,
                s.connections_active,
                s.bytes_client_to_server,
            )
        })
        .collect();
    assert_eq!(
        edges,
        vec![
            (node.clone(), pod_w.clone(), 8080, 1, 180),
            (pod_c.clone(), pod_w.clone(), 8080, 1, 200),
            (pod_c.clone(), svc.clone(), 80, 1, 600),
            (pod_w.clone(), ext.clone(), 443, 1, 500),
            (svc.clone(), pod_w.clone(), 8080, 1, 600),
        ]
    );
    let ids: Vec<&str> = g.endpoints.keys().map(|k| &**k).collect();
    let mut want = vec![
        pod_c.as_str(),
        pod_w.as_str(),
        svc.as_str(),
        node.as_str(),
        ext.as_str(),
    ];
    want.sort();
    assert_eq!(ids, want);

    // On the wire: element types and the pod's payload, exactly.
    let mut src = flowmap::config::FlowsSource::default_server();
    src.id = "flows-k8s".into();
    let batch = encode(&g, &[r.node_endpoint("node-a")], &src, &[], at(0), at(30)).unwrap();
    let d = &batch.cloud_crawl_data.crawled_data.data;
    let types: Vec<(&str, &str)> = d
        .iter()
        .filter(|e| !e.kind.starts_with("coordimap"))
        .map(|e| (e.kind.as_str(), e.id.as_str()))
        .collect();
    assert_eq!(
        types,
        vec![
            ("kubernetes.node", node.as_str()),
            ("kubernetes.pod", pod_c.as_str()),
            ("kubernetes.pod", pod_w.as_str()),
            ("kubernetes.service", svc.as_str()),
            ("flows.external", ext.as_str()),
        ]
    );
    let w = d.iter().find(|e| e.id == pod_w).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(&w.data)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        payload,
        json!({"id": pod_w, "kind": "pod", "name": "web-7d4b9c-x1", "addresses": ["10.244.0.6"],
               "namespace": "shop", "workload": "Deployment/web", "workload_kind": "Deployment",
               "workload_name": "web", "node": "node-a"})
    );
    assert_eq!(w.name, "web-7d4b9c-x1");
    let rel = d.iter().find(|e| e.id == format!("{svc}.{pod_w}")).unwrap();
    assert_eq!(rel.kind, "coordimap.relationship_skipinsert");
}

// ---- the real kube-rs watch caches against the stand-in API server ----

mod watching {
    use super::*;
    use flowmap::enrich::kube::watch;
    use flowmap::serve::metrics::Metrics;
    use flowmap::sinks::coordimap::spool::DeliveryStats;
    use flowmap_testkit::standin::StandIn;
    use std::sync::{Arc, RwLock};

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(15);
        while !f() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for: {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn now_pod(c: &watch::Shared, addr: &str) -> String {
        pod_name(&watch::read(c), addr, SystemTime::now())
    }

    /// The index of the request for `path` with a query containing all of `parts`.
    fn find(reqs: &[String], path: &str, parts: &[&str]) -> Option<usize> {
        reqs.iter()
            .position(|r| r.starts_with(&format!("{path}?")) && parts.iter().all(|p| r.contains(p)))
    }

    fn watch_rvs(reqs: &[String], path: &str) -> Vec<u64> {
        reqs.iter()
            .filter(|r| r.starts_with(&format!("{path}?")) && r.contains("watch=true"))
            .filter_map(|r| {
                r.split('&')
                    .find_map(|kv| kv.strip_prefix("resourceVersion="))
                    .and_then(|v| v.parse().ok())
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn list_watch_resume_and_relist_against_the_stand_in() {
        let api = StandIn::start().unwrap();
        api.set_bookmark_every(Some(Duration::from_millis(200)));
        // 600 pods: more than one page of 500.
        for i in 0..600u32 {
            let addr = format!("10.244.{}.{}", 2 + i / 250, 1 + i % 250);
            api.upsert(standin::pod(
                "bulk",
                &format!("p{i}"),
                "1",
                &addr,
                "node-a",
                Some(("ReplicaSet", "bulk-rs")),
            ));
        }
        api.upsert(standin::replicaset("bulk", "bulk-rs", Some("bulk")));
        api.upsert(standin::job("batch", "nightly-1", Some("nightly")));
        api.upsert(standin::service("shop", "web", "10.96.0.10", 80, 8080));
        api.upsert(standin::node("node-a", "192.0.2.1"));
        let kc = kube::config::Kubeconfig::from_yaml(&api.kubeconfig()).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(cfg).unwrap();
        let cluster: watch::Shared = Arc::new(RwLock::new(Cluster::new(Duration::from_secs(120))));
        let metrics = Arc::new(Metrics::new(Arc::new(DeliveryStats::default())));
        let tasks = watch::start(client, cluster.clone(), metrics.clone());
        assert!(
            watch::wait_synced(&cluster, Duration::from_secs(15)).await,
            "first list never completed"
        );
        {
            let c = watch::read(&cluster);
            assert_eq!(
                c.counts(),
                [
                    ("pods", 600),
                    ("pod_ip_records", 600),
                    ("replicasets", 1),
                    ("jobs", 1),
                    ("services", 1),
                    ("nodes", 1)
                ]
            );
            let Some(Target::Pod(p)) = c.resolve(ip("10.244.4.100"), SystemTime::now()) else {
                panic!()
            };
            assert_eq!(
                (p.name.as_str(), c.workload(&p).name.as_str()),
                ("p599", "bulk")
            );
        }
        assert_eq!(metrics.kube_relists.get(), 5);
        // The watch begins right after the list's last page.
        until("the pod watch", || {
            find(&api.requests(), "/api/v1/pods", &["watch=true"]).is_some()
        })
        .await;
        let reqs = api.requests();
        let first_page = find(&reqs, "/api/v1/pods", &["limit=500"]).expect("paged list");
        let second_page =
            find(&reqs, "/api/v1/pods", &["limit=500", "continue="]).expect("continued list");
        assert!(first_page < second_page, "{reqs:?}");
        find(
            &reqs,
            "/api/v1/pods",
            &["watch=true", "allowWatchBookmarks=true", "resourceVersion="],
        )
        .expect("watch from the list's version");

        // Live events: added, changed, deleted.
        api.upsert(standin::pod(
            "shop",
            "fresh",
            "1",
            "10.244.9.1",
            "node-a",
            None,
        ));
        api.upsert(standin::service("shop", "web", "10.96.0.11", 80, 8080));
        api.delete("Pod", Some("bulk"), "p0");
        until("live events applied", || {
            let c = watch::read(&cluster);
            now_pod(&cluster, "10.244.9.1") == "shop/fresh"
                && c.resolve(ip("10.96.0.11"), SystemTime::now()).is_some()
                && c.resolve(ip("10.96.0.10"), SystemTime::now()).is_none()
                && c.counts()[0] == ("pods", 600)
        })
        .await;

        // Bookmarks move the version on: a watch cut now resumes past the
        // node list's version although no node changed.
        let node_rv0 = watch_rvs(&api.requests(), "/api/v1/nodes")[0];
        tokio::time::sleep(Duration::from_millis(600)).await;
        api.drop_connections();
        until("every watch resumed", || {
            ["/api/v1/pods", "/api/v1/nodes"]
                .iter()
                .all(|p| watch_rvs(&api.requests(), p).len() >= 2)
        })
        .await;
        let node_rvs = watch_rvs(&api.requests(), "/api/v1/nodes");
        assert!(node_rvs[1] > node_rv0, "resumed at {node_rvs:?}");
        // Resumed, not listed again.
        assert_eq!(metrics.kube_relists.get(), 5);
        api.upsert(standin::pod(
            "shop",
            "after-cut",
            "1",
            "10.244.9.2",
            "node-a",
            None,
        ));
        until("an event after the cut", || {
            now_pod(&cluster, "10.244.9.2") == "shop/after-cut"
        })
        .await;

        // History expired while a pod was deleted unseen: 410, relist, gone.
        assert!(api.delete_unseen("Pod", Some("shop"), "fresh"));
        api.expire_and_drop();
        until("relisted after 410", || metrics.kube_relists.get() >= 10).await;
        until("the unseen deletion applied", || {
            watch::read(&cluster).counts()[0] == ("pods", 600)
        })
        .await;
        // Its flows from before stay its own; from now on it is no pod.
        let c = watch::read(&cluster);
        assert_eq!(
            pod_name(&c, "10.244.9.1", SystemTime::now() - Duration::from_secs(1)),
            "shop/fresh"
        );
        drop(c);
        assert!(
            metrics.kube_watch_errors.get() >= 1,
            "the 410 is counted as a watch error"
        );
        for t in tasks {
            t.abort();
        }
    }
}

#[test]
fn deleted_pods_kept_for_their_flows_are_capped() {
    let mut c = synced();
    c.max_deleted = 3;
    for i in 0..6u64 {
        let p = pod(
            "churn",
            &format!("p{i}"),
            "1",
            &format!("10.244.7.{i}"),
            None,
        );
        c.apply_pod(&p, at(i));
        c.delete_pod(&p, at(10 + i));
    }
    c.apply_pod(&pod("churn", "live", "1", "10.244.7.100", None), at(20));
    c.prune(at(30));
    // The three that left last stay, the live pod too; the rest went early.
    assert_eq!(c.counts()[1], ("pod_ip_records", 4));
    for i in 0..3 {
        assert_eq!(pod_name(&c, &format!("10.244.7.{i}"), at(5)), "-", "p{i}");
    }
    for i in 3..6 {
        assert_eq!(
            pod_name(&c, &format!("10.244.7.{i}"), at(12)),
            format!("churn/p{i}")
        );
    }
    assert_eq!(pod_name(&c, "10.244.7.100", at(30)), "churn/live");
}

/// Kubernetes mode with no API to talk to: a clear error, before the
/// program is loaded or anything attached.
/// `flowmap run --no-store --no-web` on `config` until it exits, with a
/// directory of its own as its state directory; `env` adds to its
/// environment. (exit code, stderr).
fn run_to_exit(
    config: &str,
    env: impl FnOnce(&mut std::process::Command, &std::path::Path),
) -> (Option<i32>, String) {
    let dir = TempDir::new("nokube");
    let cfg = dir.file("config.yaml", config);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flowmap"));
    cmd.args(["run", "--config", cfg.to_str().unwrap()])
        .args(["--no-store", "--no-web", "--state-dir"])
        .arg(dir.path());
    env(&mut cmd, dir.path());
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn without_an_api_server_the_agent_stops_before_attaching() {
    let (code, err) = run_to_exit(
        &format!("coordimap:\n  data_sources:\n    - type: flows\n      data_source_id: f1\n      config:\n        - name: deployedAt\n          value: kubernetes\n        - name: external_mappings\n          value: \"*@{UID}\"\n"),
        |c, dir| {
            c.env("HOME", dir)
                .env_remove("KUBECONFIG")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env_remove("KUBERNETES_SERVICE_PORT")
                .env_remove("COORDIMAP_ENDPOINT");
        },
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("deployedAt kubernetes: no Kubernetes API to talk to")
            && err.contains("set KUBECONFIG (or ~/.kube/config)"),
        "{err}"
    );
    assert!(!err.contains("BPF program loaded"), "{err}");

    // A mapping whose key matches neither this node nor `*`: named.
    let cfg2 = "coordimap:\n  data_sources:\n    - type: flows\n      data_source_id: f1\n      config:\n        - name: deployedAt\n          value: kubernetes\n        - name: external_mappings\n          value: \"other-node@x\"\n";
    let (code, err) = run_to_exit(cfg2, |c, _| {
        c.env("NODE_NAME", "node-7");
    });
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(r#"data source "f1": no external_mappings key matches this node "node-7""#),
        "{err}"
    );
}
