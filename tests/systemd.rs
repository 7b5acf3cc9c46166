//! deploy/systemd/flowmap.service as installed: the install steps of its
//! header are run into a directory of the test's, the key and collector
//! are written into the installed environment file as the steps say, and
//! the unit's exact ExecStart line runs with exactly that file's
//! environment (parsed as systemd does). A batch reaches a loopback
//! collector with the key. An environment file without the key stops the
//! agent with exit status 2, which the unit does not restart.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use flowmap_testkit::collector::{self, header};
use flowmap_testkit::net::{free_port, privileged, Netns};
use flowmap_testkit::tempdir::TempDir;

const UNIT: &str = "deploy/systemd/flowmap.service";
const KEY: &str = "unit-key-7f3a9c";

/// `Key=` values of the unit.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .collect()
}

/// Runs the header's `install [-D] -m MODE SRC DEST` lines with DEST under
/// `root` (and the release binary's SRC as the binary under test).
fn install(unit: &str, root: &Path) -> Vec<String> {
    let mut dests = Vec::new();
    for line in unit.lines().take_while(|l| l.starts_with('#')) {
        let Some(cmd) = line.trim_start_matches('#').trim().strip_prefix("install ") else {
            continue;
        };
        let w: Vec<&str> = cmd.split_whitespace().collect();
        let mode = w[w.iter().position(|a| *a == "-m").unwrap() + 1];
        let (src, dest) = (w[w.len() - 2], w[w.len() - 1]);
        let src = if src == "target/release/flowmap" {
            env!("CARGO_BIN_EXE_flowmap")
        } else {
            src
        };
        let to = root.join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(src, &to).unwrap_or_else(|e| panic!("install {src} {dest}: {e}"));
        let mode = u32::from_str_radix(mode, 8).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
        dests.push(dest.to_string());
    }
    dests
}

/// An EnvironmentFile= as systemd reads it: `KEY=VALUE` lines, `#` and
/// `;` comments, optional quotes around the value.
fn environment_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// Sets `KEY=` of the installed environment file, as an operator edits it.
fn set_env(path: &Path, key: &str, value: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let prefix = format!("{key}=");
    assert!(
        text.lines().any(|l| l.starts_with(&prefix)),
        "{key}= is not in the environment file:\n{text}"
    );
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{prefix}{value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(path, out.join("\n") + "\n").unwrap();
}

/// The unit's ExecStart line with its absolute paths under `root`; the
/// environment of its EnvironmentFile= (under `root`) and nothing else,
/// but for the map page's port (the unit's default, 9464, may be taken).
fn unit_command(unit: &str, root: &Path) -> Command {
    let exec = unit_values(unit, "ExecStart");
    assert_eq!(exec.len(), 1);
    let words: Vec<&str> = exec[0].split_whitespace().collect();
    let under = |p: &str| -> PathBuf { root.join(p.trim_start_matches('/')) };
    let mut cmd = Command::new(under(words[0]));
    cmd.args(words[1..].iter().map(|w| {
        if w.starts_with('/') {
            under(w).into_os_string()
        } else {
            w.into()
        }
    }));
    let files = unit_values(unit, "EnvironmentFile");
    assert_eq!(files.len(), 1);
    assert!(
        !files[0].starts_with('-'),
        "the environment file is required: config.yaml reads the key from it"
    );
    cmd.env_clear()
        .envs(environment_file(&under(&files[0])))
        .env("FLOWMAP_LISTEN", format!("127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The installed config.yaml on the test's veth instead of `all` (other
/// tests' interfaces are not this test's to attach to).
fn on_veth(root: &Path, dev: &str) {
    let cfg = root.join("etc/flowmap/config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("value: all"), "{text}");
    std::fs::write(&cfg, text.replace("value: all", &format!("value: {dev}"))).unwrap();
}

/// StateDirectory=flowmap: /var/lib/flowmap, 0700.
fn state_dir(unit: &str, root: &Path) {
    assert_eq!(unit_values(unit, "StateDirectory"), ["flowmap"]);
    let d = root.join("var/lib/flowmap");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn the_unit_as_installed_ships_with_the_key() {
    if !privileged("the_unit_as_installed_ships_with_the_key") {
        return;
    }
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let root = TempDir::new("unit-root");
    let installed = install(&unit, root.path());
    assert_eq!(
        installed,
        [
            "/usr/local/bin/flowmap",
            "/etc/flowmap/config.yaml",
            "/etc/flowmap/flowmap.env",
            "/etc/systemd/system/flowmap.service"
        ]
    );
    let env_file = root.path().join("etc/flowmap/flowmap.env");
    let mode = std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the environment file holds the key");
    let v = Netns::new().unwrap();
    on_veth(root.path(), &v.host);
    state_dir(&unit, root.path());
    let col = collector::Server::start();
    set_env(&env_file, "COORDIMAP_ENDPOINT", &col.url());
    set_env(&env_file, "COORDIMAP_API_KEY", KEY);

    let mut child = unit_command(&unit, root.path()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("flowmap running") {
                let _ = tx.send(());
            }
            all += &line;
            all += "\n";
        }
        all
    });
    let started = rx.recv_timeout(Duration::from_secs(30));
    // SIGTERM, as systemctl stop: the last interval is flushed and shipped.
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(started.is_ok(), "the agent did not start:\n{log}");
    assert!(status.success(), "{status}\n{log}");
    assert!(!log.contains(KEY), "the key reached the log:\n{log}");

    let accepted = std::mem::take(&mut col.log.lock().unwrap().accepted);
    assert!(
        !accepted.is_empty(),
        "no batch reached the collector:\n{log}"
    );
    for (h, body) in &accepted {
        assert_eq!(header(h, "api-key"), KEY);
        let b: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            b["cloud_crawl_data"]["data_source"]["data_source_id"],
            "flows-server"
        );
    }
}

#[test]
fn without_the_key_the_unit_stops_instead_of_restarting() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let root = TempDir::new("unit-root");
    install(&unit, root.path());
    state_dir(&unit, root.path());
    // The endpoint set, the key forgotten.
    let env_file = root.path().join("etc/flowmap/flowmap.env");
    set_env(
        &env_file,
        "COORDIMAP_ENDPOINT",
        "https://collector.example/api/crawl",
    );
    let out = unit_command(&unit, root.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("coordimap.api_key: required when an endpoint is configured"),
        "{err}"
    );
    assert_eq!(unit_values(&unit, "Restart"), ["on-failure"]);
    let no_restart = unit_values(&unit, "RestartPreventExitStatus");
    assert_eq!(no_restart, ["2"], "exit status 2 must not be restarted");
}
