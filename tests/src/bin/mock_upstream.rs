//! `passage-mock-upstream`: serves the test mock upstream on a given address,
//! for scripts that drive the real binaries (the openai SDK check).

use std::net::SocketAddr;

use clap::Parser;
use passage_tests::mock_upstream::MockUpstream;

/// Serves the mock OpenAI upstream until killed.
#[derive(Debug, Parser)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Streams one HTTP/2 connection may carry at once, as a real server
    /// caps them (default: 10,000, room for the benchmark's held streams).
    #[arg(long, default_value_t = 10_000)]
    h2_streams: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let upstream = MockUpstream::start_on_with_stream_limit(cli.listen, cli.h2_streams).await?;
    println!("{}", upstream.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
