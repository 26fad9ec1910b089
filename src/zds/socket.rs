//! The ZDS transport: a `SOCK_SEQPACKET` Unix socket on which every packet is one protobuf
//! message, and a packet may carry file descriptors (`SCM_RIGHTS`). tokio has no seqpacket
//! type, so this wraps the socket in an [`AsyncFd`].

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    connect, recvmsg, sendmsg, socket, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;

/// Largest packet weft accepts; ZDS messages are a few hundred bytes.
pub const MAX_PACKET: usize = 64 * 1024;

/// One received packet.
pub struct Packet {
    pub bytes: Vec<u8>,
    /// Descriptors that came with it, already owned (closed when dropped).
    pub fds: Vec<OwnedFd>,
    /// The packet or its descriptors did not fit and were cut.
    pub truncated: bool,
}

pub struct SeqpacketStream {
    fd: AsyncFd<OwnedFd>,
}

impl SeqpacketStream {
    /// Connects to the listening socket at `path`. A Unix connect either succeeds or fails at
    /// once (a full backlog fails with EAGAIN on a non-blocking socket; the caller retries).
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new(path)?;
        connect(fd.as_raw_fd(), &addr)?;
        // SAFETY: `fd` is an open socket owned by the AsyncFd from here on, and an OwnedFd
        // always returns the same descriptor.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(SeqpacketStream { fd })
    }

    /// Receives one packet; `Ok(None)` when the peer closed the connection.
    pub async fn recv(&self) -> io::Result<Option<Packet>> {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| receive(inner.get_ref().as_raw_fd(), &mut buf)) {
                Ok(Ok((0, fds, _))) if fds.is_empty() => return Ok(None),
                Ok(Ok((n, fds, truncated))) => {
                    buf.truncate(n);
                    return Ok(Some(Packet {
                        bytes: buf,
                        fds,
                        truncated,
                    }));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends one packet.
    pub async fn send(&self, bytes: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            let sent = guard.try_io(|inner| {
                sendmsg::<()>(
                    inner.get_ref().as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    &[],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// One `recvmsg`: the byte count, the descriptors (owned from here on, so none leaks even if
/// the packet is refused) and whether anything was cut.
fn receive(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us;
            // nothing else refers to them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    Ok((msg.bytes, fds, truncated))
}
