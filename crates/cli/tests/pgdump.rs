//! Real `pg_dump | gzip` nights, piped into `backtree ingest --stdin db.sql.gz`: each night's
//! dump is stored decompressed, `cat` gives back what `zcat` gives, `cat --original` the `.gz`
//! byte for byte, and the second night deduplicates against the first.
//!
//! Needs PostgreSQL's `initdb`, `postgres`, `psql` and `pg_dump` (looked for on PATH, in
//! /usr/local/bin and /usr/lib/postgresql/*/bin, or only in `PGDUMP_TEST_BIN_DIR` when that is
//! set); without them, or when the server does not start, the test prints `skipped: <reason>`
//! and passes. The server runs as `nobody` when the test runs as root (PostgreSQL refuses root),
//! listens only on a Unix socket in a temporary directory, and is stopped when the test ends,
//! whether it passes or fails.

mod common;

use common::{bt, ok};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directories searched for PostgreSQL's programs, in order.
fn search_dirs() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("PGDUMP_TEST_BIN_DIR") {
        return vec![PathBuf::from(d)];
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/local/bin".into());
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    // Newest version first: 9.6 < 10 < 15.
    versioned.sort_by_key(|p| {
        let v = p.parent().and_then(|v| v.file_name()).unwrap_or_default();
        let v = v.to_string_lossy();
        let major: u32 = v
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        std::cmp::Reverse(major)
    });
    dirs.extend(versioned);
    dirs
}

fn find(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// How to run a command as an unprivileged user: `setpriv` when we are root, else as we are.
struct RunAs {
    prefix: Vec<String>,
    /// uid and gid to give the server's directories to, when we are root.
    owner: Option<(u32, u32)>,
}

fn run_as(dirs: &[PathBuf]) -> Result<RunAs, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(RunAs {
            prefix: Vec::new(),
            owner: None,
        });
    }
    // SAFETY: getpwnam with a NUL-terminated name; the fields are read at once, in this thread.
    let pw = unsafe { libc::getpwnam(c"nobody".as_ptr()) };
    if pw.is_null() {
        return Err("running as root and there is no user nobody".into());
    }
    // SAFETY: pw is non-null, as checked.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    let setpriv = find("setpriv", dirs)
        .or_else(|| find("setpriv", &["/usr/bin".into(), "/bin".into()]))
        .ok_or("running as root and setpriv not found")?;
    Ok(RunAs {
        prefix: vec![
            setpriv.display().to_string(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
        ],
        owner: Some((uid, gid)),
    })
}

impl RunAs {
    fn command(&self, program: &Path) -> Command {
        match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

/// A running `postgres`; killed with SIGQUIT (PostgreSQL's immediate shutdown), then SIGKILL,
/// when dropped.
struct Server {
    child: Child,
    sock: PathBuf,
    port: u16,
    log: PathBuf,
    psql: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child (setpriv execs postgres, so it is the postmaster).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Server {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client command connected to the server as its superuser.
    fn client(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("PGHOST", &self.sock)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS");
        c
    }

    /// Runs SQL in database `db` (stopping at the first error); panics with psql's message.
    fn sql(&self, db: &str, sql: &str) {
        let o = self
            .client(&self.psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "psql {sql}: {}\nserver log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log_text()
        );
    }
}

/// The last lines of a log, for a skip message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// initdb and start a server in `dir`, or the reason it cannot be done.
fn start_server(dir: &Path, dirs: &[PathBuf], psql: &Path) -> Result<Server, String> {
    let initdb = find("initdb", dirs).ok_or("initdb not found")?;
    let postgres = find("postgres", dirs).ok_or("postgres not found")?;
    let run_as = run_as(dirs)?;
    let data = dir.join("data");
    let sock = dir.join("sock");
    for d in [&data, &sock] {
        std::fs::create_dir(d).unwrap();
        if let Some((uid, gid)) = run_as.owner {
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
        }
    }
    if run_as.owner.is_some() {
        // The unprivileged user must reach its directories.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let o = run_as
        .command(&initdb)
        .arg("-D")
        .arg(&data)
        .args(["--no-sync", "-A", "trust", "-U", "postgres", "-E", "UTF8"])
        .args(["--locale=C"])
        .output()
        .map_err(|e| format!("running initdb: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "initdb failed: {}",
            tail(&String::from_utf8_lossy(&o.stderr))
        ));
    }
    // The socket is named by the port; the directory is ours alone, so any number is free.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let port = 40000 + ((nanos ^ std::process::id()) % 20000) as u16;
    let log = dir.join("postgres.log");
    let child = run_as
        .command(&postgres)
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(&sock)
        .args(["-p", &port.to_string(), "-c", "listen_addresses="])
        .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
        .args(["-c", "synchronous_commit=off", "-c", "autovacuum=off"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map_err(|e| format!("running postgres: {e}"))?;
    let mut server = Server {
        child,
        sock,
        port,
        log,
        psql: psql.to_owned(),
    };
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = server.child.try_wait() {
            return Err(format!(
                "postgres exited ({st}): {}",
                tail(&server.log_text())
            ));
        }
        let ready = server
            .client(psql)
            .args(["-X", "-q", "-d", "postgres", "-c", "select 1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(server);
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err(format!(
                "postgres not ready after 15 s: {}",
                tail(&server.log_text())
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The generation's name and stats, from `ingest --json`.
fn generation(json: &[u8]) -> (String, serde_json::Value) {
    let v: serde_json::Value = serde_json::from_slice(json).expect("clean JSON on stdout");
    let g = &v["generation"];
    (
        g["name"].as_str().expect("generation name").to_owned(),
        g["stats"].clone(),
    )
}

fn cat(repo: &str, what: &str, original: bool) -> Vec<u8> {
    let mut c = bt();
    c.args(["cat", "--repo", repo, what]);
    if original {
        c.arg("--original");
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "cat {what} (original: {original}): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

#[test]
fn pg_dump_nights_are_stored_decompressed_and_recreated_exactly() {
    let t0 = Instant::now();
    let dirs = search_dirs();
    let (Some(psql), Some(pg_dump)) = (find("psql", &dirs), find("pg_dump", &dirs)) else {
        eprintln!("skipped: psql or pg_dump not found in {dirs:?}");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pg_dir = d.join("pg");
    std::fs::create_dir(&pg_dir).unwrap();
    let server = match start_server(&pg_dir, &dirs, &psql) {
        Ok(s) => s,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let started = t0.elapsed();

    // Chunks of about 8 KiB, so that a dump of about a megabyte has ~130 of them (`init`'s
    // 1 MiB chunks would make the whole dump one chunk, and nothing to deduplicate).
    let repo = d.join("repo");
    let r = repo.to_str().unwrap();
    std::fs::create_dir(&repo).unwrap();
    let mut cfg = backtree_core::config::Config::new(true);
    cfg.chunker.min = 4096;
    cfg.chunker.avg = 4096;
    cfg.chunker.max = 65536;
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(backtree_core::Repository::init_with(
            std::sync::Arc::new(backtree_store::LocalStore::open(&repo).unwrap()),
            cfg,
        ))
        .unwrap();

    const ROWS: u32 = 10_000;
    server.sql("postgres", "CREATE DATABASE db");
    server.sql(
        "db",
        &format!(
            "CREATE TABLE orders (id int PRIMARY KEY, customer text, qty int, note text);
             INSERT INTO orders SELECT i, 'customer ' || (i % 613), i % 97,
                 md5(i::text) || md5((i * 7)::text)
             FROM generate_series(1, {ROWS}) i;
             CREATE INDEX orders_customer ON orders (customer);"
        ),
    );

    let mut nights = Vec::new();
    for night in 1..=2u32 {
        if night == 2 {
            // ~1% of the rows updated (a run of them, as a hot range is), 0.5% inserted.
            server.sql(
                "db",
                &format!(
                    "UPDATE orders SET qty = qty + 1, note = 'changed ' || note
                         WHERE id BETWEEN 4001 AND {};
                     INSERT INTO orders SELECT i, 'customer new', 1, md5(i::text)
                         FROM generate_series({}, {}) i;",
                    4000 + ROWS / 100,
                    ROWS + 1,
                    ROWS + ROWS / 200
                ),
            );
        }
        let gz_path = d.join(format!("night-{night}.sql.gz"));
        let ti = Instant::now();
        let o = server
            .client(Path::new("bash"))
            .args([
                "-o",
                "pipefail",
                "-c",
                r#""$1" db | gzip -6 -n | tee "$2" | "$3" ingest --repo "$4" --host db \
                    --stdin db.sql.gz --json --time "$5""#,
                "bash",
            ])
            .arg(&pg_dump)
            .arg(&gz_path)
            .arg(env!("CARGO_BIN_EXE_backtree"))
            .arg(r)
            .arg(format!("2026-11-{night:02}T01:00:00Z"))
            .env_remove("BACKTREE_REPO")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "night {night}: pg_dump | gzip | backtree ingest: {}\nserver log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            server.log_text()
        );
        let (name, stats) = generation(&o.stdout);
        let gz = std::fs::read(&gz_path).unwrap();
        eprintln!(
            "night {night}: {} bytes of gzip, ingested in {:.2?}: generation {name}, {stats}",
            gz.len(),
            ti.elapsed()
        );
        nights.push((name, gz_path, gz, stats));
    }
    drop(server);

    for (night, (name, gz_path, gz, _)) in nights.iter().enumerate() {
        let night = night + 1;
        let plain = Command::new("zcat").arg(gz_path).output().unwrap();
        assert!(plain.status.success(), "zcat night {night}");
        assert!(
            String::from_utf8_lossy(&plain.stdout).contains("PostgreSQL database dump"),
            "night {night}: not a pg_dump"
        );
        let got = cat(r, &format!("db/{name}/db.sql"), false);
        assert!(
            got == plain.stdout,
            "night {night}: cat gives {} bytes, zcat {}",
            got.len(),
            plain.stdout.len()
        );
        let orig = cat(r, &format!("db/{name}/db.sql"), true);
        assert!(
            &orig == gz,
            "night {night}: cat --original gives {} bytes, the .gz is {}",
            orig.len(),
            gz.len()
        );
        // Stored decompressed: the .gz name is not in the generation.
        let ls = ok(bt().args(["ls", "--repo", r, &format!("db/{name}")]));
        assert!(
            ls.contains("db.sql") && !ls.contains("db.sql.gz"),
            "night {night}: {ls}"
        );
    }
    let (_, _, gz2, stats2) = &nights[1];
    let new2 = stats2["new_stored_bytes"]
        .as_u64()
        .expect("new_stored_bytes");
    assert!(
        new2 < gz2.len() as u64,
        "night 2 stored {new2} new bytes, not less than its .gz's {}",
        gz2.len()
    );
    eprintln!(
        "night 2 stored {new2} new bytes, {:.1}% of its {}-byte .gz; server up in {started:.2?}, \
         test {:.2?}",
        100.0 * new2 as f64 / gz2.len() as f64,
        gz2.len(),
        t0.elapsed()
    );
}
