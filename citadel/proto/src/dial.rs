//! The one dial trait. The node's host network (`citadel::net::Net`: tokio, or turmoil in the
//! harness) and the dialer the job worker gets from the CLI (mesh addresses through the node,
//! the rest over the host) both implement [`Dial`], so code that needs byte streams does not
//! know which it was given.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream (TCP, or a TCP connection over the mesh).
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}

/// A boxed future, as trait objects need.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What [`Dial::connect_tcp`] returns.
pub type DialFuture<'a> = BoxFuture<'a, io::Result<Box<dyn AsyncReadWrite>>>;

/// Opens byte streams.
pub trait Dial: Send + Sync {
    /// Opens a TCP connection to `host:port` (a name or an address).
    fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> DialFuture<'a>;
    /// Whether a connection to `ip` goes through the mesh (the host network claims none).
    fn is_mesh_addr(&self, _ip: IpAddr) -> bool {
        false
    }
}
