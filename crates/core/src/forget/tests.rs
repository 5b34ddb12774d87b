//! The planner against hand-checked tables, including the calendar's edge cases.

use super::*;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn gens(times: &[&str]) -> Vec<Generation> {
    times
        .iter()
        .map(|t| Generation {
            name: t.to_string(),
            time: utc(t),
            protected: false,
        })
        .collect()
}

fn kept(d: &[Decision]) -> Vec<&str> {
    d.iter()
        .filter(|d| d.keep)
        .map(|d| d.name.as_str())
        .collect()
}

#[test]
fn keep_last_and_daily_take_the_newest_of_each_day() {
    let g = gens(&[
        "2026-11-01T01:00:00Z",
        "2026-11-02T01:00:00Z",
        "2026-11-02T13:00:00Z",
        "2026-11-03T01:00:00Z",
        "2026-11-03T02:00:00Z",
        "2026-11-05T01:00:00Z",
    ]);
    let p = Policy {
        keep_last: Some(2),
        ..Policy::default()
    };
    assert_eq!(
        kept(&plan(&g, &p)),
        ["2026-11-05T01:00:00Z", "2026-11-03T02:00:00Z"]
    );
    // Three days that have a generation (the 4th has none and does not count), newest of each.
    let p = Policy {
        keep_daily: Some(3),
        ..Policy::default()
    };
    let d = plan(&g, &p);
    assert_eq!(
        kept(&d),
        [
            "2026-11-05T01:00:00Z",
            "2026-11-03T02:00:00Z",
            "2026-11-02T13:00:00Z"
        ]
    );
    assert_eq!(d[0].reasons, ["daily 1 (2026-11-05)"]);
    assert_eq!(d[3].reasons, ["daily 3 (2026-11-02)"]);
    assert!(d[2].reasons.is_empty() && !d[2].keep);
    // Rules add up, and each kept generation says every rule that keeps it.
    let p = Policy {
        keep_last: Some(1),
        keep_daily: Some(1),
        keep_monthly: Some(1),
        ..Policy::default()
    };
    let d = plan(&g, &p);
    assert_eq!(kept(&d), ["2026-11-05T01:00:00Z"]);
    assert_eq!(
        d[0].reasons,
        ["last 1", "daily 1 (2026-11-05)", "monthly 1 (2026-11)"]
    );
}

#[test]
fn iso_week_53_spans_the_new_year() {
    // 2026 has 53 ISO weeks: Monday 2026-12-28 to Sunday 2027-01-03 is 2026-W53.
    let g = gens(&[
        "2026-12-21T01:00:00Z", // 2026-W52
        "2026-12-29T01:00:00Z", // 2026-W53
        "2027-01-02T01:00:00Z", // 2026-W53
        "2027-01-05T01:00:00Z", // 2027-W01
    ]);
    let p = Policy {
        keep_weekly: Some(3),
        ..Policy::default()
    };
    let d = plan(&g, &p);
    assert_eq!(
        kept(&d),
        [
            "2027-01-05T01:00:00Z",
            "2027-01-02T01:00:00Z",
            "2026-12-21T01:00:00Z"
        ]
    );
    assert_eq!(d[1].reasons, ["weekly 2 (2026-W53)"]);
    // Yearly is the calendar year: 2027-01-02 is in 2027, not in the ISO year 2026.
    let p = Policy {
        keep_yearly: Some(5),
        ..Policy::default()
    };
    assert_eq!(
        kept(&plan(&g, &p)),
        ["2027-01-05T01:00:00Z", "2026-12-29T01:00:00Z"]
    );
}

#[test]
fn leap_days_belong_to_february() {
    let g = gens(&[
        "2028-02-28T01:00:00Z",
        "2028-02-29T01:00:00Z",
        "2028-03-01T01:00:00Z",
    ]);
    let p = Policy {
        keep_monthly: Some(2),
        ..Policy::default()
    };
    assert_eq!(
        kept(&plan(&g, &p)),
        ["2028-03-01T01:00:00Z", "2028-02-29T01:00:00Z"]
    );
    let p = Policy {
        keep_daily: Some(10),
        ..Policy::default()
    };
    assert_eq!(kept(&plan(&g, &p)).len(), 3);
}

#[test]
fn days_are_the_zones_days_across_dst() {
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    // Berlin springs forward on 2026-03-29 (02:00 CET → 03:00 CEST). 22:30Z on the 28th is
    // 23:30 on the 28th in Berlin, 23:30Z is 00:30 on the 29th; 2026-03-29T22:30Z is 00:30 on
    // the 30th (CEST, +2).
    let g = gens(&[
        "2026-03-28T22:30:00Z",
        "2026-03-28T23:30:00Z",
        "2026-03-29T21:30:00Z",
        "2026-03-29T22:30:00Z",
    ]);
    let utc_days = Policy {
        keep_daily: Some(10),
        ..Policy::default()
    };
    assert_eq!(
        kept(&plan(&g, &utc_days)),
        ["2026-03-29T22:30:00Z", "2026-03-28T23:30:00Z"]
    );
    let berlin_days = Policy {
        zone: Some(berlin),
        ..utc_days
    };
    let d = plan(&g, &berlin_days);
    assert_eq!(
        kept(&d),
        [
            "2026-03-29T22:30:00Z",
            "2026-03-29T21:30:00Z",
            "2026-03-28T22:30:00Z"
        ]
    );
    assert_eq!(d[0].reasons, ["daily 1 (2026-03-30)"]);
    assert_eq!(d[1].reasons, ["daily 2 (2026-03-29)"]);
    // The 23-hour day: local() resolves a local time that does not exist to nothing.
    assert!(local(berlin, 2026, 3, 29, 2, 30).is_none());
    assert_eq!(
        local(berlin, 2026, 3, 29, 3, 30),
        Some(utc("2026-03-29T01:30:00Z"))
    );
    // Hourly: the repeated hour when Berlin falls back (2026-10-25 03:00 CEST → 02:00 CET) is
    // two hours of the same label; 00:30Z and 01:30Z are both 02:30 local.
    let g = gens(&["2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z"]);
    let hourly = Policy {
        keep_hourly: Some(5),
        zone: Some(berlin),
        ..Policy::default()
    };
    assert_eq!(kept(&plan(&g, &hourly)), ["2026-10-25T01:30:00Z"]);
}

#[test]
fn within_counts_from_the_newest_generation_and_protection_always_keeps() {
    let mut g = gens(&[
        "2026-01-01T00:00:00Z",
        "2026-01-20T00:00:00Z",
        "2026-01-24T00:00:00Z",
        "2026-01-27T00:00:00Z",
    ]);
    g[0].protected = true;
    let p = Policy {
        keep_within: Some(parse_duration("7d").unwrap()),
        ..Policy::default()
    };
    let d = plan(&g, &p);
    assert_eq!(
        kept(&d),
        [
            "2026-01-27T00:00:00Z",
            "2026-01-24T00:00:00Z",
            "2026-01-20T00:00:00Z",
            "2026-01-01T00:00:00Z"
        ]
    );
    assert_eq!(d[2].reasons, ["within 7d"]);
    assert_eq!(d[3].reasons, ["protected"]);
    let p = Policy {
        keep_within: Some(parse_duration("6d").unwrap()),
        ..Policy::default()
    };
    assert_eq!(kept(&plan(&g, &p)).len(), 3);
    assert!(Policy::default().is_empty());
    assert!(!p.is_empty());
}

#[test]
fn durations() {
    assert_eq!(
        parse_duration("7d").unwrap(),
        Duration::from_secs(7 * 86_400)
    );
    assert_eq!(
        parse_duration("1y6mo").unwrap(),
        Duration::from_secs((365 + 180) * 86_400)
    );
    assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5_400));
    assert_eq!(
        parse_duration("2w").unwrap(),
        Duration::from_secs(14 * 86_400)
    );
    for bad in ["", "7", "d", "7x", "1.5d"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
    assert_eq!(human(Duration::from_secs(7 * 86_400)), "7d");
    assert_eq!(human(Duration::from_secs(5_400)), "90m");
}
