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
        let d = pg.data();
        crate::net::sh(&[
            "chown",
            "postgres:postgres",
            pg.dir.path().to_str().unwrap(),
        ]);
        let initdb = pg.bin.join("initdb");
        pg.as_postgres(&[
            initdb.to_str().unwrap(),
            "-D",
            &d,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        pg.start_again();
        Some(pg)
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.path().display())
    }

    /// Runs a command as the `postgres` user; it must succeed.
    fn as_postgres(&self, args: &[&str]) {
        let mut a = vec!["-u", "postgres", "--"];
        a.extend_from_slice(args);
        let out = Command::new("runuser").args(&a).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again, after `stop`) on the same port and data.
    pub fn start_again(&self) {
        let d = self.dir.path().to_str().unwrap().to_string();
        let opts = format!(
            "-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port
        );
        let pg_ctl = self.bin.join("pg_ctl");
        self.as_postgres(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            &self.data(),
            "-o",
            &opts,
            "-l",
            &format!("{d}/log"),
            "-w",
            "start",
        ]);
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        self.as_postgres(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            &self.data(),
            "-m",
            "fast",
            "-w",
            "stop",
        ]);
    }

    /// Makes the server TLS-only with a certificate for `localhost` signed
    /// by a fresh CA (openssl); restarts it. Returns the CA file.
    pub fn require_tls(&self) -> PathBuf {
        let d = self.data();
        let ca = self.dir.path().join("ca.pem");
        let openssl = |args: &[&str]| crate::net::sh(&[&["openssl"], args].concat());
        let ca_key = format!("{d}/ca.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=flowmap test CA",
            "-keyout",
            &ca_key,
            "-out",
            ca.to_str().unwrap(),
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &format!("{d}/server.key"),
            "-out",
            &format!("{d}/server.csr"),
        ]);
        let ext = self.dir.file("san.cnf", "subjectAltName=DNS:localhost\n");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{d}/server.csr"),
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            &format!("{d}/server.crt"),
        ]);
        crate::net::sh(&[
            "chown",
            "postgres:postgres",
            &format!("{d}/server.key"),
            &format!("{d}/server.crt"),
        ]);
        crate::net::sh(&["chmod", "600", &format!("{d}/server.key")]);
        let conf = format!("{d}/postgresql.conf");
        let mut c = std::fs::read_to_string(&conf).unwrap();
        c += "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n";
        std::fs::write(&conf, c).unwrap();
        // Only TLS connections over TCP are let in.
        std::fs::write(
            format!("{d}/pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
        )
        .unwrap();
        self.stop();
        self.start_again();
        ca
    }

    /// Through the server's Unix socket (a file: reachable from any
    /// network namespace, unlike its loopback address).
    pub fn socket_connection_string(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres sslmode=disable",
            self.dir.path().display(),
            self.port
        )
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
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                self.bin.join("pg_ctl").to_str().unwrap(),
                "-D",
                &self.data(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}
