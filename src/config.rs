//! Coordimap's YAML configuration: parsing, `${VAR}` expansion and the
//! validation of every `flows` option. Every problem in a file is reported
//! in one run; nothing here panics on any input.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::datapath::ifaces::Selection;
use crate::datapath::{AttachMode, DEFAULT_MAX_FLOWS};

/// A YAML scalar taken as its text (numbers and booleans included).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(String::new()))
            }
            fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize, Default)]
struct RawFile {
    coordimap: Option<RawCoordimap>,
}

#[derive(Debug, Deserialize, Default)]
struct RawCoordimap {
    api_key: Option<Scalar>,
    skip_fields: Option<Vec<Scalar>>,
    database: Option<RawDatabase>,
    data_sources: Option<Vec<RawSource>>,
}

#[derive(Debug, Deserialize, Default)]
struct RawDatabase {
    driver: Option<Scalar>,
    connection_string: Option<Scalar>,
}

#[derive(Debug, Deserialize, Default)]
struct RawSource {
    #[serde(rename = "type")]
    kind: Option<Scalar>,
    data_source_id: Option<Scalar>,
    id: Option<Scalar>,
    name: Option<Scalar>,
    desc: Option<Scalar>,
    config: Option<Vec<RawPair>>,
}

#[derive(Debug, Deserialize, Default)]
struct RawPair {
    name: Option<Scalar>,
    value: Option<Scalar>,
}

/// A secret value: never printed, never serialised.
#[derive(Clone, PartialEq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployedAt {
    Server,
    Kubernetes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Database {
    pub driver: Driver,
    pub connection_string: Secret,
}

/// One `key@value` of external_mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub key: String,
    pub value: String,
}

impl Mapping {
    /// `*` in the key matches any run of characters; the match is anchored
    /// at both ends.
    pub fn matches(&self, text: &str) -> bool {
        wildcard(self.key.as_bytes(), text.as_bytes())
    }
}

fn wildcard(p: &[u8], t: &[u8]) -> bool {
    // Iterative glob with one backtrack point: linear in practice.
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// A resolved `flows` data source.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowsSource {
    pub id: String,
    pub name: String,
    pub desc: String,
    pub interfaces: Selection,
    pub deployed_at: DeployedAt,
    pub external_mappings: Vec<Mapping>,
    pub crawl_interval: Duration,
    pub max_flows: u32,
    pub attach_mode: AttachMode,
    /// External endpoints of one interval that keep their own name; past
    /// it, addresses fold into aggregates (see `graph::fold`).
    pub max_external_endpoints: usize,
    /// Thresholds of the status rules (`status_failed_percent`,
    /// `status_retransmit_percent`).
    pub status: crate::status::Thresholds,
    /// Capture DNS answers and TLS server names to name external peers
    /// (`capture_names`, default true).
    pub capture_names: bool,
    /// Split this host into its processes, units and containers (issue 14;
    /// `processes`, default true).
    pub processes: bool,
    /// The options as given (after expansion), for the wire's data source block.
    pub pairs: Vec<(String, String)>,
}

impl FlowsSource {
    pub fn default_server() -> FlowsSource {
        FlowsSource {
            id: "flows".into(),
            name: "flows".into(),
            desc: String::new(),
            interfaces: Selection::All,
            deployed_at: DeployedAt::Server,
            external_mappings: Vec::new(),
            crawl_interval: Duration::from_secs(30),
            max_flows: DEFAULT_MAX_FLOWS,
            attach_mode: AttachMode::Auto,
            max_external_endpoints: crate::graph::fold::DEFAULT_MAX_EXTERNAL,
            status: Default::default(),
            capture_names: true,
            processes: true,
            pairs: Vec::new(),
        }
    }

    /// The cluster UID for a node: the value of the first mapping whose key
    /// matches the node name.
    pub fn cluster_uid(&self, node: &str) -> Option<&str> {
        self.external_mappings
            .iter()
            .find(|m| m.matches(node))
            .map(|m| m.value.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OtherSource {
    pub kind: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub api_key: Option<Secret>,
    pub skip_fields: Vec<String>,
    pub database: Option<Database>,
    pub flows: Vec<FlowsSource>,
    pub others: Vec<OtherSource>,
    pub warnings: Vec<String>,
}

impl Config {
    /// The configuration used when no file is given and ./config.yaml
    /// does not exist: one flows source on every interface, kept locally.
    pub fn builtin_default() -> Config {
        Config {
            api_key: None,
            skip_fields: Vec::new(),
            database: None,
            flows: vec![FlowsSource::default_server()],
            others: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// Every problem found in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub const KNOWN_OPTIONS: [&str; 11] = [
    "interface_name",
    "deployedAt",
    "external_mappings",
    "crawl_interval",
    "max_flows",
    "attach_mode",
    "max_external_endpoints",
    "status_failed_percent",
    "status_retransmit_percent",
    "capture_names",
    "processes",
];

/// The largest `max_external_endpoints` allowed.
pub const MAX_EXTERNAL_ENDPOINTS: usize = 20_000;

/// Expands `${NAME}` from `env`; `$${` is a literal `${`.
pub fn expand(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
    place: &str,
) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(end) = tail.find('}') else {
                return Err(format!("{place}: unterminated \"${{\" in the value (write \"$${{\" for a literal \"${{\")"));
            };
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "{place}: \"${{{name}}}\" is not a valid environment variable name"
                ));
            }
            match env(name) {
                Some(v) => out.push_str(&v),
                None => return Err(format!("{place}: environment variable {name} is not set")),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses a Go-style duration: `30s`, `5m`, `1h`, `1m30s`, `500ms`, `1.5h`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty".into());
    }
    if t.starts_with('-') {
        return Err("negative".into());
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total: f64 = 0.0;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num = &rest[..num_len];
        if num.is_empty() || num.matches('.').count() > 1 || num == "." {
            return Err(format!("expected a number at {rest:?}"));
        }
        let n: f64 = num.parse().map_err(|_| format!("bad number {num:?}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("missing unit after {num:?}")),
            other => return Err(format!("unknown unit {other:?}")),
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > 1e9 {
        return Err("too large".into());
    }
    Ok(Duration::from_secs_f64(total))
}

pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != cb) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn closest(name: &str) -> &'static str {
    KNOWN_OPTIONS
        .iter()
        .min_by_key(|k| levenshtein(name, k))
        .copied()
        .unwrap_or("interface_name")
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

struct Ctx<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl Ctx<'_> {
    fn text(&mut self, v: &Option<Scalar>, place: &str) -> Option<String> {
        let v = v.as_ref()?;
        match expand(&v.0, self.env, place) {
            Ok(s) => Some(s),
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }
}

/// A kubernetes data source of the same file: its identifier and scope_id.
type KubeSource = (String, Option<String>);

/// The data sources of a file, sorted: flows (index, id, raw), kubernetes,
/// the others.
type Sorted<'s> = (
    Vec<(usize, String, &'s RawSource)>,
    Vec<KubeSource>,
    Vec<OtherSource>,
);

impl Ctx<'_> {
    fn database(&mut self, d: RawDatabase) -> Option<Database> {
        let driver = self
            .text(&d.driver, "coordimap.database.driver")
            .unwrap_or_default();
        let conn = self
            .text(&d.connection_string, "coordimap.database.connection_string")
            .unwrap_or_default();
        let driver = match driver.to_lowercase().as_str() {
            "sqlite" | "sqlite3" => Driver::Sqlite,
            "postgres" | "postgresql" => Driver::Postgres,
            other => {
                self.errors.push(format!(
                    "coordimap.database.driver: value {other:?} is not allowed; allowed: sqlite, postgres"
                ));
                return None;
            }
        };
        if conn.is_empty() && driver == Driver::Postgres {
            self.errors
                .push("coordimap.database.connection_string: required for driver postgres".into());
            return None;
        }
        Some(Database {
            driver,
            connection_string: Secret(conn),
        })
    }

    /// Sorts the data sources: flows (index, id, raw), the kubernetes ones
    /// (whose identifiers and scope_ids check the flows mappings), others.
    fn sort_sources<'s>(&mut self, sources: &'s [RawSource]) -> Sorted<'s> {
        let (mut flows, mut kube, mut others) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in sources.iter().enumerate() {
            let kind = self
                .text(&s.kind, &format!("coordimap.data_sources[{i}].type"))
                .unwrap_or_default();
            let id = self
                .text(
                    &s.data_source_id,
                    &format!("coordimap.data_sources[{i}].data_source_id"),
                )
                .or_else(|| self.text(&s.id, &format!("coordimap.data_sources[{i}].id")))
                .unwrap_or_default();
            match kind.as_str() {
                "" => self
                    .errors
                    .push(format!("coordimap.data_sources[{i}]: \"type\" is missing")),
                "flows" => flows.push((i, id, s)),
                other => {
                    if other == "kubernetes" {
                        kube.push((id.clone(), self.scope_id(s)));
                    }
                    others.push(OtherSource {
                        kind: other.to_string(),
                        id,
                    });
                }
            }
        }
        (flows, kube, others)
    }

    /// The scope_id option of a kubernetes data source.
    fn scope_id(&self, s: &RawSource) -> Option<String> {
        s.config.iter().flatten().find_map(|p| {
            (p.name.as_ref().map(|n| n.0.as_str()) == Some("scope_id"))
                .then(|| {
                    p.value
                        .as_ref()
                        .map(|v| expand(&v.0, self.env, "").unwrap_or_default())
                })
                .flatten()
        })
    }

    /// One flows data source: its identifiers and options.
    fn flows_source(
        &mut self,
        i: usize,
        id: String,
        s: &RawSource,
        seen: &mut Vec<String>,
    ) -> (String, FlowsSource) {
        let label = if id.is_empty() {
            format!("#{i}")
        } else {
            format!("{id:?}")
        };
        let ds = format!("data source {label} (flows)");
        if id.is_empty() {
            self.errors
                .push(format!("{ds}: \"data_source_id\" (or \"id\") is missing"));
        } else if seen.contains(&id) {
            self.errors.push(format!(
                "{ds}: the identifier {id:?} is used by another flows data source"
            ));
        }
        seen.push(id.clone());
        let mut fs = FlowsSource::default_server();
        fs.id = id.clone();
        fs.name = self
            .text(&s.name, &format!("{ds}: name"))
            .unwrap_or_else(|| id.clone());
        fs.desc = self
            .text(&s.desc, &format!("{ds}: desc"))
            .unwrap_or_default();
        self.options(&ds, s, &mut fs);
        (ds, fs)
    }

    /// The `config: [{name, value}]` options of a flows data source.
    fn options(&mut self, ds: &str, s: &RawSource, fs: &mut FlowsSource) {
        let mut given: Vec<String> = Vec::new();
        for (j, p) in s.config.iter().flatten().enumerate() {
            let Some(name) = p
                .name
                .as_ref()
                .map(|n| n.0.clone())
                .filter(|n| !n.is_empty())
            else {
                self.errors
                    .push(format!("{ds}: config[{j}] has no \"name\""));
                continue;
            };
            let place = format!("{ds}: option {name:?}");
            let Some(value) = self
                .text(&p.value, &place)
                .or_else(|| p.value.is_none().then(String::new))
            else {
                continue;
            };
            if given.contains(&name) {
                self.errors.push(format!("{place}: given more than once"));
                continue;
            }
            given.push(name.clone());
            fs.pairs.push((name.clone(), value.clone()));
            apply_option(self, fs, &name, &value, &place);
        }
    }

    /// Kubernetes mode: the mappings must name cluster UIDs, not the
    /// kubernetes data source's identifier.
    fn check_mappings(&mut self, ds: &str, fs: &FlowsSource, kube: &[KubeSource]) {
        if fs.deployed_at != DeployedAt::Kubernetes {
            return;
        }
        if fs.external_mappings.is_empty() {
            self.errors.push(format!(
                "{ds}: option \"external_mappings\": required when deployedAt is kubernetes; \
                 give \"*@<cluster UID>\" (kubectl get namespace kube-system -o jsonpath='{{.metadata.uid}}')"
            ));
        }
        for m in &fs.external_mappings {
            if let Some((kid, scope)) = kube
                .iter()
                .find(|(kid, _)| !kid.is_empty() && *kid == m.value)
            {
                let hint = match scope {
                    Some(s) if !s.is_empty() => format!("use its scope_id {s:?}"),
                    _ => "use the cluster UID that it uses as scope_id".to_string(),
                };
                self.errors.push(format!(
                    "{ds}: option \"external_mappings\": value {:?} is the identifier of the kubernetes data source {kid:?}, not a cluster UID; {hint}",
                    m.value
                ));
                continue;
            }
            if !kube.is_empty()
                && !kube
                    .iter()
                    .any(|(_, s)| s.as_deref() == Some(m.value.as_str()))
            {
                self.warnings.push(format!(
                    "{ds}: option \"external_mappings\": value {:?} matches the scope_id of no kubernetes data source in this file",
                    m.value
                ));
            }
            if !is_uuid(&m.value) {
                self.warnings.push(format!(
                    "{ds}: option \"external_mappings\": value {:?} is not a UUID; a cluster UID looks like 2f4c2b1e-6f5d-4c1a-9a63-2b0f3c5d7e81",
                    m.value
                ));
            }
        }
    }
}

/// Parses and validates configuration text. `env` looks up environment
/// variables (std::env::var in the agent; a table in tests).
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let raw: RawFile = if text.trim().is_empty() {
        RawFile::default()
    } else {
        serde_saphyr::from_str(text)
            .map_err(|e| ConfigErrors(vec![format!("invalid YAML: {e}")]))?
    };
    let Some(c) = raw.coordimap else {
        return Err(ConfigErrors(vec![
            "the file has no top-level \"coordimap\" section".into(),
        ]));
    };
    let mut cx = Ctx {
        env,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let api_key = cx
        .text(&c.api_key, "coordimap.api_key")
        .filter(|s| !s.is_empty())
        .map(Secret);
    let skip_fields: Vec<String> = c
        .skip_fields
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, s)| cx.text(&Some(s.clone()), &format!("coordimap.skip_fields[{i}]")))
        .map(|s| s.to_lowercase())
        .collect();
    let database = c.database.and_then(|d| cx.database(d));
    let sources = c.data_sources.unwrap_or_default();
    let (flows_raw, kube, others) = cx.sort_sources(&sources);
    let mut flows = Vec::new();
    let mut seen_ids: Vec<String> = Vec::new();
    for (i, id, s) in flows_raw {
        let (ds, fs) = cx.flows_source(i, id, s, &mut seen_ids);
        cx.check_mappings(&ds, &fs, &kube);
        flows.push(fs);
    }
    if flows.is_empty() && cx.errors.is_empty() {
        cx.errors.push(
            "coordimap.data_sources: no data source of type \"flows\"; flowmap has nothing to run"
                .into(),
        );
    }
    if !cx.errors.is_empty() {
        return Err(ConfigErrors(cx.errors));
    }
    Ok(Config {
        api_key,
        skip_fields,
        database,
        flows,
        others,
        warnings: cx.warnings,
    })
}

/// A percentage option: a number above 0 and at most 100 (a trailing `%`
/// is allowed).
fn percent(v: &str) -> Option<f64> {
    let n: f64 = v.trim_end_matches('%').trim().parse().ok()?;
    (n.is_finite() && n > 0.0 && n <= 100.0).then_some(n)
}

fn apply_option(cx: &mut Ctx, fs: &mut FlowsSource, name: &str, value: &str, place: &str) {
    let v = value.trim();
    match name {
        "interface_name" => {
            if v.is_empty() || v.eq_ignore_ascii_case("all") {
                fs.interfaces = Selection::All;
                return;
            }
            let names: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
            if let Some(bad) = names.iter().find(|n| {
                n.is_empty() || n.len() > 15 || n.contains('/') || n.chars().any(char::is_whitespace)
            }) {
                cx.errors.push(format!(
                    "{place}: value {value:?}: {bad:?} is not an interface name; allowed: \"all\", one name, or names separated by commas (at most 15 characters each)"
                ));
                return;
            }
            fs.interfaces = Selection::Names(names);
        }
        "deployedAt" => match v.to_lowercase().as_str() {
            "server" => fs.deployed_at = DeployedAt::Server,
            "kubernetes" => fs.deployed_at = DeployedAt::Kubernetes,
            _ => cx.errors.push(format!("{place}: value {value:?} is not allowed; allowed: server, kubernetes")),
        },
        "external_mappings" => {
            let mut out: Vec<Mapping> = Vec::new();
            for entry in v.split_whitespace() {
                let parts: Vec<&str> = entry.split('@').collect();
                if parts.len() != 2 {
                    cx.errors.push(format!(
                        "{place}: entry {entry:?} must be key@value with exactly one \"@\" (for flows: *@<cluster UID>)"
                    ));
                    continue;
                }
                let (key, val) = (parts[0], parts[1]);
                if key.is_empty() || val.is_empty() {
                    cx.errors.push(format!("{place}: entry {entry:?} has an empty key or value; expected key@value"));
                    continue;
                }
                if out.iter().any(|m| m.key == key) {
                    cx.errors.push(format!("{place}: key {key:?} is given more than once"));
                    continue;
                }
                out.push(Mapping { key: key.into(), value: val.into() });
            }
            fs.external_mappings = out;
        }
        "crawl_interval" => match parse_go_duration(v) {
            Ok(d) if d < Duration::from_secs(1) => cx.errors.push(format!(
                "{place}: value {value:?} is {}; allowed: at least 1s (like 30s, 5m, 1h, 1m30s)",
                if d.is_zero() { "zero".to_string() } else { "less than 1s".to_string() }
            )),
            Ok(d) => fs.crawl_interval = d,
            Err(e) => cx.errors.push(format!(
                "{place}: value {value:?} is not a duration ({e}); allowed: a number and unit, at least 1s (like 30s, 5m, 1h, 1m30s; units ns, us, ms, s, m, h)"
            )),
        },
        "max_flows" => match v.parse::<u32>() {
            Ok(n) if (1024..=4_194_304).contains(&n) => fs.max_flows = n,
            _ => cx.errors.push(format!("{place}: value {value:?} is not allowed; allowed: a whole number from 1024 to 4194304")),
        },
        "attach_mode" => match v.parse::<AttachMode>() {
            Ok(m) => fs.attach_mode = m,
            Err(_) => cx.errors.push(format!("{place}: value {value:?} is not allowed; allowed: auto, tcx, tc")),
        },
        "max_external_endpoints" => match v.parse::<usize>() {
            Ok(n) if n <= MAX_EXTERNAL_ENDPOINTS => fs.max_external_endpoints = n,
            _ => cx.errors.push(format!("{place}: value {value:?} is not allowed; allowed: a whole number from 0 to {MAX_EXTERNAL_ENDPOINTS}")),
        },
        "status_failed_percent" => match percent(v) {
            Some(p) => fs.status.failed_percent = p,
            None => cx.errors.push(format!("{place}: value {value:?} is not allowed; allowed: a percentage above 0 and at most 100 (like 5 or 0.5)")),
        },
        "status_retransmit_percent" => match percent(v) {
            Some(p) => fs.status.retransmit_percent = p,
            None => cx.errors.push(format!("{place}: value {value:?} is not allowed; allowed: a percentage above 0 and at most 100 (like 2 or 0.5)")),
        },
        "capture_names" => match v.to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" => fs.capture_names = true,
            "false" | "off" | "no" => fs.capture_names = false,
            _ => cx.errors.push(format!("{place}: value {value:?} is not allowed; allowed: true, false")),
        },
        "processes" => match v.to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" => fs.processes = true,
            "false" | "off" | "no" => fs.processes = false,
            _ => cx.errors.push(format!("{place}: value {value:?} is not allowed; allowed: true, false")),
        },
        other => cx.warnings.push(format!(
            "{place}: unknown option, ignored; did you mean {:?}?",
            closest(other)
        )),
    }
}
