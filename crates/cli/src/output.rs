//! Human and JSON output of `backtree ls`, and the `out!` macro every command prints with.
//!
//! What `ls` costs in store requests matters with 1 000 hosts of 365 generations in one bucket:
//! `ls` of every host is one flat listing of `snapshots/` ([`Repository::all_generations`], a
//! few pages, not one listing per host); `ls HOST` one listing and the manifests of its
//! generations (for their statistics), [`MANIFEST_FETCHES`] at a time.

/// `println!` that ends the process quietly (exit 0) when stdout is a closed pipe (`| head`),
/// as Unix tools do, instead of panicking; any other write error is exit 1.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            $crate::output::stdout_failed(e)
        }
    }};
}

/// What `out!` does when stdout cannot be written.
pub fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0)
    }
    eprintln!("backtree: cannot write output: {e}");
    std::process::exit(1)
}

use anyhow::{bail, Context, Result};
use backtree_core::tree::{Entry, Kind};
use backtree_core::Repository;
use chrono::{TimeZone, Utc};
use futures_util::{StreamExt, TryStreamExt};
use serde_json::json;

/// Manifests `ls HOST` fetches at once: each is a small GET, whose latency on S3 (tens of
/// milliseconds) would otherwise add up to seconds for a year of nightly generations.
const MANIFEST_FETCHES: usize = 16;

/// The set of `--host` globs (an error names the one that is not a valid glob).
pub fn host_globs(globs: &[String]) -> Result<globset::GlobSet> {
    let mut b = globset::GlobSetBuilder::new();
    for h in globs {
        b.add(globset::Glob::new(h).with_context(|| format!("--host {h:?} is not a valid glob"))?);
    }
    Ok(b.build()?)
}

/// Bytes in binary units, like `ls -h`.
pub fn size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `drwxr-xr-x`-style mode string, with setuid/setgid/sticky.
pub fn mode_string(kind: Kind, mode: u32) -> String {
    let t = match kind {
        Kind::File => '-',
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Chardev => 'c',
        Kind::Blockdev => 'b',
        Kind::Fifo => 'p',
        Kind::Socket => 's',
    };
    let mut s = String::with_capacity(10);
    s.push(t);
    for (i, special, lower, upper) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> i) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let x = bits & 1 != 0;
        s.push(match (mode & special != 0, x) {
            (true, true) => lower,
            (true, false) => upper,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

pub fn time(secs: i64) -> String {
    Utc.timestamp_opt(secs, 0)
        .single()
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| secs.to_string())
}

pub fn entry_json(e: &Entry, path: &str) -> serde_json::Value {
    json!({
        "path": path,
        "name": String::from_utf8_lossy(&e.name),
        "type": e.kind,
        "mode": format!("{:04o}", e.mode),
        "uid": e.uid, "gid": e.gid, "user": e.user, "group": e.group,
        "size": e.size,
        "mtime": e.mtime.0, "mtime_nsec": e.mtime.1,
        "target": e.target.as_ref().map(|t| String::from_utf8_lossy(t).into_owned()),
    })
}

/// `backtree ls`: hosts, a host's generations, or the files of `HOST/GENERATION[/PATH]`
/// (with `recursive`, every entry below, depth first).
pub async fn ls(repo: &Repository, what: Option<&str>, json: bool, recursive: bool) -> Result<()> {
    let what = what.unwrap_or("").trim_matches('/');
    if what.is_empty() {
        let rows: Vec<_> = repo
            .all_generations()
            .await?
            .into_iter()
            .map(|(h, mut gens)| (h, gens.len(), gens.pop().unwrap_or_default()))
            .collect();
        if json {
            let v: Vec<_> = rows
                .iter()
                .map(|(h, n, l)| json!({"host": h, "generations": n, "latest": l}))
                .collect();
            out!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            out!("{:<24} {:>11}  LATEST", "HOST", "GENERATIONS");
            for (h, n, l) in rows {
                out!("{h:<24} {n:>11}  {l}");
            }
        }
        return Ok(());
    }
    let mut parts = what.splitn(3, '/');
    let host = parts.next().unwrap_or_default();
    let gen = parts.next();
    let path = parts.next().unwrap_or("");
    let Some(gen) = gen else {
        let gens = repo.generations(host).await?;
        if gens.is_empty() {
            bail!("host {host:?} has no generations in this repository");
        }
        let ms: Vec<_> = futures_util::stream::iter(&gens)
            .map(|g| repo.manifest(host, g))
            .buffered(MANIFEST_FETCHES)
            .try_collect()
            .await?;
        if json {
            out!("{}", serde_json::to_string_pretty(&ms)?);
        } else {
            out!(
                "{:<22} {:<20} {:>9} {:>11} {:>11}  LABEL",
                "GENERATION",
                "TIME",
                "FILES",
                "SIZE",
                "NEW STORED"
            );
            for m in ms {
                let t = m
                    .datetime()
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or(m.time.clone());
                out!(
                    "{:<22} {:<20} {:>9} {:>11} {:>11}  {}",
                    m.name,
                    t,
                    m.stats.files,
                    size(m.stats.logical_bytes),
                    size(m.stats.new_stored_bytes),
                    m.label.unwrap_or_default()
                );
            }
        }
        return Ok(());
    };
    let gen = backtree_core::restore::resolve_generation(repo, host, gen).await?;
    let m = repo.manifest(host, &gen).await?;
    let entry = match repo
        .resolve(
            &m.root.tree.unwrap_or(backtree_core::Id([0; 32])),
            path.as_bytes(),
        )
        .await?
    {
        Some(e) => e,
        None => m.root.clone(),
    };
    let entries = match (entry.kind, entry.tree) {
        (Kind::Dir, Some(t)) => repo.dir_entries(&t).await?,
        _ => vec![entry],
    };
    // Depth first, one level of entries held per directory being listed: memory follows the
    // tree's depth and its directories' widths, never the generation's size. JSON is one array,
    // written as it goes.
    let mut stack: Vec<(String, std::vec::IntoIter<Entry>)> =
        vec![(String::new(), entries.into_iter())];
    let mut first = true;
    if json {
        out!("[");
    }
    while let Some((prefix, it)) = stack.last_mut() {
        let Some(e) = it.next() else {
            stack.pop();
            continue;
        };
        let path = format!("{prefix}{}", String::from_utf8_lossy(&e.name));
        if json {
            let sep = if first { "" } else { "," };
            out!("{sep}{}", serde_json::to_string(&entry_json(&e, &path))?);
            first = false;
        } else {
            print_entry(&e, &path);
        }
        if let (true, Kind::Dir, Some(t)) = (recursive, e.kind, e.tree) {
            let below = repo.dir_entries(&t).await?;
            stack.push((format!("{path}/"), below.into_iter()));
        }
    }
    if json {
        out!("]");
    }
    Ok(())
}

/// One `ls -l`-like line.
fn print_entry(e: &Entry, path: &str) {
    let owner = e.user.clone().unwrap_or_else(|| e.uid.to_string());
    let group = e.group.clone().unwrap_or_else(|| e.gid.to_string());
    let sz = match (e.kind, e.rdev) {
        (Kind::Chardev | Kind::Blockdev, Some(r)) => {
            format!("{}, {}", libc_major(r), libc_minor(r))
        }
        _ => e.size.to_string(),
    };
    let target = e
        .target
        .as_ref()
        .map(|t| format!(" -> {}", String::from_utf8_lossy(t)))
        .unwrap_or_default();
    out!(
        "{} {:<8} {:<8} {:>12} {} {}{}",
        mode_string(e.kind, e.mode),
        owner,
        group,
        sz,
        time(e.mtime.0),
        path,
        target
    );
}

fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_sizes() {
        assert_eq!(mode_string(Kind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(Kind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(Kind::File, 0o2644), "-rw-r-Sr--");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
    }
}
