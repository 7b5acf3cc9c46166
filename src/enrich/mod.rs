//! Enrichment: turns an address (at a time) into the endpoint it belongs
//! to: this host, a Kubernetes pod/service/node, or an external peer, and
//! names external peers by the DNS and TLS names their clients used
//! (names.rs).

pub mod host;
pub mod kube;
pub mod names;
pub mod process;
pub mod quic;
pub mod server;

use std::net::IpAddr;
use std::time::SystemTime;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    /// The host the agent runs on (server mode).
    Host,
    /// Any address that is none of the others.
    External,
    /// Kubernetes mode: a pod, a Service (by its ClusterIP), a node.
    Pod,
    Service,
    Node,
    /// External addresses folded together past the cap
    /// (`max_external_endpoints`), per server port.
    ExternalGroup,
    /// Server mode: a process (unit, container or command) of this host,
    /// a child of the host endpoint (issue 14).
    Process,
}

impl EndpointKind {
    /// The Coordimap element type.
    pub fn element_type(&self) -> &'static str {
        match self {
            EndpointKind::Host => server::HOST_TYPE,
            EndpointKind::External => server::EXTERNAL_TYPE,
            EndpointKind::Pod => kube::index::POD_TYPE,
            EndpointKind::Service => kube::index::SERVICE_TYPE,
            EndpointKind::Node => kube::index::NODE_TYPE,
            EndpointKind::ExternalGroup => server::EXTERNAL_GROUP_TYPE,
            EndpointKind::Process => server::PROCESS_TYPE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub id: String,
    pub kind: EndpointKind,
    pub name: String,
    /// For the host or a node, its addresses; for the others, the address
    /// the flows used.
    pub addresses: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A pod's workload, as `Kind/name` (Coordimap's form).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_name: Option<String>,
    /// The node a pod runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// An aggregate of external addresses: what it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupStats>,
    /// A named external endpoint (issue 14): the DNS names, TLS server
    /// names and HTTP Hosts its clients used for it this interval.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_server_names: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_hosts: Vec<String>,
    /// A process endpoint (issue 14): what runs it on which host.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessPayload>,
}

/// The payload fields of a process endpoint: the host, the systemd unit,
/// the command name, the executable, the process ids seen this interval
/// and the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessPayload {
    pub hostname: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    pub pids: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// Process ids a process endpoint lists at most.
pub const PROCESS_PIDS_MAX: usize = 64;

/// The payload of an aggregate of external addresses: its (protocol,
/// port) (absent for "other ports"), how many distinct addresses it holds,
/// and their totals (connections, packets and bytes from and to them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GroupStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub peers: u64,
    pub connections: u64,
    pub packets_from_peers: u64,
    pub bytes_from_peers: u64,
    pub packets_to_peers: u64,
    pub bytes_to_peers: u64,
}

impl Endpoint {
    pub fn new(id: String, kind: EndpointKind, name: String, addresses: Vec<IpAddr>) -> Endpoint {
        Endpoint {
            id,
            kind,
            name,
            addresses,
            namespace: None,
            workload: None,
            workload_kind: None,
            workload_name: None,
            node: None,
            group: None,
            dns_names: Vec::new(),
            tls_server_names: Vec::new(),
            http_hosts: Vec::new(),
            process: None,
        }
    }
}

/// Maps an address to the endpoint it belongs to.
pub trait Resolve {
    /// The endpoint `ip` was at time `at`.
    fn endpoint(&self, ip: IpAddr, at: SystemTime) -> Endpoint;
    /// Which of the things `ip` may be it was at `at`: two calls with the
    /// same address and the same answer here resolve to the same endpoint,
    /// so the graph resolves each (address, holder) once per interval.
    /// Resolvers whose answer does not depend on time keep the default.
    fn holder(&self, _ip: IpAddr, _at: SystemTime) -> usize {
        0
    }
    /// The endpoint of an external peer its clients know by `name`
    /// (issue 14): `<data_source_id>-flows.external-<name>`, without
    /// addresses yet.
    fn named_external(&self, name: &str) -> Endpoint;
    /// The endpoint of a local end owned by process `p`, when this resolver
    /// splits `ep` (the end's own endpoint) by process (issue 14): server
    /// mode splits this host into its processes; Kubernetes mode gives a
    /// hostNetwork pod's traffic to the pod. None keeps `ep`.
    fn process(&self, _ep: &Endpoint, _ip: IpAddr, _p: &process::Process) -> Option<Endpoint> {
        None
    }
}

/// Link-scope control traffic, which is noise on a service map: to a
/// broadcast or link-local multicast address, or ICMPv6 (neighbour
/// discovery, router solicitation) between link-local (fe80::/10)
/// addresses.
pub fn is_link_control_flow(protocol: &str, src: IpAddr, dst: IpAddr) -> bool {
    let link_local = |ip: IpAddr| matches!(ip, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80);
    is_link_control(dst) || (protocol == "icmpv6" && (link_local(src) || link_local(dst)))
}

pub fn is_link_control(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            v.is_broadcast() || (v.octets()[0] == 224 && v.octets()[1] == 0 && v.octets()[2] == 0)
        }
        IpAddr::V6(v) => v.segments()[0] == 0xff02,
    }
}
