//! `cargo xtask <command>`: see `cargo xtask --help`.

use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;

use xtask::demo::{DemoOptions, demo};
use xtask::{cargo, cleanup_leftovers, cleanup_stale, debug_binary, setup};

#[derive(Parser)]
#[command(about = "Developer tasks for the eBPF service load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, the BPF
    /// nightly, bpf-linker, bpffs); silent when nothing is missing. Root.
    Setup,
    /// Run one node with three echo pods behind a Service, show how the
    /// agent spreads traffic and drops a removed endpoint. Root.
    Demo {
        /// Before tearing down, print where the pinned maps are and wait for Enter.
        #[arg(long)]
        keep: bool,
        /// Like --keep, but wait this many seconds instead of for Enter.
        #[arg(long, value_name = "N")]
        keep_seconds: Option<u64>,
    },
    /// setup, then fmt check, clippy, build and every test (serially). Root.
    Test {
        /// Passed to the test binaries (after `cargo test ... --`).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Compare this datapath with kube-proxy's iptables and nftables
    /// rulesets and a direct baseline; writes docs/benchmarks.md. Root.
    Bench {
        /// A few minutes, 3 repetitions, smaller sizes.
        #[arg(long, conflicts_with = "smoke")]
        quick: bool,
        /// Seconds, tiny sizes: only proves the benchmark works (the report
        /// goes to target/bench-smoke/).
        #[arg(long)]
        smoke: bool,
        /// Directory for benchmarks.md, the charts and the raw values.
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Run every cargo-fuzz target under fuzz/ (pinned nightly) for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Remove namespaces, bpffs directories, cgroups and temp directories
    /// left by tests and demos (`lbt-*`, `lbd-*`), and agents running inside
    /// them.
    Clean,
    /// The benchmark's connection client as a process of its own (cgroup
    /// membership is per process): joins the cgroup, runs the closed loop in
    /// the namespace it was started in, prints one summary line. Started by
    /// `bench`.
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup(),
        Task::Demo { keep, keep_seconds } => demo(&DemoOptions {
            keep: keep || keep_seconds.is_some(),
            keep_seconds,
        }),
        Task::Test { test_args } => test(&test_args),
        Task::Bench { quick, smoke, out } => bench::bench(&bench::BenchOptions {
            mode: if smoke {
                bench::Mode::Smoke
            } else if quick {
                bench::Mode::Quick
            } else {
                bench::Mode::Full
            },
            out,
        }),
        Task::Fuzz { seconds } => xtask::fuzz::fuzz(seconds),
        Task::BenchClient(args) => bench::client(&args),
        Task::Clean => {
            clean();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn clean() {
    for line in cleanup_leftovers().lines() {
        println!("{line}");
    }
}

fn test(test_args: &[String]) -> Result<()> {
    setup()?;
    // Only leftovers of dead processes: a concurrent run keeps its own.
    for line in cleanup_stale().lines() {
        println!("stale leftover: {line}");
    }

    let agent_bin = debug_binary("lb-agent");
    let lbctl_bin = debug_binary("lbctl");
    let mut cargo_test = vec!["test", "--workspace", "--", "--test-threads=1"];
    cargo_test.extend(test_args.iter().map(String::as_str));

    let steps: [(&str, Vec<&str>); 6] = [
        ("format", vec!["fmt", "--all", "--", "--check"]),
        (
            "clippy",
            vec![
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        ("build", vec!["build", "--workspace", "--bins"]),
        ("test", cargo_test),
        // The benchmark in its quickest form, only to prove it runs (it
        // asserts no timing; the report goes to target/bench-smoke/).
        (
            "bench smoke",
            vec!["run", "-p", "xtask", "--", "bench", "--smoke"],
        ),
        // A few seconds per fuzz target: proves they build and run, and
        // catches shallow regressions (`cargo xtask fuzz` goes deeper).
        (
            "fuzz",
            vec!["run", "-p", "xtask", "--", "fuzz", "--seconds", "5"],
        ),
    ];
    let mut totals = Tally::default();
    for (name, args) in steps {
        println!("==> {name}: cargo {}", args.join(" "));
        let mut command = cargo(&args);
        command
            .env("LB_AGENT_BIN", &agent_bin)
            .env("LBCTL_BIN", &lbctl_bin);
        let status = if name == "test" {
            run_counting(&mut command, &mut totals)
        } else {
            command.status()
        }
        .with_context(|| format!("step {name}: starting cargo"))?;
        if !status.success() {
            println!("tests: {}", totals.line());
            bail!("step {name} failed ({status}): cargo {}", args.join(" "));
        }
    }
    // One closing line over every test binary (cargo prints one per binary,
    // the last often a doc-test run of zero).
    println!("tests: {}", totals.line());
    println!("==> all steps passed");
    Ok(())
}

/// Test counts summed over every `test result:` line cargo prints.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Adds the counts of a `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }

    fn line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }
}

/// Runs `command`, echoing its stdout line by line while counting tests.
fn run_counting(
    command: &mut Command,
    totals: &mut Tally,
) -> std::io::Result<std::process::ExitStatus> {
    use std::io::{BufRead, BufReader};
    let mut child = command.stdout(Stdio::piped()).spawn()?;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            totals.add_line(&line);
        }
    }
    child.wait()
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tallies_cargo_test_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 31 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.04s");
        t.add_line(
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Tally {
                passed: 33,
                failed: 1,
                ignored: 2
            }
        );
        assert_eq!(t.line(), "33 passed, 1 failed, 2 skipped");
    }
}
