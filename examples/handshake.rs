//! Two domus in one process: certificates minted at start-up, one mutual-TLS handshake over TCP
//! and one over a Unix socket, each side printing the identity it verified.
//!
//! Run with `cargo run --example handshake`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vicus::a0_transport::{Transport, TransportConfig};
use vicus::dev_certs::DevCa;
use vicus::{DomusAddr, DomusId, Error};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A throw-away CA and one leaf per node (development material, never for production).
    let mut ca = DevCa::new("vicus example CA")?;
    let (alpha_auth, alpha_id) = ca.domus_auth("alpha")?;
    let (beta_auth, beta_id) = ca.domus_auth("beta")?;
    let alpha = Transport::new(alpha_auth, TransportConfig::default())?;
    let beta = Transport::new(beta_auth, TransportConfig::default())?;

    // TCP on an ephemeral loopback port.
    let tcp = beta.listen(&DomusAddr::tcp(([127, 0, 0, 1], 0))).await?;
    println!("beta listens on {}", tcp.local_addr());
    handshake("TCP", &alpha, &beta_id, &tcp).await?;

    // A Unix socket in a private directory.
    let dir = std::env::temp_dir().join(format!("vicus-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let path = dir.join("beta.sock");
    let unix = beta.listen(&DomusAddr::unix(&path)).await?;
    println!("beta listens on {}", unix.local_addr());
    let result = handshake("Unix socket", &alpha, &beta_id, &unix).await;
    drop(unix);
    let _ = std::fs::remove_dir(&dir);
    result?;

    println!("done: {alpha_id} and {beta_id} authenticated each other twice");
    Ok(())
}

async fn handshake(
    kind: &str,
    dialer: &Transport,
    expected: &DomusId,
    listener: &vicus::a0_transport::Listener,
) -> Result<(), Error> {
    let accept = async { listener.accept().await?.handshake().await };
    let (dialed, accepted) =
        tokio::join!(dialer.dial(listener.local_addr(), Some(expected)), accept);
    let (mut dialed, mut accepted) = (dialed?, accepted?);
    println!("[{kind}] alpha verified its peer: {}", dialed.peer());
    println!("[{kind}] beta  verified its peer: {}", accepted.peer());
    println!(
        "[{kind}] {:?}, {:?}, key exchange {:?}",
        dialed
            .protocol_version()
            .unwrap_or(rustls::ProtocolVersion::Unknown(0)),
        dialed
            .cipher_suite()
            .unwrap_or(rustls::CipherSuite::Unknown(0)),
        dialed
            .key_exchange_group()
            .unwrap_or(rustls::NamedGroup::Unknown(0)),
    );
    // One round trip over the authenticated stream.
    let io = |e: std::io::Error| Error::new(vicus::ErrorId::Io, e.to_string());
    dialed.write_all(b"salve").await.map_err(io)?;
    dialed.flush().await.map_err(io)?;
    let mut buf = [0u8; 5];
    accepted.read_exact(&mut buf).await.map_err(io)?;
    println!(
        "[{kind}] beta read {:?} from alpha",
        String::from_utf8_lossy(&buf)
    );
    Ok(())
}
