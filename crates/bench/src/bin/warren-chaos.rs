//! `warren-chaos`: faults against a Warren on the local cluster, and a
//! count of what was lost (see `warren_bench::chaos`). Exits 1 when
//! `--expect-clean` or `--expect-loss` is not met.

#![allow(clippy::print_stdout)] // the report's tables are this binary's output

use clap::Parser;
use warren_bench::chaos::{Args, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (report, tables) = run::main(args.clone()).await?;
    println!("{tables}");
    if args.expect_clean && !report.clean() {
        anyhow::bail!("the run is not clean: lost, double-committed, wrong, stuck or 5xx above 0");
    }
    if args.expect_loss && report.lost == 0 {
        anyhow::bail!("--expect-loss: the injected bug lost nothing the checker could see");
    }
    Ok(())
}
