//! The deployment files: every Kubernetes manifest parses into the API
//! types with nothing left over, the DaemonSet asks for no more than it
//! needs, the committed manifests are the Helm chart rendered, the chart's
//! values reach the output, and the systemd unit verifies.

use std::collections::BTreeSet;
use std::process::Command;

use flowmap_testkit::tempdir::TempDir;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

const MANIFEST: &str = "deploy/kubernetes/flowmap.yaml";

fn docs(text: &str) -> Vec<Value> {
    text.split("\n---\n")
        .map(|d| {
            serde_saphyr::from_str::<Value>(d).unwrap_or_else(|e| panic!("not YAML: {e}\n{d}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `v` as `T` and back: a misspelt or misplaced field would be
/// dropped by the typed parse, so the two must be equal.
fn typed<T: DeserializeOwned + Serialize>(v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: {e}", v["kind"]));
    assert_eq!(
        &serde_json::to_value(&t).unwrap(),
        v,
        "{} has fields its API type does not",
        v["kind"]
    );
    t
}

struct Parsed {
    daemonset: DaemonSet,
    role: ClusterRole,
    config: ConfigMap,
    kinds: Vec<String>,
    hub: Option<Deployment>,
    hub_service: Option<Service>,
}

fn parse_all(text: &str) -> Parsed {
    let mut daemonset = None;
    let mut role = None;
    let mut config = None;
    let (mut hub, mut hub_service) = (None, None);
    let mut kinds = Vec::new();
    for v in docs(text) {
        let kind = v["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "Namespace" => drop(typed::<Namespace>(&v)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(&v)),
            "Secret" => drop(typed::<Secret>(&v)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&v)),
            "ClusterRole" => role = Some(typed::<ClusterRole>(&v)),
            "ConfigMap" => config = Some(typed::<ConfigMap>(&v)),
            "DaemonSet" => daemonset = Some(typed::<DaemonSet>(&v)),
            "Deployment" => hub = Some(typed::<Deployment>(&v)),
            "Service" => hub_service = Some(typed::<Service>(&v)),
            other => panic!("unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    Parsed {
        daemonset: daemonset.expect("a DaemonSet"),
        role: role.expect("a ClusterRole"),
        config: config.expect("a ConfigMap"),
        kinds,
        hub,
        hub_service,
    }
}

fn helm(args: &[&str]) -> std::process::Output {
    Command::new("helm")
        .args(args)
        .output()
        .expect("helm (scripts/setup.sh installs it)")
}

#[test]
fn every_manifest_parses_into_the_kubernetes_types() {
    let p = parse_all(&std::fs::read_to_string(MANIFEST).unwrap());
    assert_eq!(
        p.kinds,
        [
            "Namespace",
            "ServiceAccount",
            "Secret",
            "ConfigMap",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet"
        ]
    );

    // Read-only access to exactly what the watch caches read.
    let mut rules = BTreeSet::new();
    for r in p.role.rules.unwrap() {
        for g in r.api_groups.clone().unwrap_or_default() {
            for res in r.resources.clone().unwrap_or_default() {
                let mut verbs = r.verbs.clone();
                verbs.sort();
                rules.insert(format!(
                    "{g}/{res}:{}{}",
                    verbs.join(","),
                    r.resource_names
                        .as_ref()
                        .map(|n| format!(" {n:?}"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    assert_eq!(
        rules.into_iter().collect::<Vec<_>>(),
        [
            "/namespaces:get [\"kube-system\"]",
            "/nodes:list,watch",
            "/pods:list,watch",
            "/services:list,watch",
            "apps/replicasets:list,watch",
            "batch/jobs:list,watch",
        ]
    );

    // Host network, least capabilities, probes, limits.
    let spec = p.daemonset.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.host_network, Some(true));
    let c = &spec.containers[0];
    // The image scripts/image.sh builds (tests/image.rs runs it as this
    // DaemonSet does).
    assert_eq!(
        c.image.as_deref(),
        Some(concat!("localhost/flowmap:", env!("CARGO_PKG_VERSION")))
    );
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert_eq!(
        caps.add,
        Some(vec![
            "BPF".to_string(),
            "NET_ADMIN".to_string(),
            "PERFMON".to_string()
        ])
    );
    // bpf() needs a profile that allows it: the one under deploy/seccomp.
    let seccomp = sc.seccomp_profile.unwrap();
    assert_eq!(seccomp.type_, "Localhost");
    let profile = seccomp.localhost_profile.unwrap();
    assert!(
        std::path::Path::new("deploy/seccomp")
            .join(&profile)
            .is_file(),
        "{profile} is not in deploy/seccomp"
    );
    assert_eq!(
        c.args.clone().unwrap(),
        [
            "run",
            "--config=/etc/flowmap/config.yaml",
            "--state-dir=/var/lib/flowmap",
            "--metrics-listen=$(HOST_IP):9464",
            "--spool-max-bytes=67108864",
            "--retention=24h",
            "--no-web",
            "--no-store",
        ]
    );
    // The probes reach /healthz on the metrics listener's port; nothing
    // else listens on the node's address.
    for probe in [
        c.liveness_probe.clone().unwrap(),
        c.readiness_probe.clone().unwrap(),
    ] {
        let get = probe.http_get.unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(get.port, IntOrString::Int(9464));
        assert_eq!(get.host, None, "the pod's address: the node's");
    }
    let ports: Vec<i32> = c
        .ports
        .clone()
        .unwrap()
        .iter()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(ports, [9464]);
    let res = c.resources.clone().unwrap();
    assert_eq!(res.limits.unwrap()["memory"].0, "256Mi");
    assert_eq!(res.requests.unwrap()["memory"].0, "64Mi");
    // The API key only from the Secret.
    let env = c.env.clone().unwrap();
    let key = env.iter().find(|e| e.name == "COORDIMAP_API_KEY").unwrap();
    assert!(key.value.is_none());
    assert_eq!(
        key.value_from.clone().unwrap().secret_key_ref.unwrap().key,
        "api-key"
    );
    assert!(env.iter().any(|e| e.name == "NODE_NAME"));

    // The ConfigMap holds a valid Kubernetes-mode configuration.
    let text = &p.config.data.unwrap()["config.yaml"];
    let cfg = flowmap::config::parse(text, &|v| {
        (v == "COORDIMAP_API_KEY").then(|| "k".to_string())
    })
    .unwrap();
    assert_eq!(
        cfg.flows[0].deployed_at,
        flowmap::config::DeployedAt::Kubernetes
    );
    assert_eq!(
        cfg.flows[0].cluster_uid("any-node"),
        Some("REPLACE-WITH-CLUSTER-UID")
    );
    assert_eq!(cfg.flows[0].max_flows, 32768);
}

#[test]
fn the_committed_manifests_are_the_chart_rendered_and_values_apply() {
    let dir = TempDir::new("render");
    let out = dir.path().join("flowmap.yaml");
    let st = Command::new("bash")
        .arg("scripts/render-manifests.sh")
        .env("OUT", &out)
        .status()
        .unwrap();
    assert!(st.success());
    let rendered = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        rendered,
        std::fs::read_to_string(MANIFEST).unwrap(),
        "run scripts/render-manifests.sh"
    );

    let lint = helm(&["lint", "deploy/helm/flowmap", "--set", "clusterUID=x"]);
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );

    // Without a cluster UID the chart refuses, and says how to get one.
    let no_uid = helm(&["template", "deploy/helm/flowmap"]);
    assert!(!no_uid.status.success());
    assert!(String::from_utf8_lossy(&no_uid.stderr)
        .contains("clusterUID is required: kubectl get namespace kube-system"));

    let custom = helm(&[
        "template",
        "fm",
        "deploy/helm/flowmap",
        "--namespace",
        "obs",
        "--set",
        "clusterUID=0e3c-uid",
        "--set",
        "collector.existingSecret=my-key",
        "--set",
        "store.enabled=true",
        "--set",
        "crawlInterval=1m",
        "--set",
        "port=9555",
        "--set",
        "interfaceName=eth0",
        "--set",
        "image.repository=registry.example/obs/flowmap",
        "--set",
        "image.tag=1.2.3",
        "--set",
        "seccompProfile.type=RuntimeDefault",
        "--set",
        "seccompProfile.localhostProfile=null",
    ]);
    assert!(
        custom.status.success(),
        "{}",
        String::from_utf8_lossy(&custom.stderr)
    );
    let p = parse_all(&String::from_utf8(custom.stdout).unwrap());
    assert!(
        !p.kinds.contains(&"Secret".to_string()),
        "an existing Secret is used, none made"
    );
    let c = &p.daemonset.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example/obs/flowmap:1.2.3")
    );
    let seccomp = c.security_context.clone().unwrap().seccomp_profile.unwrap();
    assert_eq!(
        (seccomp.type_.as_str(), seccomp.localhost_profile),
        ("RuntimeDefault", None)
    );
    let args = c.args.clone().unwrap();
    assert!(!args.contains(&"--no-store".to_string()));
    // With the store, the map page: on the node's loopback only.
    let listen: Vec<&String> = args.iter().filter(|a| a.contains("listen")).collect();
    assert_eq!(
        listen,
        [
            "--metrics-listen=$(HOST_IP):9555",
            "--listen=127.0.0.1:9465"
        ]
    );
    assert!(!args.iter().any(|a| a.starts_with("--web-token-file")));
    let probe = c.liveness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(probe.port, IntOrString::Int(9555));
    let env = c.env.clone().unwrap();
    let key = env.iter().find(|e| e.name == "COORDIMAP_API_KEY").unwrap();
    assert_eq!(
        key.value_from.clone().unwrap().secret_key_ref.unwrap().name,
        "my-key"
    );
    let cfg = flowmap::config::parse(&p.config.data.unwrap()["config.yaml"], &|_| {
        Some(String::new())
    })
    .unwrap();
    let f = &cfg.flows[0];
    assert_eq!(f.cluster_uid("n"), Some("0e3c-uid"));
    assert_eq!(f.crawl_interval, std::time::Duration::from_secs(60));
    assert_eq!(
        f.interfaces,
        flowmap::datapath::ifaces::Selection::Names(vec!["eth0".into()])
    );
}

/// The map page off loopback: the chart refuses without a token Secret,
/// and with one mounts it (0400) and passes it to the agent.
#[test]
fn the_chart_puts_the_map_off_loopback_only_with_a_token() {
    let base = [
        "template",
        "fm",
        "deploy/helm/flowmap",
        "--set",
        "clusterUID=u",
        "--set",
        "store.enabled=true",
        "--set",
        "web.address=10.0.0.5",
    ];
    let refused = helm(&base);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(
            "web.address 10.0.0.5 is not loopback: the map page there needs a bearer token; set web.tokenSecret"
        ),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let mut args = base.to_vec();
    args.extend([
        "--set",
        "web.tokenSecret=map-token",
        "--set",
        "web.hosts={map.example}",
    ]);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = parse_all(&String::from_utf8(out.stdout).unwrap());
    let pod = p.daemonset.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    for want in [
        "--listen=10.0.0.5:9465",
        "--web-token-file=/etc/flowmap-web/token",
        "--web-host=map.example",
    ] {
        assert!(args.contains(&want.to_string()), "{want} not in {args:?}");
    }
    let mount = c
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .find(|m| m.mount_path == "/etc/flowmap-web")
        .unwrap();
    assert_eq!(mount.read_only, Some(true));
    let vol = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    let secret = vol.secret.unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("map-token"));
    assert_eq!(secret.default_mode, Some(0o400));
    let items = secret.items.unwrap();
    assert_eq!(
        (items[0].key.as_str(), items[0].path.as_str()),
        ("token", "token")
    );
}

#[test]
fn the_systemd_unit_verifies() {
    let bin = env!("CARGO_BIN_EXE_flowmap");
    let unit = std::fs::read_to_string("deploy/systemd/flowmap.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/flowmap run --config /etc/flowmap/config.yaml"));
    let dir = TempDir::new("unit");
    let path = dir.file(
        "flowmap.service",
        &unit.replace("/usr/local/bin/flowmap", bin),
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 15's hub: off by default; with `hub.enabled` a Deployment running
/// `flowmap serve` (unprivileged) behind a Service, the agents' store
/// pointed at the same PostgreSQL, the connection string from a Secret
/// (never in the ConfigMap or the arguments). The per-node page stays.
#[test]
fn the_chart_adds_a_hub_on_postgres_when_asked() {
    let off = helm(&[
        "template",
        "fm",
        "deploy/helm/flowmap",
        "--set",
        "clusterUID=u",
    ]);
    assert!(off.status.success());
    let p = parse_all(&String::from_utf8(off.stdout).unwrap());
    assert!(p.hub.is_none() && p.hub_service.is_none());

    let base = [
        "template",
        "fm",
        "deploy/helm/flowmap",
        "--namespace",
        "obs",
        "--set",
        "clusterUID=u",
        "--set",
        "hub.enabled=true",
    ];
    let refused = helm(&base);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("hub.databaseSecret is required with hub.enabled"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let mut args = base.to_vec();
    args.extend(["--set", "hub.databaseSecret=pg-conn"]);
    let refused = helm(&args);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("hub.tokenSecret is required with hub.enabled"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    args.extend([
        "--set",
        "hub.tokenSecret=hub-token",
        "--set",
        "hub.hosts={map.example}",
        "--set",
        "store.enabled=true",
    ]);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = parse_all(&String::from_utf8(out.stdout).unwrap());

    // The agents: their store is the PostgreSQL of the Secret.
    let env_from = |env: &[k8s_openapi::api::core::v1::EnvVar], name: &str| {
        let e = env.iter().find(|e| e.name == name).unwrap();
        assert!(e.value.is_none());
        let r = e.value_from.clone().unwrap().secret_key_ref.unwrap();
        (r.name, r.key)
    };
    let agent = &p.daemonset.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(
        env_from(agent.env.as_deref().unwrap(), "FLOWMAP_DATABASE"),
        ("pg-conn".to_string(), "connection-string".to_string())
    );
    let cfg = flowmap::config::parse(&p.config.data.unwrap()["config.yaml"], &|v| {
        (v == "FLOWMAP_DATABASE")
            .then(|| "host=pg.db user=flowmap dbname=flowmap".to_string())
            .or(Some(String::new()))
    })
    .unwrap();
    assert_eq!(
        flowmap::sinks::store::Location::from_config(
            cfg.database.as_ref(),
            std::path::Path::new("/x")
        ),
        flowmap::sinks::store::Location::Postgres("host=pg.db user=flowmap dbname=flowmap".into())
    );
    // The per-node page stays (store.enabled), on loopback.
    let a = agent.args.clone().unwrap();
    assert!(a.contains(&"--listen=127.0.0.1:9465".to_string()), "{a:?}");
    assert!(!a.contains(&"--no-store".to_string()), "{a:?}");

    // The hub: `serve`, no root, no capability, the token mounted.
    let hub = p.hub.expect("the hub's Deployment");
    let pod = hub.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, None);
    assert_eq!(pod.automount_service_account_token, Some(false));
    let psc = pod.security_context.clone().unwrap();
    assert_eq!(
        (psc.run_as_non_root, psc.run_as_user),
        (Some(true), Some(65534))
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.args.clone().unwrap(),
        [
            "serve",
            "--listen=0.0.0.0:9470",
            "--web-token-file=/etc/flowmap-web/token",
            "--web-host=fm-hub",
            "--web-host=fm-hub.obs",
            "--web-host=fm-hub.obs.svc",
            "--web-host=map.example",
            "--metrics-listen=0.0.0.0:9471",
            "--refresh=30s",
        ]
    );
    assert_eq!(
        env_from(c.env.as_deref().unwrap(), "FLOWMAP_DATABASE"),
        ("pg-conn".to_string(), "connection-string".to_string())
    );
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!((caps.drop, caps.add), (Some(vec!["ALL".to_string()]), None));
    let probe = c.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(
        (probe.path.as_deref(), probe.port.clone()),
        (Some("/healthz"), IntOrString::Int(9471))
    );
    let vol = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "web-token")
        .unwrap();
    let secret = vol.secret.unwrap();
    assert_eq!(
        (secret.secret_name.as_deref(), secret.default_mode),
        (Some("hub-token"), Some(0o400))
    );

    // Its Service selects the hub's pods, and never the agents'.
    let svc = p.hub_service.expect("the hub's Service").spec.unwrap();
    let sel = svc.selector.unwrap();
    let hub_labels = hub.metadata.labels.unwrap();
    assert!(sel.iter().all(|(k, v)| hub_labels.get(k) == Some(v)));
    let agent_sel = p.daemonset.metadata.labels.unwrap();
    assert_ne!(
        sel.get("app.kubernetes.io/name"),
        agent_sel.get("app.kubernetes.io/name")
    );
    let port = &svc.ports.unwrap()[0];
    assert_eq!(
        (port.port, port.target_port.clone()),
        (9470, Some(IntOrString::String("web".into())))
    );
}
