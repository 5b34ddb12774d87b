use super::*;
use crate::diff::tests::{file, MapSource};
use std::sync::atomic::Ordering;

/// Six generations with three versions of `etc/app/vmInventory.xml` (one only a chmod), beside
/// twenty unchanged directories: each version once with its generations, and every unchanged
/// directory read once in all.
#[tokio::test]
async fn versions_across_generations_skip_unchanged_subtrees() {
    let src = MapSource::default();
    let unchanged: Vec<Entry> = (0..20)
        .map(|i| {
            let inner = src.dir("inner", vec![file("a.xml", &format!("a{i}"))]);
            src.dir(&format!("u{i:02}"), vec![inner, file("b.txt", "b")])
        })
        .collect();
    let gen = |content: &str, mode: u32| {
        let mut inv = file("vmInventory.xml", content);
        inv.mode = mode;
        // An access time and inode of its own in every generation: not a new version.
        inv.atime = crate::tree::Time(content.len() as i64 + mode as i64, 0);
        let app = src.dir("app", vec![inv, file("other.conf", "o")]);
        let etc = src.dir("etc", vec![app]);
        let mut all = unchanged.clone();
        all.push(etc);
        src.dir("", all)
    };
    let gens = [
        ("g1", gen("v1", 0o644)),
        ("g2", gen("v1", 0o644)),
        ("g3", gen("v2", 0o644)),
        ("g4", gen("v2", 0o600)),
        ("g5", gen("v2", 0o600)),
        ("g6", gen("v1", 0o644)),
    ];
    src.reads.store(0, Ordering::Relaxed);
    let pattern = Pattern::new("etc/**/vmInventory.xml").unwrap();
    let mut f = Finder::new(&src, &pattern);
    for (name, root) in &gens {
        f.generation(name, root).await.unwrap();
    }
    let stats = f.stats;
    let got: Vec<(String, Vec<String>, u32)> = f
        .versions()
        .into_iter()
        .map(|v| (v.path, v.generations, v.entry.mode))
        .collect();
    let want = |gs: &[&str], mode| {
        (
            "etc/app/vmInventory.xml".to_string(),
            gs.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            mode,
        )
    };
    assert_eq!(
        got,
        [
            want(&["g1", "g2", "g6"], 0o644),
            want(&["g3"], 0o644),
            want(&["g4", "g5"], 0o600),
        ]
    );
    // Three distinct roots (g1 = g2 = g6, g4 = g5) each with etc and app; the unchanged
    // directories and their subdirectories once.
    assert_eq!(stats.trees_read, 3 * 3 + 20 * 2, "{stats:?}");
    assert_eq!(src.reads.load(Ordering::Relaxed), stats.trees_read);

    // A name pattern matches at any depth.
    let pattern = Pattern::new("*.xml").unwrap();
    let mut f = Finder::new(&src, &pattern);
    for (name, root) in &gens {
        f.generation(name, root).await.unwrap();
    }
    let v = f.versions();
    assert_eq!(v.len(), 20 + 3);
    assert!(v.iter().skip(3).all(|v| v.generations.len() == 6));
}
