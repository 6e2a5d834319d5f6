//! Routes read from a TOML file and reloaded while the domus runs (feature `file-resolver`):
//! [`FileResolver`], and its pure parser [`RoutesFile::parse`].
//!
//! # The file
//!
//! ```toml
//! # Taberna 7 is served by two replicas: billing-0 while it can be reached, the socket after.
//! [[taberna]]
//! id = 7                       # the TabernaId: an integer from 0 to 2^63 - 1 (TOML's range)
//! candidates = [
//!   { addr = "10.0.0.5:7000", identity = "spiffe://prod/domus/billing-0", priority = 0, weight = 10 },
//!   { addr = "unix:/run/vicus/b.sock", priority = 1 },
//! ]
//!
//! [[taberna]]
//! id = 8
//! candidates = [{ addr = "billing.internal:7000", identity = "spiffe://prod/domus/billing-1" }]
//!
//! # Where a domus is reached, for sends addressed to the domus (Domus::destination_on).
//! [[domus]]
//! identity = "spiffe://prod/domus/billing-0"
//! addr = "10.0.0.5:7000"
//!
//! # Who publishes to which topics: the topic service announces subscriptions to them.
//! [[topic]]
//! pattern = "billing.>"
//! publishers = ["spiffe://prod/domus/billing-0"]
//! ```
//!
//! * `[[taberna]]`: `id` and `candidates` (at least one, at most
//!   [`RoutesFile::MAX_CANDIDATES`]), each id once; at most [`RoutesFile::MAX_TABERNAS`]
//!   tables. A candidate (see [`Candidate`]) has an `addr` (`host:port`, `[v6]:port`,
//!   `tcp://host:port` or `unix:/absolute/path`, as [`DomusAddr`](crate::DomusAddr) parses
//!   them), an optional `identity` (a [`DomusId`]: the URI SAN the domus there must present —
//!   without it, any verified identity is accepted there), a `priority` (default 0; lower is
//!   preferred) and a `weight` (default 1). The same address and identity may not be listed
//!   twice for a taberna.
//! * `[[domus]]`: `identity` and `addr`, each identity once; at most
//!   [`RoutesFile::MAX_DOMUS`] tables.
//! * `[[topic]]`: `pattern` (a topic pattern, 1 to 256 bytes, each once) and `publishers`
//!   (1 to [`RoutesFile::MAX_TOPIC_PUBLISHERS`] identities, reached at their `[[domus]]`
//!   addresses); at most [`RoutesFile::MAX_TOPICS`] tables
//!   ([`RouteResolver::topic_publishers`]).
//! * Every kind is optional (an empty file routes nothing); any other key is an error, so a
//!   misspelt `weigth` is refused instead of silently ignored. The file is at most
//!   [`FileResolver::MAX_FILE_LEN`] bytes of UTF-8.
//!
//! # Reloading
//!
//! [`FileResolver::open`] reads the file once, synchronously; a missing or invalid file is an
//! error for the caller. [`FileResolver::watch`] then polls it every interval, by the rules the
//! PEM watcher (feature `watch`) follows:
//!
//! * New contents are applied only once they have read **the same on two polls in a row**
//!   (their bytes hashed), so a writer that is half-way through is never read as routes; a
//!   change is in force within about two intervals. Writing a temporary file and renaming it
//!   over the routes file is still the best way to publish one.
//! * Stable contents that are invalid are reported **once**, as `ResolverFailed` naming the
//!   file, the line and what to fix, on the error feed of every domus the resolver is attached
//!   to ([`RouteResolver::attach`]); the routes in force stay. They are not tried again until
//!   the contents change. A read error (a missing, unreadable or too large file) is reported
//!   once until it changes or a read succeeds, and the read is retried every interval.
//! * Reads (and the parse of new contents) run on tokio's blocking pool; a read is bounded by
//!   [`FileResolver::READ_DEADLINE`], and at most one read per resolver is outstanding, so a
//!   stalled filesystem cannot pile up threads.
//! * After new routes are applied, [`RouteResolver::changes`] fires: running domus re-read the
//!   routes of every taberna they sent to at once, and a peer whose pinned route moved is
//!   dialled at its new address.
//!
//! Lookups read an immutable snapshot ([`RouteTable`], behind an `ArcSwap`): no lock, no IO,
//! and every answer is ready on its first poll.
//!
//! This module must not apply contents it has not read twice unchanged (except when asked to,
//! by [`FileResolver::reload_now`]), must not drop the routes in force because the file went
//! bad, must not report the same failure twice in a row, and must not block the runtime on
//! file IO after `open`. It does not use inotify or any platform notification API (polling
//! sees a rename or a symlink swap the same way). The poller holds only a `Weak` to the
//! resolver: it stops when the resolver is dropped or its [`FileWatchHandle`] is.

mod routes;

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

pub use routes::{RouteTable, RoutesFile};

use super::{
    Candidate, CandidatesFuture, ResolveDomusFuture, ResolveFuture, ResolverFeed, ResolverFeeds,
    RouteChanges, RouteNotifier, RouteResolver, TopicPublishersFuture,
};
use crate::a0_transport::DomusId;
use crate::change_tracker::{ChangeTracker, Step};
use crate::error::{Error, ErrorId};
use crate::taberna::TabernaId;

/// Routes read from a TOML file, reloaded when it changes; see the
/// [module docs](crate::resolve::file) for the format and the rules.
///
/// ```no_run
/// # async fn run(auth: vicus::AuthConfig) -> Result<(), vicus::Error> {
/// use std::time::Duration;
/// use vicus::{Domus, FileResolver};
///
/// let routes = FileResolver::open("/etc/vicus/routes.toml")?;
/// let _watch = routes.watch(Duration::from_secs(1))?; // polls while `_watch` lives
/// let domus = Domus::builder(auth)
///     .bind("0.0.0.0:7000".parse()?)
///     .resolver(routes.clone())
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
pub struct FileResolver {
    path: PathBuf,
    /// The routes in force and the hash of the bytes they were read from.
    loaded: ArcSwap<Loaded>,
    notifier: RouteNotifier,
    feeds: ResolverFeeds,
    /// One permit: held by the blocking read in progress, so at most one is outstanding.
    reads: Arc<Semaphore>,
    /// Cancelled when the resolver is dropped; ends its poller.
    dropped: CancellationToken,
    /// Set while a poller runs (its [`FileWatchHandle`] lives): one per resolver.
    watching: Arc<AtomicBool>,
}

struct Loaded {
    table: Arc<RouteTable>,
    hash: u64,
}

impl fmt::Debug for FileResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileResolver")
            .field("path", &self.path)
            .field("tabernas", &self.loaded.load().table.len())
            .finish_non_exhaustive()
    }
}

impl Drop for FileResolver {
    fn drop(&mut self) {
        self.dropped.cancel();
    }
}

/// A file read once: its bytes and their hash.
struct Contents {
    bytes: Vec<u8>,
    hash: u64,
}

impl FileResolver {
    /// The longest routes file read (4 MiB).
    pub const MAX_FILE_LEN: u64 = 4 * 1024 * 1024;
    /// The shortest poll interval [`watch`](Self::watch) accepts.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
    /// The longest poll interval [`watch`](Self::watch) accepts.
    pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
    /// How long a read (waiting for the one before it included) may take before it is
    /// reported as a stalled filesystem. The read is not abandoned: the next starts once it
    /// has finished.
    pub const READ_DEADLINE: Duration = Duration::from_secs(10);

    /// Reads and parses the routes file at `path` now (synchronously: call it at start-up).
    /// Fails with `ResolverFailed` when the file cannot be read (missing, unreadable, larger
    /// than [`MAX_FILE_LEN`](Self::MAX_FILE_LEN)) and `InvalidConfig` when it is not valid
    /// routes; both name the file. Call [`watch`](Self::watch) to follow later changes.
    pub fn open(path: impl Into<PathBuf>) -> Result<Arc<Self>, Error> {
        let path = path.into();
        if path.as_os_str().is_empty() {
            return Err(Error::invalid_config(
                "FileResolver::open",
                "the path is empty",
            ));
        }
        let contents = read_file(&path)?;
        let table = parse_contents(&path, &contents.bytes)?;
        tracing::debug!(path = %path.display(), tabernas = table.len(), "routes file read");
        Ok(Arc::new(Self {
            path,
            loaded: ArcSwap::from_pointee(Loaded {
                table: Arc::new(table),
                hash: contents.hash,
            }),
            notifier: RouteNotifier::new(),
            feeds: ResolverFeeds::new(),
            reads: Arc::new(Semaphore::new(1)),
            dropped: CancellationToken::new(),
            watching: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// Parses routes in the file format, without a file ([`RoutesFile::parse`]).
    pub fn parse(text: &str) -> Result<RoutesFile, Error> {
        RoutesFile::parse(text)
    }

    /// The file this resolver reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The routes in force (a snapshot; later reloads do not change it).
    pub fn table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.loaded.load().table)
    }

    /// Starts polling the file every `interval` (10 ms to 1 h) and applying changed contents
    /// by the rules in the [module docs](crate::resolve::file). The poller runs until the
    /// [`FileWatchHandle`] is dropped or the resolver is (it holds only a `Weak`). One poller
    /// per resolver: while a handle lives, another `watch` fails with `InvalidConfig` (two
    /// pollers would read the file twice as often and report each failure twice); drop the
    /// handle to change the interval. Fails with `InvalidConfig` too for an interval out of
    /// range or when called outside a tokio runtime.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> Result<FileWatchHandle, Error> {
        if !(Self::MIN_INTERVAL..=Self::MAX_INTERVAL).contains(&interval) {
            return Err(Error::invalid_config(
                "interval",
                format!(
                    "{interval:?} is outside {:?}..={:?}",
                    Self::MIN_INTERVAL,
                    Self::MAX_INTERVAL
                ),
            ));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::invalid_config(
                "FileResolver::watch",
                "watch must be called from inside a tokio runtime",
            )
        })?;
        if self
            .watching
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Error::invalid_config(
                "FileResolver::watch",
                format!(
                    "{} is watched already: drop its FileWatchHandle before watching it again",
                    self.path.display()
                ),
            ));
        }
        let slot = WatchSlot(self.watching.clone());
        let poller = Poller {
            resolver: Arc::downgrade(self),
            path: self.path.clone(),
            reads: self.reads.clone(),
            interval,
            tracker: ChangeTracker::new(self.loaded.load().hash),
        };
        let dropped = self.dropped.clone();
        tracing::debug!(path = %self.path.display(), ?interval, "watching the routes file");
        Ok(FileWatchHandle {
            task: AbortOnDropHandle::new(runtime.spawn(async move {
                tokio::select! {
                    () = dropped.cancelled() => {}
                    () = poller.run() => {}
                }
            })),
            _slot: slot,
        })
    }

    /// Reads the file once now and applies it if it changed, without waiting for a second
    /// read to agree (for an operator's "reload" command). `Ok(true)` when new routes are in
    /// force, `Ok(false)` when the file holds the routes in force already; the errors of
    /// [`open`](Self::open) (they are returned, not reported on the error feed), and
    /// `InvalidConfig` outside a tokio runtime. The routes in force stay on error.
    pub async fn reload_now(&self) -> Result<bool, Error> {
        tokio::runtime::Handle::try_current().map_err(|_| {
            Error::invalid_config(
                "FileResolver::reload_now",
                "reload_now must run inside a tokio runtime",
            )
        })?;
        let contents = read_off_runtime(self.path.clone(), self.reads.clone()).await?;
        if contents.hash == self.loaded.load().hash {
            return Ok(false);
        }
        let hash = contents.hash;
        let table = parse_off_runtime(self.path.clone(), contents).await?;
        self.install(table, hash);
        Ok(true)
    }

    fn install(&self, table: RouteTable, hash: u64) {
        tracing::info!(path = %self.path.display(), tabernas = table.len(), "routes file: new routes in force");
        self.loaded.store(Arc::new(Loaded {
            table: Arc::new(table),
            hash,
        }));
        self.notifier.notify();
    }

    /// Reports a background failure on every attached domus's error feed.
    fn report(&self, error: &Error) {
        let error = Error::new(
            ErrorId::ResolverFailed,
            format!("{}; the routes read before stay in force", error.message()),
        );
        tracing::warn!(path = %self.path.display(), error = %error, "routes file: not applied");
        self.feeds.report(&error);
    }

    fn lookup(&self, taberna: TabernaId) -> Result<Arc<[Candidate]>, Error> {
        self.loaded
            .load()
            .table
            .candidates(taberna)
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorId::UnknownTaberna,
                    format!(
                        "no route to {taberna}: it is not local and the routes file {} does \
                         not list it",
                        self.path.display()
                    ),
                )
            })
    }
}

impl RouteResolver for FileResolver {
    fn resolve(&self, taberna: TabernaId) -> ResolveFuture<'_> {
        // A listed taberna has at least one candidate (the parser refuses an empty list).
        let route = self.lookup(taberna).and_then(|c| {
            c.first().map(|c| c.route.clone()).ok_or_else(|| {
                Error::new(ErrorId::UnknownTaberna, format!("no route to {taberna}"))
            })
        });
        Box::pin(std::future::ready(route))
    }

    fn candidates(&self, taberna: TabernaId) -> CandidatesFuture<'_> {
        Box::pin(std::future::ready(self.lookup(taberna)))
    }

    fn topic_publishers(&self) -> TopicPublishersFuture<'_> {
        let topics = self.loaded.load().table.topic_publishers().clone();
        Box::pin(std::future::ready(Ok(topics)))
    }

    fn resolve_domus<'a>(&'a self, id: &'a DomusId) -> ResolveDomusFuture<'a> {
        let addr = self.loaded.load().table.domus_addr(id).cloned();
        Box::pin(std::future::ready(Ok(addr)))
    }

    fn changes(&self) -> Option<RouteChanges> {
        Some(self.notifier.subscribe())
    }

    fn attach(&self, feed: ResolverFeed) {
        self.feeds.add(feed);
    }
}

/// A running poller, from [`FileResolver::watch`]. Dropping it stops the poller.
#[derive(Debug)]
pub struct FileWatchHandle {
    /// Aborted when the handle is dropped (first: fields drop in order).
    task: AbortOnDropHandle<()>,
    /// Lets the resolver be watched again once the poller is aborted.
    _slot: WatchSlot,
}

/// Clears a resolver's "watched" flag when dropped.
#[derive(Debug)]
struct WatchSlot(Arc<AtomicBool>);

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl FileWatchHandle {
    /// True once the poller stopped on its own: the resolver was dropped.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// The polling task's state; owned by the task alone. It holds the resolver only between
/// awaits, never while a read is waited for.
struct Poller {
    resolver: Weak<FileResolver>,
    path: PathBuf,
    reads: Arc<Semaphore>,
    interval: Duration,
    tracker: ChangeTracker,
}

impl Poller {
    async fn run(mut self) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick completes at once; `open` (or the last reload) read the file.
        ticks.tick().await;
        loop {
            ticks.tick().await;
            if self.poll().await.is_none() {
                break;
            }
        }
        tracing::debug!(path = %self.path.display(), "routes file poller stopped: the resolver is gone");
    }

    /// One poll; `None` once the resolver is gone.
    async fn poll(&mut self) -> Option<()> {
        let outcome = read_off_runtime(self.path.clone(), self.reads.clone()).await;
        let resolver = self.resolver.upgrade()?;
        let contents = match outcome {
            Ok(contents) => contents,
            Err(e) => {
                if self.tracker.read_failed(e.message()) {
                    resolver.report(&e);
                }
                return Some(());
            }
        };
        // `reload_now` may have applied contents the poller has not seen.
        self.tracker.applied(resolver.loaded.load().hash);
        drop(resolver);
        match self.tracker.read(contents.hash) {
            Step::InForce | Step::Settling | Step::Refused => return Some(()),
            Step::Try => {}
        }
        let hash = contents.hash;
        let parsed = parse_off_runtime(self.path.clone(), contents).await;
        let resolver = self.resolver.upgrade()?;
        match parsed {
            Ok(table) => {
                resolver.install(table, hash);
                self.tracker.applied(hash);
            }
            Err(e) => {
                self.tracker.refused(hash);
                resolver.report(&e);
            }
        }
        Some(())
    }
}

/// Reads the file (blocking; through symlinks), at most [`FileResolver::MAX_FILE_LEN`] bytes,
/// and hashes it.
fn read_file(path: &Path) -> Result<Contents, Error> {
    let failed = |what: &str, e: std::io::Error| {
        Error::new(
            ErrorId::ResolverFailed,
            format!(
                "routes file {}: cannot {what} it: {e}; create it, or correct the path or its \
                 permissions",
                path.display()
            ),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| failed("open", e))?;
    let mut bytes = Vec::new();
    file.take(FileResolver::MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| failed("read", e))?;
    if bytes.len() as u64 > FileResolver::MAX_FILE_LEN {
        return Err(Error::new(
            ErrorId::ResolverFailed,
            format!(
                "routes file {}: larger than {} bytes; is it the right file? (a routes file \
                 of {} tabernas is far smaller)",
                path.display(),
                FileResolver::MAX_FILE_LEN,
                RoutesFile::MAX_TABERNAS
            ),
        ));
    }
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    Ok(Contents {
        hash: hasher.finish(),
        bytes,
    })
}

/// Parses what was read from `path`; errors are `InvalidConfig` naming the file.
fn parse_contents(path: &Path, bytes: &[u8]) -> Result<RouteTable, Error> {
    let in_file = |problem: &dyn fmt::Display| {
        Error::new(
            ErrorId::InvalidConfig,
            format!("routes file {}: {problem}", path.display()),
        )
    };
    let text = std::str::from_utf8(bytes).map_err(|e| in_file(&format!("not UTF-8 text: {e}")))?;
    RoutesFile::parse(text)
        .map(RouteTable::from)
        .map_err(|e| in_file(&e.message()))
}

/// [`read_file`] on the blocking pool, under [`FileResolver::READ_DEADLINE`], while no other
/// read of this resolver is outstanding (the permit goes with the blocking read: a read that
/// overran the deadline keeps it until it ends).
async fn read_off_runtime(path: PathBuf, reads: Arc<Semaphore>) -> Result<Contents, Error> {
    let shown = path.display().to_string();
    let stalled = format!(
        "routes file {shown}: reading it took longer than {:?}; is the filesystem stalled?",
        FileResolver::READ_DEADLINE
    );
    let read = async move {
        let permit = reads
            .acquire_owned()
            .await
            .map_err(|_| Error::new(ErrorId::ResolverFailed, "the routes file reader is closed"))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            read_file(&path)
        })
        .await
        .map_err(|join| {
            Error::new(
                ErrorId::ResolverFailed,
                format!("routes file {shown}: the read task failed: {join}"),
            )
        })?
    };
    tokio::time::timeout(FileResolver::READ_DEADLINE, read)
        .await
        .unwrap_or_else(|_| Err(Error::new(ErrorId::ResolverFailed, stalled)))
}

/// [`parse_contents`] on the blocking pool (a large file takes milliseconds to parse).
async fn parse_off_runtime(path: PathBuf, contents: Contents) -> Result<RouteTable, Error> {
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || parse_contents(&path, &contents.bytes))
        .await
        .unwrap_or_else(|join| {
            Err(Error::new(
                ErrorId::ResolverFailed,
                format!("routes file {shown}: the parse task failed: {join}"),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "vicus-file-resolver-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("write the routes file");
        path
    }

    #[test]
    fn open_reads_the_file_and_names_it_in_errors() {
        let good = temp_file(
            "open-good",
            "[[taberna]]\nid = 3\ncandidates = [{ addr = \"127.0.0.1:9\" }]\n",
        );
        let resolver = FileResolver::open(&good).expect("opens");
        assert_eq!(resolver.table().len(), 1);
        assert_eq!(resolver.path(), good);
        let _ = std::fs::remove_file(&good);

        let missing = std::env::temp_dir().join("vicus-file-resolver-no-such-file.toml");
        let e = FileResolver::open(&missing).unwrap_err();
        assert_eq!(e.id(), ErrorId::ResolverFailed);
        assert!(e.message().contains(&*missing.to_string_lossy()), "{e}");

        let bad = temp_file("open-bad", "[[taberna]]\nid = 3\ncandidates = []\n");
        let e = FileResolver::open(&bad).unwrap_err();
        assert_eq!(e.id(), ErrorId::InvalidConfig);
        assert!(
            e.message()
                .starts_with(&format!("routes file {}: line 3: ", bad.display())),
            "{e}"
        );
        let _ = std::fs::remove_file(&bad);

        let e = FileResolver::open("").unwrap_err();
        assert_eq!(e.id(), ErrorId::InvalidConfig);
    }

    #[test]
    fn a_file_too_large_is_a_read_error() {
        let path = temp_file("large", "");
        let big = vec![b'#'; FileResolver::MAX_FILE_LEN as usize + 1];
        std::fs::write(&path, big).expect("write");
        let e = FileResolver::open(&path).unwrap_err();
        assert_eq!(e.id(), ErrorId::ResolverFailed);
        assert!(e.message().contains("larger than 4194304 bytes"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn watch_checks_its_interval() {
        let path = temp_file("interval", "");
        let resolver = FileResolver::open(&path).expect("opens");
        for bad in [Duration::from_millis(9), Duration::from_secs(3601)] {
            let e = resolver.watch(bad).unwrap_err();
            assert_eq!(e.id(), ErrorId::InvalidConfig);
            assert!(e.message().starts_with("interval"), "{e}");
        }
        let handle = resolver.watch(FileResolver::MIN_INTERVAL).expect("watches");
        assert!(!handle.is_finished());
        drop(resolver);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !handle.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the poller ends when the resolver is dropped");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn watch_outside_a_runtime_is_an_error() {
        let path = temp_file("no-runtime", "");
        let resolver = FileResolver::open(&path).expect("opens");
        let e = resolver.watch(Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.id(), ErrorId::InvalidConfig);
        let _ = std::fs::remove_file(&path);
    }
}
