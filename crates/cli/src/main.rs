//! The `backtree` command: argument parsing, progress display and output formatting. All the
//! work is done by `backtree-core` and `backtree-store`; this file only wires them together and
//! turns errors into one clear sentence and an exit code.
//!
//! Exit codes (docs/cli.md): 0 success; 1 error, nothing committed; 2 usage error;
//! 3 the generation was committed but some paths were skipped (each was reported).

#[macro_use]
mod output;
mod explore;
mod forget;
mod fstab;
mod maintain;
mod prune;
mod repair;
mod restore;
mod verify;

use anyhow::{bail, Context, Result};
use backtree_core::index::IndexOptions;
use backtree_core::ingest::{self, IngestOptions, Progress};
use backtree_core::manifest::SkippedPath;
use backtree_core::Repository;
use backtree_store::{open_store, DynStore, Location, OpenOptions, S3Options};
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Exit code when a generation was committed but some paths were skipped.
const EXIT_PARTIAL: i32 = 3;

#[derive(Parser)]
#[command(
    name = "backtree",
    version,
    about = "Every host's backups as a plain, browsable, read-only directory tree",
    long_about = "backtree stores generations of directory trees in a deduplicated, compressed \
                  repository (a local directory), lists them, and mounts them as a read-only \
                  directory tree.\n\n\
                  Exit codes: 0 success; 1 error (nothing committed); 2 usage error; \
                  3 generation committed but some paths were skipped."
)]
struct Cli {
    /// Show more of what happens on standard error: -v backtree's progress notes (and other
    /// libraries' warnings), -vv debugging detail. BACKTREE_LOG or RUST_LOG (a `tracing` filter)
    /// replaces this choice entirely.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct RepoArg {
    /// Repository location: a local directory, or s3://BUCKET[/PREFIX]. S3 credentials come
    /// from the standard AWS chain (AWS_ACCESS_KEY_ID…, AWS_PROFILE, instance/container role).
    #[arg(
        long,
        short = 'r',
        env = "BACKTREE_REPO",
        value_name = "PATH|s3://BUCKET/PREFIX"
    )]
    repo: String,
    /// S3 endpoint URL of a self-hosted store (Garage, MinIO, Ceph RGW); also AWS_ENDPOINT_URL.
    /// A custom endpoint implies path-style addressing.
    #[arg(long, env = "BACKTREE_S3_ENDPOINT", value_name = "URL")]
    s3_endpoint: Option<String>,
    /// S3 region [default: AWS_REGION, the profile's, else us-east-1].
    #[arg(long, env = "BACKTREE_S3_REGION", value_name = "REGION")]
    s3_region: Option<String>,
    /// Attempts per S3 request before it fails (exponential backoff with jitter between them).
    #[arg(
        long,
        env = "BACKTREE_S3_ATTEMPTS",
        default_value_t = 6,
        value_name = "N"
    )]
    s3_attempts: u32,
    /// Local cache directory: downloaded index objects go to DIR/<repository id>/ (and `mount`
    /// keeps fetched file data here too) [default: $XDG_CACHE_HOME/backtree or
    /// ~/.cache/backtree for the index; no file data cache].
    #[arg(long, env = "BACKTREE_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Keep no local index cache (every run downloads what it needs).
    #[arg(long)]
    no_cache: bool,
}

impl RepoArg {
    /// The repository's location: a local directory or an S3 URL.
    fn location(&self) -> Result<Location> {
        Ok(Location::parse(&self.repo)?)
    }

    /// Opens the repository's store (see [`backtree_store::open_store`]); `create` for `init`.
    fn open(&self, rt: &tokio::runtime::Runtime, create: bool) -> Result<DynStore> {
        let opts = OpenOptions {
            s3: S3Options {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                max_attempts: Some(self.s3_attempts.max(1)),
                ..Default::default()
            },
            create,
        };
        Ok(rt.block_on(open_store(&self.repo, &opts))?)
    }

    /// Opens the store and the repository, with the index's local cache.
    fn open_repo(&self, rt: &tokio::runtime::Runtime) -> Result<Repository> {
        let store = self.open(rt, false)?;
        let index = IndexOptions {
            cache_dir: if self.no_cache {
                None
            } else {
                self.cache_dir
                    .clone()
                    .or_else(backtree_core::index::cache::default_base)
            },
            ..IndexOptions::default()
        };
        Ok(rt.block_on(Repository::open_with(store, index))?)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new, empty repository.
    Init {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Store directories and files, and standard input, as a new generation of a host.
    ///
    /// A single directory becomes the generation's root, so that
    /// `rsync -a MOUNT/HOST/latest/ /target/` restores it. Several paths (or one file) appear at
    /// the generation's root under their own names. `--stdin NAME` stores standard input as one
    /// more file at the root (`pg_dump db | backtree ingest --host h --stdin db.sql`); run such a
    /// pipeline with `set -o pipefail`, since a producer that fails cannot be detected here.
    /// `--tar FILE|-` expands a tar archive (plain, gzip, zstd or xz) into the generation instead.
    Ingest {
        #[command(flatten)]
        repo: RepoArg,
        /// Host the generation belongs to (letters, digits, '.', '-', '_').
        #[arg(long)]
        host: String,
        /// Time the generation represents (RFC 3339); default: now.
        #[arg(long, value_name = "RFC3339")]
        time: Option<String>,
        /// A free-form label stored with the generation.
        #[arg(long, value_name = "L")]
        label: Option<String>,
        /// Leave out matching entries. Without '/', the pattern matches names at any depth
        /// ('*.tmp', 'cache'); with '/', the path below the source ('var/cache/**').
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
        /// Print the result as JSON (the generation's manifest and every skipped path).
        #[arg(long)]
        json: bool,
        /// Read block devices and fifos named as PATHs (or symlinks to them, such as
        /// /dev/vg0/snap) to their end and store each as a regular file, runs of zeros as holes.
        /// Not those found inside a directory, not character devices.
        #[arg(long)]
        read_special: bool,
        /// Store standard input, read to its end, as the file NAME at the generation's root
        /// (one name: no '/', not '.' or '..'). Check the producer's exit status yourself
        /// (`set -o pipefail`): backtree sees only where the stream ends.
        #[arg(long, value_name = "NAME", value_parser = parse_stream_name)]
        stdin: Option<String>,
        /// Permission bits of the --stdin file, in octal [default: 0600: a dump is readable by
        /// its owner only].
        #[arg(long, value_name = "OCTAL", value_parser = parse_mode, requires = "stdin")]
        stdin_mode: Option<u32>,
        /// Numeric owner of the --stdin file [default: the user running backtree].
        #[arg(long, value_name = "UID:GID", value_parser = parse_owner, requires = "stdin")]
        stdin_owner: Option<(u32, u32)>,
        /// Modification time of the --stdin file (RFC 3339) [default: the generation's time].
        #[arg(long, value_name = "RFC3339", value_parser = parse_time, requires = "stdin")]
        stdin_mtime: Option<chrono::DateTime<chrono::Utc>>,
        /// Store an empty --stdin file when standard input gives no data (else that is an
        /// error).
        #[arg(long, requires = "stdin")]
        allow_empty: bool,
        /// Expand a tar archive (or `-`: standard input) into the generation: the archive's
        /// root is the generation's root, with its members' metadata. Plain, gzip, zstd or xz,
        /// detected from the data. Not combined with PATHs or --stdin.
        #[arg(long, value_name = "FILE|-", conflicts_with_all = ["stdin", "paths"])]
        tar: Option<PathBuf>,
        /// Store `*.gz` and `*.tgz` regular files that hold gzip data decompressed, under their
        /// names without `.gz` (`x.tgz` as `x.tar`), so that they deduplicate; `backtree cat
        /// --original` recreates the exact original. A file whose stripped name exists beside it
        /// is stored as it is. (--stdin data that starts with the gzip magic is always treated
        /// so, unless --no-gunzip.)
        #[arg(long, conflicts_with = "tar")]
        gunzip: bool,
        /// Store --stdin data as it comes even when it is gzip (by default gzip data is stored
        /// decompressed, under NAME without `.gz`, with what recreates the original).
        #[arg(long, requires = "stdin")]
        no_gunzip: bool,
        /// Do not compact the index after the commit, even when it is due (see `backtree
        /// maintain index`).
        #[arg(long)]
        no_compact: bool,
        /// Directories and files to ingest.
        #[arg(required_unless_present_any = ["stdin", "tar"], value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Remove generations by a retention policy (per host; protected generations stay).
    ///
    /// Rules add up, as in restic: a generation is kept if any rule keeps it. Periods are
    /// those of the calendar in --time-zone (default UTC); weeks are ISO weeks. Only manifests
    /// are deleted: the data stays until a prune removes what no generation references.
    /// `--dry-run` prints every generation with keep/remove and the rules that keep it.
    Forget {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        policy: forget::PolicyArgs,
    },
    /// Delete data no generation references, and repack packs that are mostly unreferenced.
    ///
    /// Runs beside ingests and mounts: one prune at a time (a maintenance lease in the store),
    /// packs younger than the grace period are never touched, doomed blobs are marked in the
    /// index before anything is deleted, and it waits for the ingests running at that moment
    /// to finish before it deletes (docs/concurrency.md). Refuses to delete anything if a
    /// generation references data that cannot be read (run `backtree verify`).
    Prune {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        args: prune::PruneArgs,
    },
    /// Protect a generation from every forget policy (or lift it with --remove).
    Protect {
        #[command(flatten)]
        repo: RepoArg,
        /// Lift the protection.
        #[arg(long)]
        remove: bool,
        /// HOST/GENERATION (GENERATION may be `latest`).
        #[arg(value_name = "HOST/GENERATION")]
        what: String,
    },
    /// Repository maintenance that runs beside ingests and mounts without blocking them.
    Maintain {
        #[command(subcommand)]
        what: MaintainCmd,
    },
    /// List hosts, a host's generations, or files in a generation.
    ///
    /// `ls` lists hosts; `ls HOST` its generations (time, files, logical size, new bytes
    /// stored); `ls HOST/GENERATION[/PATH]` files with `ls -l`-like columns. GENERATION may be
    /// `latest`.
    Ls {
        #[command(flatten)]
        repo: RepoArg,
        /// Print JSON instead of columns.
        #[arg(long)]
        json: bool,
        /// List every entry below HOST/GENERATION[/PATH], depth first, with paths relative to
        /// the listed directory.
        #[arg(long, short = 'R')]
        recursive: bool,
        #[arg(value_name = "HOST[/GENERATION[/PATH]]")]
        what: Option<String>,
    },
    /// Show what changed between two generations: `+` added, `-` removed, `M` content,
    /// `m` metadata only, one line per entry, in path order.
    ///
    /// Only subtrees whose tree ids differ are read, so generations that differ in a few files
    /// compare in a few reads whatever their size. Access and change times, inode numbers and
    /// hardlink groups are not compared. Exit 0 whether or not anything differs.
    Diff {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        args: explore::DiffArgs,
    },
    /// Find files by a glob in every generation: each distinct version once, with the
    /// generations that hold it.
    ///
    /// A subtree whose tree id was already walked at the same path is not read again.
    Find {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        args: explore::FindArgs,
    },
    /// Write a file of a generation to standard output.
    ///
    /// GENERATION may be `latest`. With --original, a file stored decompressed from gzip
    /// (`ingest --gunzip`, or gzip data on --stdin) is written as its original gzip bytes,
    /// recreated exactly and checked against the hash recorded at ingest. Every chunk read is
    /// verified; on any error the output is incomplete and the exit code is 1.
    Cat {
        #[command(flatten)]
        repo: RepoArg,
        /// Write the original gzip file the content was stored from.
        #[arg(long)]
        original: bool,
        #[arg(value_name = "HOST/GENERATION/PATH")]
        what: String,
    },
    /// Check that every generation can be read back: manifests, trees, chunk lists, the index
    /// and (with --read-data) every blob's bytes.
    ///
    /// Every problem is reported with what it affects (host, generation, path) and the run goes
    /// on. Exit codes: 0 sound (warnings allowed), 1 problems found, 2 could not run.
    Verify {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        args: verify::VerifyArgs,
    },
    /// Repair the index from the packs, or list and remove generations that lost data.
    Repair {
        #[command(subcommand)]
        what: repair::RepairCmd,
    },
    /// Restore a generation, a subtree or a file to a local directory, without FUSE.
    ///
    /// Every file type, owners (numeric, as root), modes, times, hardlinks, xattrs and ACLs,
    /// devices, holes as holes. Into an existing tree only what differs is written (size and
    /// mtime, or --checksum); never writes through a symlink. Exit codes: 0 all restored, 1
    /// some entries failed (listed; the rest was restored) or nothing could be done.
    Restore {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        args: restore::RestoreArgs,
    },
    /// Show every host's generations as a read-only directory tree (FUSE).
    ///
    /// The tree is MOUNTPOINT/HOST/GENERATION/…, with HOST/latest a symlink to the newest
    /// generation. New generations appear without remounting. Runs in the foreground until
    /// SIGINT/SIGTERM or `fusermount3 -u MOUNTPOINT`. Restore with cp or `rsync -aHAX
    /// --numeric-ids MOUNTPOINT/HOST/latest/ /target/`.
    Mount {
        #[command(flatten)]
        repo: RepoArg,
        /// Let other users see the mount; permissions are then enforced by the kernel from each
        /// file's mode, owner and ACL (default_permissions).
        #[arg(long)]
        allow_other: bool,
        /// Memory for decompressed file data, e.g. 12M, 1G [default: 12M for a local
        /// repository, 64M on S3]. The prefetch window is at most half of it: on S3 it must
        /// cover the bytes in flight that hide the store's latency; a local disk has none.
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        cache_size: Option<usize>,
        /// Where to mount (an existing, empty directory).
        mountpoint: PathBuf,
    },
}

#[derive(Subcommand)]
enum MaintainCmd {
    /// Compact the index: merge every ingest's delta and every run into one sharded base, and
    /// delete what a settled earlier compaction superseded.
    ///
    /// Ingests compact a little by themselves when due; run this from a timer (nightly, on one
    /// host) so the index stays one base however many hosts write. Safe beside ingests, mounts
    /// and another compaction: it takes no lock, and nothing a reader may still use is deleted
    /// before the settle time (BACKTREE_INDEX_SETTLE seconds, default 3600) has passed.
    Index {
        #[command(flatten)]
        repo: RepoArg,
        /// Print the plan without writing or deleting anything.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Parses `64M`, `1G`, `512K` or a plain number of bytes.
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1usize << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n >= 1 << 20)
        .ok_or_else(|| format!("{s:?} is not a size of at least 1M such as 64M or 1G"))
}

/// Checks a `--stdin` name (see [`ingest::check_stream_name`]).
fn parse_stream_name(s: &str) -> Result<String, String> {
    ingest::check_stream_name(s)
        .map(|()| s.to_owned())
        .map_err(str::to_owned)
}

/// Parses permission bits in octal: `600`, `0640`, `0o2750`.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777 && !digits.is_empty())
        .ok_or_else(|| format!("{s:?} is not an octal mode from 0 to 7777 such as 0600 or 0640"))
}

/// Parses `UID:GID`, two numbers.
fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    s.split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
        .ok_or_else(|| format!("{s:?} is not UID:GID, two numbers such as 26:26"))
}

/// Parses an RFC 3339 time.
fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| format!("{s:?} is not an RFC 3339 time such as 2026-11-20T01:00:00Z"))
}

/// What an ingest reads besides (or instead of) paths.
enum Input {
    /// Paths, and standard input as one file (`--stdin`).
    Paths(Option<ingest::Stream<'static>>),
    /// A tar archive (`--tar`).
    Tar(ingest::TarSource<'static>),
}

/// The `--tar` archive: a file, or standard input for `-`.
fn tar_source(path: PathBuf) -> Result<ingest::TarSource<'static>> {
    if path.as_os_str() == "-" {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            bail!("--tar -: standard input is a terminal; pipe the archive in");
        }
        use std::os::fd::AsFd;
        let fd = stdin
            .as_fd()
            .try_clone_to_owned()
            .context("cannot use standard input")?;
        return Ok(ingest::TarSource {
            origin: "stdin".into(),
            reader: Box::new(std::io::BufReader::with_capacity(
                1 << 20,
                std::fs::File::from(fd),
            )),
        });
    }
    let f = std::fs::File::open(&path)
        .with_context(|| format!("cannot open tar archive {}", path.display()))?;
    Ok(ingest::TarSource {
        origin: path.display().to_string(),
        reader: Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
    })
}

/// Standard input as a `--stdin` stream. Refuses a terminal: an ingest would wait for typing.
fn stdin_stream(
    name: String,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
    mtime: Option<chrono::DateTime<chrono::Utc>>,
    allow_empty: bool,
) -> Result<ingest::Stream<'static>> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!(
            "--stdin {name}: standard input is a terminal; pipe the data in, e.g. \
             `pg_dump db | backtree ingest … --stdin {name}`"
        );
    }
    // A file of our own on descriptor 0, read directly (no 8 KiB buffer, no lock) and movable
    // to the thread that reads it.
    let fd = stdin
        .as_fd()
        .try_clone_to_owned()
        .context("cannot use standard input")?;
    // A pipe of 1 MiB rather than 64 KiB: fewer wake-ups of reader and producer. Best effort
    // (a file, or a pipe past /proc/sys/fs/pipe-max-size, stays as it is).
    // SAFETY: fcntl on a valid descriptor has no memory-safety preconditions.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
    let mut s = ingest::Stream::new(name, "stdin", Box::new(std::fs::File::from(fd)));
    s.mode = mode.unwrap_or(ingest::STREAM_MODE);
    s.owner = owner;
    s.mtime = mtime;
    s.allow_empty = allow_empty;
    Ok(s)
}

fn main() {
    // SIGPIPE stays ignored (Rust's default): the S3 client writes to sockets with writev,
    // and a store that drops a connection must give an error, not kill an ingest. A reader of
    // our output that goes away (`| head`) ends us quietly through `out!` instead.
    tame_malloc();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let subcommands: Vec<String> = <Cli as clap::CommandFactory>::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let cli = match fstab::recognize(&args, &subcommands) {
        None => Cli::parse(),
        Some(Err(e)) => {
            eprintln!("backtree: {e} (as a mount helper: backtree REPOSITORY MOUNTPOINT [-o OPTIONS] [-f])");
            std::process::exit(2);
        }
        // `mount.fuse3` runs us this way (/etc/fstab, `mount -t fuse.backtree`): fork before
        // anything else, unless told to stay in the foreground.
        Some(Ok(helper)) => {
            if !helper.foreground {
                fstab::daemonize(helper.log);
            }
            Cli::parse_from(helper.args)
        }
    };
    init_logging(cli.verbose);
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("backtree: {}", chain(&e));
            1
        }
    };
    std::process::exit(code);
}

/// The log filter for `-v` given `verbose` times, as `tracing` directives: first the level of
/// every other crate, then that of backtree's own (the target `backtree` is a prefix, so it
/// covers the binary and backtree_core, backtree_store and backtree_fs).
///
/// By default other crates show only errors. Their warnings are about things backtree handles
/// and reports itself in one sentence: without credentials, the AWS SDK's probe of the EC2
/// instance metadata service printed two WARN records of some 800 characters each (the region
/// and the credentials lookups, with the HTTP response dumped) before backtree's own error;
/// hyper and fuser warn about dropped connections and unmounts that are expected. Their errors
/// are rare and mean something is really wrong (fuser: "/dev/fuse not found. Try 'modprobe
/// fuse'"), so they stay visible. fuser's "Unmount failed" warning is hidden below -vvv (see
/// [`init_logging`]).
fn log_directives(verbose: u8) -> &'static str {
    match verbose {
        0 => "error,backtree=warn",
        1 => "warn,fuser::mnt=error,backtree=info",
        2 => "info,fuser::mnt=error,backtree=debug",
        _ => "debug,backtree=trace",
    }
}

/// Sends `tracing` records to standard error, filtered by BACKTREE_LOG, else RUST_LOG, else
/// [`log_directives`] for `-v`.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let from_env = ["BACKTREE_LOG", "RUST_LOG"].into_iter().find_map(|var| {
        let value = std::env::var(var).ok().filter(|v| !v.trim().is_empty())?;
        match EnvFilter::try_new(&value) {
            Ok(filter) => Some((filter, value)),
            Err(e) => {
                eprintln!("backtree: ignoring {var}={value:?}: {e}");
                None
            }
        }
    });
    let filter = match from_env {
        // A filter from the environment is taken as it is, except that fuser's warning
        // "Unmount failed" stays hidden unless it names fuser itself: fuser gives it when its
        // session ends after the mount was already unmounted (by `fusermount3 -u`, ours or the
        // user's), which is expected.
        Some((filter, value)) if !value.contains("fuser") => {
            filter.add_directive("fuser::mnt=error".parse().expect("a valid directive"))
        }
        Some((filter, _)) => filter,
        None => EnvFilter::new(log_directives(verbose)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Keeps glibc from hoarding memory. Chunks are 0.5–8 MiB buffers allocated and freed on many
/// threads; with one malloc arena per thread, freed memory stays mapped in each. Two arenas
/// bounded the mount's peak RSS from ~165 MB to ~114 MB (64 MiB cache) at the same throughput
/// (measured on a 2 GiB image, docs/benchmarks.md). A fixed low mmap threshold would save more
/// memory but doubled the CPU per byte (page faults and zeroing), so it is not used.
fn tame_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// One sentence: the error and its causes, without repeating a cause already in the message.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work is local file I/O and decoding: a few threads keep the cores busy, and
        // every extra thread costs a stack and a malloc arena.
        .max_blocking_threads(8)
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> Result<i32> {
    let rt = runtime()?;
    match cli.cmd {
        Cmd::Init { repo } => {
            let store = repo.open(&rt, true)?;
            let conditional = store.honors_create_if_absent();
            rt.block_on(Repository::init(store))?;
            out!("created backtree repository at {}", repo.repo);
            if repo.location()?.is_remote() && !conditional {
                eprintln!(
                    "backtree: {} ignores conditional writes (If-None-Match); generations are \
                     committed with claims instead (docs/concurrency.md)",
                    repo.repo
                );
            }
            Ok(0)
        }
        Cmd::Ingest {
            repo,
            host,
            time,
            label,
            exclude,
            json,
            read_special,
            stdin,
            stdin_mode,
            stdin_owner,
            stdin_mtime,
            allow_empty,
            tar,
            gunzip,
            no_gunzip,
            no_compact,
            paths,
        } => {
            let time = time
                .map(|t| {
                    chrono::DateTime::parse_from_rfc3339(&t)
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .with_context(|| {
                            format!(
                                "--time {t:?} is not an RFC 3339 time such as 2026-11-20T01:00:00Z"
                            )
                        })
                })
                .transpose()?;
            let stream = stdin
                .map(|name| stdin_stream(name, stdin_mode, stdin_owner, stdin_mtime, allow_empty))
                .transpose()?
                .map(|mut s| {
                    s.gunzip = !no_gunzip;
                    s
                });
            let tar = tar.map(tar_source).transpose()?;
            let r = repo.open_repo(&rt)?;
            // Never back up the repository into itself.
            let skip_dirs = repo
                .location()?
                .local_path()
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| vec![(m.dev(), m.ino())])
                .unwrap_or_default();
            let opts = IngestOptions {
                host,
                sources: paths,
                time,
                label,
                excludes: exclude,
                skip_dirs,
                // Tuning (docs/cli.md): new pack bytes between index checkpoints.
                checkpoint_bytes: std::env::var("BACKTREE_CHECKPOINT")
                    .ok()
                    .and_then(|v| parse_size(&v).ok())
                    .map(|v| v as u64),
                threads: std::env::var("BACKTREE_THREADS")
                    .ok()
                    .and_then(|t| t.parse().ok()),
                read_special,
                gunzip,
                // Tuning (docs/cli.md): plaintext per preflate segment of gzip data.
                gzip_segment: std::env::var("BACKTREE_GZIP_SEGMENT")
                    .ok()
                    .and_then(|v| parse_size(&v).ok()),
                no_compact,
                // Tuning (docs/cli.md): the session's lease time, in seconds.
                lease_time: std::env::var("BACKTREE_LEASE_SECS")
                    .ok()
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|v| *v > 0.0)
                    .map(Duration::from_secs_f64),
            };
            let input = match tar {
                Some(t) => Input::Tar(t),
                None => Input::Paths(stream),
            };
            ingest_cmd(&rt, r, opts, input, json)
        }
        Cmd::Mount {
            repo,
            allow_other,
            cache_size,
            mountpoint,
        } => {
            let cache_dir = repo.cache_dir.clone();
            let r = Arc::new(repo.open_repo(&rt)?);
            let location = repo.location()?;
            let defaults = if location.is_remote() {
                backtree_fs::FsOptions::remote()
            } else {
                backtree_fs::FsOptions::default()
            };
            mount_cmd(
                &rt,
                r,
                &location,
                mountpoint,
                allow_other,
                backtree_fs::FsOptions {
                    cache_size: cache_size.unwrap_or(defaults.cache_size),
                    cache_dir,
                    ..defaults
                },
            )
        }
        Cmd::Cat {
            repo,
            original,
            what,
        } => {
            let r = repo.open_repo(&rt)?;
            cat_cmd(&rt, &r, &what, original)
        }
        Cmd::Maintain {
            what:
                MaintainCmd::Index {
                    repo,
                    dry_run,
                    json,
                },
        } => {
            let r = repo.open_repo(&rt)?;
            let cache = r.index().cache();
            let o = rt.block_on(backtree_core::index::compact::run(
                r.store(),
                &backtree_core::index::compact::Policy::from_env(),
                backtree_core::index::compact::Mode::Full,
                dry_run,
                cache.as_ref(),
                None,
            ))?;
            maintain::print_compaction(&o, dry_run, json)?;
            Ok(0)
        }
        Cmd::Verify { repo, args } => verify::run(&rt, &repo, &args),
        Cmd::Restore { repo, args } => {
            let r = repo.open_repo(&rt)?;
            restore::run(&rt, &r, &args)
        }
        Cmd::Repair { what } => repair::run(&rt, &what),
        Cmd::Forget { repo, policy } => {
            let r = repo.open_repo(&rt)?;
            rt.block_on(forget::run(&r, &policy))
        }
        Cmd::Prune { repo, args } => {
            let r = repo.open_repo(&rt)?;
            rt.block_on(prune::run(&r, &args))
        }
        Cmd::Protect { repo, remove, what } => {
            let r = repo.open_repo(&rt)?;
            rt.block_on(forget::protect(&r, &what, remove))
        }
        Cmd::Diff { repo, args } => {
            let r = repo.open_repo(&rt)?;
            rt.block_on(explore::diff(&r, &args))
        }
        Cmd::Find { repo, args } => {
            let r = repo.open_repo(&rt)?;
            rt.block_on(explore::find(&r, &args))
        }
        Cmd::Ls {
            repo,
            json,
            recursive,
            what,
        } => {
            let r = repo.open_repo(&rt)?;
            rt.block_on(output::ls(&r, what.as_deref(), json, recursive))?;
            Ok(0)
        }
    }
}

/// `backtree cat`: one file's content, or its gzip original, to standard output.
fn cat_cmd(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    what: &str,
    original: bool,
) -> Result<i32> {
    use backtree_core::tree::Kind;
    let what = what.trim_matches('/');
    let mut parts = what.splitn(3, '/');
    let host = parts.next().unwrap_or_default();
    let (Some(gen), Some(path)) = (parts.next(), parts.next()) else {
        bail!("cat needs HOST/GENERATION/PATH, a file in a generation (GENERATION may be `latest`), not {what:?}");
    };
    let gen = if gen == "latest" {
        match rt.block_on(repo.latest(host))? {
            Some(g) => g,
            None => bail!("host {host:?} has no generations in this repository"),
        }
    } else {
        gen.to_owned()
    };
    let m = rt.block_on(repo.manifest(host, &gen))?;
    let full = format!("{host}/{gen}/{path}");
    let entry = match m.root.tree {
        Some(root) => rt
            .block_on(repo.resolve(&root, path.as_bytes()))
            .with_context(|| format!("cat {full}"))?,
        None => None,
    };
    let entry = match entry {
        Some(e) if e.kind == Kind::File => e,
        Some(e) if e.kind == Kind::Dir => bail!("{full} is a directory; cat writes one file"),
        Some(_) => bail!("{full} is not a regular file"),
        None => bail!("{full} is a directory; cat writes one file"),
    };
    // The data goes to a descriptor of its own, and descriptor 1 points to standard error
    // meanwhile: preflate-rs prints debugging lines with println! in some failures, which must
    // never mix with the data.
    let _diverted = StdoutDiverted::new();
    let data = _diverted.data()?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, data);
    let handle = rt.handle().clone();
    let written = if original {
        backtree_core::cat::write_original(repo, &handle, &entry, &full, &mut out)
    } else {
        backtree_core::cat::write_content(repo, &handle, &entry, &full, &mut out)
    };
    match written {
        Ok(_) => Ok(0),
        Err(backtree_core::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}

/// Descriptor 1 pointed at standard error while it lives (restored on drop), with the original
/// standard output kept aside for data ([`StdoutDiverted::data`]). preflate-rs 0.7.6 prints
/// debugging lines (`tried to match …`, `dist = …`) with `println!` when it gives up on a deflate
/// stream; they must not end up in `ingest --json` output or in `cat`'s data.
struct StdoutDiverted {
    saved: Option<std::os::fd::OwnedFd>,
}

impl StdoutDiverted {
    fn new() -> StdoutDiverted {
        use std::io::Write as _;
        use std::os::fd::FromRawFd;
        let _ = std::io::stdout().flush();
        // SAFETY: dup and dup2 on the process's standard descriptors; the duplicate is owned.
        let saved = unsafe {
            let fd = libc::dup(1);
            if fd < 0 {
                return StdoutDiverted { saved: None };
            }
            let saved = std::os::fd::OwnedFd::from_raw_fd(fd);
            if libc::dup2(2, 1) < 0 {
                return StdoutDiverted { saved: None };
            }
            saved
        };
        StdoutDiverted { saved: Some(saved) }
    }

    /// A writer to the real standard output.
    fn data(&self) -> Result<std::fs::File> {
        let fd = match &self.saved {
            Some(fd) => fd.try_clone(),
            None => {
                use std::os::fd::AsFd;
                std::io::stdout().as_fd().try_clone_to_owned()
            }
        };
        Ok(std::fs::File::from(
            fd.context("cannot use standard output")?,
        ))
    }
}

impl Drop for StdoutDiverted {
    fn drop(&mut self) {
        use std::io::Write as _;
        use std::os::fd::AsRawFd;
        let _ = std::io::stdout().flush();
        if let Some(fd) = &self.saved {
            // SAFETY: dup2 onto descriptor 1 from a descriptor we own.
            unsafe {
                libc::dup2(fd.as_raw_fd(), 1);
            }
        }
    }
}

fn mount_cmd(
    rt: &tokio::runtime::Runtime,
    repo: Arc<Repository>,
    location: &Location,
    mountpoint: PathBuf,
    allow_other: bool,
    fs_opts: backtree_fs::FsOptions,
) -> Result<i32> {
    use backtree_fs::mount::{mount, MountOptions};
    let _guard = rt.enter();
    let index_stats = repo.index().stats_handle();
    let fs = Arc::new(backtree_fs::BacktreeFs::new(repo, fs_opts));
    let opts = MountOptions {
        allow_other,
        fsname: format!("backtree:{location}"),
        local_repo: location.local_path().map(PathBuf::from),
    };
    let session = mount(fs, rt.handle().clone(), &mountpoint, &opts)?;
    // Run from /etc/fstab: the waiting `mount` returns now, and the daemon's output goes to its
    // log.
    fstab::mounted();
    eprintln!(
        "backtree: {location} mounted at {}; Ctrl-C or `fusermount3 -u {}` unmounts",
        mountpoint.display(),
        mountpoint.display()
    );
    let external = !signal_or_end(rt, &session)?;
    if !external {
        use backtree_fs::mount::{unmount, Unmounted};
        if unmount(&mountpoint)? == Unmounted::Detached {
            eprintln!(
                "backtree: {} is busy (a file or directory on it is still open); detached it: it \
                 is gone from the tree, and open files are served until they are closed \
                 (Ctrl-C again stops now and fails their reads)",
                mountpoint.display()
            );
            let stop_now = signal_or_end(rt, &session)?;
            if stop_now {
                eprintln!(
                    "backtree: stopped; reads of files still open on the detached mount fail"
                );
                return Ok(0);
            }
        }
    }
    session
        .join()
        .context("the FUSE session ended with an error")?;
    tracing::info!("{}", index_stats.summary());
    eprintln!("backtree: unmounted {}", mountpoint.display());
    Ok(0)
}

/// Waits until SIGINT or SIGTERM arrives (`true`) or the FUSE session ends by itself (`false`:
/// unmounted from outside, or the last open file of a detached mount closed).
fn signal_or_end(
    rt: &tokio::runtime::Runtime,
    session: &backtree_fs::mount::BackgroundSession,
) -> Result<bool> {
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch for SIGTERM")?;
        while !session.guard.is_finished() {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(true),
                _ = term.recv() => return Ok(true),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        Ok(false)
    })
}

fn ingest_cmd(
    rt: &tokio::runtime::Runtime,
    repo: Repository,
    opts: IngestOptions,
    input: Input,
    json: bool,
) -> Result<i32> {
    let progress = Arc::new(Progress::default());
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = bar.clone().map(|b| {
        let p = progress.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let bytes = p.bytes.load(Ordering::Relaxed);
                let rate = bytes as f64 / start.elapsed().as_secs_f64().max(0.001);
                b.set_message(format!(
                    "{} files, {}, {}/s{}",
                    p.files.load(Ordering::Relaxed),
                    output::size(bytes),
                    output::size(rate as u64),
                    match p.skipped.load(Ordering::Relaxed) {
                        0 => String::new(),
                        n => format!(", {n} skipped"),
                    }
                ));
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    });
    let bar_for_skip = bar.clone();
    let on_skip = move |s: &SkippedPath| {
        let line = format!("backtree: skipped {}: {}", s.path, s.error);
        match &bar_for_skip {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    };
    let handle = rt.handle().clone();
    // preflate-rs may print to stdout while gzip data is read (see `StdoutDiverted`).
    let gzip = opts.gunzip || matches!(&input, Input::Paths(Some(s)) if s.gunzip);
    let diverted = gzip.then(StdoutDiverted::new);
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| match input {
                Input::Paths(stream) => {
                    ingest::ingest_with(&repo, &handle, &opts, stream, &progress, &on_skip)
                }
                Input::Tar(t) => ingest::ingest_tar(&repo, &handle, &opts, t, &progress, &on_skip),
            })
            .join()
    });
    drop(diverted);
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.join();
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = match result {
        Ok(r) => r?,
        Err(_) => bail!("the ingest crashed; nothing was committed"),
    };
    tracing::info!("{}", report.index);
    match &report.compaction {
        Some(Ok(o)) if o.root.is_some() => tracing::info!("{}", maintain::compaction(o)),
        Some(Err(e)) => tracing::warn!(
            "index compaction after the commit failed ({e}); the generation is committed, and \
             the next ingest or `backtree maintain index` compacts"
        ),
        _ => {}
    }
    let m = &report.manifest;
    if json {
        let v = serde_json::json!({ "generation": m, "skipped": report.skipped, "seconds": report.seconds });
        out!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let s = &m.stats;
        let ratio = if s.new_stored_bytes > 0 {
            format!("{:.1}x", s.logical_bytes as f64 / s.new_stored_bytes as f64)
        } else {
            "all deduplicated".to_owned()
        };
        out!(
            "{}/{}: {} files, {} read, {} new, {} stored, ratio {}, {:.1} s{}",
            m.host,
            m.name,
            s.files,
            output::size(s.read_bytes),
            output::size(s.new_raw_bytes),
            output::size(s.new_stored_bytes),
            ratio,
            report.seconds,
            if report.skipped.is_empty() {
                String::new()
            } else {
                format!(", {} paths skipped", report.skipped.len())
            }
        );
    }
    Ok(if report.skipped.is_empty() {
        0
    } else {
        EXIT_PARTIAL
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verbosity_is_a_valid_filter() {
        for v in 0..=4 {
            let d = log_directives(v);
            assert!(
                tracing_subscriber::EnvFilter::try_new(d).is_ok(),
                "-v x{v}: {d}"
            );
        }
    }

    #[test]
    fn verbose_is_global_and_counts() {
        let cli = Cli::try_parse_from(["backtree", "ls", "-vv", "--repo", "/r"]).expect("parse");
        assert_eq!(cli.verbose, 2);
        let cli = Cli::try_parse_from(["backtree", "-v", "ls", "--repo", "/r"]).expect("parse");
        assert_eq!(cli.verbose, 1);
    }
}
