//! A private PostgreSQL server on a loopback port, for the store tests.
//! Started from Debian's binaries (scripts/setup.sh installs them) as the
//! `postgres` user; stopped and removed on drop.

use std::path::PathBuf;
use std::process::Command;

use crate::tempdir::TempDir;

pub struct Pg {
    pub port: u16,
    bin: PathBuf,
    /// Removed after the server stopped (fields drop after `drop`).
    dir: TempDir,
}

fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

impl Pg {
    /// None (with a reason printed) when PostgreSQL is not installed and
    /// CI is not set; under CI=true a missing server is a failure.
    pub fn start(test: &str) -> Option<Pg> {
        let Some(bin) = bin_dir() else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: PostgreSQL is not installed (scripts/setup.sh installs it) and CI=true forbids skipping");
            }
            eprintln!("SKIP {test}: PostgreSQL is not installed; run scripts/setup.sh");
            return None;
        };
        let dir = TempDir::new("pg");
        let port = crate::net::free_port();
        let pg = Pg { dir, port, bin };
        let d = pg.dir.path().to_str().unwrap().to_string();
        crate::net::sh(&["chown", "postgres:postgres", &d]);
        let run = |args: &[&str]| {
            let mut a = vec!["-u", "postgres", "--"];
            a.extend_from_slice(args);
            let out = Command::new("runuser").args(&a).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let initdb = pg.bin.join("initdb");
        let pg_ctl = pg.bin.join("pg_ctl");
        run(&[
            initdb.to_str().unwrap(),
            "-D",
            &format!("{d}/data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        let opts = format!("-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off");
        run(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            &format!("{d}/data"),
            "-o",
            &opts,
            "-l",
            &format!("{d}/log"),
            "-w",
            "start",
        ]);
        Some(pg)
    }

    pub fn connection_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let d = self.dir.path().to_str().unwrap().to_string();
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                self.bin.join("pg_ctl").to_str().unwrap(),
                "-D",
                &format!("{d}/data"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}
