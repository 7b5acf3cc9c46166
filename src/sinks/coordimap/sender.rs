//! The sender: posts the oldest spooled batch until the collector accepts
//! it, in order, one at a time, with backoff.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use super::Reply;
use crate::config::Secret;

use super::spool::{DeliveryStats, Spool};

/// What one POST came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered,
    /// Connect error, timeout, 5xx, 429, 408, or a reply that is not
    /// Coordimap's: retried with backoff.
    Transient(String),
    /// 401 / 403: the API key was refused. Retried slowly.
    Credentials(String),
    /// Another 4xx, or status.http_code other than 200: the collector
    /// will not take this batch; it is dropped and counted.
    Rejected(String),
}

pub fn classify(http: u16, body: &[u8]) -> Outcome {
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match http {
        200..=299 => match serde_json::from_slice::<Reply>(body) {
            Ok(r) if r.status.http_code == 200 => Outcome::Delivered,
            Ok(r) if r.status.http_code == 401 || r.status.http_code == 403 => {
                Outcome::Credentials(format!(
                    "status.http_code {}: {}",
                    r.status.http_code, r.status.message
                ))
            }
            Ok(r) if r.status.http_code >= 500 || r.status.http_code == 429 => {
                Outcome::Transient(format!(
                    "status.http_code {}: {}",
                    r.status.http_code, r.status.message
                ))
            }
            Ok(r) => Outcome::Rejected(format!(
                "status.http_code {}: {}",
                r.status.http_code, r.status.message
            )),
            Err(_) => Outcome::Transient(format!(
                "HTTP {http} with a reply that is not Coordimap's: {}",
                text()
            )),
        },
        401 | 403 => Outcome::Credentials(format!("HTTP {http}")),
        408 | 429 | 500..=599 => Outcome::Transient(format!("HTTP {http}: {}", text())),
        _ => Outcome::Rejected(format!("HTTP {http}: {}", text())),
    }
}

/// Retry timing.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
    /// Wait after a refused API key.
    pub credentials: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            first: Duration::from_millis(500),
            max: Duration::from_secs(60),
            credentials: Duration::from_secs(60),
        }
    }
}

impl Retry {
    /// Exponential backoff with jitter: a random wait between half and all
    /// of first × 2^(attempt-1), capped at max.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .first
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = exp.min(self.max);
        d.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

pub struct Collector {
    client: reqwest::Client,
    endpoint: String,
    api_key: Secret,
    /// The node name in each batch's idempotency key.
    node: String,
}

/// Where the CA roots that check the collector's certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roots {
    /// The system's (or `SSL_CERT_FILE` / `SSL_CERT_DIR`'s) certificates.
    System,
    /// Mozilla's roots compiled into the binary (`webpki-roots`): the
    /// system has none, as in a minimal container.
    Bundled,
}

/// The CA roots: the system's when it has any, else the bundled ones.
pub fn ca_roots() -> (rustls::RootCertStore, Roots) {
    let mut store = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _ignored) = store.add_parsable_certificates(found.certs);
    if added > 0 {
        return (store, Roots::System);
    }
    store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    (store, Roots::Bundled)
}

/// The TLS setup of the collector client (ring, TLS 1.2 and 1.3), with
/// [`ca_roots`]; logs which roots it uses.
fn tls_config() -> anyhow::Result<rustls::ClientConfig> {
    let (roots, from) = ca_roots();
    match from {
        Roots::System => info!(
            certificates = roots.len(),
            "collector TLS: using the system's CA roots"
        ),
        Roots::Bundled => warn!(
            certificates = roots.len(),
            "collector TLS: the system has no CA roots; using the bundled Mozilla roots"
        ),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A node name as it goes into a header: visible ASCII other than `:`.
fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A batch's idempotency key: `<node>:<instance ID>:<sequence>`. The node
/// tells agents apart, the instance ID (kept in the spool directory) a
/// reinstalled or moved spool, and the sequence the batches of one spool.
pub fn idempotency_key(node: &str, instance: &str, seq: u64) -> String {
    format!("{}:{instance}:{seq}", header_safe(node))
}

/// The most of a reply that is read.
pub const REPLY_MAX: usize = 64 * 1024;

/// An `http://` endpoint must be loopback, unless the operator opted in.
fn check_endpoint(endpoint: &str, allow_plain_http: bool) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(endpoint)
        .map_err(|e| anyhow::anyhow!("the endpoint is not a URL ({e})"))?;
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback || allow_plain_http => Ok(()),
        "http" => anyhow::bail!(
            "the endpoint uses http:// to a host that is not loopback: the API key would travel in clear text; use https://, or pass --allow-plain-http to accept that"
        ),
        other => anyhow::bail!("the endpoint's scheme {other:?} is not http or https"),
    }
}

impl Collector {
    /// `allow_plain_http`: the operator's explicit consent to send the API
    /// key in clear text to an `http://` endpoint that is not loopback.
    pub fn new(
        endpoint: &str,
        api_key: Secret,
        allow_plain_http: bool,
    ) -> anyhow::Result<Collector> {
        check_endpoint(endpoint, allow_plain_http)?;
        // reqwest is built without a default TLS provider; ring is ours.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder();
        if endpoint.starts_with("https:") {
            builder = builder.tls_backend_preconfigured(tls_config()?);
        }
        let client = builder
            .timeout(Duration::from_secs(15))
            // A redirect would carry the Api-Key header to wherever it
            // points: never followed (see `classify`).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("flowmap/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Collector {
            client,
            endpoint: endpoint.to_string(),
            api_key,
            node: crate::agent::kube::node_name(),
        })
    }

    /// The node name of the idempotency keys (default: `NODE_NAME`, else
    /// the host name).
    pub fn node(mut self, node: &str) -> Collector {
        self.node = node.to_string();
        self
    }

    /// Posts batch `seq` of the spool whose instance ID is `instance`.
    pub async fn post(&self, instance: &str, seq: u64, body: Vec<u8>) -> Outcome {
        let res = self
            .client
            .post(&self.endpoint)
            .header("Api-Key", self.api_key.expose())
            .header("Content-Type", "application/json")
            .header("X-Flowmap-Batch", seq.to_string())
            .header(
                "Idempotency-Key",
                idempotency_key(&self.node, instance, seq),
            )
            .body(body)
            .send()
            .await;
        match res {
            Err(e) => Outcome::Transient(format!("{}", e.without_url())),
            Ok(mut r) => {
                let status = r.status().as_u16();
                if (300..400).contains(&status) {
                    let to = r
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("(no Location)")
                        .to_string();
                    error!(status, location = %super::redact_url(&to), "the collector redirects: a configuration error (redirects are not followed, so the API key never reaches another host); set --endpoint to the final URL");
                    return Outcome::Transient(format!("HTTP {status} redirect, not followed"));
                }
                // The reply is read up to REPLY_MAX bytes, whatever it says.
                let mut body = Vec::new();
                loop {
                    match r.chunk().await {
                        Ok(Some(c)) => {
                            let room = REPLY_MAX - body.len();
                            body.extend_from_slice(&c[..c.len().min(room)]);
                            if body.len() >= REPLY_MAX {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            return Outcome::Transient(format!(
                                "reading the reply: {}",
                                e.without_url()
                            ))
                        }
                    }
                }
                classify(status, &body)
            }
        }
    }
}

/// Posts spooled batches, oldest first, until `finish` turns true and the
/// spool is empty (the caller bounds that last phase with a timeout).
pub async fn run_sender(
    spool: Arc<Mutex<Spool>>,
    collector: Collector,
    retry: Retry,
    wake: Arc<Notify>,
    mut finish: watch::Receiver<bool>,
    stats: Arc<DeliveryStats>,
) {
    let mut attempt = 0u32;
    let instance = match spool.lock() {
        Ok(s) => s.instance_id().to_string(),
        Err(_) => return,
    };
    loop {
        let next = spool.lock().ok().and_then(|mut s| s.oldest());
        let Some((seq, body)) = next else {
            if *finish.borrow() {
                return;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = finish.changed() => {}
            }
            continue;
        };
        let wait = match collector.post(&instance, seq, body).await {
            Outcome::Delivered => {
                if let Ok(mut s) = spool.lock() {
                    s.remove(seq);
                }
                if attempt > 0 {
                    info!(
                        seq,
                        after_failures = attempt,
                        "collector reachable again; batch delivered"
                    );
                }
                attempt = 0;
                stats.batches_delivered.inc();
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                stats.last_delivery_unix.set(now as i64);
                continue;
            }
            Outcome::Rejected(why) => {
                error!(seq, reason = %why, "the collector rejected the batch; dropped");
                if let Ok(mut s) = spool.lock() {
                    s.remove(seq);
                }
                stats.batches_rejected.inc();
                continue;
            }
            Outcome::Transient(why) => {
                attempt += 1;
                stats.attempts_failed.inc();
                let d = retry.delay(attempt);
                warn!(seq, attempt, retry_in_ms = d.as_millis() as u64, reason = %why, "delivery failed; kept in the spool");
                d
            }
            Outcome::Credentials(why) => {
                attempt += 1;
                stats.attempts_failed.inc();
                error!(
                    seq,
                    reason = %why,
                    retry_in_s = retry.credentials.as_secs(),
                    "the collector refused the API key (coordimap.api_key); batches are kept in the spool"
                );
                retry.credentials
            }
        };
        if *finish.borrow() {
            // Shutting down: one more try soon, within the caller's timeout.
            tokio::time::sleep(wait.min(Duration::from_millis(500))).await;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = finish.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_classified() {
        let ok = br#"{"status":{"http_code":200,"message":"ok","error_code":""}}"#;
        assert_eq!(classify(200, ok), Outcome::Delivered);
        assert_eq!(classify(201, ok), Outcome::Delivered);
        assert!(matches!(
            classify(200, br#"{"status":{"http_code":500,"message":"db"}}"#),
            Outcome::Transient(_)
        ));
        assert!(matches!(
            classify(200, br#"{"status":{"http_code":400,"message":"bad"}}"#),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            classify(200, b"<html>proxy</html>"),
            Outcome::Transient(_)
        ));
        assert!(matches!(classify(503, b""), Outcome::Transient(_)));
        assert!(matches!(classify(429, b""), Outcome::Transient(_)));
        assert!(matches!(classify(401, b""), Outcome::Credentials(_)));
        assert!(matches!(classify(403, b""), Outcome::Credentials(_)));
        assert!(matches!(classify(400, b"no"), Outcome::Rejected(_)));
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let r = Retry {
            first: Duration::from_millis(100),
            max: Duration::from_secs(1),
            credentials: Duration::from_secs(60),
        };
        for _ in 0..50 {
            let d1 = r.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = r.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d10 = r.delay(10);
            assert!(d10 >= Duration::from_millis(500) && d10 <= Duration::from_secs(1));
        }
    }
}
