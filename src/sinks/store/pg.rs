//! The PostgreSQL driver's connection: timeouts, and TLS with rustls as
//! libpq's `sslmode` asks: `disable`; `prefer` (the default) and `require`
//! encrypt without checking the server's certificate, as libpq does;
//! `verify-ca` checks it against the CA (`sslrootcert`, else the system's
//! roots); `verify-full` also checks the host name. `require` with an
//! `sslrootcert` behaves as `verify-ca`, as in libpq.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::Unreachable;

/// Connect timeout when the connection string gives none.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a statement may run before the server cancels it.
pub const STATEMENT_TIMEOUT_MS: u32 = 30_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The connection string without `sslmode` and `sslrootcert` (which the
/// driver's own parser does not know in full), and those two.
pub fn split_tls(cs: &str) -> Result<(String, SslMode, Option<String>)> {
    let (mut mode, mut root) = (None, None);
    let mut take = |k: &str, v: &str| -> Result<bool> {
        match k {
            "sslmode" => {
                mode = Some(match v {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => bail!("sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"),
                });
                Ok(true)
            }
            "sslrootcert" => {
                root = Some(v.to_string());
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if cs.starts_with("postgres://") || cs.starts_with("postgresql://") {
        match cs.split_once('?') {
            Some((base, query)) => {
                let mut kept = Vec::new();
                for kv in query.split('&').filter(|s| !s.is_empty()) {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    if !take(k, v)? {
                        kept.push(kv);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => cs.to_string(),
        }
    } else {
        let mut kept = Vec::new();
        for kv in cs.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            if !take(k.trim(), v.trim().trim_matches('\''))? {
                kept.push(kv);
            }
        }
        kept.join(" ")
    };
    let mode = match (mode, &root) {
        (None, _) => SslMode::Prefer,
        (Some(SslMode::Require), Some(_)) => SslMode::VerifyCa,
        (Some(m), _) => m,
    };
    Ok((rest, mode, root))
}

/// Connects, with timeouts and TLS as `sslmode` asks; a server that
/// cannot be reached is an `Unreachable` error.
pub fn connect(cs: &str) -> Result<postgres::Client> {
    let (rest, mode, root) =
        split_tls(cs).map_err(|e| anyhow!("coordimap.database.connection_string: {e}"))?;
    let mut cfg: postgres::Config = rest
        .parse()
        .map_err(|e| anyhow!("coordimap.database.connection_string: {e}"))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    // Server notices ("relation already exists, skipping") are for --debug.
    cfg.notice_callback(
        |n| tracing::debug!(target: "postgres", "{}: {}", n.severity(), n.message()),
    );
    let unreachable =
        |e: postgres::Error| Unreachable(format!("connecting to PostgreSQL: {}", describe(&e)));
    let mut c = if mode == SslMode::Disable {
        cfg.ssl_mode(postgres::config::SslMode::Disable);
        cfg.connect(postgres::NoTls).map_err(unreachable)?
    } else {
        cfg.ssl_mode(if mode == SslMode::Prefer {
            postgres::config::SslMode::Prefer
        } else {
            postgres::config::SslMode::Require
        });
        let tls =
            tokio_postgres_rustls::MakeRustlsConnect::new(client_config(mode, root.as_deref())?);
        cfg.connect(tls).map_err(unreachable)?
    };
    // No JIT: compiling a window's aggregate costs more than it saves
    // (measured: a second on a 400,000-row window).
    c.batch_execute(&format!(
        "SET statement_timeout = {STATEMENT_TIMEOUT_MS}; SET jit = off"
    ))
    .map_err(|e| {
        Unreachable(format!(
            "PostgreSQL: setting statement_timeout: {}",
            describe(&e)
        ))
    })?;
    Ok(c)
}

/// The driver's error with what the server or the TLS layer said (its
/// Display alone is "db error" or "error performing TLS handshake").
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s
}

/// The CA roots: the `sslrootcert` file, else the system's.
fn roots(root: Option<&str>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match root {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("sslrootcert {path}"))?
            {
                store
                    .add(cert.with_context(|| format!("sslrootcert {path}"))?)
                    .with_context(|| format!("sslrootcert {path}"))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(cert);
            }
        }
    }
    if store.is_empty() {
        bail!("no CA certificate to verify the PostgreSQL server with: give sslrootcert=<file>");
    }
    Ok(store)
}

fn client_config(mode: SslMode, root: Option<&str>) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let webpki = match mode {
        SslMode::Prefer | SslMode::Require => None,
        SslMode::VerifyCa | SslMode::VerifyFull => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(root)?), provider.clone())
                .build()?,
        ),
        SslMode::Disable => unreachable!("no TLS without sslmode"),
    };
    let verifier = Arc::new(Verifier {
        provider,
        webpki,
        check_name: mode == SslMode::VerifyFull,
    });
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The server's certificate check. Always: the handshake is signed by the
/// certificate's key, so the session is encrypted to its holder. Without
/// `webpki` (`prefer`, `require`) who the certificate names is not checked,
/// as libpq does; with it the chain must lead to a trusted root, and with
/// `check_name` (`verify-full`) the certificate must name the host.
#[derive(Debug)]
struct Verifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_rootcert_are_taken_out_of_both_forms() {
        assert_eq!(
            split_tls("host=db port=5432 sslmode=verify-full sslrootcert=/ca.pem user=u").unwrap(),
            (
                "host=db port=5432 user=u".into(),
                SslMode::VerifyFull,
                Some("/ca.pem".into())
            )
        );
        assert_eq!(
            split_tls("postgresql://u:p@db/flows?sslmode=require&application_name=x").unwrap(),
            (
                "postgresql://u:p@db/flows?application_name=x".into(),
                SslMode::Require,
                None
            )
        );
        assert_eq!(
            split_tls("postgres://db/flows?sslmode=require&sslrootcert=/ca.pem").unwrap(),
            (
                "postgres://db/flows".into(),
                SslMode::VerifyCa,
                Some("/ca.pem".into())
            )
        );
        assert_eq!(split_tls("host=db").unwrap().1, SslMode::Prefer);
        assert_eq!(
            split_tls("host=db sslmode=disable").unwrap().1,
            SslMode::Disable
        );
        let e = split_tls("host=db sslmode=verify").unwrap_err().to_string();
        assert_eq!(
            e,
            "sslmode \"verify\" is not one of disable, allow, prefer, require, verify-ca, verify-full"
        );
    }
}
