//! The driver core both callis kinds share: [`CallisIo`] owns one authenticated stream with
//! its write buffer and moves bytes in and out within a budget, counting every byte; [`Dialer`]
//! dials a peer's address and spaces failed dials by the pure
//! [`Backoff`](crate::a1_callis::link::Backoff). The peer driver and the blob driver add only
//! what is their own (the session or the blob streams that fill and drain the buffers).
//!
//! Nothing here awaits: every method is a `poll_*` step a driver's `Future::poll` calls, and
//! every wait is the socket, the dial or the backoff timer, each of which registers the
//! driver's waker.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};

use crate::a0_transport::{AuthenticatedStream, DomusAddr, DomusId, Transport};
use crate::a1_callis::link::{Backoff, Dialler};
use crate::error::Error;
use crate::reporting::{Counter, PeerCells, Recorder};

/// Which counters a callis's bytes go to.
#[derive(Clone, Copy)]
pub(crate) struct ByteCounters {
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
}

/// Where a callis's bytes are counted: the domus totals and the peer's own figures.
#[derive(Clone)]
pub(crate) struct Counting {
    pub(crate) recorder: Arc<Recorder>,
    pub(crate) cells: Arc<PeerCells>,
    pub(crate) counters: ByteCounters,
}

impl Counting {
    /// Counts `n` bytes read from the callis.
    pub(crate) fn read(&self, n: usize) {
        self.recorder.add(self.counters.bytes_in, n as u64);
        self.cells.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn written(&self, n: usize) {
        self.recorder.add(self.counters.bytes_out, n as u64);
        self.cells.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What a read or write step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    /// Bytes moved.
    pub(crate) progressed: bool,
    /// The callis still works (false: EOF, a write of zero, or an IO error).
    pub(crate) alive: bool,
    /// The step used its whole budget; more may be waiting.
    pub(crate) full: bool,
}

impl Step {
    /// No callis: nothing moved, nothing ended.
    pub(crate) const IDLE: Step = Step {
        progressed: false,
        alive: true,
        full: false,
    };

    const ENDED: Step = Step {
        progressed: true,
        alive: false,
        full: false,
    };
}

/// Where read bytes go, and what happens after each read.
pub(crate) trait ReadSink {
    /// The buffer the next read appends to.
    fn buf(&mut self) -> &mut BytesMut;
    /// Handles what was just read; false stops reading for this step.
    fn after_read(&mut self) -> bool;
}

/// One authenticated callis: the stream, the bytes waiting to be written, and the counters
/// its bytes go to. Whatever is ready is written in as few writes as possible (many frames
/// per TLS record).
pub(crate) struct CallisIo {
    io: AuthenticatedStream,
    wbuf: BytesMut,
    wpos: usize,
    flushed: bool,
    counting: Counting,
}

/// The smallest read buffer a callis starts from.
pub(crate) const MIN_READ_RESERVE: usize = 4096;

impl CallisIo {
    pub(crate) fn new(io: AuthenticatedStream, wbuf: BytesMut, counting: Counting) -> Self {
        let flushed = wbuf.is_empty();
        Self {
            io,
            wbuf,
            wpos: 0,
            flushed,
            counting,
        }
    }

    /// The authenticated stream.
    pub(crate) fn stream(&self) -> &AuthenticatedStream {
        &self.io
    }

    /// Who dialled this callis.
    pub(crate) fn dialler(&self) -> Dialler {
        dialler_of(&self.io)
    }

    /// Appends frames to the write buffer (after what is already waiting).
    pub(crate) fn queue(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        encode(&mut self.wbuf);
        self.flushed = false;
    }

    /// Gives back the write buffer when everything in it went out (it grows again on the
    /// next write): a quiet callis holds no buffer of its own.
    pub(crate) fn release_idle_buffers(&mut self) {
        if self.wpos >= self.wbuf.len() && self.wbuf.capacity() > 0 {
            self.wbuf = BytesMut::new();
            self.wpos = 0;
        }
    }

    /// Whether everything queued has been written and flushed.
    pub(crate) fn is_drained(&self) -> bool {
        self.wpos >= self.wbuf.len() && self.flushed
    }

    /// Reads into `sink` until the socket has nothing more, `budget` bytes were read, or the
    /// sink says stop. `reserve_below` / `reserve`: the buffer grows when less than
    /// `reserve_below` (or half its size, for a small one) is free, by its own size (at least
    /// [`MIN_READ_RESERVE`], at most `reserve`): an idle callis reads into a few KiB, a busy
    /// one reaches full-size reads within a few reads. Each read is limited to what is left
    /// of the budget.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        sink: &mut impl ReadSink,
        budget: usize,
        (reserve_below, reserve): (usize, usize),
    ) -> Step {
        let mut read = 0usize;
        let mut progressed = false;
        while read < budget {
            let buf = sink.buf();
            let free = buf.capacity().saturating_sub(buf.len());
            if free == 0 || free < reserve_below.min(buf.capacity() / 2) {
                buf.reserve(
                    buf.capacity()
                        .clamp(MIN_READ_RESERVE, reserve.max(MIN_READ_RESERVE)),
                );
            }
            let mut room = buf.limit(budget.saturating_sub(read));
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut room) {
                Poll::Ready(Ok(0)) => return Step::ENDED,
                Poll::Ready(Ok(n)) => {
                    read = read.saturating_add(n);
                    progressed = true;
                    self.counting.read(n);
                    if !sink.after_read() {
                        break;
                    }
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(peer = %self.io.peer().id(), error = %e, "callis read failed");
                    return Step::ENDED;
                }
                Poll::Pending => {
                    return Step {
                        progressed,
                        alive: true,
                        full: false,
                    };
                }
            }
        }
        Step {
            progressed,
            alive: true,
            full: read >= budget,
        }
    }

    /// Writes what is queued, refilling the buffer from `fill` (which appends frames and says
    /// whether it did) once it is written, until the socket is full, nothing is left, or
    /// `budget` bytes went out; then flushes.
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        budget: usize,
        mut fill: impl FnMut(&mut BytesMut) -> bool,
    ) -> Step {
        let mut progressed = false;
        let mut written = 0usize;
        let mut full = false;
        loop {
            if written >= budget {
                full = true;
                break;
            }
            if self.wpos >= self.wbuf.len() {
                self.wbuf.clear();
                self.wpos = 0;
                if !fill(&mut self.wbuf) {
                    break;
                }
                self.flushed = false;
            }
            let end = self
                .wbuf
                .len()
                .min(self.wpos.saturating_add(budget.saturating_sub(written)));
            let Some(chunk) = self.wbuf.get(self.wpos..end) else {
                break;
            };
            match Pin::new(&mut self.io).poll_write(cx, chunk) {
                Poll::Ready(Ok(0)) => return Step::ENDED,
                Poll::Ready(Ok(n)) => {
                    self.wpos = self.wpos.saturating_add(n);
                    written = written.saturating_add(n);
                    progressed = true;
                    self.counting.written(n);
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(peer = %self.io.peer().id(), error = %e, "callis write failed");
                    return Step::ENDED;
                }
                Poll::Pending => {
                    return Step {
                        progressed,
                        alive: true,
                        full: false,
                    };
                }
            }
        }
        if !self.flushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flushed = true,
                Poll::Ready(Err(_)) => return Step::ENDED,
                Poll::Pending => {}
            }
        }
        Step {
            progressed,
            alive: true,
            full,
        }
    }
}

/// Who dialled `io`.
pub(crate) fn dialler_of(io: &AuthenticatedStream) -> Dialler {
    if io.is_dialer() {
        Dialler::Us
    } else {
        Dialler::Peer
    }
}

type DialFuture = Pin<Box<dyn Future<Output = Result<AuthenticatedStream, Error>> + Send>>;

/// Dials one peer at its current address, one dial at a time, spaced by the link policy's
/// backoff after failures.
pub(crate) struct Dialer {
    peer: DomusId,
    addr: Option<DomusAddr>,
    transport: Transport,
    recorder: Arc<Recorder>,
    dial: Option<DialFuture>,
    backoff: Backoff,
    /// Fires when the backoff's wait ends; armed only while one is in force.
    wake: Option<Pin<Box<Sleep>>>,
}

impl Dialer {
    pub(crate) fn new(
        peer: DomusId,
        addr: Option<DomusAddr>,
        transport: Transport,
        recorder: Arc<Recorder>,
        backoff: Backoff,
    ) -> Self {
        Self {
            peer,
            addr,
            transport,
            recorder,
            dial: None,
            backoff,
            wake: None,
        }
    }

    /// The address dials go to (a running dial's too: a new address abandons it).
    pub(crate) fn addr(&self) -> Option<&DomusAddr> {
        self.addr.as_ref()
    }

    /// A dial is running.
    pub(crate) fn is_dialling(&self) -> bool {
        self.dial.is_some()
    }

    /// The last dial failed and its backoff wait is still in force.
    pub(crate) fn is_waiting(&self) -> bool {
        self.wake.is_some()
    }

    /// Neither dialling nor waiting: a dial may start now.
    pub(crate) fn is_idle(&self) -> bool {
        self.dial.is_none() && self.wake.is_none()
    }

    /// Starts a dial to the current address (when one is known), expecting the peer's id.
    pub(crate) fn start(&mut self) {
        let Some(addr) = self.addr.clone() else {
            return;
        };
        let transport = self.transport.clone();
        let expected = self.peer.clone();
        self.recorder.inc(Counter::dial_attempts);
        self.dial = Some(Box::pin(async move {
            transport.dial(&addr, Some(&expected)).await
        }));
    }

    /// Stops dialling and waiting (shutdown).
    pub(crate) fn stop(&mut self) {
        self.dial = None;
        self.wake = None;
    }

    /// A callis opened: the backoff starts from its minimum again.
    pub(crate) fn connected(&mut self) {
        self.backoff.succeeded();
        self.wake = None;
    }

    /// Ends a backoff wait at once (a callis arrived from the peer).
    pub(crate) fn end_wait(&mut self) {
        self.backoff.expire();
        self.wake = None;
    }

    /// The route now gives `addr`: a dial still running to the old address is abandoned
    /// (and started again at the new one), and the failures at the old address are
    /// forgotten. Returns whether the address changed.
    pub(crate) fn set_addr(&mut self, addr: DomusAddr) -> bool {
        if self.addr.as_ref() == Some(&addr) {
            return false;
        }
        self.addr = Some(addr);
        self.backoff.reset();
        self.wake = None;
        if self.dial.take().is_some() {
            tracing::debug!(peer = %self.peer, "route changed; dialling the new address");
            self.start();
        }
        true
    }

    /// Polls the backoff wait; true when it just ended (a dial may start now).
    pub(crate) fn poll_wait(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(wake) = self.wake.as_mut() else {
            return false;
        };
        if wake.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.wake = None;
        self.backoff.expire();
        true
    }

    /// Polls the running dial; a failure has been counted and its backoff started when this
    /// returns it. Call it after deciding whether to start a dial, so a new one is polled
    /// (and registers its waker) at once.
    pub(crate) fn poll_dial(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<AuthenticatedStream, Error>> {
        let Some(dial) = self.dial.as_mut() else {
            return Poll::Pending;
        };
        let Poll::Ready(result) = dial.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        self.dial = None;
        if result.is_err() {
            self.recorder.inc(Counter::dial_failures);
            let now = Instant::now();
            let until = self.backoff.failed(now.into_std(), super::rand_u64());
            let mut wake = Box::pin(tokio::time::sleep_until(Instant::from_std(until)));
            // Registers the waker now: the caller may not poll again before it fires.
            let _ = wake.as_mut().poll(cx);
            self.wake = Some(wake);
        }
        Poll::Ready(result)
    }
}

/// A timer that follows the instant a pure state machine asks for (its `poll_timeout`): reset
/// only when that instant changes, armed only while there is one.
pub(crate) struct Alarm {
    sleep: Pin<Box<Sleep>>,
    at: Option<Instant>,
}

impl Alarm {
    pub(crate) fn new() -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now())),
            at: None,
        }
    }

    /// Follows `wanted`; true when it has passed (the alarm is then disarmed until `wanted`
    /// changes or is asked for again).
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        wanted: Option<std::time::Instant>,
    ) -> bool {
        let wanted = wanted.map(Instant::from_std);
        if wanted != self.at {
            self.at = wanted;
            if let Some(at) = wanted {
                self.sleep.as_mut().reset(at);
            }
        }
        if self.at.is_some() && self.sleep.as_mut().poll(cx).is_ready() {
            self.at = None;
            return true;
        }
        false
    }
}

/// The tokio clock as the pure layer takes it.
pub(crate) fn now() -> std::time::Instant {
    Instant::now().into_std()
}
