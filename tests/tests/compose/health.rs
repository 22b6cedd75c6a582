//! Every service has a healthcheck and waits for its dependencies to be healthy.

use super::*;

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
