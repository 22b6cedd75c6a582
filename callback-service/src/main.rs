use clap::Parser;

use callback_service::{
    build,
    cli::{Cli, Command, run_admin},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Admin(admin)) => {
            if let Err(e) = run_admin(*admin).await {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            return Ok(());
        }
        Some(Command::Serve(config)) => *config,
        None => cli.config,
    };
    let _trace = recheck::trace::init(config.log.as_deref(), &config.trace, "callback-service")?;

    let app = build(config).await?;

    let shutdown = recheck::shutdown::on_signals()?;

    app.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
