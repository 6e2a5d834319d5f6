//! Topics (publish/subscribe) — the pure core, the first step of the service
//! (`../shared/DESIGN.md` §11): topic names and patterns ([`Topic`], [`TopicPattern`]: dot-
//! separated segments, `*` one segment, `>` the rest, matched at the publisher) and the
//! publisher's table of subscriptions ([`Membership`]: leases renewed by the subscriber's
//! announcements, ended at once by an unsubscribe, bounded per subscriber and in total), the
//! topic policy on verified identities ([`TopicPolicy`]), and the bodies of the service's
//! messages ([`wire`]: SUBSCRIBE, UNSUBSCRIBE, their grants, PUBLISH).
//!
//! Not built yet: the A2 service that announces subscriptions to the domus that may publish,
//! the fan-out of a publish as one acknowledged message per subscriber with its report, and
//! the `Domus::subscribe` / `Domus::publish` API. Until then nothing in a
//! domus uses this module; its types may still change.
//!
//! Pure code: no sockets, clock or tokio (every call takes `now`). It must not decide who may
//! publish or subscribe (the service checks identities before it calls in).

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
