//! `vzram-bench`: load a vhost-user-blk disk like fio, with no VM.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use vzram_bench::BenchArgs;
use vzram_bench::tiering::TieringArgs;

#[derive(Debug, Parser)]
#[command(
    name = "vzram-bench",
    version,
    about = "Load a vhost-user-blk disk like fio, with no VM: a vzram device started here \
             (default), any socket (--socket), or the store alone (--store-only)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    scenario: Option<Scenario>,
    #[command(flatten)]
    args: BenchArgs,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Many VMs on one store (issue #14): devices in this process taking turns being busy and
    /// idle, hot and cold sets, a memory limit below their lz4 footprint; a no-limit run and
    /// one run per --policy mode, compared in one table.
    Tiering(TieringArgs),
}

fn main() -> ExitCode {
    let cli: Cli = vzram::config::parse_or_exit("vzram-bench");
    // Writes failing at the memory limit are what the tiering scenario measures: the daemon's
    // line per failed request would bury the table (RUST_LOG still shows them).
    let quiet = match cli.scenario {
        Some(Scenario::Tiering(_)) => "warn,vzram=error",
        None => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(quiet)).init();
    match cli.scenario {
        Some(Scenario::Tiering(args)) => tiering(&args),
        None => jobs(&cli.args),
    }
}

fn print<R: serde::Serialize + std::fmt::Display>(report: &R, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).expect("serialisable")
        );
    } else {
        print!("{report}");
    }
}

fn tiering(args: &TieringArgs) -> ExitCode {
    match vzram_bench::tiering::run(args) {
        Ok(report) => {
            print(&report, args.json);
            if report.problems() == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "vzram-bench: {} reads failed or read back wrong, or writes failed without a limit",
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

fn jobs(args: &BenchArgs) -> ExitCode {
    match vzram_bench::run(args) {
        Ok(report) => {
            print(&report, args.json);
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
