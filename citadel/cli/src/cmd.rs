//! One module per subcommand; each has its `Args` and a `run`.

pub mod connect;
pub mod init;
pub mod login;
pub mod logout;
pub mod netcheck;
pub mod ping;
pub mod proxy;
pub mod status;
pub mod up;
pub mod work;
