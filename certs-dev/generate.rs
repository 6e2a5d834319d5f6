//! Writes INSECURE development certificates for vicus: a CA and one leaf per node name, each
//! leaf carrying the URI SAN `spiffe://vicus.dev/domus/<name>`.
//!
//! Usage: `cargo run --example certs-dev -- [--out DIR] [NAME ...]`
//! (defaults: `--out certs-dev/out`, names `alpha beta`). See certs-dev/README.md.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vicus::dev_certs::{DEV_TRUST_DOMAIN, DevCa};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut out = PathBuf::from("certs-dev/out");
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().ok_or("--out needs a directory")?.into(),
            "-h" | "--help" => {
                println!("usage: cargo run --example certs-dev -- [--out DIR] [NAME ...]");
                return Ok(());
            }
            name => names.push(name.to_owned()),
        }
    }
    if names.is_empty() {
        names = vec!["alpha".into(), "beta".into()];
    }
    // Validate every name as a path segment before anything is written.
    let ids = names
        .iter()
        .map(|name| vicus::DomusId::spiffe(DEV_TRUST_DOMAIN, name))
        .collect::<Result<Vec<_>, _>>()?;
    fs::create_dir_all(&out)?;

    let mut ca = DevCa::new("vicus INSECURE development CA")?;
    write(&out.join("ca.pem"), ca.cert_pem(), 0o644)?;
    for (name, id) in names.iter().zip(&ids) {
        let leaf = ca.leaf(name)?;
        write(&out.join(format!("{name}.pem")), leaf.cert_pem(), 0o644)?;
        write(&out.join(format!("{name}.key")), leaf.key_pem(), 0o600)?;
        println!("{id}: {0}/{name}.pem, {0}/{name}.key", out.display());
    }
    println!(
        "CA bundle: {}/ca.pem (the CA key is not kept: re-run to mint a new set)",
        out.display()
    );
    println!("INSECURE: development material only. Never deploy these files.");
    Ok(())
}

fn write(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents.as_bytes())
}
