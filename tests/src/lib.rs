//! Test support for passage's end-to-end tests: a mock upstream and a
//! [`stack::TestStack`] that runs a real relay and client against it.

pub mod mock_upstream;
pub mod stack;
