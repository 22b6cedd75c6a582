use clap::Parser;

use upstream_demo::{
    build,
    cli::{Cli, Command},
    load,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Load(config)) => {
            // No log subscriber: it would write to stdout, where the report goes.
            if let Err(e) = load::run(*config).await {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            return Ok(());
        }
        Some(Command::Serve(config)) => *config,
        None => cli.config,
    };
    let _trace = recheck::trace::init(config.log.as_deref(), &config.trace, "upstream-demo")?;

    let app = build(config).await?;

    let shutdown = recheck::shutdown::on_signals()?;

    app.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
