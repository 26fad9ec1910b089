//! Inbound plaintext: a client outside the mesh connects to a captured pod; it goes through
//! the pod's [`InboundDoor`] with no identity (policy sees only its address), then to the app.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::admit::{Admitted, Caller, InboundDoor};
use super::inbound::relay_admitted;
use super::relay;

pub struct InboundPlain {
    pub door: Arc<InboundDoor>,
}

impl InboundPlain {
    pub async fn handle(self: Arc<Self>, client: TcpStream, original_dst: SocketAddr) {
        let Ok(peer) = client.peer_addr() else {
            return;
        };
        let caller = Caller::to_addr(peer, original_dst);
        // Boxed for the reason given in `Outbound::handle`: only relaying state stays.
        let (mut guard, admitted) = Box::pin(self.door.admit(caller)).await;
        let Ok(Admitted {
            upstream, tracked, ..
        }) = admitted
        else {
            return;
        };
        let counters = guard.counters().clone();
        let relay = pin!(relay::tcp_tcp(client, upstream, &counters));
        relay_admitted(&self.door.ctx, &mut guard, &tracked, relay).await;
    }
}
