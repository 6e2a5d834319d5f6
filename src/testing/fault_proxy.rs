//! A TCP proxy that injects faults between two domus (or any TCP client and server).
//!
//! [`FaultProxy::start`] listens on an ephemeral 127.0.0.1 port and relays every accepted
//! connection to one upstream address. While it runs, a test can cut every live connection
//! (a reset on both sides), cut each new connection after N client→server bytes, blackhole
//! traffic (stop forwarding; no FIN, no reset, as a dead link or a frozen host looks), refuse
//! new connections, delay every chunk, or throttle each direction to a byte rate. The faults
//! are deterministic (no randomness), so a failing test replays.
//!
//! What it must not do: it binds loopback only. It must not leak tasks: dropping the
//! [`FaultProxy`] stops accepting, resets every connection and aborts every task it spawned.
//! It must not panic on IO: an error closes that one connection. It must not wait without a
//! bound: connecting upstream has a deadline, and every other wait ends at the latest when
//! the test cuts or drops the proxy.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// How long a relay waits for the upstream to accept before closing the client.
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (for example EMFILE) so the loop cannot spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);
/// Largest chunk read (and forwarded) at once.
const CHUNK: usize = 16 * 1024;
/// The `cut_after` value meaning "no limit".
const NO_LIMIT: u64 = u64::MAX;

/// A running fault proxy; see the module docs. Dropping it closes everything.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    accept_task: JoinHandle<()>,
}

/// Controls shared between the test and the proxy's tasks. The mutex is never held across an
/// `.await`: it is only locked to clone or swap the token.
struct Shared {
    cut_after: AtomicU64,
    blackhole: AtomicBool,
    refuse: AtomicBool,
    delay_nanos: AtomicU64,
    /// Bytes per second per direction of each connection; 0 = unlimited.
    rate: AtomicU64,
    open: AtomicUsize,
    accepted: AtomicU64,
    /// The token of the connections accepted since the last `cut_all`; a child of `stop`.
    generation: Mutex<CancellationToken>,
}

impl Shared {
    fn generation(&self) -> MutexGuard<'_, CancellationToken> {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl FaultProxy {
    /// Binds 127.0.0.1:0 and relays every accepted connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            cut_after: AtomicU64::new(NO_LIMIT),
            blackhole: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            delay_nanos: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            generation: Mutex::new(stop.child_token()),
        });
        let accept = accept_loop(listener, upstream, Arc::clone(&shared), stop.clone());
        let accept_task = tokio::spawn(accept);
        Ok(FaultProxy {
            addr,
            shared,
            stop,
            accept_task,
        })
    }

    /// The address clients should connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets (RST) every connection open now, on both sides; new connections are still accepted.
    pub fn cut_all(&self) {
        let mut current = self.shared.generation();
        let old = std::mem::replace(&mut *current, self.stop.child_token());
        drop(current);
        old.cancel();
    }

    /// Connections accepted from now on are reset once `n` bytes have been forwarded
    /// client→server (counted over the whole connection). `None` disables the limit.
    pub fn cut_after_bytes(&self, n: impl Into<Option<u64>>) {
        let n = n.into().unwrap_or(NO_LIMIT);
        self.shared.cut_after.store(n, Ordering::SeqCst);
    }

    /// While on, bytes are read and discarded in both directions and a side's FIN is not
    /// passed on: connections stay open and each side sees only silence, as over a dead link
    /// (a connection one side closed meanwhile stays half-open until [`cut_all`](Self::cut_all)
    /// or the proxy is dropped).
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// While on, newly accepted connections are reset at once (never reach the upstream).
    pub fn set_refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Sleeps `delay` before forwarding each chunk, in both directions. Zero disables it.
    pub fn set_delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_nanos.store(nanos, Ordering::SeqCst);
    }

    /// Limits each direction of every connection to about `bytes_per_second` (checked per
    /// chunk forwarded); `None` removes the limit.
    pub fn set_throttle(&self, bytes_per_second: Option<u64>) {
        // 0 stores "unlimited", so a requested rate of 0 becomes the slowest one, 1 B/s.
        let rate = bytes_per_second.map_or(0, |r| r.max(1));
        self.shared.rate.store(rate, Ordering::SeqCst);
    }

    /// How many relayed connections are open now (refused ones are never counted).
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// How many connections the proxy has accepted in total, refused ones included.
    pub fn total_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Cancelling lets each relay reset its sockets; aborting the accept task drops its
        // listener and its `JoinSet`, which aborts any relay that has not finished yet.
        self.stop.cancel();
        self.accept_task.abort();
    }
}

/// Decrements `Shared::open` when its relay ends, even by abort (the accept loop increments).
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // Owning the relays here means dropping this task (on abort) aborts all of them.
    let mut relays = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if shared.refuse.load(Ordering::SeqCst) {
                    reset(&client);
                    continue;
                }
                let cut = shared.generation().clone();
                shared.open.fetch_add(1, Ordering::SeqCst);
                let open = OpenGuard(Arc::clone(&shared));
                relays.spawn(relay(client, upstream, open, cut));
            }
        }
    }
}

/// Relays one connection until both directions end cleanly (then closes normally), or until a
/// cut, a byte limit or an IO error (then resets both sockets).
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    open: OpenGuard,
    cut: CancellationToken,
) {
    let shared = &open.0;
    let connect = tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(upstream));
    let mut server = tokio::select! {
        _ = cut.cancelled() => return reset(&client),
        connected = connect => match connected {
            Ok(Ok(server)) => server,
            Ok(Err(_)) | Err(_) => return reset(&client),
        },
    };
    let limit = shared.cut_after.load(Ordering::SeqCst);
    let clean = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let both_ways = async {
            tokio::try_join!(
                pump(client_read, server_write, shared, limit),
                pump(server_read, client_write, shared, NO_LIMIT),
            )
        };
        tokio::select! {
            _ = cut.cancelled() => false,
            ended = both_ways => ended.is_ok(),
        }
    };
    if !clean {
        reset(&client);
        reset(&server);
    }
}

/// Copies `from` to `to` chunk by chunk, applying the live faults. Ok at EOF (after passing
/// the half-close on); Err on an IO error or once `limit` bytes have been forwarded.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    shared: &Shared,
    limit: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut forwarded = 0u64;
    loop {
        if forwarded >= limit {
            return Err(io::Error::other("fault proxy byte limit reached"));
        }
        let n = from.read(&mut buf).await?;
        if n == 0 {
            if shared.blackhole.load(Ordering::SeqCst) {
                // A dark link carries no FIN either: the other side learns nothing until
                // the test cuts or drops the proxy.
                std::future::pending::<()>().await;
            }
            return to.shutdown().await;
        }
        if shared.blackhole.load(Ordering::SeqCst) {
            continue;
        }
        let delay = Duration::from_nanos(shared.delay_nanos.load(Ordering::SeqCst));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let left = limit.saturating_sub(forwarded);
        let allowed = usize::try_from(left).map_or(n, |left| left.min(n));
        to.write_all(buf.get(..allowed).unwrap_or_default()).await?;
        forwarded = forwarded.saturating_add(allowed as u64);
        let rate = shared.rate.load(Ordering::SeqCst);
        if rate > 0 {
            // The chunk just forwarded takes its share of the second before the next read.
            tokio::time::sleep(Duration::from_secs_f64(allowed as f64 / rate as f64)).await;
        }
    }
}

/// Makes the coming drop send a TCP RST instead of a FIN; if that fails, the drop still closes.
fn reset(stream: &TcpStream) {
    // A zero linger never blocks on drop, which is what the deprecation warns about.
    // `set_zero_linger` would say the same but needs tokio 1.50; Cargo.toml allows 1.45.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}
