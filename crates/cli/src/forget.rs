//! `backtree forget` and `backtree protect`: retention by policy, planned by
//! `backtree_core::forget::plan` and carried out by deleting manifests.

use anyhow::{bail, Context, Result};
use backtree_core::forget::{self, Decision, Generation, Policy};
use backtree_core::manifest::generation_time;
use backtree_core::Repository;
use clap::Args;
use serde_json::json;

/// The policy options of `forget`.
#[derive(Args, Clone, Debug)]
pub struct PolicyArgs {
    /// Only hosts matching this glob (repeatable; default: every host). Run `forget` once per
    /// pattern to give host groups different policies.
    #[arg(long = "host", value_name = "GLOB")]
    pub hosts: Vec<String>,
    /// Keep the N newest generations.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Keep the newest generation of each of the N newest hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<usize>,
    /// Keep the newest generation of each of the N newest days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<usize>,
    /// … of each of the N newest ISO weeks (Monday to Sunday).
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<usize>,
    /// … of each of the N newest months.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<usize>,
    /// … of each of the N newest years.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<usize>,
    /// Keep every generation at most this much older than the host's newest, e.g. 7d, 36h,
    /// 2w, 6mo, 1y.
    #[arg(long, value_name = "DURATION", value_parser = forget::parse_duration)]
    pub keep_within: Option<std::time::Duration>,
    /// Time zone of the hours, days, weeks, months and years (an IANA name such as
    /// Europe/Berlin) [default: UTC].
    #[arg(long, value_name = "ZONE")]
    pub time_zone: Option<String>,
    /// Print what would be removed and why each generation is kept; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl PolicyArgs {
    fn policy(&self) -> Result<Policy> {
        let zone = self
            .time_zone
            .as_deref()
            .map(|z| {
                z.parse::<chrono_tz::Tz>().map_err(|_| {
                    anyhow::anyhow!(
                        "--time-zone {z:?} is not an IANA time zone such as Europe/Berlin or UTC"
                    )
                })
            })
            .transpose()?;
        let p = Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: self.keep_within,
            zone,
        };
        if p.is_empty() {
            bail!(
                "forget needs at least one --keep-* option (without one every generation would be removed)"
            );
        }
        Ok(p)
    }
}

/// Runs `forget`; returns the exit code (1 if some manifest could not be deleted).
pub async fn run(repo: &Repository, args: &PolicyArgs) -> Result<i32> {
    let policy = args.policy()?;
    let globs = crate::output::host_globs(&args.hosts)?;
    let hosts: Vec<String> = repo
        .hosts()
        .await?
        .into_iter()
        .filter(|h| args.hosts.is_empty() || globs.is_match(h))
        .collect();
    if hosts.is_empty() {
        bail!("no host matches {:?}", args.hosts);
    }
    let mut report = Vec::new();
    let mut failed = 0;
    for host in &hosts {
        let names = repo.generations(host).await?;
        let protected = repo.protected(host).await?;
        let gens: Vec<Generation> = names
            .iter()
            .filter_map(|n| {
                Some(Generation {
                    name: n.clone(),
                    time: generation_time(n)?,
                    protected: protected.contains(n),
                })
            })
            .collect();
        let decisions = forget::plan(&gens, &policy);
        let mut errors = Vec::new();
        if !args.dry_run {
            for d in decisions.iter().filter(|d| !d.keep) {
                if let Err(e) = repo.forget(host, &d.name).await {
                    errors.push(format!("{host}/{}: {e}", d.name));
                }
            }
        }
        for e in &errors {
            eprintln!("backtree: cannot forget {e}");
        }
        failed += errors.len();
        report.push((host.clone(), decisions, errors));
    }
    if args.json {
        let v: Vec<_> = report
            .iter()
            .map(|(host, ds, errors)| {
                json!({
                    "host": host,
                    "generations": ds.iter().map(|d| json!({
                        "name": d.name,
                        "time": d.time.to_rfc3339(),
                        "keep": d.keep,
                        "reasons": d.reasons,
                    })).collect::<Vec<_>>(),
                    "errors": errors,
                })
            })
            .collect();
        out!(
            "{}",
            serde_json::to_string_pretty(&json!({ "dry_run": args.dry_run, "hosts": v }))?
        );
    } else {
        for (host, ds, _) in &report {
            print_host(host, ds, args.dry_run);
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn print_host(host: &str, ds: &[Decision], dry_run: bool) {
    let removed = ds.iter().filter(|d| !d.keep).count();
    out!(
        "{host}: keep {}, {} {removed}",
        ds.len() - removed,
        if dry_run { "would remove" } else { "removed" }
    );
    for d in ds {
        let what = match (d.keep, dry_run) {
            (true, _) => "keep  ",
            (false, true) => "remove",
            (false, false) => "gone  ",
        };
        out!("  {what} {}  {}", d.name, d.reasons.join(", "));
    }
}

/// `backtree protect HOST/GENERATION [--remove]`.
pub async fn protect(repo: &Repository, what: &str, remove: bool) -> Result<i32> {
    let (host, gen) = what
        .trim_matches('/')
        .split_once('/')
        .with_context(|| format!("protect needs HOST/GENERATION, not {what:?}"))?;
    let gen = if gen == "latest" {
        repo.latest(host)
            .await?
            .with_context(|| format!("host {host:?} has no generations"))?
    } else {
        gen.to_owned()
    };
    repo.set_protected(host, &gen, !remove).await?;
    out!(
        "{host}/{gen}: {}",
        if remove {
            "no longer protected"
        } else {
            "protected from every forget policy"
        }
    );
    Ok(0)
}
