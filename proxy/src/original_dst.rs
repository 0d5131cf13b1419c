//! The one seam of transparent capture: where a redirected connection was going
//! before iptables' `REDIRECT` sent it to the proxy (`SO_ORIGINAL_DST`), with a
//! fake beside it for tests.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Reads the original destination of an accepted, redirected connection.
pub trait OriginalDst: Send + Sync + 'static {
    /// The address the peer dialled; an error when it cannot be read (the
    /// connection was not redirected and conntrack knows nothing of it).
    fn original_dst(&self, stream: &TcpStream) -> std::io::Result<SocketAddr>;
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on IPv4 sockets,
/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on IPv6 ones.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemOriginalDst;

impl OriginalDst for SystemOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> std::io::Result<SocketAddr> {
        let sock = socket2::SockRef::from(stream);
        let addr = match stream.local_addr()? {
            SocketAddr::V4(_) => sock.original_dst_v4()?,
            SocketAddr::V6(_) => sock.original_dst_v6()?,
        };
        addr.as_socket().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the original destination is not an IP socket address",
            )
        })
    }
}

/// A fake: every connection's original destination is the one given, or the
/// error kind given.
#[cfg(feature = "test-util")]
#[derive(Debug, Clone)]
pub struct FixedOriginalDst(pub Result<SocketAddr, std::io::ErrorKind>);

#[cfg(feature = "test-util")]
impl OriginalDst for FixedOriginalDst {
    fn original_dst(&self, _stream: &TcpStream) -> std::io::Result<SocketAddr> {
        self.0.map_err(std::io::Error::from)
    }
}
