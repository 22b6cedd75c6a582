use clap::Parser;
use tracing_subscriber::EnvFilter;

use upstream_demo::{Config, build};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = match &config.log {
        Some(directives) => EnvFilter::try_new(directives)?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let app = build(config).await?;

    let shutdown = recheck::shutdown::on_signals()?;

    app.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
