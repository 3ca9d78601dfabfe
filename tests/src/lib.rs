//! Test support for passage's end-to-end tests: a mock upstream and a
//! [`stack::TestStack`] that runs a real relay and client against it, and
//! [`relays`] for tests where relays stop, die and come back, and
//! [`secrets`], which watches every log line for keys, and
//! [`redis_server`], a real Redis for the shared-state tests.

pub mod mock_realtime;
pub mod mock_upstream;
pub mod redis_server;
pub mod relays;
pub mod secrets;
pub mod stack;

/// The transports a request-level test runs over: each such test takes a
/// `#[values(Quic, Tcp)] transport: Transport` argument (rstest), so one
/// body runs once per transport.
pub use passage_client::connect::TransportChoice as Transport;
