//! The names of one end of a connection (issue 14), by where they came
//! from: the DNS name its client resolved for that address, the TLS
//! server name (SNI) the client sent, the Host of a plain HTTP request.
//! Filled by enrich/names.rs.

use std::sync::Arc;

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EndNames {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<Arc<str>>,
}

impl EndNames {
    pub fn is_empty(&self) -> bool {
        self.dns.is_none() && self.tls.is_none() && self.http.is_none()
    }

    /// The name the end goes by on the map: the DNS name, else the TLS
    /// server name, else the HTTP Host (each used only when the ones
    /// before gave nothing).
    pub fn name(&self) -> Option<&Arc<str>> {
        self.dns
            .as_ref()
            .or(self.tls.as_ref())
            .or(self.http.as_ref())
    }
}
