//! `compose.yaml` checked against the binaries it runs, without Docker: every service built from
//! our Dockerfile runs one of our binaries, with subcommands and flags that binary has and only
//! environment variables it reads (taken from its `--help`, i.e. from clap's `env = …`); every
//! service has a healthcheck and waits for its dependencies to be healthy; the Dockerfile installs
//! every binary compose runs. The observability profile's files agree with it too: Prometheus scrapes
//! each service on its ops port, bind-mounted files exist, and the Grafana dashboard and the metrics
//! table of `docs/operations.md` (linked from the README) cover exactly the metric catalog
//! (`recheck::telemetry::ALL`). Each service connects to RabbitMQ as its own user of
//! `compose/rabbitmq-definitions.json` (the `permissions` suite runs them).
//!
//! The binaries are looked up next to this test's executable (`target/<profile>/`), so they must
//! be built first: `cargo build --workspace --bins` (scripts/test does).

mod binaries;
mod health;
mod observability;
mod users;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use yaml_rust2::{Yaml, YamlLoader, yaml::Hash};

/// The binaries the image holds; a service built from our Dockerfile must run one of them.
const OURS: [&str; 3] = ["callback-service", "upstream-demo", "downstream-demo"];

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
}

fn load_compose(text: &str) -> Hash {
    let docs = YamlLoader::load_from_str(text).expect("compose.yaml is not valid YAML");
    assert_eq!(docs.len(), 1, "compose.yaml must hold exactly one YAML document");
    docs[0].as_hash().expect("compose.yaml: the top level must be a map").clone()
}

fn compose() -> Hash {
    let path = repo_file("compose.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    load_compose(&text)
}

fn services(compose: &Hash) -> Vec<(String, Hash)> {
    let services =
        compose.get(&key("services")).and_then(Yaml::as_hash).expect("compose.yaml: no `services` map");
    services
        .iter()
        .map(|(name, spec)| {
            let name = name.as_str().expect("service names are strings").to_owned();
            let spec = spec.as_hash().unwrap_or_else(|| panic!("service {name}: not a map")).clone();
            (name, spec)
        })
        .collect()
}

fn key(name: &str) -> Yaml {
    Yaml::String(name.to_owned())
}

/// A scalar as compose reads it (`5`, `true` and `"5"` are all strings to the container).
fn scalar(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `command:` / `entrypoint:` as argv: list form, or a string split on whitespace (quotes are
/// refused: the list form says the same without shell-lexing rules).
fn argv(value: &Yaml, what: &str) -> Result<Vec<String>, String> {
    match value {
        Yaml::Array(items) => {
            items.iter().map(|v| scalar(v).ok_or(format!("{what}: non-scalar item"))).collect()
        }
        Yaml::String(s) if s.contains(['"', '\'', '\\']) => {
            Err(format!("{what}: use the list form instead of a quoted string ({s:?})"))
        }
        Yaml::String(s) => Ok(s.split_whitespace().map(str::to_owned).collect()),
        Yaml::Null => Ok(Vec::new()),
        other => Err(format!("{what}: expected a list or a string, got {other:?}")),
    }
}

/// The program a service runs: `entrypoint` followed by `command`.
fn service_argv(spec: &Hash) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    if let Some(entrypoint) = spec.get(&key("entrypoint")) {
        args.extend(argv(entrypoint, "entrypoint")?);
    }
    if let Some(command) = spec.get(&key("command")) {
        args.extend(argv(command, "command")?);
    }
    Ok(args)
}

/// Names of `environment:`, map form (`KEY: value`) or list form (`KEY=value` / `KEY`).
fn environment_keys(spec: &Hash) -> Result<BTreeSet<String>, String> {
    match spec.get(&key("environment")) {
        None => Ok(BTreeSet::new()),
        Some(Yaml::Hash(map)) => {
            map.keys().map(|k| scalar(k).ok_or(format!("environment: key {k:?} is not a string"))).collect()
        }
        Some(Yaml::Array(items)) => items
            .iter()
            .map(|item| {
                let item = scalar(item).ok_or(format!("environment: item {item:?} is not a string"))?;
                Ok(item.split_once('=').map_or(item.as_str(), |(k, _)| k).to_owned())
            })
            .collect(),
        Some(other) => Err(format!("environment: expected a map or a list, got {other:?}")),
    }
}

/// Whether the service is built from the repository's Dockerfile (`build: .`).
fn built_here(spec: &Hash) -> Result<bool, String> {
    let (context, dockerfile) = match spec.get(&key("build")) {
        None => return Ok(false),
        Some(Yaml::String(context)) => (context.clone(), None),
        Some(Yaml::Hash(build)) => (
            build.get(&key("context")).and_then(scalar).unwrap_or_else(|| ".".into()),
            build.get(&key("dockerfile")).and_then(scalar),
        ),
        Some(other) => return Err(format!("build: expected a string or a map, got {other:?}")),
    };
    if !matches!(context.as_str(), "." | "./") {
        return Err(format!("build: context {context:?}: only the repository root (`.`) is built here"));
    }
    if dockerfile.as_deref().is_some_and(|d| !matches!(d, "Dockerfile" | "./Dockerfile")) {
        return Err(format!("build: dockerfile {dockerfile:?}: only ./Dockerfile exists"));
    }
    Ok(true)
}

// ---- the binaries' help ----

fn report(problems: Vec<String>) {
    assert!(problems.is_empty(), "compose.yaml:\n  {}", problems.join("\n  "));
}

/// The executable a service built here runs, if its argv can be read.
fn service_binary(spec: &Hash) -> Option<String> {
    let argv = service_argv(spec).ok()?;
    Some(argv.first()?.rsplit('/').next()?.to_owned())
}

// ---- the tests ----

/// `environment:` value of `name`, map form or list form.
fn environment_value(spec: &Hash, name: &str) -> Option<String> {
    match spec.get(&key("environment"))? {
        Yaml::Hash(map) => map.get(&key(name)).and_then(scalar),
        Yaml::Array(items) => items
            .iter()
            .filter_map(scalar)
            .find_map(|item| item.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_owned())),
        _ => None,
    }
}
