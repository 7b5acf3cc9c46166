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
            .map(crate::sinks::coordimap::redact_url)
            .unwrap_or_else(|| "none (data stays local)".into())
    );
    if endpoint.is_some_and(|e| e.starts_with("https:")) {
        use crate::sinks::coordimap::sender::{ca_roots, Roots};
        let (roots, from) = ca_roots();
        let from = match from {
            Roots::System => "system",
            Roots::Bundled => "bundled (the system has none)",
        };
        println!("collector CA roots: {from}, {} certificates", roots.len());
    }
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
