//! Asking DNS about one SRV name: the lookup task (one per name at a time, bounded as a
//! whole, always ending with a stored result) and the reading of an SRV answer into
//! candidates (addresses, shares of the weight, identities from the template).
//!
//! It must not keep what it finds: every result goes to `Inner::store`, which decides what is
//! kept, signalled and reported.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError};

use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use tokio::sync::watch;

use super::config::SrvParts;
use super::{Answer, Inner, Known, MAX_CANDIDATES};
use crate::a0_transport::{DomusAddr, DomusId};
use crate::error::{Error, ErrorId, untrusted};
use crate::resolve::{Candidate, Route};

impl Inner {
    /// Starts a lookup of name `index` on its own task unless one is running; the receiver
    /// turns `true` when its result is stored.
    pub(super) fn start_lookup(inner: &Arc<Self>, index: usize) -> Option<watch::Receiver<bool>> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = watch::channel(false);
        {
            let mut entries = inner.entries.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = entries.get_mut(index)?;
            if let Some(running) = &entry.running {
                return Some(running.clone());
            }
            entry.running = Some(rx.clone());
        }
        let weak = Arc::downgrade(inner);
        rt.spawn(async move {
            let Some(inner) = weak.upgrade() else { return };
            // A lookup that ends without storing (a panic in the DNS client, a runtime shutting
            // down) stores a failure instead, so the name is not left "running" for ever.
            let mut guard = StoreOnDrop {
                inner: inner.clone(),
                index,
                stored: false,
            };
            // SRV, then A/AAAA per target not covered by the additional section: bounded as a
            // whole, so a lookup always ends.
            let limit = inner.config.query_timeout.saturating_mul(4);
            let result = match tokio::time::timeout(limit, inner.query(index)).await {
                Ok(result) => result,
                Err(_) => Err(Error::new(
                    ErrorId::ResolverFailed,
                    format!(
                        "the DNS lookup of {} took longer than {limit:?}",
                        inner.names.get(index).map_or("", |(_, t)| t.as_str())
                    ),
                )),
            };
            inner.store(index, result);
            guard.stored = true;
            let _ = tx.send(true);
        });
        Some(rx)
    }

    /// Asks DNS for name `index`: its candidates and how long they hold.
    async fn query(&self, index: usize) -> Result<Answer, Error> {
        let Some((name, text)) = self.names.get(index) else {
            return Ok(Answer::absent(self.config.negative_ttl));
        };
        let srv_parts = SrvParts::of(text);
        let failed = |e: &NetError| {
            Error::new(
                ErrorId::ResolverFailed,
                format!("the DNS lookup of {text} (SRV) failed: {e}"),
            )
        };
        let lookup = match self.dns.srv_lookup(name.clone()).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                return Ok(Answer::absent(self.config.negative_ttl));
            }
            Err(e) => return Err(failed(&e)),
        };
        let now = std::time::Instant::now();
        let mut ttl = lookup.valid_until().saturating_duration_since(now);
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut target_errors: Vec<String> = Vec::new();
        let mut targets = 0usize;
        for record in lookup.answers() {
            let RData::SRV(srv) = &record.data else {
                continue;
            };
            let target = &srv.target;
            if target.is_root() {
                continue;
            }
            targets = targets.saturating_add(1);
            let mut ips: Vec<IpAddr> = lookup
                .additionals()
                .iter()
                .filter(|r| r.name == *target)
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect();
            if ips.is_empty() {
                match self.dns.lookup_ip(target.clone()).await {
                    Ok(found) => {
                        ttl = ttl.min(found.valid_until().saturating_duration_since(now));
                        ips.extend(found.iter());
                    }
                    Err(e) if e.is_nx_domain() || e.is_no_records_found() => {}
                    Err(e) => target_errors.push(format!("{target}: {e}")),
                }
            }
            ips.sort_unstable();
            ips.dedup();
            let target_text = target.to_utf8();
            let target_text = target_text.trim_end_matches('.');
            let allowed = self.allowed.get(index).map_or(&[][..], Vec::as_slice);
            let identity = match &self.template {
                Some(t) => {
                    let rendered = t.render(&srv_parts, target_text, srv.port);
                    match DomusId::new(&rendered) {
                        Ok(id)
                            if !allowed.is_empty()
                                && !allowed.iter().any(|a| a.allows(id.as_str())) =>
                        {
                            target_errors.push(format!(
                                "{target_text}: the identity template gives \"{}\", which \
                                 allow_identities does not allow for {text}",
                                untrusted(&rendered)
                            ));
                            continue;
                        }
                        Ok(id) => Some(id),
                        Err(e) => {
                            target_errors.push(format!(
                                "{target_text}: the identity template gives \"{}\", which is \
                                 not a domus identity ({})",
                                untrusted(&rendered),
                                e.message()
                            ));
                            continue;
                        }
                    }
                }
                None => None,
            };
            let count = u16::try_from(ips.len().max(1)).unwrap_or(u16::MAX);
            let share = if srv.weight == 0 {
                0
            } else {
                (srv.weight / count).max(1)
            };
            for ip in ips {
                if candidates.len() >= MAX_CANDIDATES {
                    break;
                }
                candidates.push(Candidate {
                    route: Route {
                        addr: DomusAddr::Tcp(SocketAddr::new(ip, srv.port)),
                        identity: identity.clone(),
                    },
                    priority: srv.priority,
                    weight: share,
                });
            }
        }
        if candidates.is_empty() {
            if !target_errors.is_empty() {
                return Err(Error::new(
                    ErrorId::ResolverFailed,
                    format!(
                        "the DNS lookup of {text} gave {targets} target(s), none usable: {}",
                        target_errors.join("; ")
                    ),
                ));
            }
            return Ok(Answer::absent(self.config.negative_ttl));
        }
        let warning = (!target_errors.is_empty()).then(|| {
            format!(
                "the DNS lookup of {text}: some targets are not used: {}",
                target_errors.join("; ")
            )
        });
        candidates.sort_by(|a, b| {
            (a.priority, a.route.addr.to_string(), a.weight).cmp(&(
                b.priority,
                b.route.addr.to_string(),
                b.weight,
            ))
        });
        Ok(Answer {
            known: Known::Found(Arc::from(candidates)),
            ttl: ttl.clamp(self.config.min_ttl, self.config.max_ttl),
            warning,
        })
    }
}

/// Stores a failure for a lookup whose task ended before it stored its result.
struct StoreOnDrop {
    inner: Arc<Inner>,
    index: usize,
    stored: bool,
}

impl Drop for StoreOnDrop {
    fn drop(&mut self) {
        if !self.stored {
            let name = self
                .inner
                .names
                .get(self.index)
                .map_or("", |(_, t)| t.as_str());
            self.inner.store(
                self.index,
                Err(Error::new(
                    ErrorId::ResolverFailed,
                    format!("the DNS lookup of {name} ended without an answer"),
                )),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::dns_srv::{DnsSrvConfig, DnsSrvResolver};
    use crate::taberna::TabernaId;

    #[tokio::test]
    async fn a_lookup_task_that_dies_leaves_a_failure_not_a_name_running_for_ever() {
        let server: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let r = DnsSrvResolver::new(
            DnsSrvConfig::new()
                .name_server(server)
                .service(TabernaId(1), "_vicus._tcp.x.test"),
        )
        .expect("builds");
        let (_tx, rx) = watch::channel(false);
        r.inner.entries.lock().expect("entries")[0].running = Some(rx);
        drop(StoreOnDrop {
            inner: r.inner.clone(),
            index: 0,
            stored: false,
        });
        let entries = r.inner.entries.lock().expect("entries");
        assert!(entries[0].running.is_none(), "no longer running");
        let failing = entries[0].failing.as_ref().expect("a failure is kept");
        assert_eq!(failing.id(), ErrorId::ResolverFailed);
        assert!(failing.message().contains("without an answer"), "{failing}");
    }
}
