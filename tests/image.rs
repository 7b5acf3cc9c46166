//! The ways flowmap is shipped, run with exactly the privileges they are
//! deployed with:
//!
//! - the container image `scripts/image.sh` builds, inspected file by file
//!   and run through podman the way `deploy/kubernetes/flowmap.yaml`'s
//!   DaemonSet runs it (host network, its capabilities and nothing else,
//!   read-only root filesystem, its seccomp profile, the configuration
//!   from a mounted file, the state directory as a volume, the API key from
//!   the environment): it counts known traffic through a veth exactly,
//!   ships to a collector with that key, and reports its version. Without
//!   CAP_BPF, or under podman's own seccomp profile, it stops with an
//!   error that says why;
//! - `deploy/systemd/flowmap.service`'s user and capabilities, reproduced
//!   with setpriv around the release binary.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowmap_testkit::agent::http_get;
use flowmap_testkit::collector;
use flowmap_testkit::net::{free_port, ifindex, privileged_serial, sh, sh_quiet, Netns};
use flowmap_testkit::tempdir::TempDir;
use flowmap_testkit::traffic::{
    agent_totals, oracle, traffic, Capture, Dir, Frame, Server, Tuple, TCP_BYTES, UDP_SIZES,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Container;

const MANIFEST: &str = "deploy/kubernetes/flowmap.yaml";
const UNIT: &str = "deploy/systemd/flowmap.service";
const VERSION: &str = env!("CARGO_PKG_VERSION");
const COMMIT: &str = env!("FLOWMAP_GIT_COMMIT");
const API_KEY: &str = "image-test-key-7f3a";

/// These tests attach to interfaces of the host: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The privilege rule (`privileged_serial`: outside CI a test without
/// root skips, under CI=true it fails), then the tools setup.sh installs,
/// which must be there; the lock of these tests.
fn tools(test: &str, names: &[&str]) -> Option<MutexGuard<'static, ()>> {
    let guard = privileged_serial(test, &SERIAL)?;
    for t in names {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{test}: {t} not found; run scripts/setup.sh");
    }
    Some(guard)
}

/// Takes away what `cargo test` adds to the environment (the package's
/// CARGO_* variables, OUT_DIR, build.rs's FLOWMAP_GIT_COMMIT, rustup's
/// toolchain pin, the library path), so that a cargo run from the test
/// sees the shell's environment and reuses the shell's release build
/// instead of rebuilding every dependency.
fn shell_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let added = k == "CARGO"
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_BIN_EXE_")
            || k == "CARGO_CRATE_NAME"
            || k == "CARGO_PRIMARY_PACKAGE"
            || k == "CARGO_TARGET_TMPDIR"
            || k == "OUT_DIR"
            || k == "FLOWMAP_GIT_COMMIT"
            || k == "LD_LIBRARY_PATH"
            || k.starts_with("RUSTUP_TOOLCHAIN")
            || k == "RUST_RECURSION_COUNT";
        if added {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}

/// The release binary, built once (`cargo build --release --locked`).
fn release_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let st = shell_env(&mut Command::new("cargo"))
            .args(["build", "--release", "--locked"])
            .status()
            .expect("cargo");
        assert!(st.success(), "cargo build --release failed");
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        let bin = Path::new(&dir).join("release/flowmap");
        bin.canonicalize().unwrap()
    })
}

/// `scripts/image.sh`, once: the OCI archive it prints.
fn image_archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        release_binary();
        let out = shell_env(&mut Command::new("bash"))
            .arg("scripts/image.sh")
            .stderr(Stdio::inherit())
            .output()
            .expect("bash");
        assert!(out.status.success(), "scripts/image.sh failed");
        let path = String::from_utf8(out.stdout).unwrap();
        let path = PathBuf::from(path.trim());
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            format!("flowmap-{VERSION}.oci.tar")
        );
        path
    })
}

/// The commit this source tree is at, as build.rs reads it.
fn head_commit() -> String {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().into(),
        _ => "unknown".into(),
    }
}

fn version_line() -> String {
    format!("flowmap {VERSION} (commit {COMMIT})")
}

// ---------------------------------------------------------------------------
// Podman on storage of its own.

/// The VM's hard limits are below podman's default ulimits.
const ULIMITS: [&str; 2] = ["--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024"];

/// podman with every piece of state (images, containers, run files) in a
/// temporary directory; dropped: containers and images removed, the
/// directory deleted.
struct Podman {
    dir: PathBuf,
    /// The containers' cgroup parent (cgroupfs), removed on drop.
    cgroup: String,
}

impl Podman {
    fn new() -> Podman {
        let dir = std::env::temp_dir().join(format!("flowmap-podman-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let cgroup = format!("/flowmap-test-{}", std::process::id());
        Podman { dir, cgroup }
    }

    /// `podman run` with the VM's ulimits and the test's cgroup parent.
    fn run(&self) -> Command {
        let mut c = self.cmd();
        c.arg("run")
            .args(ULIMITS)
            .arg(format!("--cgroup-parent={}", self.cgroup));
        c
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            // What works on this VM (toolchain notes): vfs, runc, cgroupfs.
            .args([
                "--storage-driver",
                "vfs",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ]);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .args(["rm", "--all", "--force", "--time", "0"])
            .output();
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
        // Whatever podman still has mounted below its directory.
        if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = m
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| Path::new(p).starts_with(&self.dir))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                sh_quiet(&["umount", "-l", p]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // Its cgroup directories (empty once the containers are gone),
        // deepest first, in the unified and in every v1 hierarchy.
        let roots = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .chain([PathBuf::from("/sys/fs/cgroup")]);
        for root in roots {
            let top = root.join(self.cgroup.trim_start_matches('/'));
            if top.is_dir() {
                let top = top.to_str().unwrap();
                sh_quiet(&[
                    "find", top, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";",
                ]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A process whose stderr is watched for "flowmap running".

struct Running {
    child: Child,
    out: Option<JoinHandle<String>>,
    err: Arc<Mutex<String>>,
    started: mpsc::Receiver<()>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let mut stdout = child.stdout.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err = Arc::new(Mutex::new(String::new()));
        let (tx, started) = mpsc::channel();
        let sink = err.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("flowmap running") {
                    let _ = tx.send(());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Running {
            child,
            out: Some(out),
            err,
            started,
        }
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    fn wait_started(&mut self) {
        if self.started.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = self.child.kill();
            panic!("the agent did not start:\n{}", self.stderr());
        }
    }

    /// Waits for the exit (at most `limit`); returns (exit code, stdout,
    /// stderr).
    fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                panic!("still running after {limit:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = self.out.take().unwrap().join().unwrap();
        // The stderr reader ends with the pipe.
        std::thread::sleep(Duration::from_millis(100));
        (status.code().unwrap_or(-1), out, self.stderr())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Checks shared by both ways of running.

/// The known traffic of `traffic()` over IPv4, counted exactly: UDP and
/// ICMP against their exact sizes, TCP against the capture of the same
/// interface.
fn assert_counted(out: &str, err: &str, v: &Netns, captured: &[Frame], ports: (u16, u16)) {
    let got = agent_totals(out);
    let (host, peer) = (&v.host_v4, &v.peer_v4);
    let tcp: Tuple = ("tcp".into(), host.clone(), ports.0, peer.clone(), 5001);
    let a = got
        .get(&tcp)
        .unwrap_or_else(|| panic!("no TCP flow {tcp:?} in:\n{out}\n{err}"));
    let o = oracle(captured, &tcp);
    assert_eq!((a.s2d, a.d2s), (o.s2d, o.d2s), "TCP agent vs capture");
    assert!(a.s2d.bytes > TCP_BYTES as u64 && a.d2s.bytes > 1000);
    assert_eq!(
        (a.orientation.as_str(), a.interface.as_str()),
        ("syn", v.host.as_str())
    );

    let udp: Tuple = ("udp".into(), host.clone(), ports.1, peer.clone(), 5002);
    let a = got
        .get(&udp)
        .unwrap_or_else(|| panic!("no UDP flow {udp:?} in:\n{out}"));
    let hdr = 14 + 20 + 8;
    let sizes = UDP_SIZES;
    assert_eq!(
        (a.s2d, a.d2s),
        (
            Dir {
                packets: 10,
                bytes: sizes.iter().map(|s| hdr + *s as u64).sum()
            },
            Dir {
                packets: 10,
                bytes: 10 * (hdr + 50)
            }
        ),
        "UDP {udp:?}"
    );
    assert_eq!(a.orientation, "first_packet");

    let ping: Tuple = ("icmp".into(), host.clone(), 0, peer.clone(), 0);
    let a = got
        .get(&ping)
        .unwrap_or_else(|| panic!("no ICMP flow {ping:?} in:\n{out}"));
    let echo = Dir {
        packets: 3,
        bytes: 3 * (14 + 20 + 8 + 56),
    };
    assert_eq!((a.s2d, a.d2s), (echo, echo), "ICMP echo");
}

fn nothing_attached(dev: &str) {
    let tcx = flowmap_testkit::agent::tcx_programs(ifindex(dev));
    assert!(
        tcx.iter().all(|n| !n.starts_with("flowmap")),
        "flowmap TCX links left on {dev}: {tcx:?}"
    );
}

/// `flowmap_build_info{...} 1` names this version and commit.
fn assert_build_info(port: u16) {
    let (status, metrics) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    let line = format!("flowmap_build_info{{version=\"{VERSION}\",commit=\"{COMMIT}\"}} 1");
    assert!(
        metrics.lines().any(|l| l == line),
        "no `{line}` in /metrics:\n{metrics}"
    );
}

/// The server-mode configuration both runs use: the test's veth, 1 s
/// intervals, the API key from the environment.
fn server_config(iface: &str) -> String {
    format!(
        "coordimap:\n  api_key: ${{COORDIMAP_API_KEY}}\n  data_sources:\n    - type: flows\n      data_source_id: shipped\n      config:\n        - name: interface_name\n          value: {iface}\n        - name: crawl_interval\n          value: 1s\n"
    )
}

// ---------------------------------------------------------------------------
// The DaemonSet, translated into podman's words.

fn daemonset() -> (DaemonSet, Container) {
    let text = std::fs::read_to_string(MANIFEST).unwrap();
    let doc = text
        .split("\n---\n")
        .map(|d| serde_saphyr::from_str::<serde_json::Value>(d).unwrap())
        .find(|v| v["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let ds: DaemonSet = serde_json::from_value(doc).unwrap();
    let c = ds.clone().spec.unwrap().template.spec.unwrap().containers[0].clone();
    (ds, c)
}

/// How a test run differs from the DaemonSet.
struct Deviation<'a> {
    /// Capabilities to leave out of the DaemonSet's.
    without_caps: &'a [&'a str],
    /// Run under podman's default seccomp profile instead of the chart's.
    runtime_default_seccomp: bool,
}

const AS_DEPLOYED: Deviation<'static> = Deviation {
    without_caps: &[],
    runtime_default_seccomp: false,
};

/// `podman run` arguments (after `run`) that run the image as the DaemonSet's pod spec
/// says. Whatever the spec asks that is not translated here fails the test,
/// so a chart change cannot silently go untested.
fn podman_run_args(
    name: &str,
    cfg_dir: &Path,
    state_dir: &Path,
    listen_port: u16,
    endpoint: &str,
    dev: &Deviation<'_>,
) -> Vec<String> {
    let (ds, c) = daemonset();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let mut a: Vec<String> = vec!["--name".into(), name.into()];
    assert_eq!(pod.host_network, Some(true));
    a.extend(["--network".into(), "host".into()]);

    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    a.extend(["--security-opt".into(), "no-new-privileges".into()]);
    let uid = sc.run_as_user.unwrap();
    a.extend(["--user".into(), format!("{uid}:{uid}")]);
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    // Kubernetes puts no tmpfs anywhere; podman would on /tmp, /run, /var/tmp.
    a.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    let caps = sc.capabilities.unwrap();
    for d in caps.drop.unwrap_or_default() {
        a.extend(["--cap-drop".into(), d]);
    }
    for add in caps.add.unwrap_or_default() {
        if !dev.without_caps.contains(&add.as_str()) {
            a.extend(["--cap-add".into(), add]);
        }
    }
    let seccomp = sc.seccomp_profile.expect("a seccomp profile");
    if !dev.runtime_default_seccomp {
        match seccomp.type_.as_str() {
            "Localhost" => {
                let file = Path::new("deploy/seccomp").join(seccomp.localhost_profile.unwrap());
                assert!(
                    file.is_file(),
                    "{} is not in the repository",
                    file.display()
                );
                let file = file.canonicalize().unwrap();
                a.extend([
                    "--security-opt".into(),
                    format!("seccomp={}", file.display()),
                ]);
            }
            "RuntimeDefault" => {}
            "Unconfined" => a.extend(["--security-opt".into(), "seccomp=unconfined".into()]),
            other => panic!("seccomp profile type {other}"),
        }
    }

    // Volumes: the ConfigMap as a read-only directory, the state hostPath.
    let volumes = pod.volumes.unwrap();
    for m in c.volume_mounts.clone().unwrap() {
        let vol = volumes.iter().find(|v| v.name == m.name).unwrap();
        let src = if vol.config_map.is_some() {
            cfg_dir
        } else if vol.host_path.is_some() {
            state_dir
        } else {
            panic!("volume {} is neither the ConfigMap nor a hostPath", m.name);
        };
        let ro = if m.read_only == Some(true) { ":ro" } else { "" };
        a.extend([
            "--volume".into(),
            format!("{}:{}{ro}", src.display(), m.mount_path),
        ]);
    }

    // The environment the kubelet would give.
    for e in c.env.clone().unwrap() {
        let value = if e.name == "COORDIMAP_ENDPOINT" {
            endpoint.to_string()
        } else if let Some(v) = &e.value {
            v.clone()
        } else {
            let from = e.value_from.as_ref().unwrap();
            if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "spec.nodeName" => "image-test-node".into(),
                    "status.hostIP" => "127.0.0.1".into(),
                    other => panic!("field {other}"),
                }
            } else if from.secret_key_ref.is_some() {
                API_KEY.into()
            } else {
                panic!("env {} from an unknown source", e.name);
            }
        };
        a.extend(["--env".into(), format!("{}={value}", e.name)]);
    }

    a.push(c.image.clone().unwrap());
    for arg in c.args.clone().unwrap() {
        // $(HOST_IP) is the kubelet's expansion; the port is the test's.
        let arg = arg.replace("$(HOST_IP)", "127.0.0.1");
        // /healthz and /metrics on the test's port, the map page (when
        // the store is on) on a free one.
        let arg = if arg.starts_with("--metrics-listen=127.0.0.1:") {
            format!("--metrics-listen=127.0.0.1:{listen_port}")
        } else if arg.starts_with("--listen=127.0.0.1:") {
            format!("--listen=127.0.0.1:{}", free_port())
        } else {
            arg
        };
        a.push(arg);
    }
    a.extend(["--output".into(), "flows".into()]);
    a
}

/// The layer's files and the image configuration, read from the archive
/// itself.
fn inspect_archive(archive: &Path) -> (BTreeSet<String>, serde_json::Value) {
    let dir = TempDir::new("oci");
    sh(&[
        "tar",
        "-xf",
        archive.to_str().unwrap(),
        "-C",
        dir.path().to_str().unwrap(),
    ]);
    let blob = |digest: &str| {
        dir.path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index = json(dir.path().join("index.json"));
    let m = &index["manifests"][0];
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        format!("localhost/flowmap:{VERSION}").as_str()
    );
    let manifest = json(blob(m["digest"].as_str().unwrap()));
    let config = json(blob(manifest["config"]["digest"].as_str().unwrap()));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer");
    let layer = blob(layers[0]["digest"].as_str().unwrap());
    let listing = sh(&["tar", "-tvf", layer.to_str().unwrap()]);
    let files = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            assert!(l.starts_with('-'), "not a regular file: {l}");
            format!("/{}", l.split_whitespace().last().unwrap())
        })
        .collect();
    (files, config)
}

/// What the image must hold: the binary, what ldd lists, the CA bundle.
fn expected_files() -> BTreeSet<String> {
    let ldd = Command::new("ldd")
        .arg(release_binary())
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let mut want: BTreeSet<String> = String::from_utf8(ldd.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => Some(path.to_string()),
                [path, ..] if path.starts_with('/') => Some(path.to_string()),
                _ => None,
            }
        })
        .collect();
    assert!(
        want.iter().any(|p| p.contains("ld-linux")),
        "the loader: {want:?}"
    );
    assert!(want.iter().any(|p| p.contains("libc.so")), "libc: {want:?}");
    want.insert("/usr/local/bin/flowmap".into());
    want.insert("/etc/ssl/certs/ca-certificates.crt".into());
    want
}

#[test]
fn the_image_runs_as_the_daemonset_does_and_fails_clearly_without_its_privileges() {
    let test = "the_image_runs_as_the_daemonset_does_and_fails_clearly_without_its_privileges";
    let Some(_g) = tools(
        test,
        &["podman", "buildah", "runc", "ldd", "tar", "python3"],
    ) else {
        return;
    };
    let archive = image_archive();

    // Contents: exactly the binary, its libraries and loader, the CA bundle.
    let (files, config) = inspect_archive(archive);
    assert_eq!(files, expected_files(), "the image's files");
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(labels["org.opencontainers.image.revision"], COMMIT);
    assert!(labels["org.opencontainers.image.source"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(COMMIT, head_commit(), "build.rs names HEAD");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/flowmap"])
    );
    eprintln!(
        "image {}: {} bytes",
        archive.display(),
        std::fs::metadata(archive).unwrap().len()
    );

    let pm = Podman::new();
    let loaded = pm.ok(&["load", "--quiet", "--input", archive.to_str().unwrap()]);
    assert!(
        loaded.contains(&format!("localhost/flowmap:{VERSION}")),
        "{loaded}"
    );
    // The chart names the image image.sh builds.
    let (_, c) = daemonset();
    assert_eq!(
        c.image.as_deref(),
        Some(format!("localhost/flowmap:{VERSION}").as_str())
    );

    // The binary in the image starts (its libraries and loader are there)
    // and says what it is; the host's binaries say the same.
    let image = c.image.clone().unwrap();
    // No network: podman's default would make a bridge on the host.
    let isolated = ["--rm", "--network", "none"];
    let v = pm
        .run()
        .args(isolated)
        .args([&image, "--version"])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let v = String::from_utf8(v.stdout).unwrap();
    assert_eq!(v.trim(), version_line());
    for bin in [release_binary(), Path::new(env!("CARGO_BIN_EXE_flowmap"))] {
        assert_eq!(
            sh(&[bin.to_str().unwrap(), "--version"]).trim(),
            version_line()
        );
    }
    // No shell to run anything else with.
    let sh_in_image = pm
        .run()
        .args(isolated)
        .args(["--entrypoint", "/bin/sh", &image, "-c", "true"])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&sh_in_image.stderr);
    assert!(
        !sh_in_image.status.success() && why.contains("/bin/sh") && why.contains("no such file"),
        "/bin/sh in the image: {why}"
    );

    let v = Netns::new().unwrap();
    let cfg = TempDir::new("image-cfg");
    let state = TempDir::new("image-state");
    // The DaemonSet reads --config=<mount>/config.yaml.
    let cfg_arg = c
        .args
        .clone()
        .unwrap()
        .into_iter()
        .find_map(|a| a.strip_prefix("--config=").map(String::from))
        .unwrap();
    let cfg_mount = c
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .find(|m| cfg_arg.starts_with(&format!("{}/", m.mount_path)))
        .expect("--config inside a mount");
    std::fs::write(
        cfg.path().join(&cfg_arg[cfg_mount.mount_path.len() + 1..]),
        server_config(&v.host),
    )
    .unwrap();
    let col = collector::Server::start();

    // 1. As deployed: traffic counted exactly, shipped with the key.
    let _server = Server::start(&v);
    let capture = Capture::start(v.ifindex());
    let port = free_port();
    let mut cmd = pm.run();
    cmd.args(podman_run_args(
        "flowmap-deployed",
        cfg.path(),
        state.path(),
        port,
        &col.url(),
        &AS_DEPLOYED,
    ));
    let mut agent = Running::spawn(cmd);
    agent.wait_started();
    std::thread::sleep(Duration::from_millis(1100));
    let ports = traffic(v.peer_v4.parse().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let captured = capture.finish();
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);
    assert_build_info(port);
    let t0 = Instant::now();
    while col.bodies().is_empty() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    pm.ok(&["stop", "--time", "30", "flowmap-deployed"]);
    let (code, out, err) = agent.finish(Duration::from_secs(40));
    assert_eq!(code, 0, "the agent's exit after SIGTERM:\n{err}");
    nothing_attached(&v.host);
    assert_counted(&out, &err, &v, &captured, ports);
    {
        let log = col.log.lock().unwrap();
        assert!(!log.accepted.is_empty(), "nothing shipped:\n{err}");
        for (headers, _) in &log.accepted {
            let key = headers
                .iter()
                .find(|(k, _)| k == "api-key")
                .map(|(_, v)| v.as_str());
            assert_eq!(key, Some(API_KEY), "the API key from the environment");
        }
    }
    // The spool lives in the state volume, the only writable place.
    assert!(
        state.path().join("spool").is_dir(),
        "no spool in the state volume"
    );

    // 2. Without CAP_BPF: exit 1, and the error names it.
    let mut cmd = pm.run();
    let without_bpf = Deviation {
        without_caps: &["BPF"],
        ..AS_DEPLOYED
    };
    cmd.args(podman_run_args(
        "flowmap-no-bpf",
        cfg.path(),
        state.path(),
        free_port(),
        &col.url(),
        &without_bpf,
    ));
    let (code, _, err) = Running::spawn(cmd).finish(Duration::from_secs(60));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing capability CAP_BPF"), "{err}");
    nothing_attached(&v.host);

    // 3. The three capabilities under podman's own seccomp profile, which
    // allows bpf() only with CAP_SYS_ADMIN: exit 1, and the error says
    // seccomp.
    let mut cmd = pm.run();
    let runtime_default = Deviation {
        runtime_default_seccomp: true,
        ..AS_DEPLOYED
    };
    cmd.args(podman_run_args(
        "flowmap-default-seccomp",
        cfg.path(),
        state.path(),
        free_port(),
        &col.url(),
        &runtime_default,
    ));
    let (code, _, err) = Running::spawn(cmd).finish(Duration::from_secs(60));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("seccomp filter likely refused bpf()"), "{err}");
    nothing_attached(&v.host);
}

/// The shipped seccomp profile allows what a container runtime's default
/// profile allows without added capabilities, plus bpf() and nothing
/// else: every other name it allows, podman's default (containers/common)
/// allows too.
#[test]
fn the_seccomp_profile_is_the_runtime_default_plus_bpf() {
    let ours: serde_json::Value =
        serde_json::from_slice(&std::fs::read("deploy/seccomp/flowmap-seccomp.json").unwrap())
            .unwrap();
    // The OCI runtime-spec form, which containerd, CRI-O and podman read.
    assert_eq!(ours["defaultAction"], "SCMP_ACT_ERRNO");
    for key in ours.as_object().unwrap().keys() {
        assert!(
            [
                "defaultAction",
                "defaultErrnoRet",
                "architectures",
                "syscalls"
            ]
            .contains(&key.as_str()),
            "{key} is not an OCI seccomp field"
        );
    }
    let reference = Path::new("/usr/share/containers/seccomp.json");
    if !reference.exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "{} missing: run scripts/setup.sh (podman)",
                reference.display()
            );
        }
        eprintln!("SKIP the_seccomp_profile_is_the_runtime_default_plus_bpf: no {} (scripts/setup.sh installs podman)", reference.display());
        return;
    }
    let theirs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference).unwrap()).unwrap();
    // Names podman allows whatever the capabilities.
    let mut default_allowed = BTreeSet::new();
    for r in theirs["syscalls"].as_array().unwrap() {
        let caps = r["includes"]["caps"]
            .as_array()
            .is_some_and(|c| !c.is_empty());
        if r["action"] == "SCMP_ACT_ALLOW" && !caps {
            for n in r["names"].as_array().unwrap() {
                default_allowed.insert(n.as_str().unwrap().to_string());
            }
        }
    }
    assert!(
        !default_allowed.contains("bpf"),
        "podman's default allows bpf() now"
    );
    let mut extra = BTreeSet::new();
    for r in ours["syscalls"].as_array().unwrap() {
        if r["action"] != "SCMP_ACT_ALLOW" {
            continue;
        }
        for n in r["names"].as_array().unwrap() {
            let n = n.as_str().unwrap();
            if !default_allowed.contains(n) {
                extra.insert(n.to_string());
            }
        }
    }
    assert_eq!(extra, BTreeSet::from(["bpf".to_string()]));
}

// ---------------------------------------------------------------------------
// The systemd unit.

/// `Key=` values of the unit's [Service] section.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .collect()
}

/// "CAP_BPF CAP_NET_ADMIN" -> "+bpf,+net_admin", setpriv's spelling.
fn setpriv_caps(caps: &[&str]) -> String {
    caps.iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The agent under the unit's user and capabilities: setpriv, as
/// DynamicUser= (a uid of its own, no groups) and AmbientCapabilities=
/// give them.
fn as_unit(bin: &Path, caps: &[&str], uid: u32, args: &[String]) -> Command {
    let list = setpriv_caps(caps);
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
        &format!("--inh-caps=-all,{list}"),
        &format!("--ambient-caps=-all,{list}"),
        &format!("--bounding-set=-all,{list}"),
        "--no-new-privs",
        "--",
    ])
    .arg(bin)
    .args(args)
    .env_remove("LD_LIBRARY_PATH")
    .env("COORDIMAP_API_KEY", API_KEY)
    .env_remove("COORDIMAP_ENDPOINT");
    c
}

#[test]
fn the_systemd_units_user_and_capabilities_are_enough() {
    let test = "the_systemd_units_user_and_capabilities_are_enough";
    let Some(_g) = tools(test, &["setpriv", "python3"]) else {
        return;
    };
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert_eq!(unit_values(&unit, "DynamicUser"), ["yes"]);
    assert_eq!(unit_values(&unit, "NoNewPrivileges"), ["yes"]);
    let ambient = unit_values(&unit, "AmbientCapabilities");
    let ambient: Vec<&str> = ambient[0].split_whitespace().collect();
    let bounding = unit_values(&unit, "CapabilityBoundingSet");
    assert_eq!(bounding[0].split_whitespace().collect::<Vec<_>>(), ambient);
    assert_eq!(ambient, ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
    let exec = unit_values(&unit, "ExecStart");
    let exec: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(exec[0], "/usr/local/bin/flowmap");

    // A uid of DynamicUser's range (61184-65519) that nothing else uses.
    let uid = 65123u32;
    let v = Netns::new().unwrap();
    let dir = TempDir::new("unit");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, server_config(&v.host)).unwrap();
    // StateDirectory=: owned by the dynamic user, 0700.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let port = free_port();
    let args = |exec: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = exec[1..]
            .iter()
            .map(|s| match *s {
                "/etc/flowmap/config.yaml" => cfg.to_str().unwrap().to_string(),
                "/var/lib/flowmap" => state.to_str().unwrap().to_string(),
                other => other.to_string(),
            })
            .collect();
        a.extend([
            format!("--listen=127.0.0.1:{port}"),
            "--output=flows".into(),
        ]);
        a
    };
    let bin = release_binary();

    let _server = Server::start(&v);
    let capture = Capture::start(v.ifindex());
    let mut agent = Running::spawn(as_unit(bin, &ambient, uid, &args(&exec)));
    agent.wait_started();
    // Exactly the unit's user and capabilities, and nothing more.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Name:"), "flowmap");
    let ids = format!("{uid} {uid} {uid} {uid}");
    assert_eq!(
        (field("Uid:"), field("Gid:"), field("Groups:")),
        (ids.clone(), ids, String::new())
    );
    // CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
    let three = format!("{:016x}", (1u64 << 12) | (1 << 38) | (1 << 39));
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(set), three, "{set}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");

    std::thread::sleep(Duration::from_millis(1100));
    let ports = traffic(v.peer_v4.parse().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let captured = capture.finish();
    assert_build_info(port);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let (code, out, err) = agent.finish(Duration::from_secs(40));
    assert_eq!(code, 0, "{err}");
    nothing_attached(&v.host);
    assert_counted(&out, &err, &v, &captured, ports);
    // The store is written as that user in its state directory.
    assert!(state.join("flowmap.db").is_file(), "{err}");

    // One capability fewer: exit 1, and the error names it.
    let fewer: Vec<&str> = ambient
        .iter()
        .copied()
        .filter(|c| *c != "CAP_BPF")
        .collect();
    let (code, _, err) =
        Running::spawn(as_unit(bin, &fewer, uid, &args(&exec))).finish(Duration::from_secs(60));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing capability CAP_BPF"), "{err}");
    nothing_attached(&v.host);
}
