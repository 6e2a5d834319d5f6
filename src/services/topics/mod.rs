//! Topics: publish once, and every subscriber in the mesh gets its own acknowledged copy
//! exactly once, with the publisher told the outcome per subscriber (`../shared/DESIGN.md`
//! §11). No broker: [`Topics::start`] runs the service on each domus that takes part.
//!
//! ```no_run
//! # async fn demo(domus: vicus::Domus) -> Result<(), vicus::Error> {
//! use vicus::services::topics::{Topics, TopicsConfig};
//! let topics = Topics::start(&domus, TopicsConfig::default())?;
//! let mut orders = topics.subscribe("orders.*.new").await?;
//! let report = topics
//!     .publish("orders.eu.new", vicus::MessageType::app(1), "42".into())
//!     .await?;
//! println!("{} of {} subscribers took it", report.delivered(), report.recipients());
//! if let Some(copy) = orders.recv().await {
//!     println!("{} from {}", copy.topic(), copy.publisher().id());
//!     copy.accept();
//! }
//! # Ok(()) }
//! ```
//!
//! * **Names.** A [`Topic`] is UTF-8, dot-separated non-empty segments (at most 256 bytes and
//!   32 segments); a [`TopicPattern`] may use `*` for one whole segment and `>` for the rest
//!   (one or more segments, last only). Matching happens at the publisher.
//! * **Membership.** A subscription is announced (SUBSCRIBE) to this domus itself, the peers
//!   it has a session with, and [`TopicsConfig::publishers`]; it is announced again to a peer
//!   when it connects, renewed every third of its lease (30 s by default), and withdrawn
//!   (UNSUBSCRIBE) when its last [`Subscription`] is dropped. A subscriber that crashes ages
//!   out when its lease runs out; one that restarts is forgotten when it reconnects and
//!   announces afresh. Each publisher's table is bounded per subscriber and in total
//!   ([`MembershipLimits`]); an announcement past a bound is refused in its grant.
//! * **Delivery.** Each copy is an ordinary acknowledged message on the session to the
//!   subscriber: exactly once, replayed across cuts, deduplicated, with the copy's deadline,
//!   and `PeerRestarted` when the subscriber restarted with it unanswered. A domus with
//!   several subscriptions matching a topic gets one copy, handed to its oldest matching
//!   subscription. The [`PublishReport`] lists every subscriber the publish went to with its
//!   [`CopyOutcome`]; a publish that matched nobody is a success with zero recipients.
//! * **Slow subscribers.** Each subscriber has its own lane at the publisher (a window of
//!   copies in flight, a bounded queue); a copy that finds the lane full or waits longer than
//!   the topic's [`SlowSubscriber`] deadline fails with
//!   [`ErrorId::SubscriberTooSlow`](crate::ErrorId::SubscriberTooSlow) (and, with
//!   `DropSubscriber`, the subscriber's subscriptions are dropped until it renews them); a
//!   subscription whose inbox is full refuses the copy the same way. The other subscribers
//!   are never held back.
//! * **Security.** Who may publish to or subscribe to what is a [`TopicPolicy`] on verified
//!   identities (default: every peer this domus authenticated, like a taberna without an
//!   allow-list), checked by the publisher for each subscription it holds and each publish of
//!   its own, and by the subscriber for each copy it receives; [`Topics::set_policy`] changes
//!   it at once. The subscriber of an announcement is the verified peer that sent it, so
//!   nobody subscribes on another's behalf.
//!
//! # Consistency model
//!
//! * **Effect point.** A subscription takes effect at a publisher when that publisher grants
//!   it (its answer to the SUBSCRIBE, which [`Topics::subscribe`] waits for): every publish
//!   that publisher *starts* after the grant goes to the subscriber, and none started before
//!   it does. A publisher met later (it connects, or restarts) takes the subscription from
//!   its own grant on.
//! * **Per publisher, per subscriber: order and exactly once.** The copies one publisher
//!   sends one subscriber arrive in the order that publisher started the publishes (one
//!   domus's publishes, from any of its tasks, are ordered by when `publish` was called), each
//!   at most once; each copy the report calls delivered was handed to the subscription
//!   exactly once. A copy that failed (too slow, rejected, not delivered) leaves a gap the
//!   report names; later copies still come, in order.
//! * **Across publishers: no order.** Copies from different publishers interleave in any
//!   order, even for one topic.
//! * **Unsubscribe** takes effect at each publisher when it processes the UNSUBSCRIBE
//!   ([`Subscription::unsubscribe`] waits for them); copies already on their way are refused
//!   by the subscriber with `NotSubscribed`.
//! * **Leases.** A subscription lasts for its lease at each publisher unless renewed: while
//!   a publisher is unreachable for longer than a lease it forgets the subscription, and
//!   copies it would have sent meanwhile are not sent (the subscription takes effect there
//!   again at its next grant).
//!
//! The pure core: [`Membership`] (the publisher's table on a caller's clock), [`TopicPolicy`]
//! and the bodies of the service's messages ([`wire`]). The service (`service.rs`) is the
//! only part with tasks and sockets.

mod membership;
mod name;
mod policy;
mod service;
pub mod wire;

pub use membership::{Membership, MembershipLimits, Refused};
pub use name::{MAX_SEGMENTS, MAX_TOPIC_LEN, Topic, TopicError, TopicPattern};
pub use policy::{Action, Rule, TopicPolicy, Who};
pub use service::{
    CopyOutcome, Grant, MAX_APPLICATION_REJECT_CODE, MAX_LOCAL_SUBSCRIPTIONS, PublishReport,
    PublishWindow, Publisher, SERVICE_REJECT_CODES, SlowSubscriber, Subscription, TOPICS_TABERNA,
    TopicMessage, Topics, TopicsConfig, TopicsStats,
};
pub use wire::{Verdict, WireError};
