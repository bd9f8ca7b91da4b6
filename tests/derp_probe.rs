//! `derp-probe NODE_JSON`: logs in to the DERP node (a tailcfg `DERPNode` as JSON) with a fresh
//! key, as citadel's data plane would, and prints `ok` or the error (exit 1). The TLS tests run
//! it as a child so each run has its own environment (`CITADEL_DERP_INSECURE`, `SSL_CERT_FILE`).

use citadel::derphttp::DerpClient;
use citadel::keys::PrivateKey;
use citadel::net::TokioNet;
use std::time::Duration;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Some(json) = std::env::args().nth(1) else {
        eprintln!("usage: derp-probe NODE_JSON");
        return std::process::ExitCode::from(2);
    };
    let node: citadel::tailcfg::DerpNode = match serde_json::from_str(&json) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("derp-probe: bad node JSON: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let key = PrivateKey::generate(&mut rand::thread_rng());
    match DerpClient::connect(&TokioNet, node, &key, Duration::from_secs(5)).await {
        Ok(_) => {
            println!("ok");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            std::process::ExitCode::from(1)
        }
    }
}
