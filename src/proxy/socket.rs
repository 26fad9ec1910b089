//! The socket-factory seam: every socket weft opens for a workload comes from the workload's
//! factory, so "inside a pod's network namespace" versus "right here" is a constructor argument,
//! not a branch in the proxy.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How a listener should be set up.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenOptions {
    /// Accept connections for addresses not local to the namespace (TPROXY-style).
    pub transparent: bool,
}

pub trait SocketFactory: Send + Sync + std::fmt::Debug + 'static {
    /// An unconnected, non-blocking TCP socket of `ip`'s family, marked, tuned (see [`tune`]).
    fn tcp(&self, ip: IpAddr) -> io::Result<Socket>;

    /// A bound, listening, non-blocking socket with SO_REUSEPORT so a new weft can take over.
    /// It is tuned like [`SocketFactory::tcp`]'s, and Linux hands those options down to every
    /// accepted connection, so accepted sockets need no system calls of their own for them.
    fn listen(&self, addr: SocketAddr, opts: ListenOptions) -> io::Result<std::net::TcpListener>;

    /// An unbound, non-blocking UDP socket of `ip`'s family, marked (the DNS proxy's upstream
    /// queries: marked so the capture never redirects them back to weft).
    fn udp(&self, ip: IpAddr) -> io::Result<Socket>;

    /// A bound UDP socket with SO_REUSEPORT (the DNS proxy's listener; a new weft binds the
    /// same port while the old one drains).
    fn listen_udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket>;

    /// Whether a connection opened from `source`, a client's address rather than one of this
    /// namespace's own, gets its replies back. Only then may weft preserve the client's
    /// address: elsewhere the replies would be routed to the client itself and the connection
    /// would hang.
    fn returns_replies_to(&self, source: IpAddr) -> bool;
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
        tune(&s)?;
        Ok(s)
    }

    fn udp(&self, ip: IpAddr) -> io::Result<Socket> {
        let s = Socket::new(
            domain(ip),
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
        if let Some(mark) = self.mark {
            s.set_mark(mark)?;
        }
        Ok(s)
    }

    fn listen_udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let s = self.udp(addr.ip())?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&addr.into())?;
        Ok(s.into())
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

    /// Right here nothing routes replies to weft, except on loopback, where every address is
    /// this host's own (the in-process tests' workloads live there).
    fn returns_replies_to(&self, source: IpAddr) -> bool {
        source.is_loopback()
    }
}

/// Socket options for every proxied connection, accepted or opened: no Nagle delay (weft
/// forwards what it reads at once, and tunnel frames must not wait for ACKs), and keepalive so
/// a vanished peer does not hold a connection forever.
fn tune(s: &Socket) -> io::Result<()> {
    s.set_tcp_nodelay(true)?;
    let ka = TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(180))
        .with_interval(std::time::Duration::from_secs(180));
    s.set_tcp_keepalive(&ka)
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
    TcpSocket::from_std_stream(std_stream).connect(dest).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    #[test]
    fn right_here_only_loopback_clients_keep_their_address() {
        let here = LocalSockets { mark: None };
        assert!(here.returns_replies_to("127.3.4.5".parse().unwrap()));
        assert!(here.returns_replies_to("::1".parse().unwrap()));
        assert!(!here.returns_replies_to("10.250.2.2".parse().unwrap()));
    }

    #[tokio::test]
    async fn accepted_and_opened_sockets_carry_the_listener_tuning() {
        let factory = LocalSockets { mark: None };
        let listener = factory
            .listen(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                ListenOptions::default(),
            )
            .unwrap();
        let listener = into_tokio_listener(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let (opened, accepted) = tokio::join!(connect(&factory, addr, None), listener.accept());
        let opened = opened.unwrap();
        let (accepted, _) = accepted.unwrap();
        for s in [SockRef::from(&opened), SockRef::from(&accepted)] {
            assert!(s.tcp_nodelay().unwrap(), "TCP_NODELAY");
            assert!(s.keepalive().unwrap(), "SO_KEEPALIVE");
            assert_eq!(s.tcp_keepalive_time().unwrap().as_secs(), 180);
        }
    }
}
