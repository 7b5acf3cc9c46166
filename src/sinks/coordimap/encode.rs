//! Coordimap's wire format: elements, relationships and the crawl batch.
//! An element's `data` is the JSON of its payload, sent as base64 (Go's
//! encoding of `[]byte`); `hash` is the hex SHA-256 of those JSON bytes.

use std::collections::{BTreeMap, HashSet};
use std::time::SystemTime;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::FlowsSource;
use crate::graph::{EdgeStats, Graph};

pub const RELATIONSHIP_TYPE: &str = "coordimap.relationship_skipinsert";
/// Coordimap's relation type of eBPF flow edges.
pub const EBPF_FLOW_RELATION: u32 = 104;
pub const STATUS_NO_STATUS: &str = "NoStatus";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Element {
    pub retrieved_at: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub hash: String,
    /// Base64 of the payload's JSON bytes.
    pub data: String,
    pub is_json_data: bool,
    pub version: String,
    pub status: String,
}

impl Element {
    pub fn new<T: Serialize>(payload: &T, name: &str, id: &str, kind: &str, at: &str) -> Element {
        // Serialising plain structs of strings and numbers cannot fail.
        let bytes = serde_json::to_vec(payload).unwrap_or_default();
        Element {
            retrieved_at: at.to_string(),
            name: name.to_string(),
            kind: kind.to_string(),
            id: id.to_string(),
            hash: hex_sha256(&bytes),
            data: base64::engine::general_purpose::STANDARD.encode(&bytes),
            is_json_data: true,
            version: String::new(),
            status: STATUS_NO_STATUS.to_string(),
        }
    }

    /// The payload's JSON bytes.
    pub fn payload(&self) -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .ok()
    }
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The payload of a flow relationship: Coordimap's four fields, then the
/// edge statistics of the interval, one entry per (protocol, server port).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelationshipPayload {
    pub source_id: String,
    pub destination_id: String,
    pub relationship_type: String,
    pub relation_type: u32,
    pub interval_start: String,
    pub interval_end: String,
    pub flows: Vec<EdgeStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSourceInfo {
    pub name: String,
    pub desc: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSourceConfig {
    pub value_pairs: Vec<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSourceBlock {
    pub data_source_info: DataSourceInfo,
    pub data_source_id: String,
    pub data_source_config: DataSourceConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrawledData {
    pub data: Vec<Element>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudCrawlData {
    pub data_source: DataSourceBlock,
    pub crawled_data: CrawledData,
    pub timestamp: String,
    pub crawl_internal_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub cloud_crawl_data: CloudCrawlData,
}

/// Keys never sent, whatever skip_fields says.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_lowercase();
    ["password", "secret", "token", "api_key"]
        .iter()
        .any(|s| k.contains(s))
}

/// A URL as it may be shown: a user and password in it, and the values of
/// query parameters that look like secrets, replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_string(),
    };
    let path = match path.split_once('?') {
        Some((p, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if is_secret_key(k) => {
                        format!("{k}=***")
                    }
                    _ => kv.to_string(),
                })
                .collect();
            format!("{p}?{}", q.join("&"))
        }
        None => path.to_string(),
    };
    if scheme.is_empty() {
        format!("{authority}{path}")
    } else {
        format!("{scheme}://{authority}{path}")
    }
}

pub fn data_source_block(src: &FlowsSource, skip_fields: &[String]) -> DataSourceBlock {
    DataSourceBlock {
        data_source_info: DataSourceInfo {
            name: src.name.clone(),
            desc: src.desc.clone(),
            kind: "flows".into(),
        },
        data_source_id: src.id.clone(),
        data_source_config: DataSourceConfig {
            value_pairs: src
                .pairs
                .iter()
                .filter(|(k, _)| !skip_fields.contains(&k.to_lowercase()) && !is_secret_key(k))
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        },
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Encodes one interval's graph. `always` are endpoints sent even without
/// an edge (this host), so every interval says the agent is alive.
pub fn encode(
    graph: &Graph,
    always: &[crate::enrich::Endpoint],
    src: &FlowsSource,
    skip_fields: &[String],
    start: SystemTime,
    end: SystemTime,
) -> Batch {
    let at = rfc3339(end);
    let mut data = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut push = |e: Element, data: &mut Vec<Element>| {
        if seen.insert((e.kind.clone(), e.id.clone())) {
            data.push(e);
        }
    };
    for ep in always.iter().chain(graph.endpoints.values()) {
        let mut e = Element::new(ep, &ep.name, &ep.id, ep.kind.element_type(), &at);
        e.status = endpoint_status(graph, &ep.id).to_string();
        push(e, &mut data);
    }
    let mut pairs: BTreeMap<(&str, &str), Vec<EdgeStats>> = BTreeMap::new();
    for (k, s) in &graph.edges {
        pairs
            .entry((&*k.client, &*k.server))
            .or_default()
            .push(s.clone());
    }
    for ((client, server), flows) in pairs {
        let id = format!("{client}.{server}");
        let payload = RelationshipPayload {
            source_id: client.to_string(),
            destination_id: server.to_string(),
            relationship_type: RELATIONSHIP_TYPE.to_string(),
            relation_type: EBPF_FLOW_RELATION,
            interval_start: rfc3339(start),
            interval_end: at.clone(),
            flows,
        };
        let mut e = Element::new(&payload, &id, &id, RELATIONSHIP_TYPE, &at);
        e.status = relationship_status(&payload.flows).to_string();
        push(e, &mut data);
    }
    Batch {
        cloud_crawl_data: CloudCrawlData {
            data_source: data_source_block(src, skip_fields),
            crawled_data: CrawledData { data },
            timestamp: at,
            crawl_internal_id: src.id.clone(),
        },
    }
}

/// A server endpoint's status: the worst of its incoming edges.
fn endpoint_status(graph: &Graph, id: &str) -> &'static str {
    graph
        .endpoint_status
        .get(id)
        .copied()
        .unwrap_or_default()
        .name()
}

/// A relationship's status: the worst of its (protocol, port) entries.
fn relationship_status(flows: &[EdgeStats]) -> &'static str {
    flows
        .iter()
        .map(|f| f.health.status)
        .max()
        .unwrap_or_default()
        .name()
}

/// The collector's reply.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Reply {
    pub status: ReplyStatus,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ReplyStatus {
    pub http_code: i64,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub error_code: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn credentials_in_an_endpoint_are_not_shown() {
        assert_eq!(redact_url("http://127.0.0.1:9"), "http://127.0.0.1:9");
        assert_eq!(
            redact_url("https://bob:hunter2@collector.example/api/v1?api_key=abc&region=eu"),
            "https://***@collector.example/api/v1?api_key=***&region=eu"
        );
        assert_eq!(
            redact_url("https://collector.example?token=t0k&password=p"),
            "https://collector.example?token=***&password=***"
        );
    }
}
