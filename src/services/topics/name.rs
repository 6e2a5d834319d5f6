//! Topic names and subscription patterns, and how a pattern matches a name.
//!
//! A topic is a UTF-8 name of dot-separated segments (`orders.eu.created`); a pattern is a
//! topic whose segments may also be `*` (exactly one segment) or, as its last segment, `>`
//! (one or more segments: the rest). `orders.*.created` matches `orders.eu.created`;
//! `orders.>` matches `orders.eu` and `orders.eu.created` but not `orders`. Matching happens
//! at the publisher.
//!
//! Pure: parsing checks every byte against the bounds below, so a name a peer sends is
//! refused before anything is kept. It must not allocate more than the name itself.

use std::fmt;

/// The longest topic name or pattern, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// The most segments a topic name or pattern has.
pub const MAX_SEGMENTS: usize = 32;

/// Why a topic name or pattern is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicError {
    /// Empty, or longer than [`MAX_TOPIC_LEN`] bytes.
    Length,
    /// More than [`MAX_SEGMENTS`] segments.
    TooManySegments,
    /// An empty segment (a leading, trailing or doubled `.`).
    EmptySegment,
    /// A whitespace or control character.
    BadCharacter,
    /// A wildcard in a topic name, a wildcard inside a segment (`a*`), or `>` before the
    /// last segment.
    Wildcard,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicError::Length => "a topic is 1 to 256 bytes",
            TopicError::TooManySegments => "a topic has at most 32 segments",
            TopicError::EmptySegment => "a topic's segments are not empty",
            TopicError::BadCharacter => "a topic holds no whitespace or control characters",
            TopicError::Wildcard => {
                "wildcards are whole segments of a pattern: `*` anywhere, `>` last; a topic has none"
            }
        })
    }
}

impl std::error::Error for TopicError {}

/// A topic name: what a publish is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

/// A subscription pattern: a topic name whose segments may be `*` or (last) `>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPattern(String);

/// Checks what names and patterns share; returns the segments.
/// Checks a name in one pass over its bytes: length, characters, segment count, empty
/// segments, and wildcards (none in a topic; in a pattern `*` as a whole segment, `>` as the
/// whole last one). Names arrive in every copy of a publish: this is on the delivery path.
fn scan(text: &str, pattern: bool) -> Result<(), TopicError> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_TOPIC_LEN {
        return Err(TopicError::Length);
    }
    if !text.is_ascii() && text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TopicError::BadCharacter);
    }
    let mut segments = 1usize;
    let mut start = 0usize;
    // The first wildcard error, reported after the structural checks (as before).
    let mut wildcard = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'.' => {
                if i == start {
                    return Err(TopicError::EmptySegment);
                }
                let segment = &bytes[start..i];
                if segment.contains(&b'>')
                    || (segment.contains(&b'*') && (!pattern || segment != b"*"))
                {
                    wildcard = true;
                }
                segments += 1;
                start = i + 1;
            }
            b if b.is_ascii_whitespace() || b.is_ascii_control() => {
                return Err(TopicError::BadCharacter);
            }
            _ => {}
        }
    }
    if start == bytes.len() {
        return Err(TopicError::EmptySegment);
    }
    if segments > MAX_SEGMENTS {
        return Err(TopicError::TooManySegments);
    }
    let last = &bytes[start..];
    let last_ok = if pattern {
        last == b"*" || last == b">" || !last.iter().any(|b| *b == b'*' || *b == b'>')
    } else {
        !last.iter().any(|b| *b == b'*' || *b == b'>')
    };
    if wildcard || !last_ok {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

impl Topic {
    /// A topic name, checked: no wildcards.
    pub fn new(name: impl Into<String>) -> Result<Self, TopicError> {
        let name = name.into();
        scan(&name, false)?;
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TopicPattern {
    /// A pattern, checked: `*` only as a whole segment, `>` only as the whole last one.
    pub fn new(pattern: impl Into<String>) -> Result<Self, TopicError> {
        let pattern = pattern.into();
        scan(&pattern, true)?;
        Ok(Self(pattern))
    }

    /// The pattern.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `>`: every topic.
    pub fn everything() -> Self {
        Self(">".to_owned())
    }

    /// Whether the pattern has no wildcard (it names one topic).
    pub fn is_exact(&self) -> bool {
        !self.0.split('.').any(|s| s == "*" || s == ">")
    }

    /// Whether every topic `other` matches, this pattern matches too (so a rule on this
    /// pattern may grant a subscription to `other`): segment by segment, `>` covers one or
    /// more segments of anything (`>` included), `*` covers one segment that is a name or
    /// `*`, a name covers only itself.
    pub fn covers(&self, other: &TopicPattern) -> bool {
        let mut theirs = other.0.split('.');
        for segment in self.0.split('.') {
            let Some(their) = theirs.next() else {
                return false;
            };
            match segment {
                ">" => return true,
                "*" if their == ">" => return false,
                "*" => {}
                s if s != their => return false,
                _ => {}
            }
        }
        theirs.next().is_none()
    }

    /// Whether some topic matches both this pattern and `other` (so a publisher of one may
    /// publish what a subscriber of the other wants): segment by segment, `>` on either side
    /// meets anything with at least one segment left, `*` meets any segment, names must be
    /// equal.
    pub fn overlaps(&self, other: &TopicPattern) -> bool {
        let ours: Vec<&str> = self.0.split('.').collect();
        let theirs: Vec<&str> = other.0.split('.').collect();
        let (mut i, mut j) = (0, 0);
        loop {
            match (ours.get(i), theirs.get(j)) {
                (None, None) => return true,
                (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
                (Some(a), Some(b)) if *a == "*" || *b == "*" || a == b => {
                    i += 1;
                    j += 1;
                }
                _ => return false,
            }
        }
    }

    /// Whether `topic` matches: segment by segment, `*` any one segment, `>` one or more.
    pub fn matches(&self, topic: &Topic) -> bool {
        let (pattern, name) = (self.0.as_bytes(), topic.0.as_bytes());
        // The common shapes without splitting: everything, an exact topic, `prefix.>`.
        if pattern == b">" {
            return true;
        }
        let wild = |b: &u8| *b == b'*' || *b == b'>';
        match pattern.iter().position(wild) {
            None => return pattern == name,
            Some(at) if at + 1 == pattern.len() && pattern[at] == b'>' => {
                // `prefix.>`: the topic starts with `prefix.` and has something after it.
                return name.len() > at && name.starts_with(&pattern[..at]);
            }
            Some(_) => {}
        }
        let mut names = topic.0.split('.');
        for segment in self.0.split('.') {
            match segment {
                // One or more segments left: the rest matches.
                ">" => return names.next().is_some(),
                "*" => {
                    if names.next().is_none() {
                        return false;
                    }
                }
                s => {
                    if names.next() != Some(s) {
                        return false;
                    }
                }
            }
        }
        names.next().is_none()
    }
}

impl From<Topic> for TopicPattern {
    /// A topic name is a pattern that matches itself only.
    fn from(topic: Topic) -> Self {
        Self(topic.0)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    fn p(s: &str) -> TopicPattern {
        TopicPattern::new(s).unwrap()
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "orders.eu.created", "ünïcode.✓", "a-b_c.d:e"] {
            assert!(Topic::new(good).is_ok(), "{good}");
        }
        let cases = [
            ("", TopicError::Length),
            (&*"a".repeat(257), TopicError::Length),
            ("a..b", TopicError::EmptySegment),
            (".a", TopicError::EmptySegment),
            ("a.", TopicError::EmptySegment),
            ("a b", TopicError::BadCharacter),
            ("a\u{0}", TopicError::BadCharacter),
            ("a.*", TopicError::Wildcard),
            ("a.>", TopicError::Wildcard),
            ("a*b", TopicError::Wildcard),
        ];
        for (name, error) in cases {
            assert_eq!(Topic::new(name), Err(error), "{name:?}");
        }
        let deep = vec!["s"; 33].join(".");
        assert_eq!(Topic::new(deep), Err(TopicError::TooManySegments));
    }

    #[test]
    fn patterns_take_wildcards_as_whole_segments_only() {
        for good in ["a.*", "*", ">", "a.>", "*.b.>", "a.b"] {
            assert!(TopicPattern::new(good).is_ok(), "{good}");
        }
        for bad in ["a.>.b", "a*", "a.b>", ">.a", "*>"] {
            assert_eq!(TopicPattern::new(bad), Err(TopicError::Wildcard), "{bad}");
        }
        assert!(p("a.b").is_exact());
        assert!(!p("a.*").is_exact());
    }

    #[test]
    fn matching_follows_the_segments() {
        let cases = [
            ("orders.*.created", "orders.eu.created", true),
            ("orders.*.created", "orders.eu.deleted", false),
            ("orders.*.created", "orders.created", false),
            ("orders.*", "orders.eu.created", false),
            ("orders.>", "orders.eu", true),
            ("orders.>", "orders.eu.created", true),
            ("orders.>", "orders", false),
            (">", "anything.at.all", true),
            ("*", "one", true),
            ("*", "one.two", false),
            ("a.b", "a.b", true),
            ("a.b", "a.b.c", false),
            ("a.b.c", "a.b", false),
            ("*.b.>", "x.b.y.z", true),
            ("*.b.>", "x.c.y", false),
        ];
        for (pattern, topic, expected) in cases {
            assert_eq!(
                p(pattern).matches(&t(topic)),
                expected,
                "{pattern} vs {topic}"
            );
        }
        // Covering: what a rule's pattern grants.
        let covers = [
            ("a.>", "a.b", true),
            ("a.>", "a.*.c", true),
            ("a.>", "a.>", true),
            ("a.>", "a", false),
            ("a.*", "a.b", true),
            ("a.*", "a.*", true),
            ("a.*", "a.>", false),
            ("a.*", "a.b.c", false),
            ("a.b", "a.*", false),
            ("a.b", "a.b", true),
            (">", "*", true),
            ("*", ">", false),
        ];
        for (rule, wanted, expected) in covers {
            assert_eq!(
                p(rule).covers(&p(wanted)),
                expected,
                "{rule} covers {wanted}"
            );
        }
        // A topic as a pattern matches itself only.
        let exact: TopicPattern = t("a.b").into();
        assert!(exact.matches(&t("a.b")) && !exact.matches(&t("a.c")));
    }

    #[test]
    fn overlapping_patterns_share_a_topic() {
        for (a, b) in [
            ("orders.>", "orders.eu.*"),
            ("orders.*.new", "*.eu.*"),
            (">", "a"),
            ("a.b", "a.b"),
            ("a.*", "*.b"),
            ("a.>", "a.b.c.d"),
        ] {
            assert!(p(a).overlaps(&p(b)), "{a} {b}");
            assert!(p(b).overlaps(&p(a)), "{b} {a}");
        }
        for (a, b) in [
            ("orders.>", "orders"),
            ("a.b", "a.c"),
            ("a.*", "a.b.c"),
            ("a.*.c", "a.b.d"),
            ("*", "a.b"),
        ] {
            assert!(!p(a).overlaps(&p(b)), "{a} {b}");
            assert!(!p(b).overlaps(&p(a)), "{b} {a}");
        }
    }

    /// The plain segment-by-segment matcher `matches` must agree with (its fast paths
    /// included).
    fn reference_matches(pattern: &str, topic: &str) -> bool {
        let mut names = topic.split('.');
        for segment in pattern.split('.') {
            match segment {
                ">" => return names.next().is_some(),
                "*" => {
                    if names.next().is_none() {
                        return false;
                    }
                }
                s => {
                    if names.next() != Some(s) {
                        return false;
                    }
                }
            }
        }
        names.next().is_none()
    }

    proptest::proptest! {
        #[test]
        fn matches_agrees_with_the_segment_by_segment_rule(
            a in proptest::collection::vec(proptest::sample::select(vec!["x", "xy", "y", "*", ">"]), 1..5),
            t in proptest::collection::vec(proptest::sample::select(vec!["x", "xy", "y", "x.y"]), 1..5),
        ) {
            let valid = |v: &Vec<&str>| !v[..v.len() - 1].contains(&">");
            proptest::prop_assume!(valid(&a));
            let (pattern, topic) = (a.join("."), t.join("."));
            proptest::prop_assert_eq!(
                p(&pattern).matches(&self::t(&topic)),
                reference_matches(&pattern, &topic),
                "{} {}", pattern, topic
            );
        }

        /// `overlaps` is exactly "some topic matches both", over a small alphabet where
        /// every candidate topic up to four segments is tried.
        #[test]
        fn overlaps_means_a_common_topic(
            a in proptest::collection::vec(proptest::sample::select(vec!["x", "y", "*", ">"]), 1..4),
            b in proptest::collection::vec(proptest::sample::select(vec!["x", "y", "*", ">"]), 1..4),
        ) {
            let valid = |v: &Vec<&str>| !v[..v.len() - 1].contains(&">");
            proptest::prop_assume!(valid(&a) && valid(&b));
            let (a, b) = (p(&a.join(".")), p(&b.join(".")));
            let mut topics = Vec::new();
            for n in 1..=4u32 {
                for code in 0..3u32.pow(n) {
                    let segs: Vec<&str> = (0..n)
                        .map(|i| ["x", "y", "z"][(code / 3u32.pow(i) % 3) as usize])
                        .collect();
                    topics.push(t(&segs.join(".")));
                }
            }
            let common = topics.iter().any(|t| a.matches(t) && b.matches(t));
            proptest::prop_assert_eq!(a.overlaps(&b), common, "{} {}", a, b);
        }
    }
}
