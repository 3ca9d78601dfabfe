//! Lanes: pools of upstream connections, a new one opened when every lane
//! carries its share of requests, so HTTP/2's per-connection stream limit
//! never queues requests.

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::UpstreamBody;

/// The HTTP client of one lane.
pub(super) type LaneClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>;

/// Most lanes (so upstream HTTP/2 connections) the relay opens.
pub(super) const MAX_LANES: usize = 256;
/// Requests in flight on one lane before another opens, by default: the
/// least a server should allow on an HTTP/2 connection (RFC 9113, 6.5.2).
pub const DEFAULT_STREAMS_PER_CONNECTION: u32 = 100;

/// One pool of upstream connections, and what it carries now.
#[derive(Debug)]
pub(super) struct Lane {
    pub(super) client: LaneClient,
    in_flight: std::sync::atomic::AtomicU32,
}

/// A request's place on its lane, held until its response has ended.
#[derive(Debug)]
pub struct LaneSlot(pub(super) std::sync::Arc<Lane>);

impl Drop for LaneSlot {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The lanes, and how to open another.
pub(super) struct Lanes {
    pub(super) lanes: std::sync::RwLock<Vec<std::sync::Arc<Lane>>>,
    pub(super) builder: hyper_util::client::legacy::Builder,
    pub(super) connector: hyper_rustls::HttpsConnector<HttpConnector>,
    pub(super) per_lane: u32,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("per_lane", &self.per_lane)
            .finish_non_exhaustive()
    }
}

impl Lanes {
    pub(super) fn new_lane(&self) -> std::sync::Arc<Lane> {
        std::sync::Arc::new(Lane {
            client: self.builder.build(self.connector.clone()),
            in_flight: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// A place on the first lane with room, opening a lane if none has.
    pub(super) fn take(&self) -> LaneSlot {
        use std::sync::atomic::Ordering;
        let with_room = |lanes: &[std::sync::Arc<Lane>]| {
            lanes.iter().find_map(|lane| {
                lane.in_flight
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.per_lane).then_some(n + 1)
                    })
                    .ok()
                    .map(|_| LaneSlot(lane.clone()))
            })
        };
        {
            let lanes = self
                .lanes
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(slot) = with_room(&lanes) {
                return slot;
            }
        }
        let mut lanes = self
            .lanes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(slot) = with_room(&lanes) {
            return slot;
        }
        let lane = if lanes.len() < MAX_LANES {
            let lane = self.new_lane();
            lanes.push(lane.clone());
            lane
        } else {
            // Every lane full: the least loaded queues one more.
            lanes
                .iter()
                .min_by_key(|lane| lane.in_flight.load(Ordering::Acquire))
                .cloned()
                .unwrap_or_else(|| self.new_lane())
        };
        lane.in_flight.fetch_add(1, Ordering::AcqRel);
        LaneSlot(lane)
    }
}
