//! `backtree prune`: options, progress and output (the work is `backtree_core::prune`).

use anyhow::Result;
use backtree_core::prune::{self, Action, PruneOptions, Report};
use backtree_core::Repository;
use clap::Args;
use std::io::{IsTerminal, Write};
use std::time::Duration;

#[derive(Args)]
pub struct PruneArgs {
    /// Show what would be deleted and repacked, pack by pack, without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Repack a pack when at least this share of its bytes is unreferenced (0–100; 100: never
    /// repack, only delete wholly unreferenced packs).
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent, default_value = "50")]
    pub repack_threshold: f64,
    /// Never delete or repack a pack younger than this (by the store's LastModified), e.g. 24h,
    /// 3d [default: 24h, or BACKTREE_PRUNE_GRACE seconds].
    #[arg(long, value_name = "DURATION", value_parser = backtree_core::forget::parse_duration)]
    pub grace: Option<Duration>,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v / 100.0)
    } else {
        Err(format!("{s:?}: a percentage is between 0 and 100"))
    }
}

fn env_secs(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// Runs a prune; the exit code is 1 if a pack could not be deleted.
pub async fn run(repo: &Repository, a: &PruneArgs) -> Result<i32> {
    let mut opts = PruneOptions {
        dry_run: a.dry_run,
        host: host_name(),
        policy: backtree_core::index::compact::Policy::from_env(),
        ..PruneOptions::default()
    };
    opts.plan.repack_threshold = a.repack_threshold;
    if let Some(g) = a.grace.or_else(|| env_secs("BACKTREE_PRUNE_GRACE")) {
        opts.plan.grace = g;
    }
    // For tests: how often leases are polled, and the clock-skew margin on their expiry.
    if let Some(p) = env_secs("BACKTREE_PRUNE_POLL") {
        opts.poll = p;
    }
    if let Some(m) = env_secs("BACKTREE_LEASE_MARGIN") {
        opts.lease_margin = m;
    }
    if let Some(t) = env_secs("BACKTREE_LEASE_SECS") {
        opts.lease_time = t;
    }
    let tty = std::io::stderr().is_terminal() && !a.json;
    let progress = move |line: &str| {
        if tty {
            eprintln!("prune: {line}");
        } else {
            tracing::info!("prune: {line}");
        }
    };
    let r = prune::run(repo, &opts, &progress).await?;
    if a.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &r)?;
        writeln!(out).unwrap_or_else(|e| crate::output::stdout_failed(e));
    } else {
        print(&r);
    }
    Ok(if r.failed.is_empty() { 0 } else { 1 })
}

fn print(r: &Report) {
    use crate::output::size;
    let t = &r.plan.totals;
    let mut out = std::io::stdout().lock();
    let mut line =
        |s: String| writeln!(out, "{s}").unwrap_or_else(|e| crate::output::stdout_failed(e));
    if r.dry_run {
        for d in r
            .plan
            .packs
            .iter()
            .filter(|d| d.action != Action::Keep && d.action != Action::KeepYoung)
        {
            let what = match d.action {
                Action::DeleteOrphan => "delete (not indexed)".to_owned(),
                Action::DeleteUnused => "delete (unreferenced)".to_owned(),
                Action::Repack => format!(
                    "repack ({:.0}% unreferenced, copies {})",
                    d.unused * 100.0,
                    size(d.used_bytes)
                ),
                _ => continue,
            };
            line(format!("{what:<40} {} ({})", d.key, size(d.size)));
        }
    }
    line(format!(
        "{} generations reference {} blobs; the index has {} entries in {} packs ({})",
        r.generations,
        r.referenced,
        r.index_entries,
        t.packs,
        size(t.bytes)
    ));
    line(format!(
        "{}: delete {} unreferenced and {} unindexed packs, repack {} (copying {}), keep {} \
         and {} younger than the grace period ({}); frees {}",
        if r.dry_run { "would" } else { "plan" },
        t.delete_unused,
        t.delete_orphan,
        t.repack,
        size(t.repack_copy_bytes),
        t.kept,
        t.kept_young,
        size(t.young_bytes),
        size(r.plan.freed())
    ));
    if r.dry_run {
        line("dry run: nothing was written or deleted".into());
        return;
    }
    if !r.waited_for.is_empty() {
        line(format!(
            "waited {:.1} s for {} running ingests",
            r.waited_secs,
            r.waited_for.len()
        ));
    }
    if !r.rescued.is_empty() {
        line(format!(
            "kept {} packs after all (needed by generations committed meanwhile, or re-uploaded)",
            r.rescued.len()
        ));
    }
    line(format!(
        "deleted {} packs ({}), wrote {} new packs ({} blobs copied), {} tombstones; {} leftover \
         leases and claims removed; read {} in {:.1} s",
        r.deleted_packs,
        size(r.deleted_bytes),
        r.new_packs,
        r.copied_blobs,
        r.tombstones,
        r.tidied,
        size(r.bytes_read),
        r.secs
    ));
    for (k, e) in &r.failed {
        line(format!(
            "could not delete {k}: {e} (the next prune tries again)"
        ));
    }
}
