//! Secrets are never printed: each binary's configuration, parsed from an environment full of
//! secrets (broker and database URLs with passwords, bearer tokens, signing keys), shows none of
//! them in its `Debug` output, nor in `--help` (which prints the environment's values unless an
//! argument hides them); the publisher settings and the producer registry built from it neither.
//!
//! One test in its own process: it sets the process environment, which no other test may see.

use clap::{CommandFactory, Parser};

/// Every secret the environment below carries.
const SECRETS: [&str; 13] = [
    "amqp-s3cret-1",
    "amqp-s3cret-2",
    "db-s3cret",
    "db-query-s3cret",
    "admin-tok-1",
    "admin-tok-2",
    "confirm-key-0123456789",
    "hook-tok-s3cret",
    "hook-tok-a",
    "hook-tok-b",
    "consumer-key-0123456789",
    "admin-tok-client",
    "points-s3cret",
];

fn environment() -> Vec<(&'static str, &'static str)> {
    vec![
        ("RECHECK_AMQP_URL", "amqp://svc:amqp-s3cret-1@h1:5672/%2f,amqps://svc:amqp-s3cret-2@h2:5671/%2f"),
        ("DATABASE_URL", "postgres://app:db-s3cret@db:5432/store?sslmode=prefer&password=db-query-s3cret"),
        ("RECHECK_ADMIN_TOKENS", "admin-tok-1,admin-tok-2"),
        ("RECHECK_CONFIRM_KEYS", "points=confirm-key-0123456789"),
        ("RECHECK_PRODUCERS", "orders=https://orders:50061 hook-tok-s3cret"),
        ("RECHECK_HOOK_TOKENS", "hook-tok-a,hook-tok-b"),
        ("RECHECK_CONFIRM_KEY", "consumer-key-0123456789"),
        ("RECHECK_ADMIN_TOKEN", "admin-tok-client"),
        ("RECHECK_POINTS_DATABASE_URL", "postgres://reader:points-s3cret@db:5432/points"),
        // Not a secret: `--help` shows it, so it would show an unhidden secret too.
        ("RECHECK_PREFIX", "visible-prefix"),
    ]
}

fn assert_no_secret(what: &str, text: &str) {
    let leaked: Vec<&str> = SECRETS.iter().copied().filter(|s| text.contains(s)).collect();
    assert!(leaked.is_empty(), "{what} prints {leaked:?}:\n{text}");
}

/// The long help of the command and its subcommands (which lists the environment's values of
/// arguments that do not hide them).
fn help(mut command: clap::Command) -> String {
    let mut text = command.render_long_help().to_string();
    for sub in ["serve", "admin", "load", "stats"] {
        if let Some(sub) = command.find_subcommand_mut(sub) {
            text.push_str(&sub.render_long_help().to_string());
        }
    }
    assert!(text.contains("visible-prefix"), "--help shows no environment values at all:\n{text}");
    text
}

#[tokio::test]
async fn no_configuration_prints_a_secret() {
    for (key, value) in environment() {
        // SAFETY: this test is alone in its process and sets the environment before anything
        // (the runtime's threads included) reads it.
        unsafe { std::env::set_var(key, value) };
    }

    // callback-service: the service and the admin client.
    let cli = callback_service::cli::Cli::try_parse_from(["callback-service"]).unwrap();
    assert_eq!(cli.config.database_url.expose(), environment()[1].1, "the environment was not read");
    assert_eq!(cli.config.producers[0].token.as_deref(), Some("hook-tok-s3cret"));
    assert_no_secret("callback-service Config", &format!("{:?}", cli.config));
    assert_no_secret("callback-service Cli", &format!("{cli:?}"));
    let admin = callback_service::cli::Cli::try_parse_from(["callback-service", "admin", "stats"]).unwrap();
    assert_no_secret("callback-service admin", &format!("{admin:?}"));
    assert_no_secret("callback-service --help", &help(callback_service::cli::Cli::command()));
    let publisher = cli.config.broker.publisher_config("secrets-test").unwrap();
    assert_eq!(publisher.amqp_urls.len(), 2);
    assert_no_secret("PublisherConfig", &format!("{publisher:?}"));
    assert_no_secret("SecretUrl Display", &format!("{}", cli.config.broker.amqp_url));
    let registry = callback_service::registry::ProducerRegistry::from_config(&cli.config).unwrap();
    assert_no_secret("ProducerRegistry", &format!("{registry:?}"));

    // upstream-demo: the service and the load generator.
    let cli = upstream_demo::cli::Cli::try_parse_from(["upstream-demo"]).unwrap();
    assert!(cli.config.hook_tokens.as_ref().is_some_and(|a| a.enabled()), "the environment was not read");
    assert_no_secret("upstream-demo Config", &format!("{cli:?}"));
    let load = upstream_demo::cli::Cli::try_parse_from(["upstream-demo", "load"]).unwrap();
    match &load.command {
        Some(upstream_demo::cli::Command::Load(config)) => {
            assert!(config.points_database_url.is_some() && config.admin_token.is_some());
        }
        other => panic!("expected load, got {other:?}"),
    }
    assert_no_secret("upstream-demo LoadConfig", &format!("{load:?}"));
    assert_no_secret("upstream-demo --help", &help(upstream_demo::cli::Cli::command()));

    // downstream-demo: the service and stats.
    let cli = downstream_demo::Cli::try_parse_from(["downstream-demo"]).unwrap();
    assert!(cli.serve.confirm_key.is_some(), "the environment was not read");
    assert_no_secret("downstream-demo Config", &format!("{cli:?}"));
    let stats = downstream_demo::Cli::try_parse_from(["downstream-demo", "stats"]).unwrap();
    assert_no_secret("downstream-demo stats", &format!("{stats:?}"));
    assert_no_secret("downstream-demo --help", &help(downstream_demo::Cli::command()));
}
