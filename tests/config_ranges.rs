//! Every configurable field, walked at the edges of its documented range: a value just below
//! and just above it is refused with `InvalidConfig` naming the field, and nothing changes —
//! at build, as a live update, per send and per taberna.
//!
//! The tables below must have one row per field. The field names are read from each struct's
//! derived `Debug` output, so a field added without a row fails
//! `every_field_of_every_config_struct_has_a_row`.

mod common;

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use vicus::a0_transport::{Transport, TransportConfig};
use vicus::{Domus, DomusConfig, ErrorId, MessageType, SendOptions, TabernaId, TabernaOptions};

const NS: Duration = Duration::from_nanos(1);
const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const MIN: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// One edge of a field's range: an edit that puts the field just outside it, or why the field
/// has no such edge.
enum Edge<T> {
    Outside(fn(&mut T)),
    None(&'static str),
}

use Edge::{None as Open, Outside};

/// A field, the value just below its range and the value just above it.
struct Row<T> {
    field: &'static str,
    below: Edge<T>,
    above: Edge<T>,
}

fn row<T>(field: &'static str, below: Edge<T>, above: Edge<T>) -> Row<T> {
    Row {
        field,
        below,
        above,
    }
}

/// The rows of `DomusConfig` (with the defaults as the base, so relative bounds such as
/// `idle_timeout > keepalive_interval` are computed from the defaults).
fn domus_rows() -> Vec<Row<DomusConfig>> {
    vec![
        row(
            "transport",
            Open("a struct: each of its fields has a row in transport_rows"),
            Open("a struct: each of its fields has a row in transport_rows"),
        ),
        row(
            "send_timeout",
            Outside(|c| c.send_timeout = MS - NS),
            Outside(|c| c.send_timeout = 60 * MIN + NS),
        ),
        row(
            "resolve_timeout",
            Outside(|c| c.resolve_timeout = MS - NS),
            Outside(|c| c.resolve_timeout = MIN + NS),
        ),
        row(
            "max_message_len",
            Open("0 is allowed and a usize has nothing below it"),
            Outside(|c| c.max_message_len = 64 * MIB + 1),
        ),
        row(
            "max_in_flight_per_peer",
            Outside(|c| c.max_in_flight_per_peer = 0),
            Outside(|c| c.max_in_flight_per_peer = (1 << 20) + 1),
        ),
        row(
            "max_in_flight_bytes_per_peer",
            // At least max_message_len (1 MiB by default).
            Outside(|c| c.max_in_flight_bytes_per_peer = MIB - 1),
            Outside(|c| c.max_in_flight_bytes_per_peer = u32::MAX as usize + 1),
        ),
        row(
            "dedupe_window",
            // At least max_in_flight_per_peer (4096 by default).
            Outside(|c| c.dedupe_window = 4095),
            Outside(|c| c.dedupe_window = (1 << 20) + 1),
        ),
        row(
            "max_retained_reply_bytes",
            Open("0 is allowed and a usize has nothing below it"),
            Outside(|c| c.max_retained_reply_bytes = (1 << 34) + 1),
        ),
        row(
            "max_unsent_answer_bytes",
            Outside(|c| c.max_unsent_answer_bytes = 64 * 1024 - 1),
            Outside(|c| c.max_unsent_answer_bytes = (1 << 32) + 1),
        ),
        row(
            "max_headers",
            Open("0 (no headers) is allowed and a u16 has nothing below it"),
            Outside(|c| c.max_headers = 1025),
        ),
        row(
            "max_headers_len",
            Open("0 (no headers) is allowed and a usize has nothing below it"),
            Outside(|c| c.max_headers_len = 65_535),
        ),
        row(
            "keepalive_interval",
            Outside(|c| c.keepalive_interval = 10 * MS - NS),
            Outside(|c| c.keepalive_interval = 10 * MIN + NS),
        ),
        row(
            "idle_timeout",
            // More than keepalive_interval (5 s by default).
            Outside(|c| c.idle_timeout = 5 * SEC),
            Outside(|c| c.idle_timeout = 60 * MIN + NS),
        ),
        row(
            "hello_timeout",
            Outside(|c| c.hello_timeout = 10 * MS - NS),
            Outside(|c| c.hello_timeout = 5 * MIN + NS),
        ),
        row(
            "frame_read_timeout",
            Outside(|c| c.frame_read_timeout = 10 * MS - NS),
            Outside(|c| c.frame_read_timeout = 60 * MIN + NS),
        ),
        row(
            "max_frames_per_second",
            Outside(|c| c.max_frames_per_second = 999),
            Outside(|c| c.max_frames_per_second = 100_000_001),
        ),
        row(
            "max_refusals_per_second",
            Outside(|c| c.max_refusals_per_second = 0),
            Outside(|c| c.max_refusals_per_second = 10_000_001),
        ),
        row(
            "reconnect_backoff_min",
            Outside(|c| c.reconnect_backoff_min = MS - NS),
            Outside(|c| c.reconnect_backoff_min = MIN + NS),
        ),
        row(
            "reconnect_backoff_max",
            // At least reconnect_backoff_min (50 ms by default).
            Outside(|c| c.reconnect_backoff_max = 50 * MS - NS),
            Outside(|c| c.reconnect_backoff_max = 10 * MIN + NS),
        ),
        row(
            "default_inbox_depth",
            Outside(|c| c.default_inbox_depth = 0),
            Outside(|c| c.default_inbox_depth = (1 << 20) + 1),
        ),
        row(
            "shutdown_timeout",
            Outside(|c| c.shutdown_timeout = MS - NS),
            Outside(|c| c.shutdown_timeout = 10 * MIN + NS),
        ),
        row(
            "blob_chunk_len",
            Outside(|c| c.blob_chunk_len = 1023),
            Outside(|c| c.blob_chunk_len = MIB + 1),
        ),
        row(
            "blob_window",
            // At least blob_chunk_len (64 KiB by default).
            Outside(|c| c.blob_window = 64 * 1024 - 1),
            Outside(|c| c.blob_window = 256 * MIB + 1),
        ),
        row(
            "max_blob_streams_per_peer",
            Outside(|c| c.max_blob_streams_per_peer = 0),
            Outside(|c| c.max_blob_streams_per_peer = 4097),
        ),
        row(
            "blob_idle_timeout",
            Outside(|c| c.blob_idle_timeout = 10 * MS - NS),
            Outside(|c| c.blob_idle_timeout = 60 * MIN + NS),
        ),
        row(
            "blob_inbound_budget",
            // At least blob_window (8 MiB by default).
            Outside(|c| c.blob_inbound_budget = 8 * MIB - 1),
            Outside(|c| c.blob_inbound_budget = (1 << 40) + 1),
        ),
        row(
            "blob_outbound_budget",
            Outside(|c| c.blob_outbound_budget = 8 * MIB - 1),
            Outside(|c| c.blob_outbound_budget = (1 << 40) + 1),
        ),
        row(
            "max_blob_cancels_per_second",
            Outside(|c| c.max_blob_cancels_per_second = 0),
            Outside(|c| c.max_blob_cancels_per_second = 10_000_001),
        ),
        row(
            "max_unopened_calles_per_peer",
            Outside(|c| c.max_unopened_calles_per_peer = 0),
            Outside(|c| c.max_unopened_calles_per_peer = 1025),
        ),
        row(
            "max_unopened_calles",
            Outside(|c| c.max_unopened_calles = 0),
            Outside(|c| c.max_unopened_calles = 65_537),
        ),
        row(
            "max_peers",
            Outside(|c| c.max_peers = 0),
            Outside(|c| c.max_peers = 1_000_001),
        ),
        row(
            "max_pinned_addresses",
            Outside(|c| c.max_pinned_addresses = 0),
            Outside(|c| c.max_pinned_addresses = 1_000_001),
        ),
        row(
            "max_callis_age",
            Outside(|c| c.max_callis_age = Some(100 * MS - NS)),
            Outside(|c| c.max_callis_age = Some(365 * 24 * 60 * MIN + NS)),
        ),
        row(
            "peer_retire_after",
            Outside(|c| c.peer_retire_after = 1000 * MS - NS),
            Outside(|c| c.peer_retire_after = 7 * 24 * 60 * MIN + NS),
        ),
        row(
            "peer_recheck_interval",
            Outside(|c| c.peer_recheck_interval = Some(100 * MS - NS)),
            Outside(|c| c.peer_recheck_interval = Some(24 * 60 * MIN + NS)),
        ),
    ]
}

fn transport_rows() -> Vec<Row<TransportConfig>> {
    vec![
        row(
            "listen_backlog",
            Outside(|c| c.listen_backlog = 0),
            Outside(|c| c.listen_backlog = 65_536),
        ),
        row(
            "handshake_timeout",
            Outside(|c| c.handshake_timeout = 100 * MS - NS),
            Outside(|c| c.handshake_timeout = 5 * MIN + NS),
        ),
        row(
            "client_hello_timeout",
            Outside(|c| c.client_hello_timeout = 10 * MS - NS),
            Outside(|c| c.client_hello_timeout = MIN + NS),
        ),
        row(
            "connect_timeout",
            Outside(|c| c.connect_timeout = 10 * MS - NS),
            Outside(|c| c.connect_timeout = 5 * MIN + NS),
        ),
        row(
            "max_pending_handshakes",
            Outside(|c| c.max_pending_handshakes = 0),
            Outside(|c| c.max_pending_handshakes = 65_537),
        ),
        row(
            "max_pending_handshakes_per_source",
            Outside(|c| c.max_pending_handshakes_per_source = 0),
            // At most max_pending_handshakes (256 by default).
            Outside(|c| c.max_pending_handshakes_per_source = 257),
        ),
        row(
            "max_connects_per_second_per_source",
            Outside(|c| c.max_connects_per_second_per_source = 0),
            Outside(|c| c.max_connects_per_second_per_source = 1_000_001),
        ),
        row(
            "unix_socket_mode",
            // Must include 0o600 and nothing beyond 0o777.
            Outside(|c| c.unix_socket_mode = 0o400),
            Outside(|c| c.unix_socket_mode = 0o1600),
        ),
        row(
            "unix_allowed_uids",
            Outside(|c| c.unix_allowed_uids = Some(BTreeSet::new())),
            Open("any non-empty set of uids is allowed"),
        ),
        row(
            "trust_policy",
            Open("every policy is valid"),
            Open("every policy is valid"),
        ),
    ]
}

fn send_rows() -> Vec<Row<SendOptions>> {
    vec![
        row(
            "timeout",
            Outside(|o| o.timeout = Some(MS - NS)),
            Outside(|o| o.timeout = Some(60 * MIN + NS)),
        ),
        row(
            "source",
            Open("any taberna id may be the source"),
            Open("any taberna id may be the source"),
        ),
        row(
            "headers",
            Open("none is fine"),
            Open(
                "bounded by DomusConfig::max_headers and max_headers_len, refused with HeadersTooLarge (tests/headers.rs)",
            ),
        ),
    ]
}

fn taberna_rows() -> Vec<Row<TabernaOptions>> {
    vec![
        row(
            "inbox_depth",
            Outside(|o| o.inbox_depth = Some(0)),
            Outside(|o| o.inbox_depth = Some((1 << 20) + 1)),
        ),
        row(
            "allowed_peers",
            Outside(|o| o.allowed_peers = Some(BTreeSet::new())),
            Open("any non-empty set of peers is allowed"),
        ),
        row(
            "accepted_types",
            // An empty range: it would refuse every message.
            Outside(|o| o.accepted_types = Some(RangeInclusive::new(0x0100_0005, 0x0100_0004))),
            Open("any non-empty range is allowed"),
        ),
    ]
}

/// The top-level field names of a struct, from its pretty-printed derived `Debug`.
fn debug_fields(pretty: &str) -> BTreeSet<String> {
    pretty
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("    ")?;
            if rest.starts_with(' ') {
                return None;
            }
            let (name, _) = rest.split_once(':')?;
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
                .then(|| name.to_owned())
        })
        .collect()
}

/// The field names of the rows; every open edge must say why it is open.
fn names<T>(rows: &[Row<T>]) -> BTreeSet<String> {
    for r in rows {
        for edge in [&r.below, &r.above] {
            if let Open(why) = edge {
                assert!(!why.is_empty(), "{}: an open edge needs a reason", r.field);
            }
        }
    }
    rows.iter().map(|r| r.field.to_owned()).collect()
}

/// Each edit that puts a field outside its range, with the field's name and which edge.
/// A field's name, which edge ("below" or "above") and the edit that crosses it.
type Edit<T> = (&'static str, &'static str, fn(&mut T));
/// The same for `DomusConfig`, whose transport rows edit a nested struct.
type DomusEdit = (&'static str, &'static str, Box<dyn Fn(&mut DomusConfig)>);

fn edits<T>(rows: Vec<Row<T>>) -> Vec<Edit<T>> {
    let mut out = Vec::new();
    for r in rows {
        for (edge, which) in [(r.below, "below"), (r.above, "above")] {
            if let Outside(edit) = edge {
                out.push((r.field, which, edit));
            }
        }
    }
    out
}

/// The edits of every field of `DomusConfig`, the transport's included.
fn all_domus_edits() -> Vec<DomusEdit> {
    let mut out: Vec<DomusEdit> = Vec::new();
    for (field, which, edit) in edits(domus_rows()) {
        out.push((field, which, Box::new(edit)));
    }
    for (field, which, edit) in edits(transport_rows()) {
        out.push((field, which, Box::new(move |c| edit(&mut c.transport))));
    }
    out
}

fn assert_names_field(e: &vicus::Error, field: &str, context: &str) {
    assert_eq!(e.id(), ErrorId::InvalidConfig, "{context}: {e}");
    assert!(
        e.message().starts_with(field),
        "{context}: the error should name {field}: {e}"
    );
}

#[test]
fn every_field_of_every_config_struct_has_a_row() {
    let cases = [
        (
            "DomusConfig",
            debug_fields(&format!("{:#?}", DomusConfig::default())),
            names(&domus_rows()),
        ),
        (
            "TransportConfig",
            debug_fields(&format!("{:#?}", TransportConfig::default())),
            names(&transport_rows()),
        ),
        (
            "SendOptions",
            debug_fields(&format!("{:#?}", SendOptions::default())),
            names(&send_rows()),
        ),
        (
            "TabernaOptions",
            debug_fields(&format!("{:#?}", TabernaOptions::default())),
            names(&taberna_rows()),
        ),
    ];
    for (name, fields, rows) in cases {
        assert!(fields.len() >= 2, "{name}: could not read its fields");
        assert_eq!(fields, rows, "{name}: every field needs exactly one row");
    }
}

#[test]
fn defaults_are_inside_every_range() {
    DomusConfig::default().validate().expect("DomusConfig");
    TransportConfig::default()
        .validate()
        .expect("TransportConfig");
    // The edges themselves are inside: one step back from each edit is accepted.
    let mut c = DomusConfig::default();
    c.max_frames_per_second = 1000;
    c.validate().expect("1000 frames per second is allowed");
    c.max_frames_per_second = 100_000_000;
    c.validate().expect("100 M frames per second is allowed");
}

#[tokio::test]
async fn t29_every_out_of_range_value_is_refused_at_build_and_live_naming_its_field() {
    within(async {
        let mut ca = ca();
        let (auth, _) = ca.domus_auth("cfg").expect("mint");
        // At build: validate() and the builder refuse it, and no domus starts.
        for (field, which, edit) in all_domus_edits() {
            let mut config = DomusConfig::default();
            edit(&mut config);
            let context = format!("{field} {which} its range");
            let e = config.validate().expect_err(&context);
            assert_names_field(&e, field, &context);
            let e = Domus::builder(auth.clone())
                .config(config)
                .build()
                .await
                .expect_err(&context);
            assert_names_field(&e, field, &format!("build: {context}"));
        }
        // A transport on its own refuses its fields the same way.
        for (field, which, edit) in edits(transport_rows()) {
            let mut config = TransportConfig::default();
            edit(&mut config);
            let context = format!("Transport::new: {field} {which} its range");
            let e = Transport::new(auth.clone(), config).expect_err(&context);
            assert_names_field(&e, field, &context);
        }
        // Live: the update is refused and the configuration in force is unchanged.
        let domus = Domus::builder(auth.clone())
            .build()
            .await
            .expect("a valid domus");
        let before = domus.config().snapshot();
        for (field, which, edit) in all_domus_edits() {
            let context = format!("update: {field} {which} its range");
            let e = domus.config().update(|c| edit(c)).expect_err(&context);
            assert_names_field(&e, field, &context);
            assert_eq!(domus.config().snapshot(), before, "{context} changed it");
        }
        domus.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn out_of_range_send_and_taberna_options_are_refused_naming_their_field() {
    within(async {
        let mut ca = ca();
        let (auth, _) = ca.domus_auth("opts").expect("mint");
        let domus = Domus::builder(auth).build().await.expect("domus");
        let app = MessageType::app(1);
        let _inbox = domus.taberna(TabernaId(1)).expect("taberna");
        for (field, which, edit) in edits(send_rows()) {
            let mut options = SendOptions::default();
            edit(&mut options);
            let context = format!("SendOptions::{field} {which} its range");
            let sent_before = domus.reporting().snapshot().totals.messages_sent;
            let e = domus
                .send(TabernaId(1), app, Bytes::new(), options)
                .await
                .expect_err(&context);
            assert_names_field(&e, &format!("SendOptions::{field}"), &context);
            let sent_after = domus.reporting().snapshot().totals.messages_sent;
            assert_eq!(sent_after, sent_before, "{context}: nothing may be sent");
        }
        for (n, (field, which, edit)) in edits(taberna_rows()).into_iter().enumerate() {
            let mut options = TabernaOptions::default();
            edit(&mut options);
            let context = format!("TabernaOptions::{field} {which} its range");
            let id = TabernaId(100 + n as u64);
            let e = domus.taberna_with(id, options).expect_err(&context);
            assert_names_field(&e, &format!("TabernaOptions::{field}"), &context);
            // Nothing was registered: the id is still free.
            domus
                .taberna(id)
                .unwrap_or_else(|e| panic!("{context}: the id was taken: {e}"));
        }
        // A valid allow-list still registers.
        domus
            .taberna_with(
                TabernaId(99),
                TabernaOptions::default().allowed_peers([id("x")]),
            )
            .expect("a non-empty allow-list is fine");
        domus.shutdown().await;
    })
    .await;
}

/// The backticked names in the rows of a "when each field applies" table in `source` (rows
/// starting with `| **live**`, `| **new peers**` or `| **fixed**`, inside `//!` or `///`
/// comments).
fn live_config_table_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines() {
        let line = line
            .trim_start()
            .trim_start_matches("//!")
            .trim_start_matches("///");
        let row = line.trim_start();
        if !["| **live**", "| **new peers**", "| **fixed**"]
            .iter()
            .any(|start| row.starts_with(start))
        {
            continue;
        }
        names.extend(row.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    names
}

/// Both tables that say when a live change of each `DomusConfig` field applies (the crate
/// docs' *Live configuration* and `DomusConfig`'s own) name every field, so none is left
/// for a user to guess (a wildcard such as `blob_*` counts for every field it matches).
#[test]
fn the_live_configuration_tables_name_every_domus_config_field() {
    let fields = debug_fields(&format!("{:#?}", DomusConfig::default()));
    assert!(fields.len() >= 2, "could not read DomusConfig's fields");
    for (doc, source) in [
        ("the crate docs (src/lib.rs)", include_str!("../src/lib.rs")),
        ("DomusConfig's docs", include_str!("../src/domus/config.rs")),
    ] {
        let named = live_config_table_names(source);
        assert!(
            !named.is_empty(),
            "{doc}: no live-configuration table found"
        );
        let missing: Vec<&String> = fields
            .iter()
            .filter(|field| {
                !named.iter().any(|n| {
                    n == *field
                        || n.strip_suffix('*')
                            .is_some_and(|prefix| field.starts_with(prefix))
                })
            })
            .collect();
        assert!(
            missing.is_empty(),
            "{doc}: the live-configuration table does not say when {missing:?} apply"
        );
    }
}
