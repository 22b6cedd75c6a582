//! The observability profile agrees with compose: Prometheus scrapes each service on its ops
//! port, the alert rules load and name recorded metrics, bind-mounted files exist, and the Grafana
//! dashboard and `docs/operations.md`'s metrics table cover exactly the metric catalog.

use super::*;

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
