//! `citadel login`: interactive login by AceTeam's platform device flow, the Nexus's device
//! code, or Headscale's approval URL.

use crate::term::{show_login, with_spinner};
use crate::{CliError, Ctx};
use citadel::login::LoginError;
use citadel::mesh::Mesh;
use std::sync::Arc;
use std::time::Duration;

/// Flags of `citadel login`.
#[derive(clap::Args)]
pub struct Args {
    /// Nexus (Headscale) URL; with --auth-service it overrides the Nexus the platform names
    #[arg(long, env = "CITADEL_NEXUS")]
    nexus: Option<String>,
    /// AceTeam platform URL whose device login to use (the upstream CLI's auth service)
    #[arg(long, env = "CITADEL_AUTH_HOST")]
    auth_service: Option<String>,
    /// Host name to register
    #[arg(long)]
    hostname: Option<String>,
    /// auto: the platform's device login with --auth-service, else the Nexus's device code if
    /// it offers one, else Headscale's approval URL
    #[arg(long, value_parser = ["auto", "aceteam", "device", "web"], default_value = "auto")]
    flow: String,
    /// Give up after this many seconds
    #[arg(long, default_value_t = 600)]
    login_timeout: u64,
    /// Never draw the QR code
    #[arg(long)]
    no_qr: bool,
}

fn show_code(c: &citadel::login::DeviceCode, qr: bool) {
    let full = if c.verification_uri_complete.is_empty() { &c.verification_uri } else { &c.verification_uri_complete };
    show_login(full, Some(&c.user_code), qr);
}

/// Runs `citadel login`.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let limit = Duration::from_secs(a.login_timeout.max(1));
    let net = citadel::net::TokioNet;
    let no_qr = a.no_qr;
    let mut key = None;
    let mut nexus = a.nexus.clone();
    let aceteam = a.flow == "aceteam" || (a.flow == "auto" && a.auth_service.is_some());
    if aceteam {
        let Some(auth) = a.auth_service.as_deref() else {
            return Err(CliError::Usage("--flow aceteam needs --auth-service URL (or CITADEL_AUTH_HOST)".into()));
        };
        let host = a.hostname.clone().unwrap_or_else(citadel::mesh::os_hostname);
        let r = citadel::login::fabric_login(&net, auth, &host, limit, ctx.timeout, |c| show_code(c, !no_qr));
        let grant = with_spinner("waiting for approval…", r).await?;
        if nexus.is_none() {
            if grant.nexus_url.is_empty() {
                return Err(LoginError::Protocol("the platform named no Nexus; pass --nexus URL".into()).into());
            }
            nexus = Some(grant.nexus_url.clone());
        }
        let org = if grant.org_name.is_empty() { &grant.org_id } else { &grant.org_name };
        eprintln!("citadel: approved into org {org}; joining {}", nexus.as_deref().unwrap_or_default());
        key = Some(grant.authkey);
    }
    let Some(nexus) = nexus else {
        return Err(CliError::Usage("citadel login needs --nexus URL (or --auth-service URL)".into()));
    };
    if !aceteam && a.flow != "web" {
        let r = citadel::login::device_login(&net, &nexus, limit, ctx.timeout, |c| show_code(c, !no_qr));
        match with_spinner("waiting for approval…", r).await {
            Ok(k) => key = Some(k),
            Err(LoginError::Unsupported) if a.flow == "auto" => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut c = ctx.config(Some(nexus), key.clone(), a.hostname);
    if key.is_none() {
        c.login_timeout = limit;
        c.on_auth_url = Some(Arc::new(move |u: &str| show_login(u, None, !no_qr)));
    }
    let m = with_spinner("joining…", Mesh::connect(c)).await?;
    let s = m.status();
    println!("{}", s.ipv4.as_deref().unwrap_or_default());
    eprintln!("citadel: logged in as {} in org {}", s.hostname, s.org);
    Ok(())
}
