//! Coordimap's wire format: elements, relationships and the crawl batch.
//! An element's `data` is the JSON of its payload, sent as base64 (Go's
//! encoding of `[]byte`); `hash` is the hex SHA-256 of those JSON bytes.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::SystemTime;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::FlowsSource;
use crate::graph::{EdgeStats, Graph};

pub const RELATIONSHIP_TYPE: &str = "coordimap.relationship_skipinsert";
/// Coordimap's relation type of eBPF flow edges.
pub const EBPF_FLOW_RELATION: u32 = 104;
/// Coordimap's relation type of containment: a host and its processes.
pub const PARENT_CHILD_RELATION: u32 = 3;
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
        Element::of_bytes(&bytes, name, id, kind, at, STATUS_NO_STATUS)
    }

    fn of_bytes(bytes: &[u8], name: &str, id: &str, kind: &str, at: &str, status: &str) -> Element {
        Element {
            retrieved_at: at.to_string(),
            name: name.to_string(),
            kind: kind.to_string(),
            id: id.to_string(),
            hash: hex_sha256(bytes),
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
            is_json_data: true,
            version: String::new(),
            status: status.to_string(),
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
    let h = hex_sha256_bytes(bytes);
    // Hex digits are ASCII.
    String::from_utf8_lossy(&h).into_owned()
}

/// The lower-case hex SHA-256 of `bytes`, without an allocation (a
/// `format!` per byte was a tenth of the encoding; issue 16's profile).
fn hex_sha256_bytes(bytes: &[u8]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let d = Sha256::digest(bytes);
    let mut out = [0u8; 64];
    for (i, b) in d.iter().enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 0xf) as usize];
    }
    out
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

/// The largest Coordimap request body flowmap builds. The pipeline folds
/// a graph further (fewer named external endpoints) until its batch fits;
/// see README "Bounds under hostile traffic" for the worst cases.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// The payload of a flow relationship, borrowing the graph's edges (the
/// same JSON as [`RelationshipPayload`]).
#[derive(Serialize)]
struct RelationshipRef<'g> {
    source_id: &'g str,
    destination_id: &'g str,
    relationship_type: &'static str,
    relation_type: u32,
    interval_start: &'g str,
    interval_end: &'g str,
    flows: &'g [&'g EdgeStats],
}

/// The payload of a parent-child relationship (Coordimap's four fields).
#[derive(Serialize)]
struct ContainmentRef<'g> {
    source_id: &'g str,
    destination_id: &'g str,
    relationship_type: &'static str,
    relation_type: u32,
}

/// Calls `each` with every element of one interval's graph, in batch
/// order: `always` (endpoints sent even without an edge, such as this
/// host, so every interval says the agent is alive), the graph's
/// endpoints, the parent-child relationships of hosts and their processes,
/// then one relationship per (client, server) pair. An element appears
/// once. Elements are made one at a time: the caller decides
/// whether to keep them.
pub fn each_element<E>(
    graph: &Graph,
    always: &[crate::enrich::Endpoint],
    (start, end): (SystemTime, SystemTime),
    mut each: impl FnMut(Element) -> Result<(), E>,
) -> Result<(), E> {
    let at = rfc3339(end);
    each_raw(graph, always, (&rfc3339(start), &at), |r| {
        each(Element::of_bytes(
            r.payload, r.name, r.id, r.kind, &at, r.status,
        ))
    })
}

/// One element before it is an [`Element`]: its fields and its payload's
/// JSON bytes (borrowed from a buffer reused for every element).
struct Raw<'a> {
    name: &'a str,
    id: &'a str,
    kind: &'a str,
    status: &'static str,
    payload: &'a [u8],
}

/// [`each_element`]'s elements as [`Raw`]; `from` and `at` are the
/// interval's start and end (RFC 3339).
fn each_raw<E>(
    graph: &Graph,
    always: &[crate::enrich::Endpoint],
    (from, at): (&str, &str),
    mut each: impl FnMut(Raw) -> Result<(), E>,
) -> Result<(), E> {
    let mut buf: Vec<u8> = Vec::new();
    let mut seen: HashSet<(&'static str, &str)> = HashSet::new();
    for ep in always.iter().chain(graph.endpoints.values()) {
        let kind = ep.kind.element_type();
        if seen.insert((kind, &ep.id)) {
            json(&mut buf, ep);
            each(Raw {
                name: &ep.name,
                id: &ep.id,
                kind,
                status: endpoint_status(graph, &ep.id),
                payload: &buf,
            })?;
        }
    }
    let mut id = String::new();
    // Containment: each process endpoint is a child of its host.
    for (parent, child) in &graph.children {
        id.clear();
        let _ = write!(id, "{parent}.{child}");
        let payload = ContainmentRef {
            source_id: parent,
            destination_id: child,
            relationship_type: RELATIONSHIP_TYPE,
            relation_type: PARENT_CHILD_RELATION,
        };
        json(&mut buf, &payload);
        each(Raw {
            name: &id,
            id: &id,
            kind: RELATIONSHIP_TYPE,
            status: STATUS_NO_STATUS,
            payload: &buf,
        })?;
    }
    // Edges are ordered by (client, server, …): a pair's edges are
    // consecutive.
    let mut edges = graph.edges.iter().peekable();
    let mut flows = Vec::new();
    while let Some((k, s)) = edges.next() {
        flows.clear();
        flows.push(s);
        while let Some((_, s)) =
            edges.next_if(|(n, _)| n.client == k.client && n.server == k.server)
        {
            flows.push(s);
        }
        id.clear();
        let _ = write!(id, "{}.{}", k.client, k.server);
        let payload = RelationshipRef {
            source_id: &k.client,
            destination_id: &k.server,
            relationship_type: RELATIONSHIP_TYPE,
            relation_type: EBPF_FLOW_RELATION,
            interval_start: from,
            interval_end: at,
            flows: &flows,
        };
        json(&mut buf, &payload);
        each(Raw {
            name: &id,
            id: &id,
            kind: RELATIONSHIP_TYPE,
            status: relationship_status(&flows),
            payload: &buf,
        })?;
    }
    Ok(())
}

/// `buf` holds the JSON of `p`. Serialising plain structs of strings and
/// numbers into a Vec cannot fail (an error would leave an empty payload,
/// as `Element::new` does).
fn json<T: Serialize>(buf: &mut Vec<u8>, p: &T) {
    buf.clear();
    if serde_json::to_writer(&mut *buf, p).is_err() {
        buf.clear();
    }
}

/// Writes one element as the JSON of [`Element`] (same fields, same
/// order, same escaping) without building it: no string copies, the hash
/// in hex and the base64 written from buffers.
fn write_element<W: std::io::Write>(
    w: &mut W,
    r: &Raw,
    at_json: &[u8],
    b64: &mut Vec<u8>,
) -> std::io::Result<()> {
    w.write_all(b"{\"retrieved_at\":")?;
    w.write_all(at_json)?;
    w.write_all(b",\"name\":")?;
    serde_json::to_writer(&mut *w, r.name)?;
    w.write_all(b",\"type\":")?;
    serde_json::to_writer(&mut *w, r.kind)?;
    w.write_all(b",\"id\":")?;
    serde_json::to_writer(&mut *w, r.id)?;
    w.write_all(b",\"hash\":\"")?;
    w.write_all(&hex_sha256_bytes(r.payload))?;
    w.write_all(b"\",\"data\":\"")?;
    // Straight into a buffer of the encoded length (`encode_string` goes
    // through a chunked encoder, twice as slow in issue 16's profile).
    let len = base64::encoded_len(r.payload.len(), true).unwrap_or(0);
    b64.resize(len, 0);
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(r.payload, &mut b64[..])
        .map_err(std::io::Error::other)?;
    w.write_all(&b64[..n])?;
    w.write_all(b"\",\"is_json_data\":true,\"version\":\"\",\"status\":")?;
    serde_json::to_writer(&mut *w, r.status)?;
    w.write_all(b"}")
}

/// The batch [`write_body`] sends for one interval, read back from those
/// bytes: what tests and benchmarks inspect is exactly what goes on the
/// wire (the agent itself only ever writes the body).
pub fn encode(
    graph: &Graph,
    always: &[crate::enrich::Endpoint],
    src: &FlowsSource,
    skip_fields: &[String],
    start: SystemTime,
    end: SystemTime,
) -> anyhow::Result<Batch> {
    let mut body = Vec::new();
    write_body(&mut body, graph, always, src, skip_fields, (start, end))?;
    Ok(serde_json::from_slice(&body)?)
}

/// Writes the JSON of one interval's batch to `w` element by element, so the
/// batch is never held twice (as elements and as bytes); the number of
/// elements.
pub fn write_body<W: std::io::Write>(
    mut w: W,
    graph: &Graph,
    always: &[crate::enrich::Endpoint],
    src: &FlowsSource,
    skip_fields: &[String],
    (start, end): (SystemTime, SystemTime),
) -> std::io::Result<usize> {
    w.write_all(b"{\"cloud_crawl_data\":{\"data_source\":")?;
    serde_json::to_writer(&mut w, &data_source_block(src, skip_fields))?;
    w.write_all(b",\"crawled_data\":{\"data\":[")?;
    let mut n = 0usize;
    let at = rfc3339(end);
    let at_json = serde_json::to_vec(&at)?;
    let mut b64 = Vec::new();
    each_raw(graph, always, (&rfc3339(start), &at), |r| {
        if n > 0 {
            w.write_all(b",")?;
        }
        n += 1;
        write_element(&mut w, &r, &at_json, &mut b64)
    })?;
    w.write_all(b"]},\"timestamp\":")?;
    w.write_all(&at_json)?;
    w.write_all(b",\"crawl_internal_id\":")?;
    serde_json::to_writer(&mut w, &src.id)?;
    w.write_all(b"}}")?;
    Ok(n)
}

/// A writer that only counts, for the size of a body not built.
#[derive(Debug, Default)]
pub struct Count(pub usize);

impl std::io::Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The size of the body [`write_body`] would write.
pub fn body_len(
    graph: &Graph,
    always: &[crate::enrich::Endpoint],
    src: &FlowsSource,
    skip_fields: &[String],
    interval: (SystemTime, SystemTime),
) -> usize {
    let mut c = Count::default();
    // Writing to a counter cannot fail.
    let _ = write_body(&mut c, graph, always, src, skip_fields, interval);
    c.0
}

/// A body being written that gives up past `limit` bytes.
struct Capped {
    body: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.body.len() + b.len() > self.limit {
            return Err(std::io::Error::other("over the limit"));
        }
        self.body.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The body [`write_body`] writes and its element count, or `None` as soon
/// as it is longer than `limit` bytes (encoding stops there). The agent
/// encodes each batch once: the bytes that measure it are the bytes sent.
pub fn body_within(
    graph: &Graph,
    always: &[crate::enrich::Endpoint],
    src: &FlowsSource,
    skip_fields: &[String],
    interval: (SystemTime, SystemTime),
    limit: usize,
) -> Option<(Vec<u8>, usize)> {
    let mut w = Capped {
        body: Vec::new(),
        limit,
    };
    let n = write_body(&mut w, graph, always, src, skip_fields, interval).ok()?;
    Some((w.body, n))
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
fn relationship_status(flows: &[&EdgeStats]) -> &'static str {
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
