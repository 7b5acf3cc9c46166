//! `flowmap check`, and the configuration loading every command shares.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, format_duration, Config, DeployedAt};
use crate::datapath::ifaces::Selection;
use crate::datapath::AttachMode;

/// Where the configuration comes from, as the user asked.
pub fn load_config(path: Option<&PathBuf>) -> Result<(Config, String), ExitCode> {
    let (path, explicit) = match path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.yaml"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((
                Config::builtin_default(),
                "built-in default (no config.yaml here)".into(),
            ));
        }
        Err(e) => {
            eprintln!("error: reading configuration {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    match config::parse(&text, &|n| std::env::var(n).ok()) {
        Ok(c) => Ok((c, path.display().to_string())),
        Err(errs) => {
            eprintln!("{}: invalid configuration", path.display());
            eprintln!("{errs}");
            Err(ExitCode::from(2))
        }
    }
}

pub fn check_endpoint(cfg: &Config, endpoint: Option<&str>) -> Result<(), ExitCode> {
    if endpoint.is_some_and(|e| !e.is_empty()) && cfg.api_key.is_none() {
        eprintln!("error: coordimap.api_key: required when an endpoint is configured (--endpoint / COORDIMAP_ENDPOINT)");
        return Err(ExitCode::from(2));
    }
    Ok(())
}

pub fn print_check(cfg: &Config, source: &str, endpoint: Option<&str>) {
    println!("configuration: {source}");
    println!(
        "api_key: {}",
        if cfg.api_key.is_some() {
            "set (hidden)"
        } else {
            "not set"
        }
    );
    println!(
        "endpoint: {}",
        endpoint
            .filter(|e| !e.is_empty())
            .map(redact_url)
            .unwrap_or_else(|| "none (data stays local)".into())
    );
    if !cfg.skip_fields.is_empty() {
        println!("skip_fields: {}", cfg.skip_fields.join(", "));
    }
    if let Some(db) = &cfg.database {
        println!("database: {:?} (connection string hidden)", db.driver);
    }
    for f in &cfg.flows {
        println!("data source {:?} (flows)", f.id);
        let ifs = match &f.interfaces {
            Selection::All => "all".to_string(),
            Selection::Names(n) => n.join(","),
        };
        println!("  interface_name: {ifs}");
        println!(
            "  deployedAt: {}",
            match f.deployed_at {
                DeployedAt::Server => "server",
                DeployedAt::Kubernetes => "kubernetes",
            }
        );
        let maps: Vec<String> = f
            .external_mappings
            .iter()
            .map(|m| format!("{}@{}", m.key, m.value))
            .collect();
        println!(
            "  external_mappings: {}",
            if maps.is_empty() {
                "(none)".into()
            } else {
                maps.join(" ")
            }
        );
        println!("  crawl_interval: {}", format_duration(f.crawl_interval));
        println!("  max_flows: {}", f.max_flows);
        println!(
            "  attach_mode: {}",
            match f.attach_mode {
                AttachMode::Auto => "auto",
                AttachMode::Tcx => "tcx",
                AttachMode::Tc => "tc",
            }
        );
    }
    for o in &cfg.others {
        println!(
            "not run by flowmap: data source {:?} of type {:?}",
            o.id, o.kind
        );
    }
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
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
                    Some((k, _)) if crate::sinks::coordimap::is_secret_key(k) => {
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
