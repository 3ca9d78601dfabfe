//! Tests of relay targets and the reconnect backoff.

use std::time::Duration;

use super::retry::Backoff;
use super::setup::RelayTarget;

#[test]
fn server_name_defaults_to_the_host() {
    assert_eq!(
        RelayTarget::new("relay.example:4433", None).server_name,
        "relay.example"
    );
    assert_eq!(RelayTarget::new("[::1]:4433", None).server_name, "::1");
    assert_eq!(
        RelayTarget::new("10.0.0.1:1", Some("relay")).server_name,
        "relay"
    );
}

#[test]
fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
    let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
    let mut backoff = Backoff::new(min, max);
    let mut nominal = min;
    for _ in 0..10 {
        let delay = backoff.next_delay();
        assert!(
            delay >= nominal / 2 && delay <= nominal,
            "{delay:?} vs {nominal:?}"
        );
        nominal = (nominal * 2).min(max);
    }
    backoff.reset();
    assert!(backoff.next_delay() <= min);
}
