//! Retention: which generations a policy keeps (`backtree forget`), as a pure planner.
//!
//! [`plan`] takes one host's generations (name and time) and a [`Policy`], and decides for each
//! whether it is kept and by which rules; nothing is read or deleted here, so `--dry-run` is
//! free and the rules are unit-tested on synthetic lists. The semantics follow restic's
//! `forget`, which administrators know:
//!
//! - `keep_last` n: the n newest generations;
//! - `keep_hourly/daily/weekly/monthly/yearly` n: going from the newest to the oldest, the
//!   newest generation of each hour/day/week/month/year, for the n newest such periods that
//!   have a generation (periods without one do not count);
//! - `keep_within` d: every generation at most d older than the host's newest one (not than
//!   *now*: a host that stopped backing up keeps its last generations);
//! - protected generations (`backtree protect`) are always kept.
//!
//! **Calendar**: periods are those of the proleptic Gregorian calendar in the policy's time zone
//! ([`Policy::zone`], an IANA zone such as `Europe/Berlin`; default UTC). A generation's time is
//! converted to that zone before it is put into its period, so "daily" means the zone's days
//! (a day across a DST change is 23 or 25 hours long, and a generation at 00:30 local time
//! belongs to that local day), weeks are ISO 8601 weeks (Monday to Sunday, numbered within the
//! ISO week-based year: 2026-W53 exists, and 2027-01-01 belongs to it), months and years are
//! the calendar's, February 29 is an ordinary day of its month.

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use std::time::Duration;

/// A retention policy for one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: Option<usize>,
    pub keep_hourly: Option<usize>,
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
    pub keep_yearly: Option<usize>,
    pub keep_within: Option<Duration>,
    /// Time zone of the calendar periods (default UTC).
    pub zone: Option<Tz>,
}

impl Policy {
    /// Whether any rule is set (a policy without one would remove everything, and is refused).
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_hourly.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
            && self.keep_yearly.is_none()
            && self.keep_within.is_none()
    }
}

/// One generation given to the planner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub name: String,
    pub time: DateTime<Utc>,
    pub protected: bool,
}

/// The planner's decision for one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub name: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    /// The rules that keep it, e.g. `last 1`, `daily 3 (2026-11-20)`, `within 7d`, `protected`.
    pub reasons: Vec<String>,
}

#[derive(Clone, Copy)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    fn name(self) -> &'static str {
        match self {
            Period::Hour => "hourly",
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Year => "yearly",
        }
    }

    /// The period of a time in a zone, as a label that is equal exactly for the same period.
    fn of<Z: TimeZone>(self, t: &DateTime<Z>) -> String {
        match self {
            Period::Hour => format!(
                "{:04}-{:02}-{:02}T{:02}",
                t.year(),
                t.month(),
                t.day(),
                t.hour()
            ),
            Period::Day => format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day()),
            Period::Week => {
                let w = t.iso_week();
                format!("{:04}-W{:02}", w.year(), w.week())
            }
            Period::Month => format!("{:04}-{:02}", t.year(), t.month()),
            Period::Year => format!("{:04}", t.year()),
        }
    }
}

/// Decides, for one host's generations (any order), which the policy keeps. The result is
/// ordered newest first (ties by generation name order).
pub fn plan(gens: &[Generation], policy: &Policy) -> Vec<Decision> {
    let mut order: Vec<&Generation> = gens.iter().collect();
    order.sort_by(|a, b| {
        b.time.cmp(&a.time).then_with(|| {
            crate::manifest::generation_sort_key(&b.name)
                .cmp(&crate::manifest::generation_sort_key(&a.name))
        })
    });
    let mut out: Vec<Decision> = order
        .iter()
        .map(|g| Decision {
            name: g.name.clone(),
            time: g.time,
            keep: false,
            reasons: vec![],
        })
        .collect();
    let zone = policy.zone.unwrap_or(chrono_tz::UTC);
    if let Some(n) = policy.keep_last {
        for d in out.iter_mut().take(n) {
            d.reasons.push(format!("last {n}"));
        }
    }
    let rules = [
        (Period::Hour, policy.keep_hourly),
        (Period::Day, policy.keep_daily),
        (Period::Week, policy.keep_weekly),
        (Period::Month, policy.keep_monthly),
        (Period::Year, policy.keep_yearly),
    ];
    for (period, n) in rules {
        let Some(n) = n else { continue };
        let mut last: Option<String> = None;
        let mut kept = 0;
        for d in out.iter_mut() {
            if kept == n {
                break;
            }
            let label = period.of(&d.time.with_timezone(&zone));
            if last.as_ref() != Some(&label) {
                kept += 1;
                d.reasons
                    .push(format!("{} {kept} ({label})", period.name()));
                last = Some(label);
            }
        }
    }
    if let (Some(within), Some(newest)) = (policy.keep_within, out.first().map(|d| d.time)) {
        let from = newest - chrono::Duration::from_std(within).unwrap_or(chrono::Duration::MAX);
        for d in out.iter_mut().filter(|d| d.time >= from) {
            d.reasons.push(format!("within {}", human(within)));
        }
    }
    for (d, g) in out.iter_mut().zip(&order) {
        if g.protected {
            d.reasons.push("protected".into());
        }
        d.keep = !d.reasons.is_empty();
    }
    out
}

/// `7d`, `36h`, `90m`, `45s` (the largest unit that divides the duration).
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s >= secs && s.is_multiple_of(secs) {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}

/// Parses a duration such as `7d`, `36h`, `2w`, `6mo`, `1y6mo`: units s, m or min (minutes), h,
/// d, w, mo (30 days), y (365 days).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut chars = s.trim().chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphabetic() {
                unit.push(n);
                chars.next();
            } else {
                break;
            }
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: a number must come before {unit:?}"))?;
        num.clear();
        let secs = match unit.as_str() {
            "s" => 1,
            "m" | "min" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "mo" => 30 * 86_400,
            "y" => 365 * 86_400,
            u => {
                return Err(format!(
                    "{s:?}: unknown unit {u:?} (use s, m, h, d, w, mo, y, e.g. 7d or 1y6mo)"
                ))
            }
        };
        total = total.saturating_add(n.saturating_mul(secs));
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(format!(
            "{s:?} is not a duration such as 7d, 36h, 2w, 6mo or 1y"
        ));
    }
    Ok(Duration::from_secs(total))
}

/// A time in UTC from a zone's local date and time (tests and callers building times).
pub fn local(zone: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> Option<DateTime<Utc>> {
    zone.with_ymd_and_hms(y, mo, d, h, mi, 0)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests;

/// Suffix of the marker object that protects a generation from every policy:
/// `snapshots/<host>/<generation>.protect` (an empty object; readers ignore non-generation names
/// under `snapshots/<host>/`, so older versions are not confused by it).
pub const PROTECT_SUFFIX: &str = ".protect";
