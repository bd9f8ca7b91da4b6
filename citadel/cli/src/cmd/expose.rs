//! `citadel expose add|remove|list`: change what a running node exposes on its mesh ports.

use crate::{CliError, Ctx, Exit};
use citadel::api::{self, Request, Response};
use citadel::expose::{ExposeInfo, ExposeSpec, Proto};

/// Subcommands of `citadel expose`.
#[derive(clap::Subcommand, Debug)]
pub enum Args {
    /// Expose a local service: [udp:]MESH_PORT[=HOST:PORT]
    Add {
        /// What to expose
        spec: ExposeSpec,
    },
    /// Stop exposing a mesh port: [udp:]MESH_PORT
    Remove {
        /// The port
        port: String,
    },
    /// List exposed services
    List {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
}

fn print_exposes(list: &[ExposeInfo], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(list).expect("serializes"));
        return;
    }
    if list.is_empty() {
        println!("nothing exposed");
        return;
    }
    println!("{:5} {:>9}  {:24} {:>8} {:>6} {:>6}", "PROTO", "MESH PORT", "TARGET", "ACCEPTED", "ACTIVE", "FAILED");
    for e in list {
        println!(
            "{:5} {:>9}  {:24} {:>8} {:>6} {:>6}",
            e.proto.to_string(),
            e.mesh_port,
            e.target,
            e.accepted,
            e.active,
            e.failed
        );
    }
}

/// Runs `citadel expose`.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let (req, json) = match a {
        Args::Add { spec } => (Request::ExposeAdd { spec: spec.to_string() }, false),
        Args::Remove { port } => {
            let (proto, p) = match port.strip_prefix("udp:") {
                Some(p) => (Proto::Udp, p),
                None => (Proto::Tcp, port.strip_prefix("tcp:").unwrap_or(&port)),
            };
            let Ok(p) = p.parse::<u16>() else {
                return Err(CliError::Usage(format!("expected [udp:]MESH_PORT, got {port:?}")));
            };
            (Request::ExposeRemove { proto, port: p }, false)
        }
        Args::List { json } => (Request::ExposeList, json),
    };
    match api::call(&ctx.state_dir, &req).await {
        Ok(Some(Response::Exposes { exposes })) => {
            print_exposes(&exposes, json);
            Ok(())
        }
        Ok(Some(Response::Error { message })) => Err(CliError::Failed(message)),
        Ok(Some(other)) => Err(CliError::Failed(format!("unexpected answer from the running node: {other:?}"))),
        Ok(None) => {
            eprintln!("citadel: no running node (start `citadel up` first; exposes live in it)");
            Err(CliError::Reported(Exit::NotConnected))
        }
        Err(e) => Err(CliError::Failed(format!("cannot reach the running node: {e}"))),
    }
}
