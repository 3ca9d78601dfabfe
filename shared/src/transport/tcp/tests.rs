//! Tests of the TCP transport's reset mapping, socket options and liveness.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use h2::Reason;
use tokio::net::TcpStream;

use super::connection::ConnectionState;
use super::socket::{ByteCounts, rto_max, tune_socket};
use super::stream_error::{HTTP2_REASONS, code_for, reason_for};
use crate::frame::reset_code;
use crate::transport::TransportTuning;

#[test]
fn passage_codes_survive_the_http2_mapping() {
    for code in [
        reset_code::CANCELLED,
        reset_code::PROTOCOL_ERROR,
        reset_code::BODY_FAILED,
        reset_code::REFUSED,
        0x11,
    ] {
        assert_eq!(code_for(reason_for(code)), u64::from(code));
    }
    // HTTP/2's own reasons never read as one of passage's codes.
    assert_eq!(code_for(Reason::INTERNAL_ERROR), HTTP2_REASONS | 2);
    assert_eq!(code_for(Reason::NO_ERROR), HTTP2_REASONS);
}

/// The retransmission cap is set where the kernel has the option.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn tunnel_sockets_cap_their_retransmission_timeout() {
    use std::os::fd::AsRawFd;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tuning = TransportTuning::default();
    tune_socket(&tcp, &tuning);
    let mut millis: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: reads a plain int into `millis`, `len` bytes at most.
    let result = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            44,
            (&mut millis as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if result != 0 {
        println!("SKIP: this kernel has no TCP_RTO_MAX_MS (Linux 6.15+)");
        return;
    }
    assert_eq!(millis, 1000);
    assert_eq!(rto_max(&tuning), Duration::from_secs(1));
}

/// Real sockets on 127.0.0.1: the reader never sends a byte, so only
/// its kernel's acknowledgements can tell it is alive.
#[cfg(target_os = "linux")]
#[test]
fn acknowledgements_are_a_sign_of_life_only_behind_a_queue() {
    use std::io::{Read, Write};
    use std::thread::sleep;
    let settle = Duration::from_millis(100);
    // A small receive buffer: a reader that stops reading soon closes
    // its window.
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    listener.set_recv_buffer_size(8 * 1024).expect("SO_RCVBUF");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    listener.bind(&any.into()).expect("bind");
    listener.listen(1).expect("listen");
    let addr = listener
        .local_addr()
        .expect("address")
        .as_socket()
        .expect("inet");
    let mut writer = std::net::TcpStream::connect(addr).expect("connect");
    let (reader, _) = listener.accept().expect("accept");
    let mut reader = std::net::TcpStream::from(reader);
    writer.set_nonblocking(true).expect("nonblocking");
    let counts = Arc::new(ByteCounts::default());
    let handle = std::os::fd::OwnedFd::from(writer.try_clone().expect("clone"));
    let state = ConnectionState::new(addr, counts.clone(), Some(handle));
    let mut write = |bytes: &[u8]| match writer.write(bytes) {
        Ok(n) => {
            counts.sent.fetch_add(n as u64, Ordering::Relaxed);
            n
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("write: {e}"),
    };

    // A PING alone, acknowledged at once: no sign of life.
    let quiet = state.heard();
    write(&[0; 39]);
    sleep(settle);
    assert_eq!(state.heard(), quiet, "a bare acknowledgement counted");

    // Far more than the reader takes: a queue, then a closed window.
    let mut queued = 0;
    while queued < (4 << 20) {
        match write(&[1; 64 * 1024]) {
            0 => break,
            n => queued += n,
        }
    }
    sleep(settle);
    let stalled = state.heard();
    sleep(settle);
    assert_eq!(state.heard(), stalled, "a closed window counted");

    // The reader takes some: its kernel acknowledges more of our queue.
    let mut sink = vec![0; 64 * 1024];
    reader.read_exact(&mut sink).expect("read");
    sleep(settle);
    assert!(
        state.heard() > stalled,
        "acknowledgements behind a queue did not count"
    );
}
