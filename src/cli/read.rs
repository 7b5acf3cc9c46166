//! `flowmap top` and `flowmap graph`: read the store, print a view.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::check::load_config;
use crate::sinks::store::{Location, Store};

/// `top` and `graph`: opens the store the configuration names (or the
/// SQLite file of the state directory) and prints what `view` makes of the
/// window that ends now.
pub fn read_store(
    config: Option<&PathBuf>,
    state_dir: &std::path::Path,
    since: Duration,
    view: impl FnOnce(&mut Store, std::time::SystemTime) -> anyhow::Result<String>,
) -> ExitCode {
    let (cfg, _) = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let loc = Location::from_config(cfg.database.as_ref(), state_dir);
    let from = std::time::SystemTime::now()
        .checked_sub(since)
        .unwrap_or(std::time::UNIX_EPOCH);
    match Store::open(&loc).and_then(|mut s| view(&mut s, from)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: reading the store ({}): {e:#}", loc.describe());
            ExitCode::FAILURE
        }
    }
}
