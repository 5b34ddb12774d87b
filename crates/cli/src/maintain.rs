//! Output of `backtree maintain`.

use anyhow::Result;
use backtree_core::index::compact::{Outcome, Step};
use serde_json::json;

/// One line on what a compaction did.
pub fn compaction(o: &Outcome) -> String {
    format!(
        "index: compacted {} deltas and {} runs into {} tables ({} entries, {}); {} runs left; \
         {} superseded objects deleted",
        o.merged_deltas,
        o.merged_runs,
        o.tables_written,
        o.entries,
        crate::output::size(o.bytes_written),
        o.runs_after,
        o.deleted
    )
}

/// Prints a `maintain index` outcome.
pub fn print_compaction(o: &Outcome, dry_run: bool, as_json: bool) -> Result<()> {
    let plan = o.plan.as_ref();
    if as_json {
        let step = plan.map(|p| match &p.step {
            Step::Nothing => json!({ "merge": "nothing" }),
            Step::Run { deltas, runs } => json!({ "merge": "run", "deltas": deltas, "runs": runs }),
            Step::Full { deltas } => json!({ "merge": "full", "deltas": deltas }),
        });
        let v = json!({
            "dry_run": dry_run,
            "plan": step,
            "why": plan.map(|p| p.why.clone()),
            "delete": plan.map(|p| p.delete.clone()),
            "root": o.root,
            "merged_deltas": o.merged_deltas,
            "merged_runs": o.merged_runs,
            "tables_written": o.tables_written,
            "entries": o.entries,
            "bytes_written": o.bytes_written,
            "deleted": o.deleted,
            "runs_after": o.runs_after,
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if let Some(p) = plan {
        out!("plan: {}", p.why);
        if dry_run {
            for k in &p.delete {
                out!("would delete {k}");
            }
            if p.delete.is_empty() {
                out!("nothing to delete (superseded objects wait for the settle time)");
            }
            return Ok(());
        }
    }
    match &o.root {
        Some(r) => out!("{}\nnew root: {r}", compaction(o)),
        None => out!(
            "index: nothing to merge; {} superseded objects deleted",
            o.deleted
        ),
    }
    Ok(())
}
