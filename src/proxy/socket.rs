//! The socket-factory seam: every socket weft opens for a workload comes from the workload's
//! factory, so "inside a pod's network namespace" versus "right here" is a constructor argument,
//! not a branch in the proxy.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How a listener should be set up.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenOptions {
    /// Accept connections for addresses not local to the namespace (TPROXY-style).
    pub transparent: bool,
}

pub trait SocketFactory: Send + Sync + std::fmt::Debug + 'static {
    /// An unconnected, non-blocking TCP socket of `ip`'s family, marked, with TCP_NODELAY.
    fn tcp(&self, ip: IpAddr) -> io::Result<Socket>;

    /// A bound, listening, non-blocking socket with SO_REUSEPORT so a new weft can take over.
    fn listen(&self, addr: SocketAddr, opts: ListenOptions) -> io::Result<std::net::TcpListener>;
}

/// Sockets in the calling thread's network namespace.
#[derive(Debug, Clone)]
pub struct LocalSockets {
    /// `SO_MARK` for every socket (None when unprivileged, e.g. some tests).
    pub mark: Option<u32>,
}

fn domain(ip: IpAddr) -> Domain {
    if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

impl SocketFactory for LocalSockets {
    fn tcp(&self, ip: IpAddr) -> io::Result<Socket> {
        let s = Socket::new(
            domain(ip),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        if let Some(mark) = self.mark {
            s.set_mark(mark)?;
        }
        s.set_tcp_nodelay(true)?;
        Ok(s)
    }

    fn listen(&self, addr: SocketAddr, opts: ListenOptions) -> io::Result<std::net::TcpListener> {
        let s = self.tcp(addr.ip())?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if opts.transparent {
            if addr.is_ipv4() {
                s.set_ip_transparent_v4(true)?;
            } else {
                s.set_ip_transparent_v6(true)?;
            }
        }
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    }
}

/// Socket options for every proxied connection, accepted or opened.
pub fn tune(stream: &TcpStream) {
    let s = SockRef::from(stream);
    let _ = s.set_tcp_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(180))
        .with_interval(std::time::Duration::from_secs(180));
    let _ = s.set_tcp_keepalive(&ka);
}

pub fn into_tokio_listener(l: std::net::TcpListener) -> io::Result<TcpListener> {
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// Connects from a factory socket, optionally from a chosen (possibly foreign) source address.
pub async fn connect(
    factory: &dyn SocketFactory,
    dest: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<TcpStream> {
    let s = factory.tcp(dest.ip())?;
    if let Some(src) = source {
        // Binding a foreign address needs IP_TRANSPARENT; a local one works either way.
        if src.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
        s.bind(&SocketAddr::new(src, 0).into())?;
    }
    let std_stream: std::net::TcpStream = s.into();
    let stream = TcpSocket::from_std_stream(std_stream).connect(dest).await?;
    tune(&stream);
    Ok(stream)
}
