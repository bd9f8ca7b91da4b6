//! Exit codes: the one place where an error becomes a process exit status. The README's table
//! is checked against [`Exit::ALL`] by a unit test.

use citadel::control::ControlError;
use citadel::login::LoginError;
use citadel::mesh::ConnectError;
use citadel::state::StateError;

/// The process exit status of `citadel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The command did what it was asked.
    Success = 0,
    /// Any failure without a code of its own.
    Failure = 1,
    /// The command line is unusable.
    Usage = 2,
    /// Authentication failed or is needed.
    Auth = 3,
    /// Nexus cannot be reached or does not speak the protocol.
    Unreachable = 4,
    /// The state directory is locked, corrupt or unwritable.
    State = 5,
    /// The node is not connected.
    NotConnected = 6,
}

impl Exit {
    /// Every code, in order.
    pub const ALL: [Exit; 7] =
        [Exit::Success, Exit::Failure, Exit::Usage, Exit::Auth, Exit::Unreachable, Exit::State, Exit::NotConnected];

    /// The meaning, worded as in the README's table.
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Failure => "other failure",
            Exit::Usage => "bad command line (including an unusable Nexus URL)",
            Exit::Auth => "authentication failed or needed (wrong, used or expired key; not logged in)",
            Exit::Unreachable => "Nexus unreachable or not speaking the protocol",
            Exit::State => "state directory locked by another process, corrupt or unwritable",
            Exit::NotConnected => "not connected / not logged in",
        }
    }
}

/// The `Exit codes:` section of `--help`.
pub fn help() -> String {
    let mut s = String::from("Exit codes:");
    for e in Exit::ALL {
        s.push_str(&format!("\n  {}  {}", e as u8, e.meaning()));
    }
    s
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Joining the mesh or talking to Nexus failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Interactive login failed.
    #[error(transparent)]
    Login(#[from] LoginError),
    /// `citadel work` could not bring the node up.
    #[error("{}", work_needs_node(.0))]
    WorkNeedsNode(ConnectError),
    /// The node came up but is not in the mesh.
    #[error("{0}")]
    NotConnected(String),
    /// The job loop stopped with an error.
    #[error(transparent)]
    Work(#[from] citadel_work::WorkError),
    /// The command line is unusable.
    #[error("{0}")]
    Usage(String),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
    /// The command already told the user; exit with this code and print nothing more.
    #[error("")]
    Reported(Exit),
}

fn work_needs_node(e: &ConnectError) -> String {
    match e {
        ConnectError::State(StateError::Locked(_)) => "a node is already running on this state directory (`citadel up`); stop it first, `citadel work` runs the node itself".into(),
        e => format!("not connected to the mesh ({e}); refusing to start the job loop"),
    }
}

impl CliError {
    /// Whether `main` should print the error (a [`CliError::Reported`] was printed already).
    pub fn has_message(&self) -> bool {
        !matches!(self, CliError::Reported(_))
    }
}

fn connect_exit(e: &ConnectError) -> Exit {
    match e {
        ConnectError::NeedsAuth { .. } | ConnectError::AuthRejected(_) | ConnectError::Expired => Exit::Auth,
        ConnectError::Control(ControlError::BadUrl(..)) => Exit::Usage,
        ConnectError::Control(_) | ConnectError::NoMap(_) | ConnectError::NoNexusUrl => Exit::Unreachable,
        ConnectError::State(_) => Exit::State,
        ConnectError::LocalUdp(_) => Exit::Failure,
    }
}

/// The exit status for `e`.
pub fn exit_code(e: &CliError) -> Exit {
    match e {
        CliError::Connect(e) => connect_exit(e),
        CliError::Login(LoginError::Control(_)) => Exit::Unreachable,
        CliError::Login(_) => Exit::Auth,
        CliError::WorkNeedsNode(e) => match connect_exit(e) {
            Exit::Auth => Exit::Auth,
            Exit::State => Exit::State,
            _ => Exit::NotConnected,
        },
        CliError::NotConnected(_) => Exit::NotConnected,
        CliError::Work(_) => Exit::Unreachable,
        CliError::Usage(_) => Exit::Usage,
        CliError::Failed(_) => Exit::Failure,
        CliError::Reported(code) => *code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of the README's `### Exit codes` table.
    fn readme_table() -> Vec<(u8, String)> {
        let readme = include_str!("../../../README.md");
        let section = readme.split("### Exit codes").nth(1).expect("README has an `### Exit codes` section");
        section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                Some((cells.first()?.parse().ok()?, cells.get(1)?.to_string()))
            })
            .collect()
    }

    #[test]
    fn readme_exit_table_matches_the_enum() {
        let table = readme_table();
        let ours: Vec<(u8, String)> = Exit::ALL.iter().map(|e| (*e as u8, e.meaning().to_string())).collect();
        assert_eq!(table, ours, "README.md's exit-code table and citadel_cli::Exit disagree");
    }

    #[test]
    fn udp_bind_failure_is_not_nexus_unreachable() {
        let e = CliError::Connect(ConnectError::LocalUdp(std::io::Error::from(std::io::ErrorKind::AddrInUse)));
        assert_eq!(exit_code(&e), Exit::Failure);
        let e = CliError::Connect(ConnectError::Control(ControlError::Closed));
        assert_eq!(exit_code(&e), Exit::Unreachable);
    }

    #[test]
    fn work_refusal_keeps_auth_and_state_codes() {
        let e = CliError::WorkNeedsNode(ConnectError::Expired);
        assert_eq!(exit_code(&e), Exit::Auth);
        let e = CliError::WorkNeedsNode(ConnectError::NoMap(std::time::Duration::from_secs(1)));
        assert_eq!(exit_code(&e), Exit::NotConnected);
    }
}
