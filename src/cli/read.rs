//! `flowmap top`, `graph` and `diff`: read the store, print a view.

use std::path::PathBuf;
use std::process::ExitCode;

use super::check::load_config;
use super::StoreAt;
use crate::sinks::store::{Location, Store};

/// Opens the store (`--database`, else the one the configuration names,
/// else the SQLite file of the state directory) and prints what `view`
/// makes of it.
pub fn read_store(
    config: Option<&PathBuf>,
    at: &StoreAt,
    view: impl FnOnce(&mut Store) -> anyhow::Result<String>,
) -> ExitCode {
    let loc = match at {
        StoreAt::Given(l) => l.clone(),
        StoreAt::Configured(state_dir) => {
            let (cfg, _) = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            Location::from_config(cfg.database.as_ref(), state_dir)
        }
    };
    match Store::open(&loc).and_then(|mut s| view(&mut s)) {
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
