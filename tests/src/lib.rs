//! Test support for passage's end-to-end tests: a mock upstream and a
//! [`stack::TestStack`] that runs a real relay and client against it, and
//! [`relays`] for tests where relays stop, die and come back, and
//! [`secrets`], which watches every log line for keys, and
//! [`redis_server`], a real Redis for the shared-state tests.

pub mod mock_realtime;
pub mod mock_upstream;
pub mod redis_server;
pub mod relays;
pub mod requests;
pub mod secrets;
pub mod stack;

/// The transports a request-level test runs over: each such test takes a
/// `#[values(Quic, Tcp)] transport: Transport` argument (rstest), so one
/// body runs once per transport.
pub use passage_client::TransportChoice as Transport;

/// Raises this process's open-file limit towards `wanted` (as far as the
/// hard limit allows); whether it now allows that many.
pub fn allow_open_files(wanted: u64) -> bool {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= wanted {
        return true;
    }
    limit.current = Some(wanted.min(hard));
    let _ = setrlimit(Resource::Nofile, limit);
    getrlimit(Resource::Nofile)
        .current
        .is_none_or(|now| now >= wanted)
}
