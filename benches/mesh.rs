//! Placeholder replaced by the benchmark harness (see the messaging issue).
fn main() {}
