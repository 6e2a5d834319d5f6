//! Unix-socket specifics: binding a socket path safely, and reading the peer's kernel
//! credentials.
//!
//! Binding never deletes anything it did not prove to be a dead socket: a path that holds a
//! socket nobody listens on (and that belongs to our uid) is replaced; a live socket, a regular
//! file, a directory or a symlink (even one pointing at a socket) is an error and stays as it is.
//! The socket is chmod-ed to the configured mode right after `bind`; put it in a directory only
//! this user can write to (mode 0700) to close the window between the two calls.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use super::identity::UnixCredentials;
use crate::error::{Error, ErrorId};

/// Binds a Unix listener with `backlog` at `path`, replacing only a stale socket of ours.
pub(crate) fn bind(
    path: &Path,
    mode: u32,
    backlog: u32,
) -> Result<(UnixListener, SocketFileGuard), Error> {
    clear_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => in_use(path),
        _ => Error::io(
            format_args!("cannot bind Unix socket {}", path.display()),
            &e,
        ),
    })?;
    // The standard library listens with a fixed backlog; listening again sets ours.
    rustix::net::listen(&listener, i32::try_from(backlog).unwrap_or(i32::MAX)).map_err(|e| {
        Error::io(
            format_args!("cannot listen on Unix socket {}", path.display()),
            &io::Error::from(e),
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        Error::io(
            format_args!("cannot chmod {:o} {}", mode, path.display()),
            &e,
        )
    })?;
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| Error::io(format_args!("cannot stat {}", path.display()), &e))?;
    Ok((
        listener,
        SocketFileGuard {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

fn in_use(path: &Path) -> Error {
    Error::new(
        ErrorId::SocketPathInUse,
        format!(
            "{} is in use: another process is listening on it",
            path.display()
        ),
    )
}

fn clear_stale_socket(path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::io(
                format_args!("cannot stat {}", path.display()),
                &e,
            ));
        }
    };
    let occupied = |what: &str| {
        Error::new(
            ErrorId::SocketPathOccupied,
            format!(
                "{} already exists and is {what}; vicus only replaces a stale socket of its own user, so remove it yourself or choose another path",
                path.display()
            ),
        )
    };
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        return Err(occupied("a symbolic link"));
    }
    if !file_type.is_socket() {
        return Err(occupied("not a socket"));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(occupied("a socket owned by another user"));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(in_use(path)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| {
                Error::io(
                    format_args!("cannot remove stale socket {}", path.display()),
                    &e,
                )
            })?;
            tracing::debug!(path = %path.display(), "replaced a stale Unix socket");
            Ok(())
        }
        Err(e) => Err(Error::io(
            format_args!("cannot tell whether {} is still in use", path.display()),
            &e,
        )),
    }
}

/// Removes the socket file when the listener goes away — only if the path still names the
/// socket this listener created.
#[derive(Debug)]
pub(crate) struct SocketFileGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && meta.dev() == self.dev
            && meta.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The kernel's credentials for the peer of `stream`.
pub(crate) fn peer_credentials(stream: &UnixStream) -> Result<UnixCredentials, Error> {
    let cred = stream
        .peer_cred()
        .map_err(|e| Error::io("cannot read the Unix peer's credentials", &e))?;
    Ok(UnixCredentials {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// Connects to a Unix socket path.
pub(crate) async fn connect(path: &Path) -> Result<UnixStream, Error> {
    UnixStream::connect(path).await.map_err(|e| {
        Error::new(
            ErrorId::ConnectFailed,
            format!("cannot connect to unix:{}: {e}", path.display()),
        )
    })
}
