//! A userspace UDP impairment forwarder for the long-haul scenario (netem
//! is not available here): it sits between passage-client and
//! passage-relay on loopback and gives each direction a fixed one-way
//! delay and independent random loss.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Impairment of each direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// One-way delay (the round trip gains twice this).
    pub one_way_delay: Duration,
    /// Probability of dropping a datagram, 0.0–1.0.
    pub loss: f64,
}

/// A running forwarder; stops when dropped.
pub struct Forwarder {
    /// The address the client should dial instead of the relay.
    pub addr: SocketAddr,
    overflow: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Forwarder {
    /// Datagrams dropped because a delay queue was full (beyond the
    /// emulated loss; the figures are only clean when this is 0).
    pub fn overflow_drops(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Datagrams in flight per direction; beyond this the queue drops, as a
/// router's would (far above what the scenarios put in flight).
const QUEUE: usize = 1 << 16;

impl Forwarder {
    /// Forwards between one client and `relay`, impairing both directions.
    pub async fn start(relay: SocketAddr, impairment: Impairment) -> anyhow::Result<Forwarder> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        back.connect(relay).await?;
        let addr = front.local_addr()?;
        let (client_tx, mut client_rx) = tokio::sync::watch::channel::<Option<SocketAddr>>(None);

        let (up_tx, up_rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
        let (down_tx, down_rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
        let mut tasks = Vec::new();
        let overflow = Arc::new(AtomicU64::new(0));
        let (up_overflow, down_overflow) = (overflow.clone(), overflow.clone());

        // client → forwarder: remember the client, delay or drop.
        let front_rx = front.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = front_rx.recv_from(&mut buf).await {
                if client_tx.borrow().as_ref() != Some(&from) {
                    client_tx.send_replace(Some(from));
                }
                let deadline = Instant::now() + impairment.one_way_delay;
                if fastrand::f64() >= impairment.loss
                    && up_tx.try_send((deadline, buf[..n].to_vec())).is_err()
                {
                    up_overflow.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        // relay → forwarder: delay or drop.
        let back_rx = back.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = back_rx.recv(&mut buf).await {
                let deadline = Instant::now() + impairment.one_way_delay;
                if fastrand::f64() >= impairment.loss
                    && down_tx.try_send((deadline, buf[..n].to_vec())).is_err()
                {
                    down_overflow.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        // Delivery: the delay is constant, so each queue is in deadline order.
        tasks.push(tokio::spawn(deliver(up_rx, move |packet| {
            let back = back.clone();
            async move {
                let _ = back.send(&packet).await;
            }
        })));
        tasks.push(tokio::spawn(deliver(down_rx, move |packet| {
            let front = front.clone();
            let client = *client_rx.borrow_and_update();
            async move {
                if let Some(client) = client {
                    let _ = front.send_to(&packet, client).await;
                }
            }
        })));
        Ok(Forwarder {
            addr,
            overflow,
            tasks,
        })
    }
}

async fn deliver<F, Fut>(mut queue: mpsc::Receiver<(Instant, Vec<u8>)>, mut send: F)
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while let Some((deadline, packet)) = queue.recv().await {
        tokio::time::sleep_until(deadline).await;
        send(packet).await;
    }
}
