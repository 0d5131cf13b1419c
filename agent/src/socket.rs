//! The agent's Unix socket: created with the right permissions, a stale file
//! from a dead agent replaced, a live agent's socket left alone, and every
//! accepted connection tagged with its peer's credentials.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use crate::attest::{PeerInfo, process_start_time};
use crate::authority::IgnoreAuthority;

/// Mode of the socket's directory: others may reach the socket.
pub const SOCKET_DIR_MODE: u32 = 0o755;
/// Mode of the socket: any local process may connect; who it is decides
/// what it gets (attestation by peer credentials).
pub const SOCKET_MODE: u32 = 0o666;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another agent is serving on the path.
    #[error("{0} is in use by a running agent; stop it first or choose another --socket")]
    InUse(PathBuf),
    /// The path exists and is not a socket; it is not ours to delete.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Any other I/O failure.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SocketError + '_ {
    move |source| SocketError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Binds the agent socket at `path`: creates the directory (0755), replaces a
/// stale socket left by a dead agent, refuses a live one or a non-socket
/// file, and sets the socket to 0666.
pub async fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(SOCKET_DIR_MODE))
            .map_err(io_err(dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(SocketError::NotASocket(path.to_owned()));
            }
            // A socket file: is anyone serving on it?
            match tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await {
                // Refused: nobody listens on it any more; it is stale.
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing stale agent socket");
                    std::fs::remove_file(path).map_err(io_err(path))?;
                }
                // Accepted, or busy (a full backlog, a hang): someone
                // serves on it; never take a live agent's socket away.
                Ok(Ok(_)) | Err(_) => return Err(SocketError::InUse(path.to_owned())),
                Ok(Err(e)) => return Err(io_err(path)(e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io_err(path))?;
    Ok(listener)
}

/// An accepted connection and the credentials of its peer. Reads go through
/// [`IgnoreAuthority`], so any `:authority` a client sends is accepted.
pub struct PeerConnection {
    stream: IgnoreAuthority<UnixStream>,
    peer: PeerInfo,
}

impl PeerConnection {
    /// Tags `stream` with its peer's credentials, read now.
    pub fn new(stream: UnixStream, connection_id: u64) -> io::Result<Self> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid();
        let start_time = pid.and_then(|p| process_start_time(Path::new("/proc"), p));
        Ok(Self {
            stream: IgnoreAuthority::new(stream),
            peer: PeerInfo {
                connection_id,
                pid,
                uid: cred.uid(),
                gid: cred.gid(),
                start_time,
            },
        })
    }
}

impl Connected for PeerConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer
    }
}

impl AsyncRead for PeerConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The accepted connections of `listener`, each tagged with its peer. Accept
/// errors (a full file table, a peer gone before we looked) are logged and
/// skipped after a short pause, so they never stop the server.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<PeerConnection>> {
    let next_id = AtomicU64::new(1);
    futures::stream::unfold((listener, next_id), |(listener, next_id)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    match PeerConnection::new(stream, id) {
                        Ok(conn) => return Some((Ok(conn), (listener, next_id))),
                        Err(e) => {
                            tracing::debug!(error = %e, "dropping a connection without peer credentials")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the agent socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_socket_0666_in_dir_0755() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run/citadel/agent.sock");
        let _l = bind(&path).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o666);
        assert_eq!(mode(path.parent().unwrap()), 0o755);
    }

    #[tokio::test]
    async fn replaces_a_stale_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("agent.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let _l = bind(&path).await.unwrap();
    }

    #[tokio::test]
    async fn refuses_a_live_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("agent.sock");
        let _live = bind(&path).await.unwrap();
        assert!(matches!(bind(&path).await, Err(SocketError::InUse(_))));
    }

    #[tokio::test]
    async fn refuses_to_delete_a_regular_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("agent.sock");
        std::fs::write(&path, "precious").unwrap();
        assert!(matches!(bind(&path).await, Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn tags_connections_with_peer_credentials() {
        use futures::StreamExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("agent.sock");
        let listener = bind(&path).await.unwrap();
        let _client = UnixStream::connect(&path).await.unwrap();
        let mut inc = Box::pin(incoming(listener));
        let conn = inc.next().await.unwrap().unwrap();
        let peer = conn.connect_info();
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        assert_eq!(peer.connection_id, 1);
        assert!(peer.start_time.is_some());
    }
}
