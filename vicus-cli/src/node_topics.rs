//! The `[topics]` table of `vicus node`: the node runs the topic service
//! (`vicus::services::topics`) with the publishers, lease and policy the table names, and
//! subscribes to its patterns with a built-in handler each (log, sink, echo). A `[[taberna]]`
//! with behaviour `publish` (in `node.rs`) publishes what it receives through the same
//! service.
//!
//! This module checks the table and starts the handlers; it must not print anything but
//! through [`crate::output`].

use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::task::JoinSet;
use toml::Spanned;
use vicus::services::topics::{Action, TopicPattern, TopicPolicy, Topics, TopicsConfig, Who};
use vicus::{Domus, DomusId};

use crate::client::parse_duration;
use crate::output::{CliError, Output};

/// The most `subscribe` entries and `rules` a `[topics]` table may have.
const MAX_ENTRIES: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTopics {
    #[serde(default)]
    publishers: Vec<Spanned<String>>,
    lease: Option<Spanned<String>>,
    #[serde(default)]
    subscribe: Vec<Spanned<RawSubscribe>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscribe {
    pattern: String,
    behaviour: TopicBehaviour,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: RawAction,
    topics: String,
    who: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawAction {
    Publish,
    Subscribe,
}

/// What a subscription of the node does with each copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicBehaviour {
    /// Prints the topic, the publisher and the first bytes; accepts.
    Log,
    /// Accepts.
    Sink,
    /// Replies with the payload.
    Echo,
}

impl TopicBehaviour {
    fn name(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Sink => "sink",
            Self::Echo => "echo",
        }
    }
}

/// A checked `[topics]` table.
#[derive(Debug)]
pub struct TopicsSpec {
    config: TopicsConfig,
    subscriptions: Vec<(String, TopicBehaviour)>,
}

impl TopicsSpec {
    /// `pattern behaviour` of each subscription, for the node's first line.
    pub fn describe(&self) -> Vec<String> {
        self.subscriptions
            .iter()
            .map(|(p, b)| format!("{p} {}", b.name()))
            .collect()
    }
}

/// Checks the table; `at` makes an error naming the config line of a span.
pub fn check(
    raw: Spanned<RawTopics>,
    at: &dyn Fn(&Range<usize>, String) -> CliError,
) -> Result<TopicsSpec, CliError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let mut config = TopicsConfig::default();
    for p in &raw.publishers {
        let id = DomusId::new(p.get_ref())
            .map_err(|e| at(&p.span(), format!("[topics] publishers: {}", e.message())))?;
        config = config.publisher(id);
    }
    if let Some(lease) = &raw.lease {
        let d = parse_duration(lease.get_ref())
            .map_err(|e| at(&lease.span(), format!("[topics] lease: {e}")))?;
        if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(3600) {
            return Err(at(&lease.span(), "[topics] lease: give 100ms to 1h".into()));
        }
        config = config.lease(d);
    }
    if raw.subscribe.len() > MAX_ENTRIES || raw.rules.len() > MAX_ENTRIES {
        return Err(at(
            &span,
            format!("[topics]: at most {MAX_ENTRIES} subscribe entries and {MAX_ENTRIES} rules"),
        ));
    }
    let mut subscriptions = Vec::new();
    for s in &raw.subscribe {
        let entry = s.get_ref();
        TopicPattern::new(entry.pattern.as_str())
            .map_err(|e| at(&s.span(), format!("[topics] subscribe pattern: {e}")))?;
        subscriptions.push((entry.pattern.clone(), entry.behaviour));
    }
    if !raw.rules.is_empty() {
        let mut policy = TopicPolicy::deny_all();
        for r in &raw.rules {
            let rule = r.get_ref();
            let topics = TopicPattern::new(rule.topics.as_str())
                .map_err(|e| at(&r.span(), format!("[topics] rules topics: {e}")))?;
            let who = if rule.who == "*" {
                Who::Anyone
            } else if let Some(prefix) = rule.who.strip_suffix('*') {
                Who::Prefix(prefix.to_owned())
            } else {
                let id = DomusId::new(&rule.who).map_err(|e| {
                    at(
                        &r.span(),
                        format!(
                            "[topics] rules who: {} (write \"*\", an identity, or a prefix ending in *)",
                            e.message()
                        ),
                    )
                })?;
                Who::Identity(id.as_str().to_owned())
            };
            let action = match rule.action {
                RawAction::Publish => Action::Publish,
                RawAction::Subscribe => Action::Subscribe,
            };
            policy = policy.allow(action, topics, who);
        }
        config = config.policy(policy);
    }
    Ok(TopicsSpec {
        config,
        subscriptions,
    })
}

/// Starts the topic service and a handler per subscription (on `handlers`).
pub async fn start(
    domus: &Domus,
    spec: TopicsSpec,
    out: Output,
    handlers: &mut JoinSet<()>,
) -> Result<Topics, CliError> {
    let topics = Topics::start(domus, spec.config)?;
    for (pattern, behaviour) in spec.subscriptions {
        let mut sub = topics.subscribe(&pattern).await?;
        handlers.spawn(async move {
            while let Some(copy) = sub.recv().await {
                match behaviour {
                    TopicBehaviour::Sink => copy.accept(),
                    TopicBehaviour::Echo => {
                        let payload: Bytes = copy.payload().clone();
                        copy.reply(payload);
                    }
                    TopicBehaviour::Log => {
                        let head = crate::node::head(copy.payload());
                        out.result(
                            &format!(
                                "topic {} ({pattern}, log): {} B from {}: {head}",
                                copy.topic(),
                                copy.payload().len(),
                                copy.publisher().id()
                            ),
                            &json!({
                                "event": "topic_message",
                                "topic": copy.topic().as_str(),
                                "pattern": pattern,
                                "from": copy.publisher().id().as_str(),
                                "len": copy.payload().len(),
                                "head": head,
                            }),
                        );
                        copy.accept();
                    }
                }
            }
        });
    }
    Ok(topics)
}
