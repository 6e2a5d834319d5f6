//! Failover: the memory of peers forgotten while they could not be reached (so a choice
//! avoids them for a while), and moving a send that never went out to another replica of its
//! taberna. A message that may have reached its peer never moves (no delivery by two
//! replicas).

use super::DomusInner;
use super::peers::Down;
use super::routing::Lookup;
use super::send::move_send;
use crate::a0_transport::{DomusAddr, DomusId};
use crate::resolve::{Candidate, Route};
use crate::runtime::peer::SendCmd;
use crate::taberna::TabernaId;
use std::sync::Arc;

impl DomusInner {
    /// Another replica for a send `from` cannot deliver and never wrote anywhere (see
    /// [`DriverHost::redirect`](crate::runtime::peer::DriverHost::redirect)): the taberna's
    /// candidates as the resolver gives them at once (a resolver that must wait is not asked),
    /// without `from` and without any this domus cannot reach now, chosen as a send chooses;
    /// the send takes room there afresh.
    pub(super) fn redirect(self: &Arc<Self>, from: &DomusId, send: SendCmd) -> Result<(), SendCmd> {
        let taberna = TabernaId(send.msg.dst);
        let Some(others) = self.alternatives(from, taberna) else {
            return Err(send);
        };
        let Ok(Route {
            addr,
            identity: Some(to),
        }) = self.pick(taberna, &others)
        else {
            return Err(send);
        };
        let moved = move_send(&self.peer_routed(&to, Some(addr), Some(taberna)), send);
        if moved.is_ok() {
            tracing::debug!(
                target: "vicus::why",
                why = "failover",
                taberna = taberna.0,
                from = %from,
                to = %to,
                "a message its peer never received went to another replica"
            );
        }
        moved
    }

    /// The candidates of `taberna` other than `from` that a send may move to now (see
    /// [`DomusInner::redirect`]); `None` when there is none, or the resolver does not answer at
    /// once.
    pub(super) fn alternatives(
        &self,
        from: &DomusId,
        taberna: TabernaId,
    ) -> Option<Vec<Candidate>> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let Lookup::Ready(Ok(candidates)) = self.start_candidates(taberna) else {
            return None;
        };
        let unreachable = self
            .peers
            .unreachable(&candidates, tokio::time::Instant::now());
        let others: Vec<Candidate> = candidates
            .iter()
            .filter(|c| {
                c.route.identity.as_ref().is_some_and(|id| {
                    id != from && id != &self.local_id && !unreachable.contains(&&c.route)
                })
            })
            .cloned()
            .collect();
        (!others.is_empty()).then_some(others)
    }

    /// What to remember of a peer forgotten while it could not be reached at `addr` (see
    /// [`Down`]): choice avoids it there for `reconnect_backoff_max`, and when it had
    /// `shut_down`, its next driver there is told so for `peer_retire_after`.
    pub(super) fn down_memory(&self, addr: Option<DomusAddr>, shut_down: bool) -> Down {
        let now = tokio::time::Instant::now();
        let config = self.config.load();
        Down {
            avoid_until: now + config.reconnect_backoff_max,
            // A driver with no address cannot dial: there is nothing to tell it.
            shut_down_until: (shut_down && addr.is_some()).then(|| now + config.peer_retire_after),
            addr,
        }
    }
}
