//! Each service connects to RabbitMQ as its own user of `compose/rabbitmq-definitions.json` (the
//! `permissions` suite runs them), and the broker loads that file.

use super::*;

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
