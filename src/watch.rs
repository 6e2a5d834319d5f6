//! Watching a directory of PEM files and reloading a running [`Domus`]'s authentication
//! material when they change (feature `watch`).
//!
//! [`spawn`] starts a task that polls the files named by a [`WatchConfig`] — CA bundle,
//! certificate chain, private key and optional CRLs — every `interval`, and hands a changed,
//! complete set to [`Domus::reload_auth`], which validates it, swaps it in for new handshakes
//! and publishes [`Event::AuthReloaded`] (or the error, keeping the old material).
//!
//! Files are read through their paths, so symlinks are followed on every poll. That is what
//! makes a Kubernetes Secret or ConfigMap volume work: there `cert.pem` is a symlink to
//! `..data/cert.pem`, `..data` is a symlink to a timestamped directory, and an update writes a
//! new directory and renames a new `..data` link over the old one. Nothing here depends on that
//! layout; any writer works, atomic or not, because of the rules below.
//!
//! * A set is applied only once it has read **the same on two polls in a row**: a writer that
//!   replaces the files one by one, or a poll that straddles a swap, never gets a mixed set
//!   tried. This costs one extra interval of latency.
//! * A set that is stable but refused (a key that does not match its certificate, a truncated
//!   PEM, another identity) is reported once on the domus's error feed and not tried again
//!   until the contents change. A read error (a file missing, unreadable, too large) is
//!   reported once until it changes or a read succeeds, and retried every interval.
//! * Reads run on tokio's blocking pool under a deadline ([`READ_DEADLINE`]); at most one read
//!   is outstanding, so a stalled filesystem cannot pile up threads.
//! * Changes are detected by hashing the bytes (std's `DefaultHasher`; the files are small).
//!   The bytes themselves are held in zeroizing buffers for one poll only.
//!
//! This module must not apply a set it has not read twice unchanged, must not report the same
//! failure twice in a row, must not block the runtime on file IO, and must not touch
//! established calles (a reload only affects new handshakes). It does not use inotify or any
//! platform notification API: polling is portable and sees symlink swaps that notifications
//! on the file paths would miss.
//!
//! The watcher holds a [`WeakDomus`](crate::WeakDomus), which does not keep the domus running:
//! it stops when the domus shuts down, when the application drops its last [`Domus`], or when
//! the [`WatchHandle`] is dropped.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::task::AbortOnDropHandle;
use zeroize::Zeroizing;

use crate::a0_transport::AuthConfig;
use crate::change_tracker::{ChangeTracker, Step};
use crate::domus::Domus;
use crate::error::{Error, ErrorId};
use crate::reporting::{Event, EventReceiver, FeedItem};

/// The default poll interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest poll interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The longest poll interval accepted.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// How long one poll waits for its file reads before it reports the filesystem as stalled.
/// The read is not abandoned: the next poll waits for the same read instead of starting
/// another one.
pub const READ_DEADLINE: Duration = Duration::from_secs(10);
/// The longest file the watcher reads (certificate bundles and CRLs are far smaller).
const MAX_FILE_LEN: u64 = 4 * 1024 * 1024;

/// What to watch and how often. Build it with [`WatchConfig::new`] and the setters; checked by
/// [`validate`](Self::validate) when the watcher starts.
///
/// File names are relative to `dir`; they may not be absolute or contain `..` components, so
/// every file read lies under `dir` (symlinks inside it are followed, as a Kubernetes volume
/// needs).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchConfig {
    /// The directory holding the files (a mounted Secret volume, for example).
    pub dir: PathBuf,
    /// The CA bundle (PEM, one or more certificates). Default `ca.pem` (cert-manager and
    /// `kubernetes.io/tls` Secrets call it `ca.crt`).
    pub ca_file: PathBuf,
    /// This domus's certificate chain, leaf first (PEM). Default `cert.pem` (`tls.crt` in a
    /// `kubernetes.io/tls` Secret).
    pub cert_file: PathBuf,
    /// The private key for the leaf (PEM: PKCS#8, SEC1 or PKCS#1). Default `key.pem`
    /// (`tls.key` in a `kubernetes.io/tls` Secret).
    pub key_file: PathBuf,
    /// CRL files (PEM, `X509 CRL` sections), all required once named. Default none. When
    /// any are given, every peer certificate must be covered by a current CRL (see
    /// [`AuthConfig`]).
    pub crl_files: Vec<PathBuf>,
    /// How often the files are read. Default 1 s (a Secret update takes the kubelet far
    /// longer to propagate, and a poll is three small reads); 10 ms to 1 h. A change is
    /// applied after two polls that read it unchanged, so within about two intervals.
    pub interval: Duration,
}

impl WatchConfig {
    /// Watches `dir` for `ca.pem`, `cert.pem` and `key.pem`, every second.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ca_file: PathBuf::from("ca.pem"),
            cert_file: PathBuf::from("cert.pem"),
            key_file: PathBuf::from("key.pem"),
            crl_files: Vec::new(),
            interval: DEFAULT_INTERVAL,
        }
    }

    /// Sets the CA bundle's file name.
    pub fn ca_file(mut self, name: impl Into<PathBuf>) -> Self {
        self.ca_file = name.into();
        self
    }

    /// Sets the certificate chain's file name.
    pub fn cert_file(mut self, name: impl Into<PathBuf>) -> Self {
        self.cert_file = name.into();
        self
    }

    /// Sets the private key's file name.
    pub fn key_file(mut self, name: impl Into<PathBuf>) -> Self {
        self.key_file = name.into();
        self
    }

    /// Adds a CRL file name.
    pub fn crl_file(mut self, name: impl Into<PathBuf>) -> Self {
        self.crl_files.push(name.into());
        self
    }

    /// Sets the poll interval.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Checks the interval's range and that every file name stays inside `dir`; errors are
    /// `InvalidConfig` naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        if self.interval < MIN_INTERVAL || self.interval > MAX_INTERVAL {
            return Err(Error::invalid_config(
                "interval",
                format!(
                    "{:?} is outside {MIN_INTERVAL:?}..={MAX_INTERVAL:?}",
                    self.interval
                ),
            ));
        }
        if self.dir.as_os_str().is_empty() {
            return Err(Error::invalid_config("dir", "the directory is empty"));
        }
        check_name("ca_file", &self.ca_file)?;
        check_name("cert_file", &self.cert_file)?;
        check_name("key_file", &self.key_file)?;
        for name in &self.crl_files {
            check_name("crl_files", name)?;
        }
        Ok(())
    }
}

fn check_name(field: &str, name: &Path) -> Result<(), Error> {
    if name.as_os_str().is_empty() {
        return Err(Error::invalid_config(field, "the file name is empty"));
    }
    let inside = name
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        return Err(Error::invalid_config(
            field,
            format!(
                "{} must be a relative name inside the watched directory (no root, no `..`)",
                name.display()
            ),
        ));
    }
    Ok(())
}

/// A running watcher, from [`spawn`]. Dropping it stops the watcher.
#[derive(Debug)]
pub struct WatchHandle {
    /// Aborted when the handle is dropped.
    task: AbortOnDropHandle<()>,
}

impl WatchHandle {
    /// True once the watcher stopped on its own: the domus began shutting down or is gone.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Starts watching the files `config` names and reloading `domus`'s authentication material
/// when they change; the watcher runs until the [`WatchHandle`] is dropped, the domus begins
/// shutting down, or the application drops its last [`Domus`] clone.
///
/// The files are read once here, synchronously (they are small), and that set is taken to be
/// the material the domus runs with: it is not reloaded. If the domus was built from other
/// material, call [`Domus::reload_auth`] first. Fails with `InvalidConfig` for a bad config or
/// when called outside a tokio runtime, and with the read error (`Io`, naming the path) when a
/// file cannot be read now.
pub fn spawn(domus: &Domus, config: WatchConfig) -> Result<WatchHandle, Error> {
    config.validate()?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::invalid_config("watch", "spawn must be called from inside a tokio runtime")
    })?;
    let files = Arc::new(WatchedFiles::new(&config));
    let baseline = files.read()?.hash;
    // Subscribe before the task starts, so a shutdown that begins at once is not missed.
    let events = domus.reporting().events();
    let watcher = Watcher {
        domus: domus.downgrade(),
        name: domus.identity().to_string(),
        files,
        interval: config.interval,
        pending: None,
        tracker: ChangeTracker::new(baseline),
    };
    tracing::debug!(domus = %domus.identity(), dir = %config.dir.display(), "watching A0 material");
    Ok(WatchHandle {
        task: AbortOnDropHandle::new(runtime.spawn(watcher.run(events))),
    })
}

/// The full paths of the watched files.
struct WatchedFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    crls: Vec<PathBuf>,
}

impl fmt::Display for WatchedFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {}, {}",
            self.ca.display(),
            self.cert.display(),
            self.key.display()
        )?;
        for crl in &self.crls {
            write!(f, ", {}", crl.display())?;
        }
        Ok(())
    }
}

impl WatchedFiles {
    fn new(config: &WatchConfig) -> Self {
        Self {
            ca: config.dir.join(&config.ca_file),
            cert: config.dir.join(&config.cert_file),
            key: config.dir.join(&config.key_file),
            crls: config
                .crl_files
                .iter()
                .map(|n| config.dir.join(n))
                .collect(),
        }
    }

    /// Reads every file once (blocking; through symlinks) and hashes the set.
    fn read(&self) -> Result<MaterialSet, Error> {
        let ca = read_file(&self.ca)?;
        let cert = read_file(&self.cert)?;
        let key = read_file(&self.key)?;
        let crls = self
            .crls
            .iter()
            .map(|p| read_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        // `Hash` for a slice writes its length first, so file boundaries are part of the hash.
        let mut hasher = DefaultHasher::new();
        ca.as_slice().hash(&mut hasher);
        cert.as_slice().hash(&mut hasher);
        key.as_slice().hash(&mut hasher);
        for crl in &crls {
            crl.as_slice().hash(&mut hasher);
        }
        Ok(MaterialSet {
            ca,
            cert,
            key,
            crls,
            hash: hasher.finish(),
        })
    }
}

fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    let file = std::fs::File::open(path).map_err(|e| {
        Error::io(
            format_args!("auth watcher: cannot open {}", path.display()),
            &e,
        )
    })?;
    let mut buf = Zeroizing::new(Vec::new());
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            Error::io(
                format_args!("auth watcher: cannot read {}", path.display()),
                &e,
            )
        })?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(Error::new(
            ErrorId::InvalidAuthMaterial,
            format!(
                "auth watcher: {} is larger than {MAX_FILE_LEN} bytes; is it really key material?",
                path.display()
            ),
        ));
    }
    Ok(buf)
}

/// One poll's contents. The buffers are zeroized on drop.
struct MaterialSet {
    ca: Zeroizing<Vec<u8>>,
    cert: Zeroizing<Vec<u8>>,
    key: Zeroizing<Vec<u8>>,
    crls: Vec<Zeroizing<Vec<u8>>>,
    hash: u64,
}

impl MaterialSet {
    fn auth_config(&self) -> Result<AuthConfig, Error> {
        let mut auth = AuthConfig::from_pem(&self.ca, &self.cert, &self.key)?;
        for crl in &self.crls {
            auth = auth.with_crls_pem(crl)?;
        }
        Ok(auth)
    }
}

/// The watcher task's state; owned by the task alone.
struct Watcher {
    /// Weak: the watcher must not keep the domus running.
    domus: crate::domus::WeakDomus,
    /// The domus's identity, for logs.
    name: String,
    files: Arc<WatchedFiles>,
    interval: Duration,
    /// A read that overran [`READ_DEADLINE`]; the next poll waits for it instead of starting
    /// another, so at most one blocking read is ever outstanding.
    pending: Option<JoinHandle<Result<MaterialSet, Error>>>,
    /// Two polls agree before a set is tried; each failure is reported once.
    tracker: ChangeTracker,
}

impl Watcher {
    async fn run(mut self, mut events: EventReceiver) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick completes at once; the baseline was read by `spawn` just now.
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if self.domus.upgrade().is_none() {
                        break;
                    }
                    self.poll().await;
                }
                event = events.recv() => match event {
                    Some(FeedItem::Item(Event::ShutdownStarted)) | None => break,
                    Some(_) => {}
                },
            }
        }
        tracing::debug!(domus = %self.name, "auth watcher stopped: the domus is shutting down or gone");
    }

    async fn poll(&mut self) {
        let mut read = match self.pending.take() {
            Some(read) => read,
            None => {
                let files = self.files.clone();
                tokio::task::spawn_blocking(move || files.read())
            }
        };
        let outcome = match tokio::time::timeout(READ_DEADLINE, &mut read).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(join)) => Err(Error::new(
                ErrorId::Io,
                format!("auth watcher: the file read task failed: {join}"),
            )),
            Err(_) => {
                self.pending = Some(read);
                Err(Error::new(
                    ErrorId::Io,
                    format!(
                        "auth watcher: reading {} took longer than {READ_DEADLINE:?}; is the filesystem stalled?",
                        self.files
                    ),
                ))
            }
        };
        match outcome {
            Ok(set) => self.consider(&set),
            Err(e) => self.read_failed(e),
        }
    }

    fn read_failed(&mut self, error: Error) {
        if !self.tracker.read_failed(error.message()) {
            return;
        }
        tracing::warn!(domus = %self.name, error = %error, "auth watcher: read failed; retrying every interval");
        if let Some(domus) = self.domus.upgrade() {
            domus.reporting().recorder.error(error);
        }
    }

    fn consider(&mut self, set: &MaterialSet) {
        match self.tracker.read(set.hash) {
            Step::InForce | Step::Settling | Step::Refused => return,
            Step::Try => {}
        }
        let auth = match set.auth_config() {
            Ok(auth) => auth,
            Err(e) => {
                self.tracker.refused(set.hash);
                let e = Error::new(
                    e.id(),
                    format!("{} (watched files: {})", e.message(), self.files),
                );
                tracing::warn!(domus = %self.name, error = %e, "auth watcher: new material refused");
                if let Some(domus) = self.domus.upgrade() {
                    domus.reporting().recorder.error(e);
                }
                return;
            }
        };
        let Some(domus) = self.domus.upgrade() else {
            return;
        };
        // `reload_auth` publishes the event or the error itself.
        match domus.reload_auth(auth) {
            Ok(()) => {
                self.tracker.applied(set.hash);
                tracing::info!(domus = %self.name, files = %self.files, "auth watcher: new material in force");
            }
            Err(e) => {
                self.tracker.refused(set.hash);
                tracing::warn!(domus = %self.name, error = %e, files = %self.files, "auth watcher: new material refused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_and_file_names_are_checked() {
        let ok = WatchConfig::new("/secrets");
        assert_eq!(ok.interval, DEFAULT_INTERVAL);
        assert!(ok.validate().is_ok());
        let e = ok
            .clone()
            .interval(Duration::from_millis(9))
            .validate()
            .unwrap_err();
        assert_eq!(e.id(), ErrorId::InvalidConfig);
        assert!(e.message().starts_with("interval"), "{e}");
        assert!(
            ok.clone()
                .interval(MAX_INTERVAL + Duration::from_millis(1))
                .validate()
                .is_err()
        );
        assert!(ok.clone().interval(MIN_INTERVAL).validate().is_ok());
        assert!(ok.clone().interval(MAX_INTERVAL).validate().is_ok());
        for bad in ["/etc/key.pem", "../key.pem", "a/../../key.pem", ""] {
            let e = ok.clone().key_file(bad).validate().unwrap_err();
            assert!(e.message().starts_with("key_file"), "{bad}: {e}");
        }
        assert!(ok.clone().crl_file("/crl.pem").validate().is_err());
        assert!(ok.clone().key_file("..data/key.pem").validate().is_ok());
        assert!(WatchConfig::new("").validate().is_err());
    }
}
