//! `compose.yaml` is valid against the Compose Specification's JSON schema (vendored with its
//! licence in `tests/data/compose-spec/`), the file Docker Compose v2 validates against: whatever
//! runner `scripts/compose-check` uses here, users run Docker Compose.

use std::path::PathBuf;

use serde_json::{Map, Number, Value};
use yaml_rust2::{Yaml, YamlLoader};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A YAML document as JSON (aliases are resolved by the loader; compose.yaml uses no merge keys).
fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(text) => {
            text.parse::<f64>().ok().and_then(Number::from_f64).map_or(Value::Null, Value::Number)
        }
        Yaml::Integer(n) => Value::from(*n),
        Yaml::String(s) => Value::from(s.as_str()),
        Yaml::Boolean(b) => Value::from(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(n) => n.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    (key, to_json(v))
                })
                .collect::<Map<_, _>>(),
        ),
        Yaml::Null | Yaml::Alias(_) | Yaml::BadValue => Value::Null,
    }
}

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(repo_file("tests/data/compose-spec/compose-spec.json")).unwrap();
    let schema: Value = serde_json::from_str(&text).expect("the vendored schema is JSON");
    jsonschema::validator_for(&schema).expect("the vendored schema compiles")
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo_file("compose.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("compose.yaml is YAML");
    to_json(&docs[0])
}

#[test]
fn compose_yaml_is_valid_against_the_compose_specification() {
    let errors: Vec<String> =
        schema().iter_errors(&compose()).map(|e| format!("{}: {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "compose.yaml against the Compose Specification:\n{}", errors.join("\n"));
}

/// The schema does refuse what Compose refuses: a misspelt service key and a wrong type.
#[test]
fn the_schema_refuses_a_broken_compose_file() {
    let validator = schema();
    let mut broken = compose();
    let services = broken["services"].as_object_mut().expect("services");
    let (_, first) = services.iter_mut().next().expect("a service");
    first["restart_policy"] = Value::from("always");
    assert!(!validator.is_valid(&broken), "an unknown service key passed");
    let mut wrong_type = compose();
    wrong_type["services"] = Value::from("not a map");
    assert!(!validator.is_valid(&wrong_type), "services as a string passed");
}
