//! Server mode: this host is one endpoint, every other address its own.

use std::net::IpAddr;
use std::time::SystemTime;

use super::host::HostView;
use super::process::Process;
use super::{Endpoint, EndpointKind, ProcessPayload, Resolve};

/// Server mode: this host is one endpoint, every other address its own.
pub struct ServerResolver<'a> {
    pub data_source_id: &'a str,
    pub host: &'a HostView,
}

pub const HOST_TYPE: &str = "flows.host";
pub const EXTERNAL_TYPE: &str = "flows.external";
/// An aggregate of external addresses past `max_external_endpoints`.
pub const EXTERNAL_GROUP_TYPE: &str = "flows.external_group";
/// A process of this host (issue 14).
pub const PROCESS_TYPE: &str = "flows.process";

impl ServerResolver<'_> {
    pub fn host_endpoint(&self) -> Endpoint {
        Endpoint::new(
            format!("{}-{HOST_TYPE}-{}", self.data_source_id, self.host.hostname),
            EndpointKind::Host,
            self.host.hostname.clone(),
            self.host
                .addrs
                .iter()
                .copied()
                .filter(|a| !a.is_loopback())
                .collect(),
        )
    }
}

/// The endpoint of a process of host `hostname` (issue 14):
/// `<data_source_id>-flows.process-<hostname>-<unit, else container ID (12
/// hex), else comm>`, named by that service name; the graph adds the
/// addresses it used and the other pids of the same service.
pub fn process_endpoint(data_source_id: &str, hostname: &str, p: &Process) -> Endpoint {
    let name = p.service_name();
    let mut e = Endpoint::new(
        format!("{data_source_id}-{PROCESS_TYPE}-{hostname}-{name}"),
        EndpointKind::Process,
        name.to_string(),
        Vec::new(),
    );
    e.process = Some(ProcessPayload {
        hostname: hostname.to_string(),
        unit: p.unit.as_deref().map(str::to_string),
        comm: p.comm.to_string(),
        exe: p.exe.as_deref().map(str::to_string),
        pids: vec![p.pid],
        container_id: p.container_id.as_deref().map(str::to_string),
    });
    e
}

/// An address that belongs to nothing known: its own endpoint.
pub fn external_endpoint(data_source_id: &str, ip: IpAddr) -> Endpoint {
    Endpoint::new(
        format!("{data_source_id}-{EXTERNAL_TYPE}-{ip}"),
        EndpointKind::External,
        ip.to_string(),
        vec![ip],
    )
}

/// An external peer by the name its clients used for it (issue 14); the
/// graph adds the addresses and names seen for it.
pub fn named_external_endpoint(data_source_id: &str, name: &str) -> Endpoint {
    Endpoint::new(
        format!("{data_source_id}-{EXTERNAL_TYPE}-{name}"),
        EndpointKind::External,
        name.to_string(),
        Vec::new(),
    )
}

impl Resolve for ServerResolver<'_> {
    fn endpoint(&self, ip: IpAddr, _at: SystemTime) -> Endpoint {
        if self.host.is_local(ip) {
            return self.host_endpoint();
        }
        external_endpoint(self.data_source_id, ip)
    }

    fn named_external(&self, name: &str) -> Endpoint {
        named_external_endpoint(self.data_source_id, name)
    }

    fn process(&self, ep: &Endpoint, _ip: IpAddr, p: &Process) -> Option<Endpoint> {
        (ep.kind == EndpointKind::Host)
            .then(|| process_endpoint(self.data_source_id, &self.host.hostname, p))
    }
}
