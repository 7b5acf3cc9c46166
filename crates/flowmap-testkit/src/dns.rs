//! A real DNS server for tests: dnsmasq (Debian `dnsmasq-base`, installed
//! by scripts/setup.sh) in a namespace, serving only the records a test
//! gives it; stopped on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::net::Netns;

pub struct Dnsmasq(Child);

impl Dnsmasq {
    /// dnsmasq in `ns`, listening on `listen` (addresses of the namespace)
    /// port 53, answering from `records` (`--host-record=…`, `--cname=…`)
    /// only: no upstream, no /etc/hosts, no configuration file.
    pub fn start(ns: &Netns, listen: &[&str], records: &[String]) -> Result<Dnsmasq> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.ns, "dnsmasq", "--no-daemon"])
            .args(["--no-resolv", "--no-hosts", "--conf-file=/dev/null"])
            .args(["--pid-file=", "--user=root", "--bind-interfaces"])
            .args(listen.iter().map(|a| format!("--listen-address={a}")))
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().context(
            "starting dnsmasq (Debian package dnsmasq-base; scripts/setup.sh installs it)",
        )?;
        let d = Dnsmasq(child);
        // Ready when it answers on its first address.
        let end = Instant::now() + Duration::from_secs(10);
        let first = listen.first().copied().unwrap_or("127.0.0.1").to_string();
        while ns
            .try_exec(&[
                "dig",
                "+short",
                "+time=1",
                "+tries=1",
                &format!("@{first}"),
                "localhost.invalid",
            ])
            .is_err()
        {
            if Instant::now() > end {
                bail!("dnsmasq did not answer on {first} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
