//! The PEM directory watcher (feature `watch`) against a real domus, with files laid out the
//! way a Kubernetes Secret volume lays them out: `ca.pem -> ..data/ca.pem`, and `..data` a
//! symlink to a timestamped directory that is swapped with an atomic rename.
#![cfg(feature = "watch")]

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vicus::a0_transport::{CertFingerprint, Transport};
use vicus::dev_certs::{DevCa, DevLeaf};
use vicus::reporting::{Event, EventReceiver, FeedItem};
use vicus::watch::{self, WatchConfig};
use vicus::{Domus, ErrorId};

const INTERVAL: Duration = Duration::from_millis(20);
/// Long enough for many polls: what must not happen has had every chance to.
const QUIET: Duration = Duration::from_millis(400);

/// A Secret-volume-like directory.
struct Volume {
    dir: TempDir,
    generation: u32,
}

impl Volume {
    /// `..2026_1` holds the files, `..data -> ..2026_1`, and each name links through `..data`.
    fn new(ca: &str, cert: &str, key: &str) -> Self {
        let mut v = Self {
            dir: tempdir(),
            generation: 0,
        };
        let first = v.write_generation(ca, cert, key);
        symlink(&first, v.dir.join("..data")).expect("..data link");
        for name in ["ca.pem", "cert.pem", "key.pem"] {
            symlink(Path::new("..data").join(name), v.dir.join(name)).expect("file link");
        }
        v
    }

    fn write_generation(&mut self, ca: &str, cert: &str, key: &str) -> String {
        self.generation += 1;
        let name = format!("..2026_{}", self.generation);
        let dir = self.dir.join(&name);
        std::fs::create_dir(&dir).expect("generation dir");
        std::fs::write(dir.join("ca.pem"), ca).expect("write ca");
        std::fs::write(dir.join("cert.pem"), cert).expect("write cert");
        std::fs::write(dir.join("key.pem"), key).expect("write key");
        name
    }

    /// Publishes a new generation the way the kubelet does: a new directory, a temporary
    /// `..data_tmp` link to it, renamed over `..data` in one step.
    fn swap(&mut self, ca: &str, cert: &str, key: &str) {
        let name = self.write_generation(ca, cert, key);
        let tmp = self.dir.join("..data_tmp");
        symlink(&name, &tmp).expect("tmp link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("atomic swap");
    }

    fn auth(&self) -> vicus::AuthConfig {
        vicus::AuthConfig::from_pem_files(
            self.dir.join("ca.pem"),
            self.dir.join("cert.pem"),
            self.dir.join("key.pem"),
        )
        .expect("auth from the volume")
    }

    fn config(&self) -> WatchConfig {
        WatchConfig::new(self.dir.to_path_buf()).interval(INTERVAL)
    }
}

/// A CA, a domus "b" built from a volume, and a probe transport that dials it.
struct Setup {
    ca: DevCa,
    volume: Volume,
    domus: Domus,
    probe: Transport,
}

async fn setup() -> Setup {
    let mut ca = ca();
    let leaf = ca.leaf("b").expect("mint");
    let volume = Volume::new(ca.cert_pem(), leaf.cert_pem(), leaf.key_pem());
    let domus = Domus::builder(volume.auth())
        .build()
        .await
        .expect("build domus");
    let probe = transport(&mut ca, "probe");
    Setup {
        ca,
        volume,
        domus,
        probe,
    }
}

impl Setup {
    /// The fingerprint of the certificate a fresh handshake to the domus presents.
    async fn served(&self) -> CertFingerprint {
        let stream = self
            .probe
            .dial(&addr_of(&self.domus), Some(self.domus.identity()))
            .await
            .expect("probe handshake");
        stream.peer().fingerprint()
    }

    fn leaf(&mut self) -> DevLeaf {
        self.ca.leaf("b").expect("mint")
    }
}

/// Waits up to 10 s for `AuthReloaded`.
async fn reloaded(events: &mut EventReceiver) -> bool {
    let wait = async {
        while let Some(item) = events.recv().await {
            if item == FeedItem::Item(Event::AuthReloaded) {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or(false)
}

/// True if no `AuthReloaded` arrives within [`QUIET`].
async fn no_reload_within_quiet(events: &mut EventReceiver) -> bool {
    let until = Instant::now() + QUIET;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Err(_) => return true,
            Ok(Some(FeedItem::Item(Event::AuthReloaded))) => return false,
            Ok(Some(_)) => {}
            Ok(None) => return true,
        }
    }
}

/// Waits up to 10 s for the domus's error feed to hold at least one error, then [`QUIET`]
/// more so repeats would have arrived; returns every error kept.
async fn errors_after_quiet(domus: &Domus) -> Vec<vicus::reporting::SequencedError> {
    let until = Instant::now() + Duration::from_secs(10);
    while domus.reporting().last_error_seq() == 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(QUIET).await;
    domus.reporting().errors_since(0, 100).errors
}

/// True if an `AuthReloaded` is waiting in `events`.
fn reload_seen(events: &mut EventReceiver) -> bool {
    let mut seen = false;
    while let Some(item) = events.try_recv() {
        seen |= item == FeedItem::Item(Event::AuthReloaded);
    }
    seen
}

#[tokio::test]
async fn replacing_the_pem_files_through_a_symlink_swap_triggers_a_reload() {
    within(async {
        let mut s = setup().await;
        let before = s.served().await;
        let _watch = watch::spawn(&s.domus, s.volume.config()).expect("spawn watcher");
        let mut events = s.domus.reporting().events();
        let next = s.leaf();
        let ca_pem = s.ca.cert_pem().to_owned();
        s.volume.swap(&ca_pem, next.cert_pem(), next.key_pem());
        assert!(reloaded(&mut events).await, "an AuthReloaded event");
        let after = s.served().await;
        assert_ne!(
            after, before,
            "a new handshake presents the new certificate"
        );
        assert_eq!(
            s.domus.reporting().errors_since(0, 100).errors,
            vec![],
            "an atomic swap reports nothing"
        );
    })
    .await;
}

#[tokio::test]
async fn a_half_written_set_is_not_applied_and_is_reported_once() {
    within(async {
        let mut s = setup().await;
        let before = s.served().await;
        let old_cert = std::fs::read_to_string(s.volume.dir.join("cert.pem")).expect("read");
        let _watch = watch::spawn(&s.domus, s.volume.config()).expect("spawn watcher");
        let mut events = s.domus.reporting().events();
        let ca_pem = s.ca.cert_pem().to_owned();
        let next = s.leaf();
        // The key is new, the certificate is not yet: they do not match.
        s.volume.swap(&ca_pem, &old_cert, next.key_pem());
        let errors = errors_after_quiet(&s.domus).await;
        assert!(!reload_seen(&mut events), "not applied");
        assert_eq!(errors.len(), 1, "reported once, not every poll: {errors:?}");
        assert_eq!(
            errors[0].error.id(),
            ErrorId::InvalidAuthMaterial,
            "{errors:?}"
        );
        assert_eq!(
            s.served().await,
            before,
            "the old certificate is still served"
        );
        // The certificate arrives: the complete set is applied.
        s.volume.swap(&ca_pem, next.cert_pem(), next.key_pem());
        assert!(reloaded(&mut events).await, "the complete set is applied");
        assert_ne!(s.served().await, before, "the new certificate is served");
        assert_eq!(s.domus.reporting().errors_since(0, 100).errors.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_missing_file_is_reported_once_and_retried_until_it_returns() {
    within(async {
        let mut s = setup().await;
        let before = s.served().await;
        let _watch = watch::spawn(&s.domus, s.volume.config()).expect("spawn watcher");
        let mut events = s.domus.reporting().events();
        std::fs::remove_file(s.volume.dir.join("..data")).expect("remove ..data");
        let errors = errors_after_quiet(&s.domus).await;
        assert!(!reload_seen(&mut events));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].error.id(), ErrorId::Io, "{errors:?}");
        assert!(
            errors[0].error.message().contains("ca.pem"),
            "names the file: {errors:?}"
        );
        // The swap recreates `..data` with new material.
        let ca_pem = s.ca.cert_pem().to_owned();
        let next = s.leaf();
        s.volume.swap(&ca_pem, next.cert_pem(), next.key_pem());
        assert!(reloaded(&mut events).await);
        assert_ne!(s.served().await, before);
        assert_eq!(s.domus.reporting().errors_since(0, 100).errors.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn dropping_the_handle_stops_the_watcher() {
    within(async {
        let mut s = setup().await;
        let before = s.served().await;
        let handle = watch::spawn(&s.domus, s.volume.config()).expect("spawn watcher");
        let mut events = s.domus.reporting().events();
        drop(handle);
        let ca_pem = s.ca.cert_pem().to_owned();
        let next = s.leaf();
        s.volume.swap(&ca_pem, next.cert_pem(), next.key_pem());
        assert!(no_reload_within_quiet(&mut events).await, "nothing watches");
        assert_eq!(s.served().await, before);
    })
    .await;
}

#[tokio::test]
async fn the_watcher_stops_when_the_domus_shuts_down() {
    within(async {
        let s = setup().await;
        let handle = watch::spawn(&s.domus, s.volume.config()).expect("spawn watcher");
        assert!(!handle.is_finished());
        s.domus.shutdown().await;
        let until = Instant::now() + Duration::from_secs(5);
        while !handle.is_finished() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(handle.is_finished(), "the watcher ends with the domus");
    })
    .await;
}

#[tokio::test]
async fn dropping_the_last_domus_clone_stops_the_watcher_and_the_domus() {
    within(async {
        let s = setup().await;
        let handle = watch::spawn(&s.domus, s.volume.config()).expect("spawn watcher");
        let weak = s.domus.downgrade();
        let addr = addr_of(&s.domus);
        let Setup {
            domus,
            volume,
            probe,
            ..
        } = s;
        // The watcher holds no strong handle: this drop stops the domus.
        drop(domus);
        let until = Instant::now() + Duration::from_secs(5);
        while !handle.is_finished() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            handle.is_finished(),
            "the watcher ends when the domus is gone"
        );
        assert!(weak.upgrade().is_none(), "nothing keeps the domus alive");
        let refused = tokio::time::timeout(Duration::from_secs(5), probe.dial(&addr, None)).await;
        assert!(
            !matches!(refused, Ok(Ok(_))),
            "the stopped domus no longer accepts calles"
        );
        drop(volume);
    })
    .await;
}

#[tokio::test]
async fn bad_configs_and_unreadable_files_are_refused_at_spawn() {
    within(async {
        let s = setup().await;
        let e = watch::spawn(
            &s.domus,
            s.volume.config().interval(Duration::from_millis(1)),
        )
        .expect_err("interval too short");
        assert_eq!(e.id(), ErrorId::InvalidConfig, "{e}");
        let e = watch::spawn(&s.domus, s.volume.config().key_file("/etc/shadow"))
            .expect_err("absolute name");
        assert_eq!(e.id(), ErrorId::InvalidConfig, "{e}");
        let e = watch::spawn(&s.domus, s.volume.config().cert_file("tls.crt"))
            .expect_err("no such file");
        assert_eq!(e.id(), ErrorId::Io, "{e}");
        assert!(e.message().contains("tls.crt"), "{e}");
        let e = watch::spawn(&s.domus, s.volume.config().crl_file("crl.pem"))
            .expect_err("a named CRL file is required");
        assert!(e.message().contains("crl.pem"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn a_leaf_signed_by_a_ca_the_volume_does_not_trust_is_reported_once_and_not_applied() {
    within(async {
        let s = setup().await;
        let before = s.served().await;
        let _watch = watch::spawn(&s.domus, s.volume.config()).expect("spawn watcher");
        let mut events = s.domus.reporting().events();
        // The right identity, the right key for it, but signed by another CA.
        let mut other = ca_named("another CA");
        let stranger = other.leaf("b").expect("mint");
        let ca_pem = s.ca.cert_pem().to_owned();
        let mut volume = s.volume;
        volume.swap(&ca_pem, stranger.cert_pem(), stranger.key_pem());
        let errors = errors_after_quiet(&s.domus).await;
        assert!(!reload_seen(&mut events), "not applied");
        assert_eq!(errors.len(), 1, "reported once: {errors:?}");
        assert_eq!(errors[0].error.id(), ErrorId::InvalidAuthMaterial);
        assert!(
            errors[0].error.message().contains("trust anchors"),
            "{errors:?}"
        );
        let probe = s.probe;
        let stream = probe
            .dial(&addr_of(&s.domus), Some(s.domus.identity()))
            .await
            .expect("the old certificate still serves");
        assert_eq!(stream.peer().fingerprint(), before);
    })
    .await;
}
