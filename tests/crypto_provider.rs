//! Which TLS crypto provider a domus runs on is a visible, documented choice: the default
//! (aws-lc-rs whenever its feature is on, ring only without it) or an explicit provider, and
//! the snapshot says which. `.ci/run` runs this file with ring alone and with both features.

mod common;

use common::*;
use vicus::Domus;
use vicus::a0_transport::{DEFAULT_CRYPTO_PROVIDER, default_crypto_provider};

/// What the documented rule picks for the features this test was built with.
fn expected() -> &'static str {
    if cfg!(feature = "aws-lc-rs") {
        "aws-lc-rs"
    } else {
        "ring"
    }
}

#[tokio::test]
async fn the_crypto_provider_in_use_is_reported_and_follows_the_documented_rule() {
    within(async {
        let mut ca = ca();
        assert_eq!(DEFAULT_CRYPTO_PROVIDER, expected());
        let (auth, _) = ca.domus_auth("default").expect("mint");
        let domus = Domus::builder(auth).build().await.expect("domus");
        assert_eq!(domus.crypto_provider(), expected());
        assert_eq!(
            domus.reporting().snapshot().crypto_provider,
            expected(),
            "the snapshot names the provider"
        );
        // An explicit provider is the caller's choice and reported as such.
        let (auth, _) = ca.domus_auth("explicit").expect("mint");
        let explicit = Domus::builder(auth)
            .crypto_provider(default_crypto_provider())
            .build()
            .await
            .expect("domus");
        assert_eq!(explicit.crypto_provider(), "custom");
        explicit.shutdown().await;
        domus.shutdown().await;
    })
    .await;
}
