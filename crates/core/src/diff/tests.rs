use super::*;
use crate::tree::{paginate, ChunkList, ChunkRef, PageRef, Time};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Trees in memory, counting reads.
#[derive(Default)]
pub(crate) struct MapSource {
    trees: Mutex<HashMap<Id, Tree>>,
    pub reads: AtomicU64,
}

impl TreeSource for MapSource {
    fn tree<'a>(&'a self, id: &'a Id) -> BoxFuture<'a, Result<Arc<Tree>>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let t = self.trees.lock().unwrap().get(id).cloned().map(Arc::new);
        Box::pin(async move {
            t.ok_or_else(|| crate::Error::NotFound {
                what: format!("tree {id}"),
            })
        })
    }
}

impl MapSource {
    fn put(&self, t: Tree) -> Id {
        let id = Id::of(&t.encode());
        self.trees.lock().unwrap().insert(id, t);
        id
    }

    /// A directory entry holding `entries` (any order), paged when large.
    pub(crate) fn dir(&self, name: &str, mut entries: Vec<Entry>) -> Entry {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let pages = paginate(entries);
        let id = if pages.len() == 1 {
            self.put(Tree::leaf(pages.into_iter().next().unwrap()))
        } else {
            let refs = pages
                .into_iter()
                .map(|p| PageRef {
                    first: p[0].name.clone(),
                    count: p.len() as u64,
                    id: self.put(Tree::leaf(p)),
                })
                .collect();
            self.put(Tree::paged(refs))
        };
        let mut e = Entry::made_dir(name.as_bytes(), Time(1000, 0));
        e.tree = Some(id);
        e
    }
}

/// A file whose one chunk is named by `content`.
pub(crate) fn file(name: &str, content: &str) -> Entry {
    let mut e = Entry::made_file(name.as_bytes(), 0o644, 0, 0, Time(1000, 0), Time(1000, 0));
    e.size = content.len() as u64 + 1;
    e.chunks = Some(ChunkList(vec![ChunkRef {
        end: e.size,
        id: Some(Id::of(content.as_bytes())),
    }]));
    e
}

async fn lines(src: &MapSource, a: &Entry, b: &Entry) -> (Vec<String>, DiffStats) {
    let mut out = Vec::new();
    let stats = diff_entries(src, Some(a), Some(b), "", &mut |c| {
        out.push(format!("{} {}", c.kind.letter(), c.path))
    })
    .await
    .unwrap();
    (out, stats)
}

/// Twenty unchanged subtrees, one deep chain with one change, an added, a removed, a content
/// change, a chmod, a type change and an added directory: exactly those lines, and only the
/// trees along the changed paths read.
#[tokio::test]
async fn known_changes_read_only_differing_subtrees() {
    let src = MapSource::default();
    let unchanged: Vec<Entry> = (0..20)
        .map(|i| {
            let sub = src.dir("sub", vec![file("x", &format!("x{i}"))]);
            src.dir(&format!("d{i:02}"), vec![sub, file("y", "y")])
        })
        .collect();
    let deep = |content: &str| {
        let c = src.dir("c", vec![file("f", content), file("g", "g")]);
        let b = src.dir("b", vec![c]);
        let a = src.dir("a", vec![b]);
        src.dir("deep", vec![a])
    };
    let mut ea = unchanged.clone();
    ea.extend([
        deep("one"),
        file("gone", "gone"),
        file("content", "v1"),
        file("mode", "m"),
        file("kind", "k"),
    ]);
    let mut eb = unchanged.clone();
    let mut chmod = file("mode", "m");
    chmod.mode = 0o600;
    eb.extend([
        deep("two"),
        file("new", "new"),
        file("content", "v2"),
        chmod,
        src.dir("kind", vec![file("inside", "i")]),
        src.dir("newdir", vec![file("n", "n")]),
    ]);
    let ra = src.dir("", ea);
    let rb = src.dir("", eb);
    src.reads.store(0, Ordering::Relaxed);
    let (out, stats) = lines(&src, &ra, &rb).await;
    assert_eq!(
        out,
        [
            "M content",
            "M deep/a/b/c/f",
            "- gone",
            "- kind",
            "+ kind",
            "+ kind/inside",
            "m mode",
            "+ new",
            "+ newdir",
            "+ newdir/n",
        ]
    );
    // Both roots, both sides of deep, a, b, c; one side of kind and newdir.
    assert_eq!(stats.trees_read, 2 + 2 * 4 + 2, "{stats:?}");
    assert_eq!(src.reads.load(Ordering::Relaxed), stats.trees_read);
    assert_eq!(stats.trees_skipped, 20, "{stats:?}");
    // Nothing differs: nothing read.
    src.reads.store(0, Ordering::Relaxed);
    let (out, stats) = lines(&src, &ra, &ra).await;
    assert!(out.is_empty());
    assert_eq!(src.reads.load(Ordering::Relaxed), 0, "{stats:?}");
}

/// 10⁵ files (100 directories of 1 000, one of them paged at 10 000) of which 10 differ: only
/// the differing directories and pages are read.
#[tokio::test]
async fn hundred_thousand_files_ten_changes() {
    let src = MapSource::default();
    let build = |changed: &[(usize, usize)]| {
        let dirs: Vec<Entry> = (0..100)
            .map(|d| {
                let n = if d == 7 { 10_000 } else { 910 };
                let files = (0..n)
                    .map(|f| {
                        let v = if changed.contains(&(d, f)) {
                            "new"
                        } else {
                            "old"
                        };
                        file(&format!("f{f:05}"), &format!("{d}/{f}/{v}"))
                    })
                    .collect();
                src.dir(&format!("d{d:03}"), files)
            })
            .collect();
        src.dir("", dirs)
    };
    let changed: Vec<(usize, usize)> = (0..9).map(|i| (i * 11, i * 7)).chain([(7, 9999)]).collect();
    let a = build(&[]);
    let b = build(&changed);
    let started = std::time::Instant::now();
    let (out, stats) = lines(&src, &a, &b).await;
    println!("10^5 files, 10 changed: {:?}, {stats:?}", started.elapsed());
    assert_eq!(out.len(), 10, "{out:?}");
    assert!(out.iter().all(|l| l.starts_with("M ")), "{out:?}");
    assert!(out.contains(&"M d007/f09999".to_string()), "{out:?}");
    // Roots, 9 plain directories and d007's page list on both sides, its last page on both.
    assert_eq!(stats.trees_read, 2 + 2 * 9 + 2 + 2, "{stats:?}");
    assert_eq!(stats.trees_skipped, 90);
    assert_eq!(stats.pages_skipped, 2);
}
