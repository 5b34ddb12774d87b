//! `backtree verify`: runs `backtree_core::verify` and prints what it found.
//!
//! Exit codes (ripgrep-like): 0 the repository is sound (warnings allowed), 1 problems found,
//! 2 verify could not run (the repository cannot be opened or listed).

use anyhow::Result;
use backtree_core::verify::{self, DataSubset, Report, VerifyOptions, VerifyProgress};
use backtree_core::Repository;
use clap::Args;
use serde_json::json;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Exit code when verify (or repair) could not run at all.
pub const EXIT_CANNOT_RUN: i32 = 2;

#[derive(Args, Clone, Debug)]
pub struct VerifyArgs {
    /// Also read every pack whole: its hash, its trailer, and every blob decoded and checked
    /// against its id.
    #[arg(long, conflicts_with = "read_data_subset")]
    pub read_data: bool,
    /// Read only a deterministic subset of the packs: a percentage (10%) or group N of M (2/5:
    /// runs with 1/5 … 5/5 read every pack once).
    #[arg(long, value_name = "PERCENT|N/M", value_parser = DataSubset::parse)]
    pub read_data_subset: Option<DataSubset>,
    /// Only generations of hosts matching this glob (repeatable; default: every host). The
    /// index and the packs are checked whole either way.
    #[arg(long = "host", value_name = "GLOB")]
    pub hosts: Vec<String>,
    /// Print one JSON document (every problem, and the counts) instead of text.
    #[arg(long)]
    pub json: bool,
}

impl VerifyArgs {
    pub fn options(&self) -> Result<VerifyOptions> {
        let data = match (self.read_data, self.read_data_subset) {
            (true, _) => DataSubset::All,
            (false, Some(s)) => s,
            (false, None) => DataSubset::None,
        };
        Ok(VerifyOptions {
            data,
            hosts: host_filter(&self.hosts)?,
        })
    }
}

/// A filter accepting hosts that match any of `globs` (`None` if there are none).
pub fn host_filter(globs: &[String]) -> Result<Option<verify::HostFilter>> {
    if globs.is_empty() {
        return Ok(None);
    }
    let set = crate::output::host_globs(globs)?;
    Ok(Some(Box::new(move |h: &str| set.is_match(h))))
}

/// Runs `f` with a progress line on standard error if it is a terminal.
pub fn with_progress<T>(progress: &Arc<VerifyProgress>, f: impl FnOnce() -> T) -> T {
    if !std::io::stderr().is_terminal() {
        return f();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (p, b, stop) = (progress.clone(), bar.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let phase = p.phase.lock().map(|s| s.clone()).unwrap_or_default();
                let (done, total) = (
                    p.done.load(Ordering::Relaxed),
                    p.total.load(Ordering::Relaxed),
                );
                b.set_message(if total > 0 {
                    format!("verify: {phase} {done}/{total}")
                } else {
                    format!("verify: {phase}")
                });
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let out = f();
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    bar.finish_and_clear();
    out
}

/// Opens the repository and verifies it with progress on a terminal, for `verify` and
/// `repair generations` (`what` names the command in the error). `Err(code)`: it could not run,
/// and said why.
pub fn open_and_verify(
    rt: &tokio::runtime::Runtime,
    repo: &crate::RepoArg,
    opts: &VerifyOptions,
    what: &str,
) -> Result<(Repository, Report), i32> {
    let r = open(rt, repo)?;
    let progress = Arc::new(VerifyProgress::default());
    match with_progress(&progress, || {
        rt.block_on(verify::verify(&r, opts, &progress))
    }) {
        Ok(report) => Ok((r, report)),
        Err(e) => {
            eprintln!("backtree: {what} could not run: {e}");
            Err(EXIT_CANNOT_RUN)
        }
    }
}

/// Opens the repository for a command whose exit code 2 means "could not run".
pub fn open(rt: &tokio::runtime::Runtime, repo: &crate::RepoArg) -> Result<Repository, i32> {
    repo.open_repo(rt).map_err(|e| {
        eprintln!("backtree: {}", crate::chain(&e));
        EXIT_CANNOT_RUN
    })
}

/// `backtree verify`.
pub fn run(rt: &tokio::runtime::Runtime, repo: &crate::RepoArg, args: &VerifyArgs) -> Result<i32> {
    let opts = args.options()?;
    let report = match open_and_verify(rt, repo, &opts, "verify") {
        Ok((_, report)) => report,
        Err(code) => return Ok(code),
    };
    print(&report, args.json)?;
    Ok(if report.counts.problems > 0 { 1 } else { 0 })
}

/// The summary line: `N problems in M generations`, and the warnings.
pub fn summary(report: &Report) -> String {
    let c = &report.counts;
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut s = format!(
        "{} in {} ({} checked, {}, {}{})",
        plural(c.problems, "problem", "problems"),
        plural(c.damaged_generations, "generation", "generations"),
        plural(c.generations, "generation", "generations"),
        plural(c.packs, "pack", "packs"),
        plural(c.index_entries, "index entry", "index entries"),
        if c.packs_read > 0 {
            format!(", {} read whole", plural(c.packs_read, "pack", "packs"))
        } else {
            String::new()
        }
    );
    if c.warnings > 0 {
        s.push_str(&format!("; {}", plural(c.warnings, "warning", "warnings")));
    }
    s
}

fn print(report: &Report, as_json: bool) -> Result<()> {
    if as_json {
        let v = json!({
            "sound": report.counts.problems == 0,
            "problems": report.findings,
            "counts": report.counts,
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for f in &report.findings {
        out!("{}", f.line());
    }
    out!("{}", summary(report));
    Ok(())
}
