//! `citadel login`: interactive login by device code or Headscale's approval URL.

use crate::term::{show_login, with_spinner};
use crate::{CliError, Ctx};
use citadel::login::LoginError;
use citadel::mesh::Mesh;
use std::sync::Arc;
use std::time::Duration;

/// Flags of `citadel login`.
#[derive(clap::Args)]
pub struct Args {
    /// Nexus (Headscale) URL
    #[arg(long, env = "CITADEL_NEXUS")]
    nexus: String,
    /// Host name to register
    #[arg(long)]
    hostname: Option<String>,
    /// auto: device code if the server offers it, else Headscale's approval URL
    #[arg(long, value_parser = ["auto", "device", "web"], default_value = "auto")]
    flow: String,
    /// Give up after this many seconds
    #[arg(long, default_value_t = 600)]
    login_timeout: u64,
    /// Never draw the QR code
    #[arg(long)]
    no_qr: bool,
}

/// Runs `citadel login`.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let limit = Duration::from_secs(a.login_timeout.max(1));
    let net = citadel::net::TokioNet;
    let no_qr = a.no_qr;
    let mut key = None;
    if a.flow != "web" {
        let r = citadel::login::device_login(&net, &a.nexus, limit, ctx.timeout, |c| {
            let full =
                if c.verification_uri_complete.is_empty() { &c.verification_uri } else { &c.verification_uri_complete };
            show_login(full, Some(&c.user_code), !no_qr);
        });
        match with_spinner("waiting for approval…", r).await {
            Ok(k) => key = Some(k),
            Err(LoginError::Unsupported) if a.flow == "auto" => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut c = ctx.config(Some(a.nexus), key.clone(), a.hostname);
    if key.is_none() {
        c.login_timeout = limit;
        c.on_auth_url = Some(Arc::new(move |u: &str| show_login(u, None, !no_qr)));
    }
    let m = with_spinner("waiting for approval…", Mesh::connect(c)).await?;
    let s = m.status();
    println!("{}", s.ipv4.as_deref().unwrap_or_default());
    eprintln!("citadel: logged in as {} in org {}", s.hostname, s.org);
    Ok(())
}
