//! `vzram-bench`: load a vhost-user-blk disk like fio, with no VM.

use clap::Parser;
use std::process::ExitCode;
use vzram_bench::BenchArgs;

#[derive(Debug, Parser)]
#[command(
    name = "vzram-bench",
    version,
    about = "Load a vhost-user-blk disk like fio, with no VM: a vzram device started here \
             (default), any socket (--socket), or the store alone (--store-only)"
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> ExitCode {
    let cli: Cli = vzram::config::parse_or_exit("vzram-bench");
    let args = cli.args;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match vzram_bench::run(&args) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serialisable")
                );
            } else {
                print!("{report}");
            }
            if report.problems() == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "vzram-bench: {} requests failed or read back wrong",
                    report.problems()
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("vzram-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
