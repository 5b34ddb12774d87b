//! `backtree repair index` and `backtree repair generations`: `backtree_core::repair`, printed.
//!
//! Exit codes: 0 done (or nothing to do); 1 something is left that the repair could not fix
//! (a damaged pack skipped, damaged generations listed but not removed, a manifest that could
//! not be deleted); 2 the repair could not run.

use crate::verify::{host_filter, open, open_and_verify, with_progress, EXIT_CANNOT_RUN};
use anyhow::Result;
use backtree_core::repair::{self, DamagedGeneration, SalvageOptions, Salvaged};
use backtree_core::verify::{self, DataSubset, VerifyOptions, VerifyProgress};
use clap::Subcommand;
use serde_json::json;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum RepairCmd {
    /// Rebuild what the index lacks from the packs' trailers (a lost or damaged delta), and
    /// tombstone entries whose pack is gone. Only adds index deltas: safe beside ingests,
    /// mounts and compactions.
    Index {
        #[command(flatten)]
        repo: crate::RepoArg,
        /// Show what would be added; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the generations that reference missing or damaged data (as `verify` finds them),
    /// and with --remove delete their manifests.
    Generations {
        #[command(flatten)]
        repo: crate::RepoArg,
        /// Delete the manifests of the damaged generations (their intact data stays for
        /// other generations; a prune removes what nothing references).
        #[arg(long)]
        remove: bool,
        /// For each damaged generation, write a new generation of the same host that keeps
        /// everything readable and leaves out what is lost, then delete the damaged manifest.
        /// With --remove too, generations whose manifest cannot be read are removed.
        #[arg(long)]
        salvage: bool,
        /// Find damaged blobs by reading every pack whole, as `verify --read-data`.
        #[arg(long)]
        read_data: bool,
        /// Only generations of hosts matching this glob (repeatable).
        #[arg(long = "host", value_name = "GLOB")]
        hosts: Vec<String>,
        /// Show what would be removed; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(rt: &tokio::runtime::Runtime, cmd: &RepairCmd) -> Result<i32> {
    match cmd {
        RepairCmd::Index {
            repo,
            dry_run,
            json,
        } => {
            let r = match open(rt, repo) {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
            let progress = Arc::new(VerifyProgress::default());
            let done = with_progress(&progress, || {
                rt.block_on(repair::repair_index(&r, *dry_run, &progress))
            });
            let done = match done {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("backtree: repair index could not run: {e}");
                    return Ok(EXIT_CANNOT_RUN);
                }
            };
            if *json {
                out!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                for p in &done.index_problems {
                    out!("index: {p}");
                }
                for (k, why) in &done.damaged_packs {
                    out!("skipped damaged pack {k}: {why}");
                }
                let verb = if *dry_run { "would add" } else { "added" };
                out!(
                    "{verb} {} index entries of {} packs and {} tombstones for entries of missing \
                     packs, in {} deltas ({} pack trailers read)",
                    done.entries_added,
                    done.packs_added,
                    done.tombstones_added,
                    done.deltas.len(),
                    done.packs
                );
                for d in &done.deltas {
                    out!("  {}{d}", if *dry_run { "would write " } else { "wrote " });
                }
            }
            Ok(if done.damaged_packs.is_empty() { 0 } else { 1 })
        }
        RepairCmd::Generations {
            repo,
            remove,
            salvage,
            read_data,
            hosts,
            dry_run,
            json,
        } => {
            let opts = VerifyOptions {
                data: if *read_data {
                    DataSubset::All
                } else {
                    DataSubset::None
                },
                hosts: host_filter(hosts)?,
            };
            let (r, report) = match open_and_verify(rt, repo, &opts, "repair generations") {
                Ok(x) => x,
                Err(code) => return Ok(code),
            };
            let damaged = repair::damaged_generations(&report);
            if *salvage {
                return salvage_run(rt, &r, &report, damaged, *remove, *dry_run, *json);
            }
            let act = *remove && !*dry_run;
            let errors = if act {
                rt.block_on(repair::remove_generations(&r, &damaged))
            } else {
                Vec::new()
            };
            for e in &errors {
                eprintln!("backtree: cannot remove {e}");
            }
            print(&damaged, *remove, *dry_run, &errors, *json)?;
            Ok(if damaged.is_empty() || (act && errors.is_empty()) {
                0
            } else {
                1
            })
        }
    }
}

/// `repair generations --salvage [--remove]`.
fn salvage_run(
    rt: &tokio::runtime::Runtime,
    r: &backtree_core::repo::Repository,
    report: &verify::Report,
    damaged: Vec<DamagedGeneration>,
    remove: bool,
    dry_run: bool,
    as_json: bool,
) -> Result<i32> {
    // With --remove, what cannot be salvaged (an unreadable manifest) is removed instead.
    let (unreadable, salvageable): (Vec<_>, Vec<_>) = damaged
        .into_iter()
        .partition(|d| d.manifest_damaged && remove);
    let opts = SalvageOptions {
        dry_run,
        lease_time: None,
    };
    let done = repair::salvage_generations(r, rt.handle(), report, &salvageable, &opts);
    let errors = if remove && !dry_run {
        rt.block_on(repair::remove_generations(r, &unreadable))
    } else {
        Vec::new()
    };
    // As --remove: a dry run fixes nothing, so damaged generations still mean exit 1.
    let ok = (done.is_empty() && unreadable.is_empty())
        || (!dry_run && done.iter().all(Salvaged::ok) && errors.is_empty());
    let removed: Vec<String> = unreadable
        .iter()
        .map(|d| format!("{}/{}", d.host, d.generation))
        .collect();
    if as_json {
        let v = json!({
            "action": if dry_run { "would salvage" } else { "salvaged" },
            "salvaged": done,
            "removed": removed,
            "errors": errors,
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(if ok { 0 } else { 1 });
    }
    for s in &done {
        let g = format!("{}/{}", s.host, s.generation);
        let Some(new) = s.new_generation.as_deref().filter(|_| s.ok()) else {
            let why = s.error.as_deref().unwrap_or("unknown");
            out!("cannot salvage {g}: {why}");
            continue;
        };
        let verb = if dry_run { "would salvage" } else { "salvaged" };
        let mut line = format!(
            "{verb} {g} as {}/{new}: {} paths left out",
            s.host, s.left_out
        );
        if let Some(p) = s.paths.first() {
            line.push_str(&format!(" (first: {}: {})", p.path, p.error));
        }
        if s.links_dropped {
            line.push_str("; hardlink table dropped");
        }
        if !dry_run && !s.removed {
            line.push_str("; the damaged manifest could not be deleted");
        }
        out!("{line}");
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for g in &removed {
        out!("{verb} {g}: manifest unreadable, nothing to salvage");
    }
    for e in &errors {
        eprintln!("backtree: cannot remove {e}");
    }
    out!(
        "{} of {} damaged generations {}",
        done.iter().filter(|s| s.ok()).count(),
        done.len() + removed.len(),
        if dry_run {
            "would be salvaged"
        } else {
            "salvaged"
        }
    );
    Ok(if ok { 0 } else { 1 })
}

fn print(
    damaged: &[DamagedGeneration],
    remove: bool,
    dry_run: bool,
    errors: &[String],
    as_json: bool,
) -> Result<()> {
    let what = match (remove, dry_run) {
        (false, _) => "damaged",
        (true, true) => "would remove",
        (true, false) => "removed",
    };
    if as_json {
        let v = json!({
            "action": what,
            "generations": damaged,
            "errors": errors,
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for d in damaged {
        let mut line = format!(
            "{what} {}/{}: {} problems, {} damaged blobs",
            d.host, d.generation, d.problems, d.blobs
        );
        if d.manifest_damaged {
            line.push_str(", manifest unreadable");
        }
        if !d.paths.is_empty() {
            line.push_str(&format!("; {}", d.paths.join(", ")));
        }
        out!("{line}");
    }
    out!(
        "{} damaged generations{}",
        damaged.len(),
        match (remove, dry_run) {
            (false, _) if !damaged.is_empty() =>
                "; `--remove` deletes their manifests, `--salvage` rewrites them without what is \
                 lost",
            _ => "",
        }
    );
    Ok(())
}
