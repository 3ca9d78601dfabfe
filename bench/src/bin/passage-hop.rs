//! passage-hop: the least a process hop can do, as a floor for the
//! benchmark. It accepts TCP connections on `--listen`, opens one to `--to`
//! for each, and copies bytes both ways with nothing else: no TLS, no HTTP,
//! no framing. Two of them in a chain cost what passage's two processes
//! must cost at least on this machine: the wake-ups and copies of two more
//! programs on the path.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

/// A minimal TCP forwarder (the per-hop floor for passage-bench).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address to accept connections on (port 0: any; the chosen address is printed).
    #[arg(long)]
    listen: SocketAddr,
    /// Address to forward each connection to.
    #[arg(long)]
    to: SocketAddr,
}

/// Copies one accepted connection to a new connection to `to` until either side closes.
async fn forward(mut inbound: TcpStream, to: SocketAddr) -> std::io::Result<()> {
    let mut outbound = TcpStream::connect(to).await?;
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    println!("{}", listener.local_addr()?);
    loop {
        let (inbound, _) = listener.accept().await.context("accepting")?;
        tokio::spawn(forward(inbound, cli.to));
    }
}
