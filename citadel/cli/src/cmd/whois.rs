//! `citadel whois IP[:PORT]`: the mesh node behind an address.

use crate::{CliError, Ctx};
use citadel::api::{self, Request, Response};
use citadel::mesh::Mesh;
use citadel::whois::WhoIs;

/// Flags of `citadel whois`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// IP[:PORT]
    addr: String,
    /// Machine-readable output
    #[arg(long)]
    json: bool,
}

fn print_whois(w: &WhoIs, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(w).expect("serializes"));
        return;
    }
    println!("Name       {}{}", w.name, if w.is_self { " (this node)" } else { "" });
    println!("FQDN       {}", w.fqdn);
    println!("Org        {}", w.org);
    println!("Tags       {}", if w.tags.is_empty() { "-".to_string() } else { w.tags.join(", ") });
    println!("Node key   {}", w.node_key);
    println!("OS         {}", if w.os.is_empty() { "-" } else { &w.os });
    println!("Addresses  {}", w.addresses.join(", "));
}

/// Runs `citadel whois`: asks the running node, or brings one up from the saved state.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let Some(ip) = citadel::whois::parse_addr(&a.addr) else {
        return Err(CliError::Usage(format!("expected IP[:PORT], got {:?}", a.addr)));
    };
    match api::call(&ctx.state_dir, &Request::Whois { addr: a.addr.clone() }).await {
        Ok(Some(Response::Whois(w))) => {
            print_whois(&w, a.json);
            return Ok(());
        }
        Ok(Some(Response::Error { message })) => return Err(CliError::Failed(message)),
        _ => {}
    }
    let m = Mesh::connect(ctx.config(None, None, None)).await?;
    let w = m.whois(ip).ok_or_else(|| CliError::Failed(format!("no mesh node has address {ip}")))?;
    print_whois(&w, a.json);
    Ok(())
}
