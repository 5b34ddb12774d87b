//! `backtree diff` and `backtree find`: comparing generations and searching across them, with
//! core's walks that read only the subtrees that differ (core diff.rs, find.rs).

use crate::output::{entry_json, host_globs, size, time};
use anyhow::{bail, Context, Result};
use backtree_core::diff::{diff_entries, Change};
use backtree_core::find::{Finder, Pattern};
use backtree_core::tree::Entry;
use backtree_core::Repository;
use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct DiffArgs {
    /// Print JSON: every change with both entries, and what was read.
    #[arg(long)]
    pub json: bool,
    /// The older generation, HOST/GENERATION (GENERATION may be `latest`).
    #[arg(value_name = "HOST/A")]
    pub a: String,
    /// The newer generation, HOST/GENERATION (any host).
    #[arg(value_name = "HOST/B")]
    pub b: String,
    /// Compare only this path (a directory or a file) of both.
    #[arg(value_name = "PATH")]
    pub path: Option<String>,
}

#[derive(Args)]
pub struct FindArgs {
    /// Only hosts matching this glob (repeatable; default: every host).
    #[arg(long = "host", value_name = "GLOB")]
    pub hosts: Vec<String>,
    /// Print JSON: every version with its entry and all its generations.
    #[arg(long)]
    pub json: bool,
    /// A glob: without '/', on names at any depth ('*.xml'); with '/', on the path from the
    /// generation's root, '*' within a directory, '**' across ('etc/**/vmInventory.xml').
    #[arg(value_name = "PATTERN")]
    pub pattern: String,
}

/// `HOST/GENERATION` → (host, generation name), `latest` resolved.
async fn generation(repo: &Repository, what: &str) -> Result<(String, String)> {
    let Some((host, gen)) = what.trim_matches('/').split_once('/') else {
        bail!("expected HOST/GENERATION, not {what:?}");
    };
    if gen.contains('/') {
        bail!("expected HOST/GENERATION, not {what:?} (give the path as the third argument)");
    }
    let gen = backtree_core::restore::resolve_generation(repo, host, gen).await?;
    Ok((host.to_owned(), gen))
}

/// The entry at `path` of generation `host/gen`: the root entry for `""`, `None` if absent.
async fn entry_at(repo: &Repository, host: &str, gen: &str, path: &str) -> Result<Option<Entry>> {
    let m = repo.manifest(host, gen).await?;
    if path.is_empty() {
        return Ok(Some(m.root));
    }
    let Some(root) = m.root.tree else {
        return Ok(None);
    };
    match repo.resolve(&root, path.as_bytes()).await {
        Ok(e) => Ok(e),
        Err(e) if e.kind() == backtree_core::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub async fn diff(repo: &Repository, args: &DiffArgs) -> Result<i32> {
    let (ha, ga) = generation(repo, &args.a).await?;
    let (hb, gb) = generation(repo, &args.b).await?;
    let path = args.path.as_deref().unwrap_or("").trim_matches('/');
    let ea = entry_at(repo, &ha, &ga, path).await?;
    let eb = entry_at(repo, &hb, &gb, path).await?;
    if ea.is_none() && eb.is_none() {
        bail!("{path} is in neither {ha}/{ga} nor {hb}/{gb}");
    }
    let json = args.json;
    let mut first = true;
    if json {
        out!("{{\"changes\": [");
    }
    let mut print = |c: Change| {
        if json {
            let v = json!({
                "change": c.kind,
                "path": c.path,
                "old": c.old.as_ref().map(|e| entry_json(e, &c.path)),
                "new": c.new.as_ref().map(|e| entry_json(e, &c.path)),
            });
            let sep = if first { "" } else { "," };
            first = false;
            out!("{sep}{v}");
        } else {
            out!("{} {}", c.kind.letter(), c.path);
        }
    };
    let stats = diff_entries(repo, ea.as_ref(), eb.as_ref(), path, &mut print)
        .await
        .with_context(|| format!("diff {ha}/{ga} {hb}/{gb}"))?;
    if json {
        out!("], \"stats\": {}}}", serde_json::to_string(&stats)?);
    }
    Ok(0)
}

/// Generations named in a text line: all up to four, else the first two, `…` and the last.
fn generations_text(g: &[String]) -> String {
    if g.len() <= 4 {
        g.join(", ")
    } else {
        format!("{}, {}, …, {}", g[0], g[1], g[g.len() - 1])
    }
}

pub async fn find(repo: &Repository, args: &FindArgs) -> Result<i32> {
    let pattern = Pattern::new(&args.pattern)?;
    let globs = host_globs(&args.hosts)?;
    let mut all = Vec::new();
    for (host, gens) in repo.all_generations().await? {
        if !args.hosts.is_empty() && !globs.is_match(&host) {
            continue;
        }
        let mut finder = Finder::new(repo, &pattern);
        for g in &gens {
            let m = repo.manifest(&host, g).await?;
            finder
                .generation(g, &m.root)
                .await
                .with_context(|| format!("find in {host}/{g}"))?;
        }
        let stats = finder.stats;
        let versions = finder.versions();
        if args.json {
            for v in versions {
                let mut e = entry_json(&v.entry, &v.path);
                e["host"] = json!(host);
                e["generations"] = json!(v.generations);
                all.push(e);
            }
        } else {
            for v in versions {
                let n = v.generations.len();
                out!(
                    "{host} {}  {} {}  in {} ({n} generation{})",
                    v.path,
                    size(v.entry.size),
                    time(v.entry.mtime.0),
                    generations_text(&v.generations),
                    if n == 1 { "" } else { "s" }
                );
            }
        }
        tracing::debug!(host, ?stats, "find");
    }
    if args.json {
        out!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(0)
}
