//! Configuration: exact resolved values and exact error texts.

use std::time::Duration;

use flowmap::config::{parse, parse_go_duration, Config, DeployedAt, Mapping};
use flowmap::datapath::ifaces::Selection;
use flowmap::datapath::AttachMode;
use flowmap_testkit::tempdir::TempDir;
use proptest::prelude::*;

fn env(name: &str) -> Option<String> {
    match name {
        "KEY" => Some("s3cr3t".into()),
        "IFACE" => Some("eth1".into()),
        "UID" => Some("5f0c4d2a-8e1b-4c3d-9a7f-2b6e1d0c9f84".into()),
        _ => None,
    }
}

fn flows(options: &str) -> String {
    format!("coordimap:\n  data_sources:\n    - type: flows\n      data_source_id: f1\n      config:\n{options}")
}

fn opt(name: &str, value: &str) -> String {
    format!("        - name: {name}\n          value: {value}\n")
}

fn ok(text: &str) -> Config {
    parse(text, &env).unwrap_or_else(|e| panic!("expected valid:\n{text}\n{e}"))
}

fn errs(text: &str) -> Vec<String> {
    parse(text, &env).expect_err("expected errors").0
}

#[test]
fn examples_are_valid() {
    let s = ok(&std::fs::read_to_string("examples/server.yaml").unwrap());
    assert_eq!(s.flows.len(), 1);
    assert_eq!(s.flows[0].id, "flows-server");
    assert_eq!(s.flows[0].interfaces, Selection::All);
    assert_eq!(s.flows[0].crawl_interval, Duration::from_secs(30));
    let k = ok(&std::fs::read_to_string("examples/kubernetes.yaml")
        .unwrap()
        .replace("${COORDIMAP_API_KEY}", "${KEY}"));
    assert_eq!(k.flows[0].deployed_at, DeployedAt::Kubernetes);
    assert_eq!(
        k.flows[0].cluster_uid("node-1"),
        Some("5f0c4d2a-8e1b-4c3d-9a7f-2b6e1d0c9f84")
    );
    assert_eq!(k.others.len(), 1);
    assert_eq!(
        (k.others[0].kind.as_str(), k.others[0].id.as_str()),
        ("kubernetes", "k8s-prod")
    );
    assert!(k.warnings.is_empty(), "{:?}", k.warnings);
    assert_eq!(k.api_key.as_ref().unwrap().expose(), "s3cr3t");
}

#[test]
fn defaults_and_resolved_values() {
    let c = ok(&flows(&opt("deployedAt", "SERVER")));
    let f = &c.flows[0];
    assert_eq!(f.interfaces, Selection::All);
    assert_eq!(f.deployed_at, DeployedAt::Server);
    assert_eq!(f.crawl_interval, Duration::from_secs(30));
    assert_eq!(f.attach_mode, AttachMode::Auto);
    assert!(c.api_key.is_none());

    let c = ok(&(flows(
        &(opt("interface_name", "\"eth0, ${IFACE}\"")
            + &opt("crawl_interval", "1m30s")
            + &opt("max_flows", "65536")
            + &opt("attach_mode", "tc")),
    )));
    let f = &c.flows[0];
    assert_eq!(
        f.interfaces,
        Selection::Names(vec!["eth0".into(), "eth1".into()])
    );
    assert_eq!(f.crawl_interval, Duration::from_secs(90));
    assert_eq!(f.max_flows, 65536);
    assert_eq!(f.attach_mode, AttachMode::Tc);
}

#[test]
fn id_alias_numbers_and_env_expansion() {
    let text = "coordimap:\n  api_key: \"k-${KEY}-$${LIT}\"\n  data_sources:\n    - type: flows\n      id: 42\n      config:\n        - name: max_flows\n          value: 2048\n";
    let c = ok(text);
    assert_eq!(c.api_key.as_ref().unwrap().expose(), "k-s3cr3t-${LIT}");
    assert_eq!(format!("{:?}", c.api_key), "Some(<hidden>)");
    assert_eq!(c.flows[0].id, "42");
    assert_eq!(c.flows[0].max_flows, 2048);
}

#[test]
fn exact_errors_all_reported_in_one_run() {
    let text = flows(
        &(opt("deployedAt", "cloud")
            + &opt("crawl_interval", "5x")
            + &opt("external_mappings", "\"a@b c d@ *@x@y\"")
            + &opt("interface_name", "${NOPE}")),
    );
    assert_eq!(
        errs(&text),
        vec![
            "data source \"f1\" (flows): option \"deployedAt\": value \"cloud\" is not allowed; allowed: server, kubernetes".to_string(),
            "data source \"f1\" (flows): option \"crawl_interval\": value \"5x\" is not a duration (unknown unit \"x\"); allowed: a number and unit, at least 1s (like 30s, 5m, 1h, 1m30s; units ns, us, ms, s, m, h)".into(),
            "data source \"f1\" (flows): option \"external_mappings\": entry \"c\" must be key@value with exactly one \"@\" (for flows: *@<cluster UID>)".into(),
            "data source \"f1\" (flows): option \"external_mappings\": entry \"d@\" has an empty key or value; expected key@value".into(),
            "data source \"f1\" (flows): option \"external_mappings\": entry \"*@x@y\" must be key@value with exactly one \"@\" (for flows: *@<cluster UID>)".into(),
            "data source \"f1\" (flows): option \"interface_name\": environment variable NOPE is not set".into(),
        ]
    );
}

#[test]
fn crawl_interval_rules() {
    for (v, msg) in [
        ("\"\"", "value \"\" is not a duration (empty)"),
        ("0s", "value \"0s\" is zero"),
        ("-5s", "value \"-5s\" is not a duration (negative)"),
        ("500ms", "value \"500ms\" is less than 1s"),
        (
            "30",
            "value \"30\" is not a duration (missing unit after \"30\")",
        ),
    ] {
        let e = errs(&flows(&opt("crawl_interval", v)));
        assert_eq!(e.len(), 1, "{v}");
        assert!(
            e[0].starts_with(&format!(
                "data source \"f1\" (flows): option \"crawl_interval\": {msg}"
            )),
            "{v}: {}",
            e[0]
        );
    }
    assert_eq!(
        parse_go_duration("1h2m3s").unwrap(),
        Duration::from_secs(3723)
    );
    assert_eq!(
        parse_go_duration("1.5h").unwrap(),
        Duration::from_secs(5400)
    );
    assert_eq!(
        parse_go_duration("1500ms").unwrap(),
        Duration::from_millis(1500)
    );
}

#[test]
fn kubernetes_mode_rules() {
    let e = errs(&flows(&opt("deployedAt", "Kubernetes")));
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("data source \"f1\" (flows): option \"external_mappings\": required when deployedAt is kubernetes"));

    let both = |mapping: &str| {
        format!(
            "coordimap:\n  data_sources:\n    - type: kubernetes\n      id: k8s\n      config:\n        - name: scope_id\n          value: 5f0c4d2a-8e1b-4c3d-9a7f-2b6e1d0c9f84\n    - type: flows\n      id: f1\n      config:\n{}{}",
            opt("deployedAt", "kubernetes"),
            opt("external_mappings", mapping)
        )
    };
    assert_eq!(
        errs(&both("\"*@k8s\"")),
        vec!["data source \"f1\" (flows): option \"external_mappings\": value \"k8s\" is the identifier of the kubernetes data source \"k8s\", not a cluster UID; use its scope_id \"5f0c4d2a-8e1b-4c3d-9a7f-2b6e1d0c9f84\"".to_string()]
    );
    let c = ok(&both("\"*@${UID}\""));
    assert!(c.warnings.is_empty());
    let c = ok(&both("\"node-*@other\""));
    assert_eq!(
        c.warnings,
        vec![
            "data source \"f1\" (flows): option \"external_mappings\": value \"other\" matches the scope_id of no kubernetes data source in this file".to_string(),
            "data source \"f1\" (flows): option \"external_mappings\": value \"other\" is not a UUID; a cluster UID looks like 2f4c2b1e-6f5d-4c1a-9a63-2b0f3c5d7e81".into(),
        ]
    );
    assert_eq!(c.flows[0].cluster_uid("node-7"), Some("other"));
    assert_eq!(
        c.flows[0].cluster_uid("xnode-7"),
        None,
        "anchored at the start"
    );
}

#[test]
fn wildcard_is_anchored() {
    let m = Mapping {
        key: "web-*".into(),
        value: "v".into(),
    };
    assert!(m.matches("web-1") && m.matches("web-") && !m.matches("aweb-1") && !m.matches("web"));
    let m = Mapping {
        key: "*-a".into(),
        value: "v".into(),
    };
    assert!(m.matches("x-a") && !m.matches("x-ab"));
}

#[test]
fn unknown_option_is_a_warning_with_the_closest_name() {
    let c = ok(&flows(&opt("crawlinterval", "30s")));
    assert_eq!(c.warnings, vec!["data source \"f1\" (flows): option \"crawlinterval\": unknown option, ignored; did you mean \"crawl_interval\"?".to_string()]);
}

#[test]
fn structural_errors() {
    assert_eq!(
        errs("a: 1\n"),
        vec!["the file has no top-level \"coordimap\" section".to_string()]
    );
    assert_eq!(
        errs("coordimap:\n  data_sources:\n    - type: aws\n      id: a\n"),
        vec![
            "coordimap.data_sources: no data source of type \"flows\"; flowmap has nothing to run"
                .to_string()
        ]
    );
    let e = errs("coordimap:\n  data_sources: [\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("invalid YAML: "), "{}", e[0]);
    assert!(
        e[0].contains("line"),
        "the parser's line is given: {}",
        e[0]
    );
    assert_eq!(
        errs(&(flows(&opt("max_flows", "10")))),
        vec!["data source \"f1\" (flows): option \"max_flows\": value \"10\" is not allowed; allowed: a whole number from 1024 to 4194304".to_string()]
    );
    assert_eq!(
        errs("coordimap:\n  data_sources:\n    - type: flows\n      id: a\n    - type: flows\n      id: a\n"),
        vec!["data source \"a\" (flows): the identifier \"a\" is used by another flows data source".to_string()]
    );
}

#[test]
fn max_external_endpoints_default_value_and_errors() {
    let c = ok(&flows(&opt("deployedAt", "server")));
    assert_eq!(c.flows[0].max_external_endpoints, 2000);
    let c = ok(&flows(&opt("max_external_endpoints", "0")));
    assert_eq!(c.flows[0].max_external_endpoints, 0);
    let c = ok(&flows(&opt("max_external_endpoints", "20000")));
    assert_eq!(c.flows[0].max_external_endpoints, 20000);
    for bad in ["20001", "-1", "many", "1.5", "\"\""] {
        assert_eq!(
            errs(&flows(&opt("max_external_endpoints", bad))),
            vec![format!(
                "data source \"f1\" (flows): option \"max_external_endpoints\": value {:?} is not allowed; allowed: a whole number from 0 to 20000",
                bad.trim_matches('"')
            )],
            "{bad}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn any_text_is_config_or_errors(text in "\\PC{0,300}") {
        let _ = parse(&text, &env);
    }

    #[test]
    fn any_option_value_is_config_or_errors(name in "[a-zA-Z_]{1,20}", value in "[ -~]{0,40}") {
        let v = serde_json::to_string(&value).unwrap();
        let _ = parse(&flows(&opt(&name, &v)), &env);
    }

    #[test]
    fn any_duration_text_never_panics(s in "\\PC{0,30}") {
        let _ = parse_go_duration(&s);
    }
}

fn flowmap(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_flowmap"));
    c.args(args)
        .env_remove("COORDIMAP_ENDPOINT")
        .env_remove("COORDIMAP_CONFIG_PATH");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn check_and_run_refuse_invalid_files_with_status_2_and_hide_the_key() {
    let dir = TempDir::new("cfg");
    let bad = dir.file("bad.yaml", &flows(&opt("deployedAt", "cloud")));
    for cmd in ["check", "run"] {
        let o = flowmap(&[cmd, "--config", bad.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("error: data source \"f1\" (flows): option \"deployedAt\": value \"cloud\" is not allowed; allowed: server, kubernetes"), "{cmd}: {err}");
    }
    let good = dir.file(
        "good.yaml",
        "coordimap:\n  api_key: ${FM_TEST_KEY}\n  data_sources:\n    - type: flows\n      id: f1\n",
    );
    let o = flowmap(
        &[
            "check",
            "--config",
            good.to_str().unwrap(),
            "--endpoint",
            "http://127.0.0.1:9",
        ],
        &[("FM_TEST_KEY", "topsecret-123")],
    );
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("topsecret-123")
            && !String::from_utf8_lossy(&o.stderr).contains("topsecret-123")
    );
    assert!(out.contains("api_key: set (hidden)\nendpoint: http://127.0.0.1:9\ndata source \"f1\" (flows)\n  interface_name: all\n"), "{out}");
    // Credentials in the endpoint URL are not printed.
    let o = flowmap(
        &[
            "check",
            "--config",
            good.to_str().unwrap(),
            "--endpoint",
            "https://bob:hunter2@collector.example/v1?api_key=k3y&region=eu",
        ],
        &[("FM_TEST_KEY", "topsecret-123")],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("endpoint: https://***@collector.example/v1?api_key=***&region=eu\n")
            && !out.contains("hunter2")
            && !out.contains("k3y"),
        "{out}"
    );
    // A clear-text endpoint off loopback is refused before anything runs,
    // unless the operator opts in (then it starts as usual).
    let state = dir.path().join("state");
    let o = flowmap(
        &[
            "run",
            "--config",
            good.to_str().unwrap(),
            "--endpoint",
            "http://collector.example/api",
            "--no-web",
            "--no-store",
            "--state-dir",
            state.to_str().unwrap(),
            "--duration",
            "1s",
        ],
        &[("FM_TEST_KEY", "topsecret-123")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: the endpoint uses http:// to a host that is not loopback: the API key would travel in clear text; use https://, or pass --allow-plain-http to accept that"),
        "{err}"
    );
    assert!(
        !err.contains("topsecret-123") && !err.contains("BPF program"),
        "{err}"
    );
    // An endpoint without a key is refused.
    let nokey = dir.file("nokey.yaml", &flows(""));
    let o = flowmap(
        &["check", "--config", nokey.to_str().unwrap()],
        &[("COORDIMAP_ENDPOINT", "http://127.0.0.1:9")],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("coordimap.api_key: required when an endpoint is configured"));
    // A named file that does not exist is an error, not the default.
    let o = flowmap(
        &[
            "check",
            "--config",
            dir.path().join("missing.yaml").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
}

/// `--listen` takes the DaemonSet's `$(HOST_IP):9464` for IPv6 host
/// addresses too; a bad value is refused with the value named.
#[test]
fn listen_addresses() {
    let run = |listen: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowmap"))
            .args([
                "run",
                "--listen",
                listen,
                "--config",
                "/nonexistent/flowmap.yaml",
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for ok in ["127.0.0.1:9464", "[fd00::5]:9464", "fd00::5:9464"] {
        let (_, err) = run(ok);
        assert!(
            err.contains("reading configuration /nonexistent/flowmap.yaml"),
            "{ok}: {err}"
        );
    }
    let (code, err) = run("nonsense");
    assert_eq!(code, Some(2));
    assert!(
        err.contains(r#""nonsense" is not an address and port"#),
        "{err}"
    );
}

#[test]
fn status_thresholds_are_options_with_defaults_and_exact_errors() {
    let c = ok(&flows(&opt("crawl_interval", "30s")));
    assert_eq!(
        c.flows[0].status,
        flowmap::status::Thresholds {
            failed_percent: 5.0,
            retransmit_percent: 2.0
        }
    );
    let c = ok(&flows(
        &(opt("status_failed_percent", "\"10%\"") + &opt("status_retransmit_percent", "0.5")),
    ));
    assert_eq!(
        (
            c.flows[0].status.failed_percent,
            c.flows[0].status.retransmit_percent
        ),
        (10.0, 0.5)
    );
    for bad in ["0", "101", "-1", "lots", "NaN"] {
        assert_eq!(
            errs(&flows(&opt("status_failed_percent", bad))),
            vec![format!("data source \"f1\" (flows): option \"status_failed_percent\": value \"{bad}\" is not allowed; allowed: a percentage above 0 and at most 100 (like 5 or 0.5)")]
        );
    }
    assert_eq!(
        errs(&flows(&opt("status_retransmit_percent", "200"))),
        vec!["data source \"f1\" (flows): option \"status_retransmit_percent\": value \"200\" is not allowed; allowed: a percentage above 0 and at most 100 (like 2 or 0.5)".to_string()]
    );
}
