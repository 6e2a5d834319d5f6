//! Who may publish to and subscribe to which topics: rules on verified identities, checked by
//! the publisher for a publish and for a subscription it is asked to hold, and by the
//! subscriber for a copy it receives. A rule names an action, the topics (a pattern) and who
//! (anyone authenticated, one identity, or identities under a prefix); what no rule allows is
//! refused. A subscription is allowed when a rule's pattern covers the subscription's whole
//! pattern ([`TopicPattern::covers`]), so a wildcard cannot reach past what was granted.
//!
//! Pure: identities are the verified URI strings the caller passes in. It must not hold state
//! of its own: a live update replaces the whole policy.

use super::name::{Topic, TopicPattern};

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publishing to the rule's topics.
    Publish,
    /// Subscribing to (patterns within) the rule's topics.
    Subscribe,
}

/// Whom a rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Who {
    /// Any authenticated peer (and this domus).
    Anyone,
    /// Exactly this identity (its URI).
    Identity(String),
    /// Identities whose URI starts with this prefix (`spiffe://vicus.dev/domus/edge-`).
    Prefix(String),
}

impl Who {
    fn admits(&self, identity: &str) -> bool {
        match self {
            Who::Anyone => true,
            Who::Identity(id) => id == identity,
            Who::Prefix(prefix) => identity.starts_with(prefix.as_str()),
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What it allows.
    pub action: Action,
    /// On which topics.
    pub topics: TopicPattern,
    /// To whom.
    pub who: Who,
}

/// A topic policy: what its rules allow, nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicPolicy {
    rules: Vec<Rule>,
}

impl TopicPolicy {
    /// Allows nothing until rules are added.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Any authenticated peer may publish and subscribe to anything (a mesh whose members
    /// all trust each other).
    pub fn open() -> Self {
        let any = TopicPattern::everything();
        Self::deny_all()
            .allow(Action::Publish, any.clone(), Who::Anyone)
            .allow(Action::Subscribe, any, Who::Anyone)
    }

    /// Adds a rule.
    pub fn allow(mut self, action: Action, topics: TopicPattern, who: Who) -> Self {
        self.rules.push(Rule {
            action,
            topics,
            who,
        });
        self
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `identity` may publish to `topic`.
    pub fn may_publish(&self, identity: &str, topic: &Topic) -> bool {
        self.rules.iter().any(|r| {
            r.action == Action::Publish && r.who.admits(identity) && r.topics.matches(topic)
        })
    }

    /// Whether `identity` may hold a subscription to `pattern`.
    pub fn may_subscribe(&self, identity: &str, pattern: &TopicPattern) -> bool {
        self.rules.iter().any(|r| {
            r.action == Action::Subscribe && r.who.admits(identity) && r.topics.covers(pattern)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TopicPattern {
        TopicPattern::new(s).unwrap()
    }

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    const EDGE: &str = "spiffe://vicus.dev/domus/edge-1";
    const CORE: &str = "spiffe://vicus.dev/domus/core";

    #[test]
    fn rules_allow_what_they_name_and_nothing_else() {
        let policy = TopicPolicy::deny_all()
            .allow(
                Action::Publish,
                p("telemetry.>"),
                Who::Prefix("spiffe://vicus.dev/domus/edge-".into()),
            )
            .allow(
                Action::Subscribe,
                p("telemetry.*"),
                Who::Identity(CORE.into()),
            );
        assert!(policy.may_publish(EDGE, &t("telemetry.cpu")));
        assert!(!policy.may_publish(EDGE, &t("orders.new")));
        assert!(!policy.may_publish(CORE, &t("telemetry.cpu")));
        assert!(policy.may_subscribe(CORE, &p("telemetry.cpu")));
        assert!(policy.may_subscribe(CORE, &p("telemetry.*")));
        // A wildcard cannot reach past the rule: telemetry.> includes telemetry.a.b.
        assert!(!policy.may_subscribe(CORE, &p("telemetry.>")));
        assert!(!policy.may_subscribe(EDGE, &p("telemetry.cpu")));
        assert!(!TopicPolicy::deny_all().may_publish(CORE, &t("a")));
        let open = TopicPolicy::open();
        assert!(open.may_publish(EDGE, &t("a.b")) && open.may_subscribe(EDGE, &p(">")));
    }
}
