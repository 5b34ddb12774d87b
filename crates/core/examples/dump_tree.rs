//! Debug helper: prints the root directory entries of a generation (`dump_tree REPO HOST GEN`).
use backtree_core::Repository;
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let store = Arc::new(backtree_store::LocalStore::open(&a[1])?);
    let repo = Repository::open(store).await?;
    let m = repo.manifest(&a[2], &a[3]).await?;
    println!("{:?}", m.root);
    for e in repo.dir_entries(&m.root.tree.expect("root tree")).await? {
        println!("{e:?}");
    }
    Ok(())
}
