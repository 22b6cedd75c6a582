use clap::Parser;

use downstream_demo::{Cli, Command, Stats, build, config::StatsArgs, store};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Stats(args)) => stats(args).await,
        Some(Command::Serve(config)) => serve(*config).await,
        None => serve(cli.serve).await,
    }
}

async fn serve(config: downstream_demo::Config) -> anyhow::Result<()> {
    let _trace = recheck::trace::init(config.log.as_deref(), &config.trace, "downstream-demo")?;
    let app = build(config).await?;
    let shutdown = recheck::shutdown::on_signals()?;
    app.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let pool = store::connect(&args.store.database_url).await?;
    let stats = Stats::load(&pool, &args.store.consumer).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        println!("{stats}");
    }
    Ok(())
}
