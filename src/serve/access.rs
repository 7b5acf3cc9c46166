//! Who may read the map page and its API: the Host header is checked
//! (against DNS rebinding), and off loopback a bearer token is required.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest, Sha256};

/// The rules of the map page's listener.
pub struct Access {
    listen: IpAddr,
    /// SHA-256 of the token (None: no token asked, loopback only).
    token: Option<[u8; 32]>,
    /// Host names the page is served under, lower case, without port.
    names: Vec<String>,
    /// Longest a request may take.
    timeout: Duration,
}

/// Reads a bearer token from `path` (surrounding whitespace and the final
/// newline of a Secret file are not part of it). The token itself never
/// appears in an error.
pub fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the web token file {}", path.display()))?;
    let t = text.trim();
    if t.is_empty() {
        bail!("the web token file {} is empty", path.display());
    }
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!(
            "the web token file {} holds more than one word; a bearer token has no spaces",
            path.display()
        );
    }
    Ok(t.to_string())
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

impl Access {
    /// Refuses a listener off loopback without a token.
    pub fn new(
        listen: SocketAddr,
        token: Option<String>,
        names: &[String],
        timeout: Duration,
    ) -> Result<Access> {
        let ip = listen.ip().to_canonical();
        if token.is_none() && !ip.is_loopback() {
            bail!(
                "--listen {listen} is not a loopback address, and the map page and its API \
                 there need a bearer token: give one with --web-token-file FILE, or keep \
                 --listen on 127.0.0.1 and put /metrics and /healthz on --metrics-listen"
            );
        }
        let names = names
            .iter()
            .map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        Ok(Access {
            listen: ip,
            token: token.map(|t| digest(t.as_bytes())),
            names,
            timeout,
        })
    }

    pub fn requires_token(&self) -> bool {
        self.token.is_some()
    }

    /// An IP literal names this listener (a browser sends a name an
    /// attacker controls only for a DNS name, never for an address);
    /// a DNS name must be `localhost` or one of `--web-host`. The port is
    /// not compared: a port-forward (kubectl, ssh) changes it.
    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = name.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            return ip.is_loopback() || ip == self.listen || self.listen.is_unspecified();
        }
        name == "localhost" || self.names.contains(&name)
    }

    /// `Authorization: Bearer <token>`, compared in constant time (the
    /// digests of both, so neither the length nor a prefix shows).
    fn token_ok(&self, auth: Option<&HeaderValue>) -> bool {
        let Some(want) = &self.token else {
            return true;
        };
        let given = auth
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .unwrap_or("");
        let got = digest(given.as_bytes());
        let diff = want
            .iter()
            .zip(got.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        std::hint::black_box(diff) == 0 && !given.is_empty()
    }
}

/// The host of a Host header: `[v6]:port`, `name:port`, `name`.
fn host_name(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match h.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => h,
    }
}

fn error(code: StatusCode, msg: &str) -> Response {
    (code, Json(json!({ "error": msg }))).into_response()
}

/// The middleware of the map page's listener: Host (421), token (401),
/// then the handler within the request deadline (503).
pub async fn check(State(a): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if a.host_allowed(&h) => {}
        Some(h) => {
            tracing::debug!(host = %h, "map page: request for another host refused");
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                "this host name is not served here (add it with --web-host)",
            );
        }
        None => return error(StatusCode::MISDIRECTED_REQUEST, "a Host header is required"),
    }
    if !a.token_ok(req.headers().get(header::AUTHORIZATION)) {
        let mut r = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"flowmap\""),
        );
        return r;
    }
    match tokio::time::timeout(a.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request ran past its deadline (--web-timeout)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(listen: &str, names: &[&str]) -> Access {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        Access::new(
            listen.parse().unwrap(),
            Some("t".into()),
            &names,
            Duration::from_secs(1),
        )
        .unwrap()
    }

    #[test]
    fn host_names() {
        let a = access("10.0.0.5:9465", &["Map.Example."]);
        for ok in [
            "10.0.0.5:9465",
            "10.0.0.5",
            "127.0.0.1:8080",
            "[::1]:9465",
            "localhost:9465",
            "LOCALHOST",
            "map.example",
            "map.example:443",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example:9465",
            "10.0.0.6:9465",
            "map.example.evil",
            "",
            "[fd00::1]:9465",
        ] {
            assert!(!a.host_allowed(bad), "{bad}");
        }
        assert!(access("0.0.0.0:9465", &[]).host_allowed("192.0.2.7:9465"));
        assert!(!access("0.0.0.0:9465", &[]).host_allowed("rebind.example:9465"));
    }

    #[test]
    fn tokens() {
        let a = access("10.0.0.5:9465", &[]);
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(a.token_ok(Some(&h("Bearer t"))));
        assert!(a.token_ok(Some(&h("bearer t"))));
        assert!(!a.token_ok(Some(&h("Bearer u"))));
        assert!(!a.token_ok(Some(&h("Bearer tt"))));
        assert!(!a.token_ok(Some(&h("Basic t"))));
        assert!(!a.token_ok(None));
        let none = Access::new(
            "127.0.0.1:1".parse().unwrap(),
            None,
            &[],
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(none.token_ok(None));
        let off = Access::new(
            "0.0.0.0:1".parse().unwrap(),
            None,
            &[],
            Duration::from_secs(1),
        );
        assert!(off.is_err());
    }
}
