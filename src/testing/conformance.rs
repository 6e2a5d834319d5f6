//! The resolver contract, as a test a resolver author runs: [`check_resolver`] drives a
//! [`ResolverUnderTest`] through what a domus relies on and reports each check by name.
//!
//! What it checks: a taberna that was set answers with exactly its candidates (from
//! `candidates`, and `resolve` gives one of them); an unknown taberna is an
//! `ErrorId::UnknownTaberna` error (or an empty candidate list), never a hang; every call
//! answers within the bound; a change is visible to new lookups within the bound, and
//! `changes()`, when the resolver offers it, fires for it; a removed taberna is unknown again;
//! odd ids (0, `u64::MAX`) neither panic nor hang; 64 lookups at once all get the same
//! answer. What it must not do: touch the network itself — everything goes through the
//! resolver and the test's own setter.
//!
//! A resolver author implements [`ResolverUnderTest`] for their resolver (how to make a
//! taberna served by some candidates: write the zone, the file, the table) and asserts the
//! report, here with vicus's own [`SimpleResolver`](crate::SimpleResolver):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::time::Duration;
//! use vicus::testing::conformance::{SimpleResolverUnderTest, check_resolver};
//!
//! let report = check_resolver(&SimpleResolverUnderTest::default(), Duration::from_secs(1)).await;
//! for check in report.failures() {
//!     eprintln!("{}: {}", check.name, check.failure.as_deref().unwrap_or(""));
//! }
//! report.assert_passed();
//! # }
//! ```

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::ErrorId;
use crate::resolve::{Candidate, Route, RouteResolver};
use crate::{DomusAddr, DomusId, TabernaId};

/// A resolver under test, with the means to change what it knows (a DNS zone, a file, a
/// table) the way its users would.
pub trait ResolverUnderTest: Send + Sync {
    /// The resolver, as a domus would hold it.
    fn resolver(&self) -> Arc<dyn RouteResolver>;

    /// Makes `taberna` served by `candidates` (replacing what it had); returns once the
    /// change is made at the source (the resolver may see it later, within the bound).
    fn set<'a>(
        &'a self,
        taberna: TabernaId,
        candidates: Vec<Candidate>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

    /// Makes `taberna` unknown.
    fn remove<'a>(&'a self, taberna: TabernaId) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// `None` when it held; what went wrong otherwise.
    pub failure: Option<String>,
}

/// Every check, in order; [`ConformanceReport::passed`] says whether all held.
#[derive(Debug, Clone, Default)]
pub struct ConformanceReport {
    /// The checks that ran.
    pub checks: Vec<Check>,
}

impl ConformanceReport {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.failure.is_none())
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.failure.is_some())
    }

    /// Prints every check and panics, naming the failed ones, unless all held — the one line
    /// a resolver's own test needs.
    #[track_caller]
    pub fn assert_passed(&self) {
        for check in &self.checks {
            match &check.failure {
                None => println!("ok    {}", check.name),
                Some(why) => println!("FAIL  {}: {why}", check.name),
            }
        }
        assert!(!self.checks.is_empty(), "no check ran");
        let failed: Vec<String> = self
            .failures()
            .map(|c| format!("{}: {}", c.name, c.failure.as_deref().unwrap_or_default()))
            .collect();
        assert!(
            failed.is_empty(),
            "the resolver failed {} of {} conformance checks: {failed:#?}",
            failed.len(),
            self.checks.len()
        );
    }

    fn record(&mut self, name: &'static str, result: Result<(), String>) {
        self.checks.push(Check {
            name,
            failure: result.err(),
        });
    }
}

/// A candidate for the checks: `spiffe://vicus.dev/domus/<name>` at `127.0.0.1:port`.
fn candidate(name: &str, port: u16, priority: u16, weight: u16) -> Result<Candidate, String> {
    Ok(Candidate {
        route: Route {
            addr: DomusAddr::tcp(([127, 0, 0, 1], port)),
            identity: Some(DomusId::spiffe("vicus.dev", name).map_err(|e| e.to_string())?),
        },
        priority,
        weight,
    })
}

fn as_set(c: &[Candidate]) -> BTreeSet<String> {
    c.iter()
        .map(|c| format!("{:?}/{}/{}", c.route, c.priority, c.weight))
        .collect()
}

/// Looks `taberna` up through `candidates`, bounded by `within`.
async fn look(
    resolver: &dyn RouteResolver,
    taberna: TabernaId,
    within: Duration,
) -> Result<Result<Vec<Candidate>, ErrorId>, String> {
    let call = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        resolver.candidates(taberna)
    }))
    .map_err(|_| format!("candidates({taberna}) panicked"))?;
    match tokio::time::timeout(within, call).await {
        Err(_) => Err(format!(
            "candidates({taberna}) did not answer within {within:?}"
        )),
        Ok(Ok(c)) => Ok(Ok(c.to_vec())),
        Ok(Err(e)) => Ok(Err(e.id())),
    }
}

/// Runs every check against `target`; `bound` is how long a lookup may take and how soon a
/// change must be visible (a DNS resolver with a TTL needs about one TTL). Tabernas
/// `0xC0F0_0001..=0xC0F0_0003` are used.
pub async fn check_resolver(target: &dyn ResolverUnderTest, bound: Duration) -> ConformanceReport {
    let mut report = ConformanceReport::default();
    let resolver = target.resolver();
    let (t1, t2, t3) = (
        TabernaId(0xC0F0_0001),
        TabernaId(0xC0F0_0002),
        TabernaId(0xC0F0_0003),
    );
    let (Ok(a), Ok(b), Ok(c)) = (
        candidate("conformance-a", 41001, 0, 1),
        candidate("conformance-b", 41002, 0, 3),
        candidate("conformance-c", 41003, 1, 1),
    ) else {
        report.record("setup", Err("could not build the test candidates".into()));
        return report;
    };
    let mut changes = resolver.changes();

    // 1. What was set is answered, exactly.
    target.set(t1, vec![a.clone(), b.clone(), c.clone()]).await;
    let want = as_set(&[a.clone(), b.clone(), c.clone()]);
    let seen = eventually(
        &*resolver,
        t1,
        bound,
        |got| matches!(got, Ok(v) if as_set(v) == want),
    )
    .await;
    report.record(
        "a taberna that was set answers with exactly its candidates",
        seen,
    );
    let one = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resolver.resolve(t1)))
    {
        Err(_) => Err("resolve panicked".to_owned()),
        Ok(f) => match tokio::time::timeout(bound, f).await {
            Err(_) => Err(format!("resolve did not answer within {bound:?}")),
            Ok(Err(e)) => Err(format!("resolve failed: {e}")),
            Ok(Ok(route)) if [&a, &b, &c].iter().any(|c| c.route == route) => Ok(()),
            Ok(Ok(route)) => Err(format!("resolve gave {route:?}, which is no candidate")),
        },
    };
    report.record("resolve gives one of the candidates", one);

    // 2. Unknown tabernas: a typed error or nothing, at once, never a panic.
    let mut unknown = Ok(());
    for t in [t2, TabernaId(0), TabernaId(u64::MAX)] {
        match look(&*resolver, t, bound).await {
            Err(e) => unknown = Err(e),
            Ok(Ok(v)) if v.is_empty() => {}
            Ok(Err(ErrorId::UnknownTaberna)) => {}
            Ok(Ok(v)) => unknown = Err(format!("{t} is unknown but answered {v:?}")),
            Ok(Err(id)) => unknown = Err(format!("{t} is unknown but failed with {id:?}")),
        }
    }
    report.record(
        "an unknown taberna is UnknownTaberna (or no candidate), without a panic",
        unknown,
    );

    // 3. A change reaches new lookups, and the change signal fires.
    target.set(t1, vec![c.clone()]).await;
    let want = as_set(std::slice::from_ref(&c));
    report.record(
        "a change is visible to new lookups within the bound",
        eventually(
            &*resolver,
            t1,
            bound,
            |got| matches!(got, Ok(v) if as_set(v) == want),
        )
        .await,
    );
    if let Some(ch) = changes.as_mut() {
        let fired = tokio::time::timeout(bound, ch.changed()).await;
        report.record(
            "changes() fires after a change",
            match fired {
                Ok(true) => Ok(()),
                Ok(false) => Err("the change signal ended".into()),
                Err(_) => Err(format!("no change signalled within {bound:?}")),
            },
        );
    }

    // 4. A removed taberna is unknown again.
    target.remove(t1).await;
    report.record(
        "a removed taberna is unknown again within the bound",
        eventually(&*resolver, t1, bound, |got| {
            matches!(got, Err(ErrorId::UnknownTaberna)) || matches!(got, Ok(v) if v.is_empty())
        })
        .await,
    );

    // 5. Many lookups at once agree.
    target.set(t3, vec![a.clone(), b.clone()]).await;
    let want = as_set(&[a, b]);
    let ready = eventually(
        &*resolver,
        t3,
        bound,
        |got| matches!(got, Ok(v) if as_set(v) == want),
    )
    .await;
    let concurrent = match ready {
        Err(e) => Err(e),
        Ok(()) => {
            let lookups = (0..64).map(|_| look(&*resolver, t3, bound));
            let answers = futures_join_all(lookups).await;
            answers
                .into_iter()
                .find_map(|r| match r {
                    Ok(Ok(v)) if as_set(&v) == want => None,
                    other => Some(format!("one of 64 concurrent lookups got {other:?}")),
                })
                .map_or(Ok(()), Err)
        }
    };
    report.record("64 concurrent lookups all get the same answer", concurrent);
    target.remove(t3).await;
    report
}

/// Polls `taberna` until `ok` holds for the answer or `bound` passes.
async fn eventually(
    resolver: &dyn RouteResolver,
    taberna: TabernaId,
    bound: Duration,
    ok: impl Fn(&Result<Vec<Candidate>, ErrorId>) -> bool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let got = look(resolver, taberna, bound).await?;
        if ok(&got) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("within {bound:?} the last answer was {got:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits every future (all polled together, on this task).
async fn futures_join_all<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (slot, fut) in out.iter_mut().zip(pending.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// [`SimpleResolver`](crate::SimpleResolver) as a [`ResolverUnderTest`] (vicus's own
/// conformance test, and an example of the trait).
#[derive(Debug, Default)]
pub struct SimpleResolverUnderTest(pub Arc<crate::SimpleResolver>);

impl ResolverUnderTest for SimpleResolverUnderTest {
    fn resolver(&self) -> Arc<dyn RouteResolver> {
        self.0.clone()
    }

    fn set<'a>(
        &'a self,
        taberna: TabernaId,
        candidates: Vec<Candidate>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.0.insert_candidates(taberna, candidates);
        Box::pin(std::future::ready(()))
    }

    fn remove<'a>(&'a self, taberna: TabernaId) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.0.remove(taberna);
        Box::pin(std::future::ready(()))
    }
}
