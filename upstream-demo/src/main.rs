use clap::Parser;

use upstream_demo::{Config, build};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    recheck::shutdown::init_tracing(config.log.as_deref())?;

    let app = build(config).await?;

    let shutdown = recheck::shutdown::on_signals()?;

    app.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
