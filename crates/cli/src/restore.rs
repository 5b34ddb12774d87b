//! `backtree restore`: runs `backtree_core::restore` with a progress line on a terminal and
//! prints a summary (or JSON), every entry that could not be restored, and the exit code: 0 all
//! restored, 1 some entries failed (the rest was restored) or the restore could not start.

use anyhow::{bail, Result};
use backtree_core::restore::{self, RestoreOptions, RestoreProgress, Selection};
use backtree_core::Repository;
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone, Debug)]
pub struct RestoreArgs {
    /// Compare existing files of the same size by content (hashed along the stored chunk
    /// boundaries; nothing is read from the store) instead of by size and modification time.
    #[arg(long)]
    pub checksum: bool,
    /// Remove entries under TARGET that the generation does not have.
    #[arg(long)]
    pub delete: bool,
    /// Files restored at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub jobs: usize,
    /// Print the summary as JSON (counts, bytes fetched, every failure).
    #[arg(long)]
    pub json: bool,
    /// HOST/GENERATION[/PATH] (GENERATION may be `latest`).
    #[arg(value_name = "HOST/GENERATION[/PATH]")]
    pub what: String,
    /// Where to restore (created if missing): a directory's contents go into it, a single
    /// file to TARGET/NAME.
    #[arg(value_name = "TARGET")]
    pub target: PathBuf,
}

pub fn run(rt: &tokio::runtime::Runtime, repo: &Repository, args: &RestoreArgs) -> Result<i32> {
    let Some(what) = Selection::parse(&args.what) else {
        bail!(
            "restore needs HOST/GENERATION[/PATH] (GENERATION may be `latest`), not {:?}",
            args.what
        );
    };
    let opts = RestoreOptions {
        checksum: args.checksum,
        delete: args.delete,
        jobs: args.jobs.max(1),
    };
    let progress = Arc::new(RestoreProgress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        let (p, stop) = (progress.clone(), stop.clone());
        let t = std::thread::spawn({
            let b = b.clone();
            move || {
                let start = std::time::Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let bytes = p.bytes_fetched.load(Ordering::Relaxed);
                    let rate = bytes as f64 / start.elapsed().as_secs_f64().max(0.001);
                    b.set_message(format!(
                        "{} entries, {} files written, {} fetched, {}/s",
                        p.entries.load(Ordering::Relaxed),
                        p.files_written.load(Ordering::Relaxed),
                        crate::output::size(bytes),
                        crate::output::size(rate as u64),
                    ));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        (b, t)
    });
    let handle = rt.handle().clone();
    let result = restore::restore(repo, &handle, &what, &args.target, &opts, &progress);
    stop.store(true, Ordering::Relaxed);
    if let Some((b, t)) = ticker {
        let _ = t.join();
        b.finish_and_clear();
    }
    let r = result?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for f in &r.failures {
            eprintln!("backtree: not restored: {}: {}", f.path, f.error);
        }
        out!(
            "{} to {}: {} entries, {} files written ({}), {} unchanged, {} fetched, {} removed, \
             {:.1} s{}",
            r.generation,
            args.target.display(),
            r.entries,
            r.files_written,
            crate::output::size(r.bytes_written),
            r.files_unchanged,
            crate::output::size(r.bytes_fetched),
            r.removed,
            r.seconds,
            if r.failures.is_empty() {
                String::new()
            } else {
                format!(", {} entries NOT restored", r.failures.len())
            }
        );
    }
    Ok(if r.failures.is_empty() { 0 } else { 1 })
}
