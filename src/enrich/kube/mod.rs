//! Kubernetes mode: watch caches of the cluster's pods, ReplicaSets, Jobs,
//! Services and Nodes, and the resolver that maps each flow's addresses
//! onto them at the flow's time.

pub mod index;
pub mod watch;

use std::net::IpAddr;
use std::time::SystemTime;

use crate::enrich::host::HostView;
use crate::enrich::server::external_endpoint;
use crate::enrich::{Endpoint, EndpointKind, Resolve};
use index::{internal_id, Cluster, Target};

/// Resolves addresses against the cluster: pod (at the flow's time),
/// Service ClusterIP, node address; an address of this host that no Node
/// object lists (a CNI bridge, say) is this node; anything else external.
pub struct KubeResolver<'a> {
    pub cluster: &'a Cluster,
    pub cluster_uid: &'a str,
    pub data_source_id: &'a str,
    /// The node the agent runs on.
    pub node: &'a str,
    pub host: &'a HostView,
}

impl KubeResolver<'_> {
    pub fn node_endpoint(&self, name: &str) -> Endpoint {
        self.object(
            EndpointKind::Node,
            "",
            name,
            self.cluster.node_addresses(name).to_vec(),
        )
    }

    /// An object with the Kubernetes crawler's internal ID.
    fn object(
        &self,
        kind: EndpointKind,
        namespace: &str,
        name: &str,
        addresses: Vec<IpAddr>,
    ) -> Endpoint {
        let mut e = Endpoint::new(
            internal_id(self.cluster_uid, namespace, kind.element_type(), name),
            kind,
            name.to_string(),
            addresses,
        );
        if !namespace.is_empty() {
            e.namespace = Some(namespace.to_string());
        }
        e
    }

    fn target_endpoint(&self, t: Target, ip: IpAddr) -> Endpoint {
        match t {
            Target::Pod(p) => {
                let w = self.cluster.workload(&p);
                let mut e = self.object(EndpointKind::Pod, &p.namespace, &p.name, vec![ip]);
                e.workload = Some(format!("{}/{}", w.kind, w.name));
                e.workload_kind = Some(w.kind);
                e.workload_name = Some(w.name);
                e.node = p.node.clone();
                e
            }
            Target::Service(s) => {
                self.object(EndpointKind::Service, &s.namespace, &s.name, vec![ip])
            }
            Target::Node(n) => self.node_endpoint(&n),
        }
    }
}

impl Resolve for KubeResolver<'_> {
    fn endpoint(&self, ip: IpAddr, at: SystemTime) -> Endpoint {
        match self.cluster.resolve(ip, at) {
            Some(t) => self.target_endpoint(t, ip),
            None if self.host.is_local(ip) => self.node_endpoint(self.node),
            None => external_endpoint(self.data_source_id, ip),
        }
    }

    /// The identity of the pod, service or node object (its shared
    /// record's address), 0 for none.
    fn holder(&self, ip: IpAddr, at: SystemTime) -> usize {
        match self.cluster.resolve(ip, at) {
            Some(Target::Pod(p)) => std::sync::Arc::as_ptr(&p) as usize,
            Some(Target::Service(s)) => std::sync::Arc::as_ptr(&s) as usize,
            Some(Target::Node(n)) => std::sync::Arc::as_ptr(&n) as *const u8 as usize,
            None => 0,
        }
    }

    fn named_external(&self, name: &str) -> Endpoint {
        crate::enrich::server::named_external_endpoint(self.data_source_id, name)
    }

    /// A socket of this node owned by a container of a hostNetwork pod:
    /// that pod (issue 14).
    fn process(
        &self,
        ep: &Endpoint,
        ip: IpAddr,
        p: &crate::enrich::process::Process,
    ) -> Option<Endpoint> {
        if ep.kind != EndpointKind::Node {
            return None;
        }
        let pod = self.cluster.host_network_pod(p.container_id.as_deref()?)?;
        Some(self.target_endpoint(Target::Pod(pod), ip))
    }
}
