//! The topic service on a running domus: [`Topics::start`] registers the reserved taberna
//! [`TOPICS_TABERNA`] and runs both roles of publish/subscribe (`../shared/DESIGN.md` §11).
//!
//! * **Subscriber.** [`Topics::subscribe`] keeps a bounded inbox for a pattern and announces it
//!   (SUBSCRIBE) to the domus that may publish: the peers this domus has a session with, the
//!   publishers named in [`TopicsConfig::publishers`], and this domus itself. It renews the
//!   announcement every third of its lease, announces again to a peer that connects (or
//!   restarts), and withdraws it (UNSUBSCRIBE) when the last [`Subscription`] for the
//!   pattern is dropped. Each arriving copy (PUBLISH) is checked against the policy (may its
//!   publisher publish to this topic?) and handed to the oldest local subscription whose
//!   pattern matches; that subscription's [`TopicMessage`] answers it.
//! * **Publisher.** An announcement is checked against the policy (may this identity
//!   subscribe to the pattern?) and entered in the [`Membership`] table before it is
//!   answered: the answer (the grant) is the point from which every publish of this domus
//!   reaches the subscriber. [`Topics::publish`] sends one acknowledged message per
//!   subscriber known at that moment, through a per-subscriber lane that keeps the
//!   publisher's order and a window of copies in flight, and gathers a [`PublishReport`].
//!
//! Each copy is an ordinary message on the session: exactly once per subscriber, replayed
//! across cuts, deduplicated, with the send's deadline. A subscriber that falls behind (its
//! lane full, or a copy waiting longer than the topic's [`SlowSubscriber`] allows) has that
//! copy failed with [`ErrorId::SubscriberTooSlow`] — or, if the topic's policy says so, its
//! subscriptions dropped — and never holds back the others.
//!
//! Must not: trust a field for the subscriber's or publisher's identity (both are the verified
//! peer of the message), grow a table past its bound, hold a lock across an `.await`, or wait
//! without a deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::membership::{Membership, MembershipLimits, Refused};
use super::name::{Topic, TopicPattern};
use super::policy::TopicPolicy;
use super::wire::{
    Announcement, Grants, MAX_LEASE, MAX_PATTERNS, PUBLISH_TYPE, Publication, SUBSCRIBE_TYPE,
    UNSUBSCRIBE_TYPE, Verdict,
};
use crate::TabernaRequest;
use crate::a0_transport::{DomusId, PeerIdentity};
use crate::a1_callis::headers::{Headers, TraceContext};
use crate::domus::Reply;
use crate::domus::{Delivery, Destination, Domus, SendOptions};
use crate::error::{Error, ErrorId};
use crate::reporting::{Event, FeedItem};
use crate::taberna::{MessageClass, MessageType, Taberna, TabernaId, TabernaOptions};

/// The taberna the topic service answers on.
pub const TOPICS_TABERNA: TabernaId = TabernaId(crate::domus::RESERVED_TABERNA_BASE + 2);

/// Reject codes from this one up are the topic service's own (a [`TopicMessage::reject`]
/// with one is sent as [`MAX_APPLICATION_REJECT_CODE`]).
pub const SERVICE_REJECT_CODES: u32 = 0xFFFF_FF00;
/// The highest reject code a subscriber's handler can send.
pub const MAX_APPLICATION_REJECT_CODE: u32 = SERVICE_REJECT_CODES - 1;

/// The service's reject codes, mapped to errors in one place ([`service_rejection`]).
const REJECT_MALFORMED: u32 = SERVICE_REJECT_CODES + 1;
const REJECT_FORBIDDEN: u32 = SERVICE_REJECT_CODES + 2;
const REJECT_NOT_SUBSCRIBED: u32 = SERVICE_REJECT_CODES + 3;
const REJECT_INBOX_FULL: u32 = SERVICE_REJECT_CODES + 4;

/// The most local subscriptions one domus holds at once.
pub const MAX_LOCAL_SUBSCRIPTIONS: usize = 4096;

/// What a publisher does about a subscriber that falls behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlowSubscriber {
    /// Fail a copy that waited `after` in the subscriber's lane (or found the lane full) with
    /// [`ErrorId::SubscriberTooSlow`]; the subscriber keeps its subscriptions and gets the
    /// copies after it. The default, with 5 s.
    FailCopy {
        /// How long a copy may wait for the subscriber's window.
        after: Duration,
    },
    /// As `FailCopy`, and also drop every subscription of that subscriber on this publisher:
    /// it gets nothing more until it announces again (its next renewal, at most a third of a
    /// lease later), so it never sees a gap it does not know about.
    DropSubscriber {
        /// How long a copy may wait for the subscriber's window.
        after: Duration,
    },
}

impl SlowSubscriber {
    fn after(self) -> Duration {
        match self {
            Self::FailCopy { after } | Self::DropSubscriber { after } => after,
        }
    }
}

impl Default for SlowSubscriber {
    fn default() -> Self {
        Self::FailCopy {
            after: Duration::from_secs(5),
        }
    }
}

/// How a domus runs the topic service.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TopicsConfig {
    /// Who may publish and subscribe to what (checked on both sides). Default
    /// [`TopicPolicy::open`]: every peer this domus authenticated, like a taberna without an
    /// allow-list.
    pub policy: TopicPolicy,
    /// The publisher's table: bounds and the longest lease it grants.
    pub limits: MembershipLimits,
    /// The lease this domus asks for its subscriptions (renewed every third of it); default
    /// 30 s, at most 1 h.
    pub lease: Duration,
    /// Publishers to announce subscriptions to besides the peers with a session (reached at
    /// the addresses the resolver gives for them).
    pub publishers: Vec<DomusId>,
    /// Copies in flight (sent, not answered) per subscriber; default 256.
    pub window: usize,
    /// Copies waiting for a subscriber's window before they fail as too slow; default 1024.
    pub lane_depth: usize,
    /// The policy for a subscriber that falls behind, per topic pattern (the first that
    /// matches); topics no rule matches use `slow_default`.
    pub slow: Vec<(TopicPattern, SlowSubscriber)>,
    /// The slow-subscriber policy of topics no rule in `slow` names.
    pub slow_default: SlowSubscriber,
    /// The deadline of each copy (as [`SendOptions::timeout`]); default the domus's
    /// `send_timeout`.
    pub copy_timeout: Option<Duration>,
    /// The deadline of an announcement to one publisher; default 5 s.
    pub announce_timeout: Duration,
    /// The inbox depth of each subscription; default 1024.
    pub subscription_depth: usize,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            policy: TopicPolicy::open(),
            limits: MembershipLimits::default(),
            lease: Duration::from_secs(30),
            publishers: Vec::new(),
            window: 256,
            lane_depth: 1024,
            slow: Vec::new(),
            slow_default: SlowSubscriber::default(),
            copy_timeout: None,
            announce_timeout: Duration::from_secs(5),
            subscription_depth: 1024,
        }
    }
}

impl TopicsConfig {
    /// Sets the policy.
    pub fn policy(mut self, policy: TopicPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the lease this domus asks for (and, as a publisher, the longest it grants).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self.limits.lease = lease;
        self
    }

    /// Adds a publisher to announce subscriptions to.
    pub fn publisher(mut self, peer: DomusId) -> Self {
        self.publishers.push(peer);
        self
    }

    /// Sets the per-subscriber window and lane depth.
    pub fn window(mut self, window: usize, lane_depth: usize) -> Self {
        self.window = window;
        self.lane_depth = lane_depth;
        self
    }

    /// Sets the slow-subscriber policy of topics matching `topics`.
    pub fn slow(mut self, topics: TopicPattern, policy: SlowSubscriber) -> Self {
        self.slow.push((topics, policy));
        self
    }

    /// Sets the slow-subscriber policy of every other topic.
    pub fn slow_default(mut self, policy: SlowSubscriber) -> Self {
        self.slow_default = policy;
        self
    }

    /// Sets the deadline of each copy.
    pub fn copy_timeout(mut self, timeout: Duration) -> Self {
        self.copy_timeout = Some(timeout);
        self
    }

    /// Sets the depth of each subscription's inbox.
    pub fn subscription_depth(mut self, depth: usize) -> Self {
        self.subscription_depth = depth;
        self
    }

    /// Sets the publisher's table bounds (the lease stays as set).
    pub fn table_limits(mut self, per_subscriber: usize, total: usize) -> Self {
        self.limits.per_subscriber = per_subscriber;
        self.limits.total = total;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |field: &str, problem: &str| Err(Error::invalid_config(field, problem));
        if self.lease.is_zero() || self.lease > MAX_LEASE {
            return bad("topics lease", "must be above 0 and at most 1 h");
        }
        if self.limits.lease.is_zero() || self.limits.lease > MAX_LEASE {
            return bad("topics limits.lease", "must be above 0 and at most 1 h");
        }
        if self.limits.per_subscriber == 0 || self.limits.total == 0 {
            return bad("topics table limits", "must be at least 1");
        }
        if !(1..=65_536).contains(&self.window) || !(1..=1_048_576).contains(&self.lane_depth) {
            return bad(
                "topics window",
                "window must be 1..=65536 and lane depth 1..=1048576",
            );
        }
        if !(1..=1_048_576).contains(&self.subscription_depth) {
            return bad("topics subscription_depth", "must be 1..=1048576");
        }
        if self.announce_timeout.is_zero() || self.announce_timeout > Duration::from_secs(3600) {
            return bad("topics announce_timeout", "must be above 0 and at most 1 h");
        }
        let slow_ok =
            |p: &SlowSubscriber| !p.after().is_zero() && p.after() <= Duration::from_secs(3600);
        if !slow_ok(&self.slow_default) || !self.slow.iter().all(|(_, p)| slow_ok(p)) {
            return bad(
                "topics slow-subscriber policy",
                "after must be 0 < after <= 1 h",
            );
        }
        Ok(())
    }

    fn slow_for(&self, topic: &Topic) -> SlowSubscriber {
        self.slow
            .iter()
            .find(|(pattern, _)| pattern.matches(topic))
            .map_or(self.slow_default, |(_, policy)| *policy)
    }
}

/// The topic service of one domus. Cheap to clone; the service (and its taberna) stops when
/// the last clone, [`Subscription`] and [`Publisher`] are dropped, or the domus shuts down.
/// It keeps the domus running like a [`Domus`] clone.
#[derive(Clone, Debug)]
pub struct Topics {
    inner: Arc<Running>,
}

/// The running service: its state and its task.
#[derive(Debug)]
struct Running {
    shared: Arc<Shared>,
    _task: AbortOnDropHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Snapshots stop listing the service (its task stops right after this).
        self.shared.domus.reporting().set_topics(None);
    }
}

/// The service's figures for the domus's snapshot.
fn figures(shared: &Shared) -> crate::reporting::TopicsFigures {
    let membership = lock(&shared.membership);
    let mut patterns: Vec<(String, u64)> = membership
        .patterns()
        .into_iter()
        .map(|(p, n)| (p.as_str().to_owned(), n as u64))
        .collect();
    let mut figures = crate::reporting::TopicsFigures {
        subscriptions: membership.len() as u64,
        subscribers: membership.subscriber_count() as u64,
        ..Default::default()
    };
    drop(membership);
    patterns.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    patterns.truncate(crate::reporting::TopicsFigures::MAX_PATTERNS);
    figures.patterns = patterns;
    figures.lanes = lock(&shared.lanes).len() as u64;
    figures.local_subscriptions = lock(&shared.local).subs.len() as u64;
    figures
}

/// The service's state, shared by the handles, the task and the lanes. Each table has one
/// lock, held for a few map operations and never across an `.await`.
struct Shared {
    domus: Domus,
    me: DomusId,
    config: Mutex<TopicsConfig>,
    /// Publisher side: who subscribed to what here.
    membership: Mutex<Membership<DomusId>>,
    /// Publisher side: one lane per subscriber with copies in flight.
    lanes: Mutex<HashMap<DomusId, Lane>>,
    /// Subscriber side: this domus's subscriptions.
    local: Mutex<Local>,
    /// Wakes the task when a local subscription ended.
    changed: Notify,
    /// Peers with a session that answered an announcement `UnknownTaberna` (they run no
    /// topic service): not announced to again until they connect anew. At most
    /// [`MAX_TARGETS`].
    no_service: Mutex<BTreeSet<DomusId>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topics").field("domus", &self.me).finish()
    }
}

/// This domus's subscriptions, oldest first.
#[derive(Default)]
struct Local {
    next_id: u64,
    subs: BTreeMap<u64, LocalSub>,
    /// The patterns announced to publishers and not withdrawn yet.
    announced: BTreeSet<TopicPattern>,
}

struct LocalSub {
    pattern: TopicPattern,
    tx: mpsc::Sender<TopicMessage>,
}

impl Local {
    fn patterns(&self) -> BTreeSet<TopicPattern> {
        self.subs.values().map(|s| s.pattern.clone()).collect()
    }
}

/// A publisher's lane to one subscriber: copies wait here (at most `lane_depth`) and its task
/// sends them in order, keeping at most `window` unanswered. The task is not aborted when the
/// lane is dropped (the subscriber left, restarted, or the service stopped): it sends what is
/// queued and reports every copy in flight with its real outcome, each bounded by its
/// deadline, then ends — an aborted lane would report copies the subscriber may have as
/// never delivered.
struct Lane {
    tx: mpsc::Sender<Copy>,
}

/// One subscriber's copy of a publish, on its way.
struct Copy {
    body: Bytes,
    headers: Headers,
    queued: Instant,
    slow: SlowSubscriber,
    done: oneshot::Sender<CopyOutcome>,
}

/// What became of one subscriber's copy of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyOutcome {
    /// The subscriber accepted it.
    Accepted,
    /// The subscriber answered it with a reply.
    Replied(Reply),
    /// The subscriber refused it: its handler rejected it (`RemoteTabernaRejected` with its
    /// code), the topic policy there does not let this publisher publish to the topic
    /// (`Forbidden`), it no longer holds a matching subscription (`NotSubscribed`), or its
    /// subscription's inbox was full (`SubscriberTooSlow`).
    Rejected(Error),
    /// The copy did not reach a handler, or may not have: the error says why, and
    /// [`Error::outcome_unknown`] whether the subscriber may have had it after all (as for a
    /// send).
    NotDelivered(Error),
}

impl CopyOutcome {
    fn of(outcome: Result<Delivery, Error>) -> Self {
        match outcome {
            Ok(Delivery::Accepted) => Self::Accepted,
            Ok(Delivery::Replied(reply)) => Self::Replied(reply),
            Err(e) => {
                if let Some(mapped) = e.rejection().and_then(|r| service_rejection(r.code)) {
                    return Self::Rejected(mapped);
                }
                if e.id().is_rejection() && !e.outcome_unknown() {
                    Self::Rejected(e)
                } else {
                    Self::NotDelivered(e)
                }
            }
        }
    }

    /// Whether the subscriber took the copy (accepted or replied).
    pub fn is_delivered(&self) -> bool {
        matches!(self, Self::Accepted | Self::Replied(_))
    }

    /// The error, when the copy was not taken.
    pub fn error(&self) -> Option<&Error> {
        match self {
            Self::Rejected(e) | Self::NotDelivered(e) => Some(e),
            _ => None,
        }
    }
}

/// The service's own reject codes as the errors a publisher reports.
fn service_rejection(code: u32) -> Option<Error> {
    let (id, text) = match code {
        REJECT_MALFORMED => (
            ErrorId::DecodeFailure,
            "the subscriber could not decode the copy",
        ),
        REJECT_FORBIDDEN => (
            ErrorId::Forbidden,
            "the subscriber's topic policy does not let this domus publish to the topic",
        ),
        REJECT_NOT_SUBSCRIBED => (
            ErrorId::NotSubscribed,
            "the subscriber holds no subscription matching the topic any more",
        ),
        REJECT_INBOX_FULL => (
            ErrorId::SubscriberTooSlow,
            "the subscriber's subscription inbox is full",
        ),
        _ => return None,
    };
    Some(Error::new(id, text))
}

/// What a publish did: one entry per subscriber it went to, in identity order. A publish
/// that matched no subscriber is a success with no entries ([`PublishReport::recipients`]
/// is 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReport {
    topic: Topic,
    copies: Vec<(DomusId, CopyOutcome)>,
}

impl PublishReport {
    /// The topic published to.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// How many subscribers the publish went to.
    pub fn recipients(&self) -> usize {
        self.copies.len()
    }

    /// Each subscriber and what became of its copy.
    pub fn copies(&self) -> &[(DomusId, CopyOutcome)] {
        &self.copies
    }

    /// The outcome of `subscriber`'s copy, if the publish went to it.
    pub fn outcome(&self, subscriber: &DomusId) -> Option<&CopyOutcome> {
        self.copies
            .iter()
            .find(|(s, _)| s == subscriber)
            .map(|(_, o)| o)
    }

    /// How many subscribers took their copy.
    pub fn delivered(&self) -> usize {
        self.copies.iter().filter(|(_, o)| o.is_delivered()).count()
    }

    /// Whether every subscriber took its copy (true for a publish with no subscriber).
    pub fn all_delivered(&self) -> bool {
        self.copies.iter().all(|(_, o)| o.is_delivered())
    }

    /// The subscribers whose copy's outcome is unknown (it may have reached them).
    pub fn outcome_unknown(&self) -> Vec<&DomusId> {
        self.copies
            .iter()
            .filter(|(_, o)| o.error().is_some_and(Error::outcome_unknown))
            .map(|(s, _)| s)
            .collect()
    }
}

/// One publisher's verdict on a subscription, as [`Subscription::grants`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Grant {
    /// Granted: from the moment of this answer every publish of that domus to a matching
    /// topic reaches the subscription (until it ends or its lease runs out).
    Granted {
        /// The lease granted.
        lease: Duration,
    },
    /// Refused by the publisher (its table bounds or its policy).
    Refused(Verdict),
    /// The announcement failed (the publisher runs no topic service, was unreachable, …);
    /// the renewal tries again.
    Failed(Error),
}

/// A subscription: a bounded inbox of the copies published to topics its pattern matches.
/// Dropping it ends it (the publishers are told at once).
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    pattern: TopicPattern,
    rx: mpsc::Receiver<TopicMessage>,
    grants: Vec<(DomusId, Grant)>,
    service: Arc<Running>,
}

impl Subscription {
    /// The pattern subscribed to.
    pub fn pattern(&self) -> &TopicPattern {
        &self.pattern
    }

    /// What each publisher known when it was made answered ([`Topics::subscribe`]).
    pub fn grants(&self) -> &[(DomusId, Grant)] {
        &self.grants
    }

    /// Whether `publisher` granted it when it was made.
    pub fn granted_by(&self, publisher: &DomusId) -> bool {
        self.grants
            .iter()
            .any(|(p, g)| p == publisher && matches!(g, Grant::Granted { .. }))
    }

    /// The next copy; `None` once the service stopped.
    pub async fn recv(&mut self) -> Option<TopicMessage> {
        self.rx.recv().await
    }

    /// The next copy within `timeout` ([`ErrorId::ReceiveTimeout`] after it,
    /// [`ErrorId::DomusClosed`] once the service stopped).
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<TopicMessage, Error> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Error::new(
                ErrorId::DomusClosed,
                "the topic service stopped",
            )),
            Err(_) => Err(Error::new(
                ErrorId::ReceiveTimeout,
                format!("no copy for {} within {timeout:?}", self.pattern),
            )),
        }
    }

    /// Waits for at least one copy, then moves up to `limit` waiting copies into `buf`; how
    /// many (0 once the service stopped).
    pub async fn recv_many(&mut self, buf: &mut Vec<TopicMessage>, limit: usize) -> usize {
        self.rx.recv_many(buf, limit).await
    }

    /// A copy if one waits.
    pub fn try_recv(&mut self) -> Option<TopicMessage> {
        self.rx.try_recv().ok()
    }

    /// How many copies wait.
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Ends the subscription and waits (each within the announce deadline) until the
    /// publishers it was announced to have dropped it: no publish they start after this
    /// returns reaches this domus for it.
    pub async fn unsubscribe(self) {
        let shared = self.service.shared.clone();
        let pattern = self.pattern.clone();
        drop(self);
        let still_held = {
            let mut local = lock(&shared.local);
            let held = local.patterns().contains(&pattern);
            if !held {
                local.announced.remove(&pattern);
            }
            held
        };
        if !still_held {
            withdraw(&shared, vec![pattern]).await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let shared = &self.service.shared;
        lock(&shared.local).subs.remove(&self.id);
        shared.changed.notify_one();
    }
}

/// One copy of a publish at a subscriber: the topic, the publisher's message type and
/// payload, and the publisher's verified identity. Answer it like a taberna request
/// (dropping it unanswered answers `RequestDropped`).
#[derive(Debug)]
pub struct TopicMessage {
    /// Boxed: a copy moves through two queues and the subscriber's buffers, 8 bytes at a
    /// time instead of 300.
    inner: Box<MessageInner>,
}

#[derive(Debug)]
struct MessageInner {
    request: TabernaRequest,
    topic: Topic,
    msg_type: MessageType,
    payload: Bytes,
}

impl TopicMessage {
    /// The topic it was published to.
    pub fn topic(&self) -> &Topic {
        &self.inner.topic
    }

    /// The publisher's message type.
    pub fn message_type(&self) -> MessageType {
        self.inner.msg_type
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.inner.payload
    }

    /// The publisher's verified identity.
    pub fn publisher(&self) -> &PeerIdentity {
        self.inner.request.peer()
    }

    /// The headers the publisher attached.
    pub fn headers(&self) -> &Headers {
        self.inner.request.headers()
    }

    /// The trace context it carries, if any.
    pub fn trace_context(&self) -> Option<TraceContext> {
        self.inner.request.trace_context()
    }

    /// Accepts it.
    pub fn accept(self) {
        self.inner.request.accept();
    }

    /// Answers it with a reply (the publisher's report carries it).
    pub fn reply(self, payload: Bytes) {
        self.inner.request.reply(payload);
    }

    /// Rejects it with an application code (at most [`MAX_APPLICATION_REJECT_CODE`]).
    pub fn reject(self, code: u32, reason: &str) {
        self.inner
            .request
            .reject(code.min(MAX_APPLICATION_REJECT_CODE), reason);
    }
}

/// A handle for publishing to one topic (validated once).
#[derive(Debug, Clone)]
pub struct Publisher {
    topic: Topic,
    service: Arc<Running>,
}

impl Publisher {
    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Publishes like [`Topics::publish`].
    pub fn publish(
        &self,
        msg_type: MessageType,
        payload: Bytes,
    ) -> impl Future<Output = Result<PublishReport, Error>> + Send + 'static + use<> {
        publish(
            &self.service,
            &self.topic,
            msg_type,
            &payload,
            Headers::new(),
        )
    }

    /// Publishes with headers on every copy.
    pub fn publish_with_headers(
        &self,
        msg_type: MessageType,
        payload: Bytes,
        headers: Headers,
    ) -> impl Future<Output = Result<PublishReport, Error>> + Send + 'static + use<> {
        publish(&self.service, &self.topic, msg_type, &payload, headers)
    }

    /// A pipelined publisher keeping at most `limit` publishes (1 to 65,536) unreported.
    pub fn window(&self, limit: usize) -> PublishWindow {
        PublishWindow {
            publisher: self.clone(),
            limit: limit.clamp(1, 65_536),
            pending: VecDeque::new(),
        }
    }
}

type ReportFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<PublishReport, Error>> + Send + 'static>>;

/// Publishes to one topic with up to `limit` publishes unreported; reports come in publish
/// order. Each publish is handed to its subscribers' lanes when it is made, so order holds
/// per subscriber however the reports are awaited.
pub struct PublishWindow {
    publisher: Publisher,
    limit: usize,
    pending: VecDeque<ReportFuture>,
}

impl std::fmt::Debug for PublishWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishWindow")
            .field("topic", &self.publisher.topic)
            .field("limit", &self.limit)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl PublishWindow {
    /// Publishes; when `limit` publishes are unreported, first waits for the oldest and
    /// returns its report.
    pub async fn publish(
        &mut self,
        msg_type: MessageType,
        payload: Bytes,
    ) -> Option<Result<PublishReport, Error>> {
        let oldest = if self.pending.len() >= self.limit {
            self.next().await
        } else {
            None
        };
        self.pending
            .push_back(Box::pin(self.publisher.publish(msg_type, payload)));
        oldest
    }

    /// The oldest unreported publish's report.
    pub async fn next(&mut self) -> Option<Result<PublishReport, Error>> {
        let front = self.pending.pop_front()?;
        Some(front.await)
    }

    /// Every unreported publish's report, in order.
    pub async fn drain(&mut self) -> Vec<Result<PublishReport, Error>> {
        let mut out = Vec::with_capacity(self.pending.len());
        while let Some(r) = self.next().await {
            out.push(r);
        }
        out
    }

    /// How many publishes are unreported.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// What [`Topics::stats`] tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicsStats {
    /// As a publisher: each pattern held here and how many subscribers hold it.
    pub patterns: BTreeMap<String, usize>,
    /// As a publisher: subscriptions held here.
    pub subscriptions: usize,
    /// As a publisher: subscribers with a lane (copies sent recently).
    pub lanes: usize,
    /// As a subscriber: this domus's own subscriptions.
    pub local_subscriptions: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Topics {
    /// Starts the topic service on `domus`. Must be called inside a tokio runtime; fails if
    /// it already runs there (`TabernaAlreadyRegistered`) or `config` is out of range.
    pub fn start(domus: &Domus, config: TopicsConfig) -> Result<Topics, Error> {
        config.validate()?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::invalid_config(
                "topic service",
                "start must be called inside a tokio runtime",
            )
        })?;
        let options = TabernaOptions::default()
            .accepted_types(SUBSCRIBE_TYPE..=PUBLISH_TYPE)
            .inbox_depth(4096);
        let taberna = domus.service_taberna(TOPICS_TABERNA, options)?;
        let events = domus.reporting().events();
        let shared = Arc::new(Shared {
            domus: domus.clone(),
            me: domus.identity().clone(),
            membership: Mutex::new(Membership::new(config.limits)),
            config: Mutex::new(config),
            lanes: Mutex::new(HashMap::new()),
            local: Mutex::new(Local::default()),
            changed: Notify::new(),
            no_service: Mutex::new(BTreeSet::new()),
        });
        let weak = Arc::downgrade(&shared);
        domus.reporting().set_topics(Some(Box::new(move || {
            weak.upgrade().map(|shared| figures(&shared))
        })));
        let task = rt.spawn(serve(shared.clone(), taberna, events));
        Ok(Topics {
            inner: Arc::new(Running {
                shared,
                _task: AbortOnDropHandle::new(task),
            }),
        })
    }

    /// Subscribes to `pattern` (a topic, or one with `*` and `>`): makes the subscription's
    /// inbox, then announces it to every publisher known now (this domus, the peers it has a
    /// session with, [`TopicsConfig::publishers`]) and waits for their grants, each within
    /// the announce deadline. When this returns, every publish those publishers start from
    /// now reaches the subscription; publishers met later are announced to when they
    /// connect.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, Error> {
        let pattern = TopicPattern::new(pattern)
            .map_err(|e| Error::new(ErrorId::InvalidTopic, e.to_string()))?;
        let shared = &self.inner.shared;
        let depth = lock(&shared.config).subscription_depth;
        let (tx, rx) = mpsc::channel(depth);
        let id = {
            let mut local = lock(&shared.local);
            if local.subs.len() >= MAX_LOCAL_SUBSCRIPTIONS {
                return Err(Error::new(
                    ErrorId::InvalidConfig,
                    format!("this domus holds {MAX_LOCAL_SUBSCRIPTIONS} subscriptions already"),
                ));
            }
            local.next_id = local.next_id.saturating_add(1);
            let id = local.next_id;
            local.subs.insert(
                id,
                LocalSub {
                    pattern: pattern.clone(),
                    tx,
                },
            );
            local.announced.insert(pattern.clone());
            id
        };
        // The subscription exists (and is dropped on any early return) before any publisher
        // hears of it, so a copy sent right after a grant finds it.
        let mut subscription = Subscription {
            id,
            pattern: pattern.clone(),
            rx,
            grants: Vec::new(),
            service: self.inner.clone(),
        };
        let targets = targets(shared, std::slice::from_ref(&pattern)).await;
        let mut grants = announce(shared, &targets, std::slice::from_ref(&pattern)).await;
        grants.sort_by(|a, b| a.0.cmp(&b.0));
        subscription.grants = grants
            .into_iter()
            .map(|(peer, answer)| {
                let grant = match answer {
                    Ok(g) => match g.verdicts.first() {
                        Some(Verdict::Granted) => Grant::Granted { lease: g.lease },
                        Some(v) => Grant::Refused(*v),
                        None => Grant::Failed(Error::new(
                            ErrorId::DecodeFailure,
                            "the publisher's grant lists no verdict",
                        )),
                    },
                    Err(e) => Grant::Failed(e),
                };
                (peer, grant)
            })
            .collect();
        Ok(subscription)
    }

    /// Meets `peer`: opens a session with it (at the address the resolver gives for it) and
    /// sends a hello (a SUBSCRIBE of no patterns), so that it announces its subscriptions to
    /// this domus at once — for a publisher that has no session with its subscribers yet (a
    /// client that dials a node, then publishes). Returns when the peer answered, within the
    /// announce deadline; its announcements follow (see [`Topics::stats`]).
    pub async fn meet(&self, peer: &DomusId) -> Result<(), Error> {
        let shared = &self.inner.shared;
        let (lease, deadline) = {
            let config = lock(&shared.config);
            (config.lease, config.announce_timeout)
        };
        let hello = Announcement::Subscribe {
            lease,
            patterns: Vec::new(),
        }
        .encode();
        let answer = shared
            .domus
            .destination_on(peer, TOPICS_TABERNA)
            .send_with(
                MessageType(SUBSCRIBE_TYPE),
                hello,
                SendOptions::default().timeout(deadline),
            )
            .await?;
        match answer {
            Delivery::Replied(_) => Ok(()),
            Delivery::Accepted => Err(Error::new(
                ErrorId::DecodeFailure,
                "the peer accepted the hello without grants",
            )),
        }
    }

    /// A [`Publisher`] for `topic` (an exact topic: no wildcards).
    pub fn publisher(&self, topic: &str) -> Result<Publisher, Error> {
        let topic =
            Topic::new(topic).map_err(|e| Error::new(ErrorId::InvalidTopic, e.to_string()))?;
        Ok(Publisher {
            topic,
            service: self.inner.clone(),
        })
    }

    /// Publishes `payload` with the application type `msg_type` (A3) to `topic`: one
    /// acknowledged copy to each subscriber known now, and a [`PublishReport`] once every
    /// copy has its outcome. The copies are handed to their lanes before this returns the
    /// future, so publishes made one after the other reach each subscriber in that order.
    /// Fails as a whole only when the topic is not one (`InvalidTopic`), the type is not an
    /// application type (`InvalidMessageType`), or this domus's own policy does not let it
    /// publish to the topic (`Forbidden`).
    pub fn publish(
        &self,
        topic: &str,
        msg_type: MessageType,
        payload: Bytes,
    ) -> impl Future<Output = Result<PublishReport, Error>> + Send + 'static + use<> {
        let topic = Topic::new(topic).map_err(|e| Error::new(ErrorId::InvalidTopic, e.to_string()));
        let started = topic.map(|t| publish(&self.inner, &t, msg_type, &payload, Headers::new()));

        async move { started?.await }
    }

    /// Changes the policy at once: subscriptions held here that it no longer allows are
    /// dropped (their subscribers are not told; their renewals are refused from now on).
    pub fn set_policy(&self, policy: TopicPolicy) {
        let shared = &self.inner.shared;
        let mut membership = lock(&shared.membership);
        let held: Vec<(DomusId, TopicPattern)> = membership.entries();
        for (subscriber, pattern) in held {
            if !policy.may_subscribe(subscriber.as_str(), &pattern) {
                membership.unsubscribe(&subscriber, &pattern);
            }
        }
        drop(membership);
        lock(&shared.config).policy = policy;
    }

    /// What the service holds now.
    pub fn stats(&self) -> TopicsStats {
        let shared = &self.inner.shared;
        let membership = lock(&shared.membership);
        let patterns = membership
            .patterns()
            .into_iter()
            .map(|(p, n)| (p.as_str().to_owned(), n))
            .collect();
        let subscriptions = membership.len();
        drop(membership);
        TopicsStats {
            patterns,
            subscriptions,
            lanes: lock(&shared.lanes).len(),
            local_subscriptions: lock(&shared.local).subs.len(),
        }
    }
}

/// Starts a publish: checks, picks the subscribers, hands each its copy; the future gathers
/// the outcomes.
fn publish(
    service: &Arc<Running>,
    topic: &Topic,
    msg_type: MessageType,
    payload: &Bytes,
    headers: Headers,
) -> impl Future<Output = Result<PublishReport, Error>> + Send + 'static + use<> {
    let started = start_publish(&service.shared, topic, msg_type, payload, headers);
    let topic = topic.clone();
    async move {
        let waiting = started?;
        let mut copies = Vec::with_capacity(waiting.len());
        for (subscriber, wait) in waiting {
            let outcome = match wait {
                Waiting::Done(outcome) => outcome,
                Waiting::Pending(rx) => rx.await.unwrap_or_else(|_| {
                    CopyOutcome::NotDelivered(Error::new(
                        ErrorId::DomusClosed,
                        "the topic service stopped before the copy's outcome was known",
                    ))
                }),
            };
            copies.push((subscriber, outcome));
        }
        Ok(PublishReport { topic, copies })
    }
}

enum Waiting {
    Done(CopyOutcome),
    Pending(oneshot::Receiver<CopyOutcome>),
}

fn start_publish(
    shared: &Arc<Shared>,
    topic: &Topic,
    msg_type: MessageType,
    payload: &Bytes,
    headers: Headers,
) -> Result<Vec<(DomusId, Waiting)>, Error> {
    if msg_type.class() != MessageClass::A3 {
        return Err(Error::new(
            ErrorId::InvalidMessageType,
            format!("{:#x} is not an application (A3) message type", msg_type.0),
        ));
    }
    let (slow, window, depth, timeout) = {
        let config = lock(&shared.config);
        if !config.policy.may_publish(shared.me.as_str(), topic) {
            return Err(Error::new(
                ErrorId::Forbidden,
                format!("this domus's topic policy does not let it publish to {topic}"),
            ));
        }
        (
            config.slow_for(topic),
            config.window,
            config.lane_depth,
            config.copy_timeout,
        )
    };
    let subscribers = lock(&shared.membership).subscribers(Instant::now().into_std(), topic);
    if subscribers.is_empty() {
        return Ok(Vec::new());
    }
    let body = Publication::encode(topic, msg_type.0, payload);
    let now = Instant::now();
    let mut lanes = lock(&shared.lanes);
    let mut waiting = Vec::with_capacity(subscribers.len());
    for subscriber in subscribers {
        let lane = lanes
            .entry(subscriber.clone())
            .or_insert_with(|| open_lane(shared, subscriber.clone(), window, depth, timeout));
        let (done, rx) = oneshot::channel();
        let copy = Copy {
            body: body.clone(),
            headers: headers.clone(),
            queued: now,
            slow,
            done,
        };
        let wait = match lane.tx.try_send(copy) {
            Ok(()) => Waiting::Pending(rx),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if matches!(slow, SlowSubscriber::DropSubscriber { .. }) {
                    lock(&shared.membership).remove_subscriber(&subscriber);
                }
                Waiting::Done(CopyOutcome::NotDelivered(too_slow(
                    &subscriber,
                    "its lane is full",
                )))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Waiting::Done(CopyOutcome::NotDelivered(
                Error::new(ErrorId::DomusClosed, "the subscriber's lane stopped"),
            )),
        };
        waiting.push((subscriber, wait));
    }
    Ok(waiting)
}

fn too_slow(subscriber: &DomusId, why: &str) -> Error {
    Error::new(
        ErrorId::SubscriberTooSlow,
        format!("{subscriber} is too slow: {why}; the copy was not sent"),
    )
}

fn open_lane(
    shared: &Arc<Shared>,
    subscriber: DomusId,
    window: usize,
    depth: usize,
    timeout: Option<Duration>,
) -> Lane {
    let (tx, rx) = mpsc::channel(depth);
    let destination = shared.domus.destination_on(&subscriber, TOPICS_TABERNA);
    // Detached on purpose (see `Lane`): it ends once its queue is closed and drained.
    drop(tokio::spawn(run_lane(
        Arc::downgrade(shared),
        subscriber,
        destination,
        rx,
        window,
        timeout,
    )));
    Lane { tx }
}

/// Sends one subscriber's copies in order, at most `window` unanswered; ends when its queue
/// closes (the service stopped or dropped the lane) and nothing is in flight.
async fn run_lane(
    shared: Weak<Shared>,
    subscriber: DomusId,
    destination: Destination,
    mut rx: mpsc::Receiver<Copy>,
    window: usize,
    timeout: Option<Duration>,
) {
    let mut in_flight: VecDeque<(crate::domus::Receipt, oneshot::Sender<CopyOutcome>)> =
        VecDeque::new();
    let mut open = true;
    let lane = LaneSend {
        shared: &shared,
        subscriber: &subscriber,
        destination: &destination,
        timeout,
    };
    loop {
        tokio::select! {
            copy = rx.recv(), if open && in_flight.len() < window => {
                let Some(copy) = copy else {
                    open = false;
                    if in_flight.is_empty() { return; }
                    continue;
                };
                lane.send(copy, &mut in_flight).await;
                // Whatever else waits, while the window has room: one wake-up for a burst.
                while in_flight.len() < window {
                    let Ok(copy) = rx.try_recv() else { break };
                    lane.send(copy, &mut in_flight).await;
                }
            }
            outcome = async { match in_flight.front_mut() {
                Some((receipt, _)) => receipt.await,
                None => std::future::pending().await,
            } } => {
                if let Some((_, done)) = in_flight.pop_front() {
                    let _ = done.send(CopyOutcome::of(outcome));
                }
                // The outcomes behind it that are in already.
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                while let Some((receipt, _)) = in_flight.front_mut() {
                    let std::task::Poll::Ready(outcome) = std::pin::Pin::new(receipt).poll(&mut cx) else {
                        break;
                    };
                    if let Some((_, done)) = in_flight.pop_front() {
                        let _ = done.send(CopyOutcome::of(outcome));
                    }
                }
                if !open && in_flight.is_empty() { return; }
            }
        }
    }
}

/// What a lane needs to send one copy.
struct LaneSend<'a> {
    shared: &'a Weak<Shared>,
    subscriber: &'a DomusId,
    destination: &'a Destination,
    timeout: Option<Duration>,
}

impl LaneSend<'_> {
    /// Sends `copy` (or fails it as too slow when it waited past its topic's deadline).
    async fn send(
        &self,
        copy: Copy,
        in_flight: &mut VecDeque<(crate::domus::Receipt, oneshot::Sender<CopyOutcome>)>,
    ) {
        if copy.queued.elapsed() > copy.slow.after() {
            if matches!(copy.slow, SlowSubscriber::DropSubscriber { .. })
                && let Some(shared) = self.shared.upgrade()
            {
                lock(&shared.membership).remove_subscriber(self.subscriber);
            }
            let _ = copy.done.send(CopyOutcome::NotDelivered(too_slow(
                self.subscriber,
                "the copy waited longer than the topic allows for its window",
            )));
            return;
        }
        let mut options = SendOptions::default().headers(copy.headers);
        if let Some(t) = self.timeout {
            options = options.timeout(t);
        }
        match self
            .destination
            .admit(MessageType(PUBLISH_TYPE), copy.body, options)
            .await
        {
            Ok(receipt) => in_flight.push_back((receipt, copy.done)),
            Err(e) => {
                let _ = copy.done.send(CopyOutcome::NotDelivered(e));
            }
        }
    }
}

/// The most domus one announcement goes to.
const MAX_TARGETS: usize = 4096;

/// Who this domus announces `patterns` to: itself, the peers with a session, the configured
/// publishers, and the publishers the resolver lists for a pattern that overlaps one of them
/// (asked within the announce deadline; a resolver that fails or is late adds none).
async fn targets(shared: &Shared, patterns: &[TopicPattern]) -> BTreeSet<DomusId> {
    let mut targets: BTreeSet<DomusId> = shared
        .domus
        .reporting()
        .connected_peers()
        .into_iter()
        .collect();
    {
        let no_service = lock(&shared.no_service);
        targets.retain(|peer| !no_service.contains(peer));
    }
    let deadline = {
        let config = lock(&shared.config);
        targets.extend(config.publishers.iter().cloned());
        config.announce_timeout
    };
    let resolver = shared.domus.resolver();
    if let Ok(Ok(listed)) = tokio::time::timeout(deadline, resolver.topic_publishers()).await {
        for entry in listed.iter() {
            let Ok(pattern) = TopicPattern::new(entry.pattern.as_str()) else {
                continue;
            };
            if patterns.iter().any(|p| p.overlaps(&pattern)) {
                targets.extend(entry.publishers.iter().cloned());
            }
        }
    }
    targets.insert(shared.me.clone());
    while targets.len() > MAX_TARGETS {
        targets.pop_last();
    }
    targets
}

/// Announces `patterns` to each target at once; their answers, in no set order.
async fn announce(
    shared: &Arc<Shared>,
    targets: &BTreeSet<DomusId>,
    patterns: &[TopicPattern],
) -> Vec<(DomusId, Result<Grants, Error>)> {
    let (lease, deadline) = {
        let config = lock(&shared.config);
        (config.lease, config.announce_timeout)
    };
    let mut answers = Vec::with_capacity(targets.len());
    let mut set = JoinSet::new();
    for chunk in patterns.chunks(MAX_PATTERNS) {
        for target in targets {
            if *target == shared.me {
                answers.push((target.clone(), Ok(hold(shared, &shared.me, lease, chunk))));
                continue;
            }
            let body = Announcement::Subscribe {
                lease,
                patterns: chunk.to_vec(),
            }
            .encode();
            let send = shared
                .domus
                .destination_on(target, TOPICS_TABERNA)
                .send_with(
                    MessageType(SUBSCRIBE_TYPE),
                    body,
                    SendOptions::default().timeout(deadline),
                );
            let target = target.clone();
            let expected = chunk.len();
            set.spawn(async move {
                let answer = match send.await {
                    Ok(Delivery::Replied(reply)) => Grants::decode(reply.into_payload())
                        .map_err(|e| Error::new(ErrorId::DecodeFailure, format!("grant: {e:?}")))
                        .and_then(|g| {
                            if g.verdicts.len() == expected {
                                Ok(g)
                            } else {
                                Err(Error::new(
                                    ErrorId::DecodeFailure,
                                    "the grant does not answer every pattern",
                                ))
                            }
                        }),
                    Ok(Delivery::Accepted) => Err(Error::new(
                        ErrorId::DecodeFailure,
                        "the publisher accepted the announcement without a grant",
                    )),
                    Err(e) => Err(e),
                };
                (target, answer)
            });
        }
    }
    while let Some(done) = set.join_next().await {
        if let Ok(answer) = done {
            if let (peer, Err(e)) = &answer
                && e.id() == ErrorId::UnknownTaberna
            {
                let mut no_service = lock(&shared.no_service);
                if no_service.len() >= MAX_TARGETS {
                    no_service.clear();
                }
                no_service.insert(peer.clone());
            }
            answers.push(answer);
        }
    }
    answers
}

/// Withdraws `patterns` from every target (each within the announce deadline).
async fn withdraw(shared: &Arc<Shared>, patterns: Vec<TopicPattern>) {
    if patterns.is_empty() {
        return;
    }
    {
        let mut membership = lock(&shared.membership);
        for p in &patterns {
            membership.unsubscribe(&shared.me, p);
        }
    }
    let deadline = lock(&shared.config).announce_timeout;
    let targets = targets(shared, &patterns).await;
    let mut set = JoinSet::new();
    for chunk in patterns.chunks(MAX_PATTERNS) {
        let body = Announcement::Unsubscribe {
            patterns: chunk.to_vec(),
        }
        .encode();
        for target in &targets {
            if *target == shared.me {
                continue;
            }
            set.spawn(
                shared
                    .domus
                    .destination_on(target, TOPICS_TABERNA)
                    .send_with(
                        MessageType(UNSUBSCRIBE_TYPE),
                        body.clone(),
                        SendOptions::default().timeout(deadline),
                    ),
            );
        }
    }
    while set.join_next().await.is_some() {}
}

/// The publisher's side of a SUBSCRIBE from `subscriber`: policy, then the table; the grants.
fn hold(
    shared: &Shared,
    subscriber: &DomusId,
    asked: Duration,
    patterns: &[TopicPattern],
) -> Grants {
    let policy = lock(&shared.config).policy.clone();
    let now = Instant::now().into_std();
    let mut membership = lock(&shared.membership);
    let lease = asked.min(membership.lease());
    let verdicts = patterns
        .iter()
        .map(|pattern| {
            if !policy.may_subscribe(subscriber.as_str(), pattern) {
                return Verdict::Forbidden;
            }
            match membership.subscribe_for(now, subscriber, pattern.clone(), lease) {
                Ok(_) => Verdict::Granted,
                Err(Refused::PerSubscriber) => Verdict::PerSubscriberFull,
                Err(_) => Verdict::TableFull,
            }
        })
        .collect();
    Grants { lease, verdicts }
}

/// The service's task: answers announcements, hands copies to subscriptions, renews this
/// domus's announcements, and ages out the table.
async fn serve(shared: Arc<Shared>, taberna: Taberna, mut events: crate::reporting::EventReceiver) {
    let mut background: JoinSet<()> = JoinSet::new();
    let renew_every = {
        let lease = lock(&shared.config).lease;
        (lease / 3).max(Duration::from_millis(10))
    };
    // The first renewal one period from now: subscribe() announced already.
    let mut renew = tokio::time::interval_at(Instant::now() + renew_every, renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events_open = true;
    // Requests are taken in bursts: one wake-up of this task for many copies.
    let mut batch: Vec<TabernaRequest> = Vec::with_capacity(64);
    loop {
        tokio::select! {
            taken = taberna.recv_many(&mut batch, 64) => {
                if taken == 0 {
                    return;
                }
                for request in batch.drain(..) {
                    if let Some(peer) = handle(&shared, request) {
                        announce_held_to(&shared, peer, &mut background);
                    }
                }
            }
            () = shared.changed.notified() => {
                let gone: Vec<TopicPattern> = {
                    let mut local = lock(&shared.local);
                    let held = local.patterns();
                    let gone = local.announced.difference(&held).cloned().collect();
                    local.announced = held;
                    gone
                };
                let shared = shared.clone();
                if !gone.is_empty() && background.len() < MAX_BACKGROUND {
                    background.spawn(async move { withdraw(&shared, gone).await });
                }
            }
            _ = renew.tick() => {
                expire(&shared);
                let held = lock(&shared.local).patterns();
                if !held.is_empty() && background.len() < MAX_BACKGROUND {
                    let shared = shared.clone();
                    let patterns: Vec<TopicPattern> = held.into_iter().collect();
                    background.spawn(async move {
                        let targets = targets(&shared, &patterns).await;
                        announce(&shared, &targets, &patterns).await;
                    });
                }
            }
            event = events.recv(), if events_open => match event {
                Some(FeedItem::Item(Event::PeerConnected { peer, restarted })) => {
                    // It may run the topic service now.
                    lock(&shared.no_service).remove(&peer);
                    if restarted {
                        // A new run of the subscriber holds none of the old run's
                        // subscriptions; it announces its own.
                        lock(&shared.membership).remove_subscriber(&peer);
                        lock(&shared.lanes).remove(&peer);
                    }
                    announce_held_to(&shared, peer, &mut background);
                }
                Some(_) => {}
                None => events_open = false,
            },
            Some(_) = background.join_next(), if !background.is_empty() => {}
        }
    }
}

/// The most announcements and withdrawals the service's task runs at once (more wait for
/// the next renewal).
const MAX_BACKGROUND: usize = 64;

/// Announces this domus's subscriptions to `peer` (it connected, or sent a hello), on the
/// task's bounded set of background sends.
fn announce_held_to(shared: &Arc<Shared>, peer: DomusId, background: &mut JoinSet<()>) {
    let held: Vec<TopicPattern> = lock(&shared.local).patterns().into_iter().collect();
    if !held.is_empty() && background.len() < MAX_BACKGROUND {
        let shared = shared.clone();
        let targets = BTreeSet::from([peer]);
        background.spawn(async move {
            announce(&shared, &targets, &held).await;
        });
    }
}

/// Ends leases that ran out, and the lanes of subscribers with nothing held (a lane's task
/// still finishes what it holds).
fn expire(shared: &Shared) {
    let now = Instant::now().into_std();
    let mut membership = lock(&shared.membership);
    membership.expire(now);
    let mut lanes = lock(&shared.lanes);
    lanes.retain(|subscriber, _| membership.held_by(subscriber) > 0);
}

/// One request to the service's taberna; the peer to announce this domus's subscriptions to
/// when it sent a hello.
fn handle(shared: &Arc<Shared>, request: TabernaRequest) -> Option<DomusId> {
    let msg_type = request.message_type().0;
    let peer = request.peer().id().clone();
    match msg_type {
        SUBSCRIBE_TYPE | UNSUBSCRIBE_TYPE => {
            match Announcement::decode(msg_type, request.payload().clone()) {
                Ok(Announcement::Subscribe { lease, patterns }) => {
                    let hello = patterns.is_empty();
                    let grants = hold(shared, &peer, lease, &patterns);
                    request.reply(grants.encode());
                    if hello && peer != shared.me {
                        return Some(peer);
                    }
                }
                Ok(Announcement::Unsubscribe { patterns }) => {
                    let mut membership = lock(&shared.membership);
                    for p in &patterns {
                        membership.unsubscribe(&peer, p);
                    }
                    drop(membership);
                    request.accept();
                }
                Err(e) => request.reject(REJECT_MALFORMED, &format!("announcement: {e:?}")),
            }
        }
        PUBLISH_TYPE => deliver(shared, request),
        _ => request.reject(REJECT_MALFORMED, "not a topic service message"),
    }
    None
}

/// Hands a copy to the oldest local subscription that matches its topic.
fn deliver(shared: &Shared, mut request: TabernaRequest) {
    let publication = match Publication::decode(request.take_payload()) {
        Ok(p) => p,
        Err(e) => {
            request.reject(REJECT_MALFORMED, &format!("publish: {e:?}"));
            return;
        }
    };
    let msg_type = MessageType(publication.msg_type);
    if msg_type.class() != MessageClass::A3 {
        request.reject(
            REJECT_MALFORMED,
            "a publish carries an application message type",
        );
        return;
    }
    let allowed = lock(&shared.config)
        .policy
        .may_publish(request.peer().id().as_str(), &publication.topic);
    if !allowed {
        request.reject(
            REJECT_FORBIDDEN,
            "the topic policy does not allow this publisher",
        );
        return;
    }
    let tx = lock(&shared.local)
        .subs
        .values()
        .find(|s| s.pattern.matches(&publication.topic))
        .map(|s| s.tx.clone());
    let Some(tx) = tx else {
        request.reject(REJECT_NOT_SUBSCRIBED, "no subscription matches the topic");
        return;
    };
    let message = TopicMessage {
        inner: Box::new(MessageInner {
            request,
            topic: publication.topic,
            msg_type,
            payload: publication.payload,
        }),
    };
    match tx.try_send(message) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(m)) => {
            m.inner
                .request
                .reject(REJECT_INBOX_FULL, "the subscription's inbox is full");
        }
        Err(mpsc::error::TrySendError::Closed(m)) => {
            m.inner
                .request
                .reject(REJECT_NOT_SUBSCRIBED, "the subscription just ended");
        }
    }
}
