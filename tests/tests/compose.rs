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

fn bin_dir() -> PathBuf {
    // target/<profile>/deps/compose-<hash> → target/<profile>/
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("test executable outside target/<profile>/deps").to_owned()
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: this test runs the service binaries' --help; build them first with \
         `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// One command level's `--help`, parsed.
#[derive(Debug)]
struct Help {
    /// `binary sub sub` as typed, for messages.
    invocation: String,
    /// Subcommand names (`help` left out).
    commands: BTreeSet<String>,
    /// Option spellings (`--addr`, `-h`) → whether the option takes a value.
    options: BTreeMap<String, bool>,
    /// Names in `[env: NAME=…]`.
    env: BTreeSet<String>,
    /// Whether the level takes positional arguments (an `Arguments:` section).
    positionals: bool,
    /// Whether this level's options may be given together with a subcommand (one usage line
    /// shows both); false with `args_conflicts_with_subcommands`, where they configure the
    /// default command only.
    options_with_subcommand: bool,
}

fn help(bin: &str, path: &[String]) -> Result<Help, String> {
    let invocation =
        std::iter::once(bin.to_owned()).chain(path.iter().cloned()).collect::<Vec<_>>().join(" ");
    let output = Command::new(binary(bin))
        .args(path)
        .arg("--help")
        // The inherited environment would only show up as values in `[env: NAME=value]`.
        .env_clear()
        .output()
        .map_err(|e| format!("`{invocation} --help`: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{invocation} --help` exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(parse_help(invocation, &String::from_utf8_lossy(&output.stdout)))
}

fn parse_help(invocation: String, text: &str) -> Help {
    let mut help = Help {
        invocation,
        commands: BTreeSet::new(),
        options: BTreeMap::new(),
        env: BTreeSet::new(),
        positionals: false,
        options_with_subcommand: false,
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(usage) = line.strip_prefix("Usage:") {
            section = "Usage";
            help.options_with_subcommand |= usage_with_both(usage);
            continue;
        }
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':');
            continue;
        }
        if line.trim().is_empty() {
            section = "";
            continue;
        }
        match section {
            "Usage" => help.options_with_subcommand |= usage_with_both(line),
            "Commands" if line.starts_with("  ") && !line.starts_with("   ") => {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name != "help" {
                    help.commands.insert(name.to_owned());
                }
            }
            "Arguments" => help.positionals = true,
            "Options" if line.trim_start().starts_with('-') => {
                let tokens: Vec<&str> = line.split_whitespace().collect();
                let names: Vec<&str> = tokens
                    .iter()
                    .map(|t| t.trim_end_matches(','))
                    .take_while(|t| t.starts_with('-'))
                    .collect();
                let takes_value = tokens.get(names.len()).is_some_and(|t| t.starts_with(['<', '[']));
                for name in names {
                    help.options.insert(name.to_owned(), takes_value);
                }
            }
            _ => {}
        }
    }
    let mut rest = text;
    while let Some(at) = rest.find("[env: ") {
        rest = &rest[at + "[env: ".len()..];
        let end = rest.find(['=', ']']).unwrap_or(rest.len());
        help.env.insert(rest[..end].to_owned());
    }
    help
}

fn usage_with_both(line: &str) -> bool {
    line.contains("[OPTIONS]") && (line.contains("<COMMAND>") || line.contains("[COMMAND]"))
}

/// What an argv resolves to: the help of every level on the way (binary, subcommand, …).
#[derive(Debug)]
struct Resolved {
    levels: Vec<Help>,
}

impl Resolved {
    /// Environment variables the invocation reads: the last level's (clap repeats `global`
    /// options there), and those of each parent whose options combine with a subcommand.
    fn env(&self) -> BTreeSet<String> {
        let (last, parents) = self.levels.split_last().expect("at least the binary");
        let mut env = last.env.clone();
        for parent in parents.iter().filter(|p| p.options_with_subcommand) {
            env.extend(parent.env.iter().cloned());
        }
        env
    }

    fn invocation(&self) -> &str {
        &self.levels.last().expect("at least the binary").invocation
    }
}

/// Walks `argv` (binary first) through the binary's subcommands, checking every option against
/// the level it is given at and every bare word against that level's subcommands and arguments.
fn resolve(argv: &[String]) -> Result<Resolved, String> {
    let (bin, args) = argv.split_first().ok_or("empty command")?;
    let bin = bin.rsplit('/').next().unwrap_or(bin);
    if !OURS.contains(&bin) {
        return Err(format!("`{bin}` is not one of the image's binaries ({})", OURS.join(", ")));
    }
    let mut path = Vec::new();
    let mut levels = vec![help(bin, &path)?];
    let mut only_positionals = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let level = levels.last().expect("at least the binary");
        if arg == "--" {
            only_positionals = true;
        } else if !only_positionals && arg.starts_with('-') && arg.len() > 1 {
            let (name, inline_value) = match arg.split_once('=') {
                Some((name, _)) => (name, true),
                None => (arg.as_str(), false),
            };
            let takes_value = *level
                .options
                .get(name)
                .ok_or_else(|| format!("`{}` has no option `{name}`", level.invocation))?;
            if takes_value && !inline_value {
                args.next().ok_or_else(|| format!("`{}`: `{name}` needs a value", level.invocation))?;
            }
        } else if !only_positionals && level.commands.contains(arg) {
            path.push(arg.clone());
            levels.push(help(bin, &path)?);
        } else if level.positionals {
            only_positionals = true;
        } else {
            return Err(format!(
                "`{}` takes no argument `{arg}` (subcommands: {})",
                level.invocation,
                if level.commands.is_empty() {
                    "none".to_owned()
                } else {
                    level.commands.iter().cloned().collect::<Vec<_>>().join(", ")
                }
            ));
        }
    }
    Ok(Resolved { levels })
}

/// Problems of one service built from our Dockerfile: what it runs and the variables it sets.
fn check_built_service(name: &str, spec: &Hash) -> Vec<String> {
    let mut problems = Vec::new();
    if spec.contains_key(&key("env_file")) {
        problems.push(format!("{name}: `env_file` cannot be checked; configure with `environment:` only"));
    }
    let argv = match service_argv(spec) {
        Ok(argv) if argv.is_empty() => {
            problems.push(format!("{name}: no `command`/`entrypoint`: say which binary it runs"));
            return problems;
        }
        Ok(argv) => argv,
        Err(e) => {
            problems.push(format!("{name}: {e}"));
            return problems;
        }
    };
    let resolved = match resolve(&argv) {
        Ok(resolved) => resolved,
        Err(e) => {
            problems.push(format!("{name}: {e}"));
            return problems;
        }
    };
    let known = resolved.env();
    match environment_keys(spec) {
        Ok(keys) => {
            for unknown in keys.difference(&known) {
                problems.push(format!(
                    "{name}: `{}` does not read {unknown} (it reads: {})",
                    resolved.invocation(),
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        Err(e) => problems.push(format!("{name}: {e}")),
    }
    problems
}

fn report(problems: Vec<String>) {
    assert!(problems.is_empty(), "compose.yaml:\n  {}", problems.join("\n  "));
}

/// The executable a service built here runs, if its argv can be read.
fn service_binary(spec: &Hash) -> Option<String> {
    let argv = service_argv(spec).ok()?;
    Some(argv.first()?.rsplit('/').next()?.to_owned())
}

// ---- the tests ----

#[test]
fn services_built_here_run_our_binaries_with_known_subcommands_options_and_env() {
    let compose = compose();
    let mut problems = Vec::new();
    let mut run = BTreeSet::new();
    for (name, spec) in services(&compose) {
        match built_here(&spec) {
            Ok(false) => {
                if !spec.contains_key(&key("image")) {
                    problems.push(format!("{name}: neither `image` nor `build`"));
                }
            }
            Ok(true) => {
                run.extend(service_binary(&spec));
                problems.extend(check_built_service(&name, &spec));
            }
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    for bin in OURS {
        if !run.contains(bin) {
            problems.push(format!("no service runs {bin}"));
        }
    }
    report(problems);
}

#[test]
fn every_service_has_a_healthcheck_and_waits_for_healthy_dependencies() {
    let compose = compose();
    let services = services(&compose);
    // service → Some(true) probed, Some(false) `disable: true`, None no healthcheck.
    let health: BTreeMap<&str, Option<bool>> = services
        .iter()
        .map(|(name, spec)| {
            let check = spec.get(&key("healthcheck")).and_then(Yaml::as_hash);
            let probed = check.map(|c| {
                c.get(&key("disable")).and_then(Yaml::as_bool) != Some(true) && c.contains_key(&key("test"))
            });
            (name.as_str(), probed)
        })
        .collect();
    let mut problems = Vec::new();
    for (name, probed) in &health {
        if probed.is_none() {
            problems.push(format!(
                "{name}: no healthcheck (`disable: true` only for a one-shot nobody waits on)"
            ));
        }
    }
    for (name, spec) in &services {
        let Some(depends_on) = spec.get(&key("depends_on")) else { continue };
        let Some(depends_on) = depends_on.as_hash() else {
            problems.push(format!(
                "{name}: depends_on: use the map form with `condition: service_healthy` \
                 (the list form only waits for the container to start)"
            ));
            continue;
        };
        for (target, how) in depends_on {
            let target = scalar(target).unwrap_or_default();
            let condition = how.as_hash().and_then(|h| h.get(&key("condition"))).and_then(scalar);
            if condition.as_deref() != Some("service_healthy") {
                problems.push(format!(
                    "{name}: depends_on {target}: condition {condition:?}, not service_healthy"
                ));
            }
            match health.get(target.as_str()) {
                None => problems.push(format!("{name}: depends_on {target}: no such service")),
                Some(Some(true)) => {}
                Some(_) => {
                    problems.push(format!("{name}: depends_on {target}, which has no healthcheck test"))
                }
            }
        }
    }
    report(problems);
}

#[test]
fn healthchecks_running_our_binaries_use_known_subcommands_and_options() {
    let compose = compose();
    let mut problems = Vec::new();
    for (name, spec) in services(&compose) {
        if !built_here(&spec).unwrap_or(false) {
            continue;
        }
        let Some(test) =
            spec.get(&key("healthcheck")).and_then(Yaml::as_hash).and_then(|h| h.get(&key("test")))
        else {
            continue;
        };
        let argv = match argv(test, "healthcheck.test") {
            Ok(argv) => argv,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        // ["CMD", program, args…]; CMD-SHELL strings and NONE are not parsed.
        let Some(("CMD", program)) = argv.split_first().map(|(form, rest)| (form.as_str(), rest)) else {
            continue;
        };
        let is_ours = program.first().is_some_and(|p| OURS.contains(&p.rsplit('/').next().unwrap_or(p)));
        if is_ours && let Err(e) = resolve(program) {
            problems.push(format!("{name}: healthcheck: {e}"));
        }
    }
    report(problems);
}

#[test]
fn the_dockerfile_builds_and_installs_every_binary_compose_runs() {
    let path = repo_file("Dockerfile");
    let dockerfile = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut problems = Vec::new();
    for (name, spec) in services(&compose()) {
        if !built_here(&spec).unwrap_or(false) {
            continue;
        }
        let Some(bin) = service_binary(&spec) else { continue };
        // Each binary is its package's name; built with `-p`, copied from target/release.
        for needle in [format!("-p {bin}"), format!("target/release/{bin}")] {
            if !dockerfile.contains(&needle) {
                problems.push(format!("{name} runs {bin}, but the Dockerfile has no `{needle}`"));
            }
        }
    }
    report(problems);
}

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

#[test]
fn prometheus_scrapes_every_service_on_its_ops_port() {
    let compose = compose();
    let mut problems = Vec::new();
    // "service:port" of every service with an ops listener.
    let mut expected = BTreeSet::new();
    for (name, spec) in services(&compose) {
        let runs_a_service = built_here(&spec).unwrap_or(false)
            && service_argv(&spec).is_ok_and(|argv| argv.iter().any(|a| a == "serve"));
        match environment_value(&spec, "RECHECK_OPS_ADDR") {
            Some(addr) => match addr.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()) {
                Some(port) => {
                    expected.insert(format!("{name}:{port}"));
                }
                None => problems.push(format!("{name}: RECHECK_OPS_ADDR {addr:?} has no port")),
            },
            None if runs_a_service => problems.push(format!("{name}: no RECHECK_OPS_ADDR (its /metrics)")),
            None => {}
        }
    }
    let path = repo_file("deploy/prometheus.yml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let config = YamlLoader::load_from_str(&text).expect("deploy/prometheus.yml is not valid YAML");
    let mut targets = BTreeSet::new();
    for job in config[0]["scrape_configs"].as_vec().expect("deploy/prometheus.yml: no scrape_configs") {
        for group in job["static_configs"].as_vec().into_iter().flatten() {
            targets.extend(group["targets"].as_vec().into_iter().flatten().filter_map(scalar));
        }
    }
    for missing in expected.difference(&targets) {
        problems.push(format!("deploy/prometheus.yml does not scrape {missing}"));
    }
    for unknown in targets.difference(&expected) {
        problems
            .push(format!("deploy/prometheus.yml scrapes {unknown}: no compose service has that ops port"));
    }
    report(problems);
}

/// Prometheus loads the alert rules (`rule_files`, each mounted beside its config), and every
/// rule's expression names only metrics some component records (`scripts/test` runs
/// `promtool check rules` on the syntax).
#[test]
fn the_alert_rules_are_loaded_and_name_only_recorded_metrics() {
    let mut problems = Vec::new();
    let text = std::fs::read_to_string(repo_file("deploy/prometheus.yml")).expect("deploy/prometheus.yml");
    let config = YamlLoader::load_from_str(&text).expect("deploy/prometheus.yml is not valid YAML");
    let rule_files: Vec<String> =
        config[0]["rule_files"].as_vec().into_iter().flatten().filter_map(scalar).collect();
    if !rule_files.contains(&"alerts.yml".to_owned()) {
        problems.push(format!("deploy/prometheus.yml loads {rule_files:?}, not alerts.yml"));
    }
    let compose = std::fs::read_to_string(repo_file("compose.yaml")).expect("compose.yaml");
    if !compose.contains("./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro") {
        problems.push("compose.yaml does not mount deploy/alerts.yml beside prometheus.yml".into());
    }
    let text = std::fs::read_to_string(repo_file("deploy/alerts.yml")).expect("deploy/alerts.yml");
    let rules = YamlLoader::load_from_str(&text).expect("deploy/alerts.yml is not valid YAML");
    let catalog: BTreeSet<String> = recheck::telemetry::ALL.iter().map(|s| s.to_string()).collect();
    let mut alerts = 0;
    for group in rules[0]["groups"].as_vec().into_iter().flatten() {
        for rule in group["rules"].as_vec().into_iter().flatten() {
            alerts += 1;
            let name = rule["alert"].as_str().unwrap_or("?");
            let expr = rule["expr"].as_str().unwrap_or_default();
            let used = metric_names(expr);
            if used.is_empty() {
                problems.push(format!("alert {name}: its expression names no recheck metric"));
            }
            for unknown in used.difference(&catalog) {
                problems.push(format!("alert {name}: {unknown} is not a recorded metric"));
            }
        }
    }
    if alerts < 5 {
        problems.push(format!("deploy/alerts.yml has {alerts} alerts"));
    }
    report(problems);
}

#[test]
fn bind_mounted_files_exist() {
    let mut problems = Vec::new();
    for (name, spec) in services(&compose()) {
        let volumes = spec.get(&key("volumes")).and_then(Yaml::as_vec).cloned().unwrap_or_default();
        for source in volumes.iter().filter_map(scalar).filter_map(|v| v.split(':').next().map(str::to_owned))
        {
            if source.starts_with("./") && !repo_file(&source).exists() {
                problems.push(format!("{name}: mounts {source}, which does not exist"));
            }
        }
    }
    report(problems);
}

/// Every service that talks to RabbitMQ connects as a user of its own from
/// `compose/rabbitmq-definitions.json`, with that user's password and permissions on its vhost,
/// and not as an administrator; the broker imports that file at boot. (The `permissions` suite
/// checks that the permissions suffice and refuse the rest.)
#[test]
fn each_service_connects_as_its_own_user_of_the_definitions() {
    use recheck_tests::definitions::{Definitions, compose_logins, definitions_path};
    let definitions = Definitions::load(&definitions_path()).unwrap();
    let text = std::fs::read_to_string(repo_file("compose.yaml")).unwrap();
    let logins = compose_logins(&text).unwrap();
    let mut problems = Vec::new();
    let mut users = BTreeMap::new();
    for login in &logins {
        let name = &login.service;
        if let Some(other) = users.insert(login.user.clone(), name.clone()) {
            problems.push(format!("{name} and {other} share the broker user {}", login.user));
        }
        let Some(user) = definitions.user(&login.user) else {
            problems.push(format!("{name}: user {} is not in the definitions", login.user));
            continue;
        };
        match user.password_matches(&login.password) {
            Ok(true) => {}
            Ok(false) => {
                problems.push(format!("{name}: the password of {} is not the defined one", login.user))
            }
            Err(e) => problems.push(format!("{name}: {e:#}")),
        }
        if user.tags.iter().any(|t| t == "administrator") {
            problems.push(format!("{name}: connects as the administrator {}", login.user));
        }
        if definitions.permission(&login.user, &login.vhost).is_none() {
            problems.push(format!("{name}: {} has no permissions on vhost {:?}", login.user, login.vhost));
        }
    }
    for (name, spec) in services(&compose()) {
        let serves = built_here(&spec).unwrap_or(false)
            && service_argv(&spec).is_ok_and(|argv| argv.iter().any(|a| a == "serve"));
        if serves && environment_value(&spec, "RECHECK_AMQP_URL").is_none() {
            problems.push(format!("{name}: runs a service without RECHECK_AMQP_URL (which user?)"));
        }
    }
    // The broker side: the definitions file and a config that loads it are mounted.
    let rabbitmq =
        services(&compose()).into_iter().find(|(name, _)| name == "rabbitmq").map(|(_, spec)| spec);
    let volumes: Vec<String> = rabbitmq
        .and_then(|spec| spec.get(&key("volumes")).and_then(Yaml::as_vec).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(scalar)
        .collect();
    let target = |source: &str| {
        volumes
            .iter()
            .find_map(|v| v.strip_prefix(source)?.strip_prefix(':')?.split(':').next().map(str::to_owned))
    };
    match (target("./compose/rabbitmq-definitions.json"), target("./compose/rabbitmq.conf")) {
        (Some(definitions), Some(conf)) => {
            let text = std::fs::read_to_string(repo_file("compose/rabbitmq.conf")).unwrap();
            if !text.lines().any(|l| l.trim() == format!("load_definitions = {definitions}")) {
                problems.push(format!("compose/rabbitmq.conf does not load_definitions = {definitions}"));
            }
            if !conf.starts_with("/etc/rabbitmq/conf.d/") {
                problems.push(format!("rabbitmq: compose/rabbitmq.conf mounted at {conf}, not in conf.d"));
            }
        }
        _ => problems.push(
            "rabbitmq: compose/rabbitmq-definitions.json and rabbitmq.conf are not both mounted".into(),
        ),
    }
    report(problems);
}

/// `recheck_*` metric names in `text`, histogram series (`_bucket`, `_sum`, `_count`) as their metric.
fn metric_names(text: &str) -> BTreeSet<String> {
    let catalog: BTreeSet<&str> = recheck::telemetry::ALL.iter().copied().collect();
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("recheck_") {
        if text[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|b| catalog.contains(b)))
            .unwrap_or(&name);
        names.insert(base.to_owned());
    }
    names
}

#[test]
fn the_dashboard_and_the_operations_metrics_table_cover_the_metric_catalog() {
    let catalog: BTreeSet<String> = recheck::telemetry::ALL.iter().map(|s| s.to_string()).collect();
    let path = repo_file("deploy/grafana/dashboards/recheck.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is not valid JSON");
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("the dashboard has no panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
        .filter_map(|target| target["expr"].as_str())
        .collect();
    let used = metric_names(&exprs.join("\n"));
    let mut problems = Vec::new();
    for unknown in used.difference(&catalog) {
        problems.push(format!("the dashboard queries {unknown}, which no component records"));
    }
    for unused in catalog.difference(&used) {
        problems.push(format!("the dashboard shows nothing of {unused}"));
    }
    // The metrics table moved from the README to docs/operations.md (the README links to it):
    // its `## Metrics` section, up to the next heading.
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("README.md");
    if !readme.contains("docs/operations.md#metrics") {
        problems.push("README.md does not link to docs/operations.md#metrics".to_owned());
    }
    let operations = std::fs::read_to_string(repo_file("docs/operations.md")).expect("docs/operations.md");
    let table = operations.split_once("\n## Metrics\n").map_or("", |(_, rest)| rest);
    let table = table.split("\n#").next().unwrap_or_default();
    for name in &catalog {
        if !table.contains(&format!("`{name}`")) {
            problems.push(format!("docs/operations.md, Metrics, does not list `{name}`"));
        }
    }
    for unknown in metric_names(table).difference(&catalog) {
        problems.push(format!("docs/operations.md, Metrics, lists {unknown}, which no component records"));
    }
    report(problems);
}

/// The check itself: a variable no binary reads, an unknown subcommand and an unknown option are
/// each reported, and a valid service passes.
#[test]
fn the_check_rejects_unknown_variables_subcommands_and_options() {
    let compose = load_compose(
        r#"
services:
  good:
    build: .
    command: callback-service serve
    environment:
      RECHECK_AMQP_URL: amqp://rabbitmq
  bogus-env:
    build: .
    command: ["callback-service", "serve"]
    environment: ["RECHECK_AMQP_URL=amqp://rabbitmq", "RECHECK_NO_SUCH_SETTING=1"]
  admin-env-on-serve:
    build: .
    command: ["callback-service"]
    environment: { RECHECK_ADMIN_ADDR: "http://callback:50051" }
  bogus-subcommand:
    build: .
    command: ["callback-service", "no-such-subcommand"]
  bogus-option:
    build: .
    command: ["callback-service", "admin", "--no-such-option", "stats"]
"#,
    );
    let problems: BTreeMap<String, Vec<String>> = services(&compose)
        .into_iter()
        .map(|(name, spec)| {
            let problems = check_built_service(&name, &spec);
            (name, problems)
        })
        .collect();
    assert_eq!(problems["good"], Vec::<String>::new());
    let expect = [
        ("bogus-env", "does not read RECHECK_NO_SUCH_SETTING"),
        ("admin-env-on-serve", "does not read RECHECK_ADMIN_ADDR"),
        ("bogus-subcommand", "takes no argument `no-such-subcommand`"),
        ("bogus-option", "has no option `--no-such-option`"),
    ];
    for (service, message) in expect {
        assert!(
            problems[service].len() == 1 && problems[service][0].contains(message),
            "{service}: expected one problem containing {message:?}, got {:?}",
            problems[service]
        );
    }
    // Options of `admin` combine with its subcommands; the top level's (serve's) do not.
    let admin = resolve(&["callback-service".into(), "admin".into(), "stats".into()]).unwrap();
    assert!(admin.env().contains("RECHECK_ADMIN_ADDR"), "{:?}", admin.env());
    assert!(!admin.env().contains("RECHECK_AMQP_URL"), "{:?}", admin.env());
}
