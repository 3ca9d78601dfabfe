//! Test support for passage's end-to-end tests: a mock upstream and a
//! [`stack::TestStack`] that runs a real relay and client against it, and
//! [`relays`] for tests where relays stop, die and come back.

pub mod mock_upstream;
pub mod relays;
pub mod stack;
