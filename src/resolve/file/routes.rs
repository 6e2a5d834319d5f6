//! The routes file's format, parsed and checked: [`RoutesFile`] (what the file says, in its
//! order) and [`RouteTable`] (the lookup table a [`FileResolver`](super::FileResolver)
//! answers from). The format is in the [parent module's docs](super).
//!
//! Pure: no IO, no clock, no tokio (the fuzz target `routes_file` drives it). It must not
//! accept a file it cannot bound: every count is checked against its limit, and every error
//! names the line and what to write instead.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::a0_transport::{DomusAddr, DomusId};
use crate::error::{Error, ErrorId, untrusted};
use crate::resolve::{Candidate, Route, TopicPublishers};
use crate::taberna::TabernaId;

/// A parsed routes file (the format is in the [module docs](super)): what
/// [`RoutesFile::parse`] and [`FileResolver::parse`](super::FileResolver::parse) return, in
/// the order the file lists it. Checked: every taberna has 1 to
/// [`MAX_CANDIDATES`](Self::MAX_CANDIDATES) candidates, no taberna id or domus identity is
/// listed twice, and the bounds hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoutesFile {
    /// Each `[[taberna]]` table: its id and its candidates.
    pub tabernas: Vec<(TabernaId, Vec<Candidate>)>,
    /// Each `[[domus]]` table: the identity and where it is reached.
    pub domus: Vec<(DomusId, DomusAddr)>,
    /// Each `[[topic]]` table: a topic pattern and the domus that publish to it.
    pub topics: Vec<TopicPublishers>,
}

/// The lookup table built from a [`RoutesFile`] ([`RoutesFile::table`]): what a
/// [`FileResolver`](super::FileResolver) answers from, the same shape as
/// [`SimpleResolver`](crate::resolve::SimpleResolver)'s (taberna → candidates, identity →
/// address). Immutable; cheap to share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    tabernas: HashMap<TabernaId, Arc<[Candidate]>>,
    domus: HashMap<DomusId, DomusAddr>,
    topics: Arc<[TopicPublishers]>,
}

impl RouteTable {
    /// The candidates of `taberna`, when the table routes it.
    pub fn candidates(&self, taberna: TabernaId) -> Option<&Arc<[Candidate]>> {
        self.tabernas.get(&taberna)
    }

    /// Where the domus `id` is reached, when the table says.
    pub fn domus_addr(&self, id: &DomusId) -> Option<&DomusAddr> {
        self.domus.get(id)
    }

    /// Who publishes to which topics (the `[[topic]]` tables).
    pub fn topic_publishers(&self) -> &Arc<[TopicPublishers]> {
        &self.topics
    }

    /// How many tabernas the table routes.
    pub fn len(&self) -> usize {
        self.tabernas.len()
    }

    /// Whether the table routes no taberna.
    pub fn is_empty(&self) -> bool {
        self.tabernas.is_empty()
    }
}

impl From<RoutesFile> for RouteTable {
    fn from(file: RoutesFile) -> Self {
        Self {
            tabernas: file
                .tabernas
                .into_iter()
                .map(|(id, candidates)| (id, Arc::from(candidates)))
                .collect(),
            domus: file.domus.into_iter().collect(),
            topics: Arc::from(file.topics),
        }
    }
}

/// The file as TOML lays it out; checked and converted by [`RoutesFile::parse`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    taberna: Vec<RawTaberna>,
    #[serde(default)]
    domus: Vec<RawDomus>,
    #[serde(default)]
    topic: Vec<RawTopic>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    pattern: Spanned<String>,
    publishers: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTaberna {
    id: Spanned<u64>,
    candidates: Spanned<Vec<RawCandidate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCandidate {
    addr: Spanned<String>,
    #[serde(default)]
    identity: Option<Spanned<String>>,
    #[serde(default)]
    priority: u16,
    #[serde(default = "default_weight")]
    weight: u16,
}

fn default_weight() -> u16 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomus {
    identity: Spanned<String>,
    addr: Spanned<String>,
}

impl RoutesFile {
    /// The most `[[taberna]]` tables a file may have.
    pub const MAX_TABERNAS: usize = 65_536;
    /// The most candidates one taberna may list.
    pub const MAX_CANDIDATES: usize = 64;
    /// The most `[[domus]]` tables a file may have.
    pub const MAX_DOMUS: usize = 65_536;
    /// The most `[[topic]]` tables a file may have.
    pub const MAX_TOPICS: usize = 4096;
    /// The most publishers one `[[topic]]` table may list.
    pub const MAX_TOPIC_PUBLISHERS: usize = 256;
    /// The longest topic pattern (as the topic service's).
    pub const MAX_TOPIC_PATTERN_LEN: usize = 256;

    /// Parses and checks routes in the format of the [module docs](super). Pure: no IO. Errors are
    /// `InvalidConfig`, with the line (when known) and what to fix.
    ///
    /// ```
    /// use vicus::{RoutesFile, TabernaId};
    ///
    /// let routes = RoutesFile::parse(r#"
    ///     [[taberna]]
    ///     id = 7
    ///     candidates = [{ addr = "10.0.0.5:7000", identity = "spiffe://prod/domus/billing-0" }]
    /// "#)?;
    /// assert_eq!(routes.tabernas[0].0, TabernaId(7));
    /// assert_eq!(routes.tabernas[0].1[0].weight, 1);
    /// # Ok::<(), vicus::Error>(())
    /// ```
    pub fn parse(text: &str) -> Result<Self, Error> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            at(
                text,
                e.span(),
                format!(
                    "{} (expected [[taberna]] tables with `id` and `candidates`, and [[domus]] \
                     tables with `identity` and `addr`; see vicus::FileResolver for the format)",
                    untrusted(e.message().trim_end())
                ),
            )
        })?;
        if raw.taberna.len() > Self::MAX_TABERNAS {
            return Err(invalid(format!(
                "{} [[taberna]] tables; at most {} are allowed (split the routes across \
                 resolvers or use another one)",
                raw.taberna.len(),
                Self::MAX_TABERNAS
            )));
        }
        if raw.domus.len() > Self::MAX_DOMUS {
            return Err(invalid(format!(
                "{} [[domus]] tables; at most {} are allowed",
                raw.domus.len(),
                Self::MAX_DOMUS
            )));
        }
        // Byte offsets, not lines: a line is counted only for an error (counting for every
        // table would be quadratic in the file's length).
        let mut first_at: HashMap<u64, usize> = HashMap::with_capacity(raw.taberna.len());
        let mut tabernas = Vec::with_capacity(raw.taberna.len());
        for table in raw.taberna {
            let id = *table.id.get_ref();
            match first_at.entry(id) {
                Entry::Occupied(first) => {
                    return Err(at(
                        text,
                        Some(table.id.span()),
                        format!(
                            "taberna {id} is listed twice (first at line {}); merge its \
                             candidates into one [[taberna]] table",
                            line_of(text, *first.get())
                        ),
                    ));
                }
                Entry::Vacant(slot) => {
                    slot.insert(table.id.span().start);
                }
            }
            let span = table.candidates.span();
            let raw_candidates = table.candidates.into_inner();
            if raw_candidates.is_empty() {
                return Err(at(
                    text,
                    Some(span),
                    format!(
                        "taberna {id} has no candidates; list at least one, e.g. \
                         candidates = [{{ addr = \"host:port\" }}], or remove the table"
                    ),
                ));
            }
            if raw_candidates.len() > Self::MAX_CANDIDATES {
                return Err(at(
                    text,
                    Some(span),
                    format!(
                        "taberna {id} lists {} candidates; at most {} are allowed",
                        raw_candidates.len(),
                        Self::MAX_CANDIDATES
                    ),
                ));
            }
            let mut candidates: Vec<Candidate> = Vec::with_capacity(raw_candidates.len());
            for raw in raw_candidates {
                let addr_span = raw.addr.span();
                let route = Route {
                    addr: parse_addr(text, &raw.addr, &format!("taberna {id}"))?,
                    identity: raw
                        .identity
                        .as_ref()
                        .map(|s| parse_identity(text, s, &format!("taberna {id}")))
                        .transpose()?,
                };
                if candidates.iter().any(|c| c.route == route) {
                    return Err(at(
                        text,
                        Some(addr_span),
                        format!(
                            "taberna {id} lists {} {} twice; remove one",
                            route.addr,
                            route
                                .identity
                                .as_ref()
                                .map_or_else(|| "(any identity)".to_owned(), |i| i.to_string())
                        ),
                    ));
                }
                candidates.push(Candidate {
                    route,
                    priority: raw.priority,
                    weight: raw.weight,
                });
            }
            tabernas.push((TabernaId(id), candidates));
        }
        let mut first_at: HashMap<DomusId, usize> = HashMap::with_capacity(raw.domus.len());
        let mut domus = Vec::with_capacity(raw.domus.len());
        for table in raw.domus {
            let identity = parse_identity(text, &table.identity, "[[domus]]")?;
            if let Some(first) = first_at.insert(identity.clone(), table.identity.span().start) {
                return Err(at(
                    text,
                    Some(table.identity.span()),
                    format!(
                        "domus {identity} is listed twice (first at line {}); keep one \
                         [[domus]] table per identity",
                        line_of(text, first)
                    ),
                ));
            }
            let addr = parse_addr(text, &table.addr, &format!("domus {identity}"))?;
            domus.push((identity, addr));
        }
        if raw.topic.len() > Self::MAX_TOPICS {
            return Err(invalid(format!(
                "{} [[topic]] tables; at most {} are allowed",
                raw.topic.len(),
                Self::MAX_TOPICS
            )));
        }
        let mut topics: Vec<TopicPublishers> = Vec::with_capacity(raw.topic.len());
        for table in raw.topic {
            let pattern = table.pattern.get_ref();
            if pattern.is_empty() || pattern.len() > Self::MAX_TOPIC_PATTERN_LEN {
                return Err(at(
                    text,
                    Some(table.pattern.span()),
                    format!(
                        "topic pattern: 1 to {} bytes, e.g. \"orders.>\"",
                        Self::MAX_TOPIC_PATTERN_LEN
                    ),
                ));
            }
            if topics.iter().any(|t| &t.pattern == pattern) {
                return Err(at(
                    text,
                    Some(table.pattern.span()),
                    format!("topic pattern {pattern:?} is listed twice; keep one [[topic]] table"),
                ));
            }
            let span = table.publishers.span();
            let raw_publishers = table.publishers.into_inner();
            if raw_publishers.is_empty() || raw_publishers.len() > Self::MAX_TOPIC_PUBLISHERS {
                return Err(at(
                    text,
                    Some(span),
                    format!(
                        "topic {pattern:?}: list 1 to {} publishers (identities)",
                        Self::MAX_TOPIC_PUBLISHERS
                    ),
                ));
            }
            let mut publishers = Vec::with_capacity(raw_publishers.len());
            for raw in &raw_publishers {
                let id = parse_identity(text, raw, &format!("topic {pattern:?}"))?;
                if !publishers.contains(&id) {
                    publishers.push(id);
                }
            }
            topics.push(TopicPublishers {
                pattern: pattern.clone(),
                publishers,
            });
        }
        Ok(Self {
            tabernas,
            domus,
            topics,
        })
    }

    /// The lookup table for these routes (what a resolver answers from).
    pub fn table(&self) -> RouteTable {
        RouteTable::from(self.clone())
    }
}

fn parse_addr(text: &str, raw: &Spanned<String>, what: &str) -> Result<DomusAddr, Error> {
    raw.get_ref().parse::<DomusAddr>().map_err(|e| {
        at(
            text,
            Some(raw.span()),
            format!(
                "{what}: addr: {}; write host:port, [v6 address]:port or unix:/absolute/path",
                e.message()
            ),
        )
    })
}

fn parse_identity(text: &str, raw: &Spanned<String>, what: &str) -> Result<DomusId, Error> {
    DomusId::new(raw.get_ref()).map_err(|e| {
        at(
            text,
            Some(raw.span()),
            format!(
                "{what}: identity: {}; write the URI SAN of the domus's certificate, e.g. \
                 spiffe://prod/domus/billing-0",
                e.message()
            ),
        )
    })
}

/// An `InvalidConfig` error, prefixed with the line `span` starts on when known.
fn at(text: &str, span: Option<Range<usize>>, problem: impl fmt::Display) -> Error {
    match span {
        Some(span) => invalid(format!("line {}: {problem}", line_of(text, span.start))),
        None => invalid(problem),
    }
}

fn invalid(problem: impl fmt::Display) -> Error {
    Error::new(ErrorId::InvalidConfig, problem.to_string())
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        let e = RoutesFile::parse(text).expect_err("the file is invalid");
        assert_eq!(e.id(), ErrorId::InvalidConfig, "{e}");
        e.message().to_owned()
    }

    fn id(s: &str) -> DomusId {
        DomusId::new(s).expect("valid id")
    }

    #[test]
    fn topic_tables_list_publishers_and_are_bounded() {
        let routes = RoutesFile::parse(
            r#"
[[topic]]
pattern = "billing.>"
publishers = ["spiffe://prod/domus/billing-0", "spiffe://prod/domus/billing-0", "spiffe://prod/domus/billing-1"]
"#,
        )
        .expect("parses");
        assert_eq!(routes.topics.len(), 1);
        assert_eq!(routes.topics[0].pattern, "billing.>");
        assert_eq!(
            routes.topics[0].publishers,
            vec![
                id("spiffe://prod/domus/billing-0"),
                id("spiffe://prod/domus/billing-1")
            ],
            "repeats collapse"
        );
        assert_eq!(routes.table().topic_publishers().len(), 1);
        let e = parse_err("[[topic]]\npattern = \"a\"\npublishers = []\n");
        assert!(e.contains("1 to 256 publishers"), "{e}");
        let e = parse_err("[[topic]]\npattern = \"\"\npublishers = [\"spiffe://a/b\"]\n");
        assert!(e.contains("topic pattern"), "{e}");
        let e = parse_err(
            "[[topic]]\npattern = \"a\"\npublishers = [\"spiffe://a/b\"]\n[[topic]]\npattern = \"a\"\npublishers = [\"spiffe://a/b\"]\n",
        );
        assert!(e.contains("listed twice"), "{e}");
        let e = parse_err("[[topic]]\npattern = \"a\"\npublishers = [\"not an id\"]\n");
        assert!(e.contains("identity"), "{e}");
    }

    #[test]
    fn a_good_file_parses_with_defaults_in_file_order() {
        let text = r#"
[[taberna]]
id = 7
candidates = [
  { addr = "10.0.0.5:7000", identity = "spiffe://prod/domus/billing-0", priority = 0, weight = 10 },
  { addr = "unix:/run/vicus/b.sock" },
]

[[taberna]]
id = 0x10
candidates = [{ addr = "billing.internal:7000", priority = 2 }]

[[domus]]
identity = "spiffe://prod/domus/billing-0"
addr = "10.0.0.5:7000"
"#;
        let file = RoutesFile::parse(text).expect("parses");
        assert_eq!(file.tabernas.len(), 2);
        let (t7, c7) = &file.tabernas[0];
        assert_eq!(*t7, TabernaId(7));
        assert_eq!(
            c7[0],
            Candidate {
                route: Route {
                    addr: DomusAddr::tcp(([10, 0, 0, 5], 7000)),
                    identity: Some(id("spiffe://prod/domus/billing-0")),
                },
                priority: 0,
                weight: 10,
            }
        );
        // Defaults: no identity, priority 0, weight 1.
        assert_eq!(
            c7[1],
            Candidate::new(Route {
                addr: DomusAddr::Unix(std::path::PathBuf::from("/run/vicus/b.sock")),
                identity: None,
            })
        );
        let (t16, c16) = &file.tabernas[1];
        assert_eq!(*t16, TabernaId(16));
        assert_eq!((c16[0].priority, c16[0].weight), (2, 1));
        assert_eq!(
            c16[0].route.addr,
            DomusAddr::TcpHost {
                host: "billing.internal".into(),
                port: 7000
            }
        );
        assert_eq!(
            file.domus,
            [(
                id("spiffe://prod/domus/billing-0"),
                DomusAddr::tcp(([10, 0, 0, 5], 7000))
            )]
        );

        let table = file.table();
        assert_eq!(table.len(), 2);
        assert_eq!(table.candidates(TabernaId(7)).map(|c| c.len()), Some(2));
        assert!(table.candidates(TabernaId(8)).is_none());
        assert_eq!(
            table.domus_addr(&id("spiffe://prod/domus/billing-0")),
            Some(&DomusAddr::tcp(([10, 0, 0, 5], 7000)))
        );
    }

    #[test]
    fn the_example_in_the_module_docs_parses() {
        let example: String = include_str!("mod.rs")
            .lines()
            .skip_while(|l| *l != "//! ```toml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let file = RoutesFile::parse(&example).expect("the documented example is valid");
        assert_eq!(file.tabernas.len(), 2);
        assert_eq!(file.tabernas[0].1.len(), 2);
        assert_eq!(file.tabernas[0].1[1].priority, 1);
        assert_eq!(file.domus.len(), 1);
    }

    #[test]
    fn an_empty_file_routes_nothing() {
        for text in ["", "# nothing yet\n", "\n\n"] {
            let file = RoutesFile::parse(text).expect("parses");
            assert_eq!(file, RoutesFile::default());
            assert!(file.table().is_empty());
        }
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let m = parse_err("[[taberna]]\nid = 7\ncandidates = [ { addr = \"a:1\" \n");
        assert!(m.starts_with("line 3: "), "{m}");
        assert!(m.contains("see vicus::FileResolver"), "{m}");
        let m = parse_err("garbage\x07 here");
        assert!(m.starts_with("line 1: "), "{m}");
        assert!(!m.contains('\x07'), "control characters are escaped: {m}");
    }

    #[test]
    fn unknown_and_missing_fields_are_refused_with_their_line() {
        let m = parse_err(
            "[[taberna]]\nid = 7\ncandidates = [{ addr = \"127.0.0.1:1\", weigth = 3 }]\n",
        );
        assert!(m.starts_with("line 3: "), "{m}");
        assert!(m.contains("weigth"), "{m}");
        let m = parse_err("[[tabernas]]\nid = 7\n");
        assert!(m.contains("tabernas"), "{m}");
        let m = parse_err("[[taberna]]\nid = 7\n");
        assert!(m.contains("candidates"), "{m}");
        let m = parse_err("[[domus]]\naddr = \"127.0.0.1:1\"\n");
        assert!(m.contains("identity"), "{m}");
    }

    #[test]
    fn values_out_of_range_are_refused() {
        let m = parse_err("[[taberna]]\nid = -1\ncandidates = [{ addr = \"127.0.0.1:1\" }]\n");
        assert!(m.starts_with("line 2: "), "{m}");
        let m = parse_err(
            "[[taberna]]\nid = 1\ncandidates = [{ addr = \"127.0.0.1:1\", weight = 70000 }]\n",
        );
        assert!(m.starts_with("line 3: "), "{m}");
        let m = parse_err("[[taberna]]\nid = \"seven\"\ncandidates = []\n");
        assert!(m.starts_with("line 2: "), "{m}");
    }

    #[test]
    fn a_bad_address_names_its_line_and_what_to_write() {
        let m = parse_err(
            "[[taberna]]\nid = 7\ncandidates = [\n  { addr = \"127.0.0.1:1\" },\n  { addr = \"unix:relative.sock\" },\n]\n",
        );
        assert!(m.starts_with("line 5: taberna 7: addr: "), "{m}");
        assert!(m.contains("unix:/absolute/path"), "{m}");
        let m = parse_err("[[domus]]\nidentity = \"spiffe://prod/domus/a\"\naddr = \"nowhere\"\n");
        assert!(
            m.starts_with("line 3: domus spiffe://prod/domus/a: addr: "),
            "{m}"
        );
    }

    #[test]
    fn a_bad_identity_names_its_line_and_what_to_write() {
        let m = parse_err(
            "[[taberna]]\nid = 7\ncandidates = [{ addr = \"127.0.0.1:1\", identity = \"billing-0\" }]\n",
        );
        assert!(m.starts_with("line 3: taberna 7: identity: "), "{m}");
        assert!(m.contains("spiffe://prod/domus/billing-0"), "{m}");
        let m = parse_err("[[domus]]\nidentity = \"not an id\"\naddr = \"127.0.0.1:1\"\n");
        assert!(m.starts_with("line 2: [[domus]]: identity: "), "{m}");
    }

    #[test]
    fn duplicates_are_refused_with_both_lines() {
        let m = parse_err(
            "[[taberna]]\nid = 7\ncandidates = [{ addr = \"127.0.0.1:1\" }]\n\
             [[taberna]]\nid = 7\ncandidates = [{ addr = \"127.0.0.1:2\" }]\n",
        );
        assert!(
            m.starts_with("line 5: taberna 7 is listed twice (first at line 2)"),
            "{m}"
        );
        let m = parse_err(
            "[[domus]]\nidentity = \"spiffe://p/domus/a\"\naddr = \"127.0.0.1:1\"\n\
             [[domus]]\nidentity = \"spiffe://p/domus/a\"\naddr = \"127.0.0.1:2\"\n",
        );
        assert!(
            m.starts_with("line 5: domus spiffe://p/domus/a is listed twice (first at line 2)"),
            "{m}"
        );
        let m = parse_err(
            "[[taberna]]\nid = 7\ncandidates = [{ addr = \"127.0.0.1:1\" }, { addr = \"127.0.0.1:1\", weight = 5 }]\n",
        );
        assert!(m.contains("lists 127.0.0.1:1 (any identity) twice"), "{m}");
        // The same address with two identities is two candidates.
        RoutesFile::parse(
            "[[taberna]]\nid = 7\ncandidates = [{ addr = \"127.0.0.1:1\", identity = \"spiffe://p/domus/a\" }, { addr = \"127.0.0.1:1\" }]\n",
        )
        .expect("distinct routes");
    }

    #[test]
    fn an_empty_candidate_list_is_refused() {
        let m = parse_err("[[taberna]]\nid = 7\ncandidates = []\n");
        assert!(m.starts_with("line 3: taberna 7 has no candidates"), "{m}");
    }

    fn tabernas(n: usize, candidates: usize) -> String {
        let list = (0..candidates)
            .map(|i| format!("{{ addr = \"127.0.0.1:{}\" }}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        (0..n)
            .map(|t| format!("[[taberna]]\nid = {t}\ncandidates = [{list}]\n"))
            .collect()
    }

    #[test]
    fn the_bounds_hold_at_their_limits() {
        let at_limit = tabernas(1, RoutesFile::MAX_CANDIDATES);
        assert_eq!(
            RoutesFile::parse(&at_limit).expect("parses").tabernas[0]
                .1
                .len(),
            RoutesFile::MAX_CANDIDATES
        );
        let m = parse_err(&tabernas(1, RoutesFile::MAX_CANDIDATES + 1));
        assert!(
            m.contains("lists 65 candidates; at most 64 are allowed"),
            "{m}"
        );
        let file = tabernas(RoutesFile::MAX_TABERNAS, 1);
        assert_eq!(
            RoutesFile::parse(&file).expect("parses").tabernas.len(),
            RoutesFile::MAX_TABERNAS
        );
        let file = tabernas(RoutesFile::MAX_TABERNAS + 1, 1);
        let m = parse_err(&file);
        assert!(
            m.contains("65537 [[taberna]] tables; at most 65536 are allowed"),
            "{m}"
        );
        let domus: String = (0..=RoutesFile::MAX_DOMUS)
            .map(|i| {
                format!("[[domus]]\nidentity = \"spiffe://p/domus/d{i}\"\naddr = \"127.0.0.1:1\"\n")
            })
            .collect();
        let m = parse_err(&domus);
        assert!(m.contains("at most 65536 are allowed"), "{m}");
    }

    #[test]
    fn line_of_counts_newlines_and_tolerates_any_offset() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
        assert_eq!(line_of("a\nb", 99), 2);
        assert_eq!(line_of("é\n", 1), 1);
    }
}
