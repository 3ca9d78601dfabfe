//! Checks made by asking the relay: the upstream behind it, and the path's
//! round trip, loss and throughput.

use std::time::{Duration, Instant};

use passage_shared::doctor::{
    Check, DOCTOR_DOWNLOAD, DOCTOR_ECHO, DOCTOR_MAX_DOWNLOAD, DOCTOR_UPLOAD, DOCTOR_UPSTREAM,
    UpstreamReport, Verdict,
};
use passage_shared::transport::TransportKind;

use super::DoctorOptions;
use super::question::{Answer, ask};
use crate::connect::Connection;

/// What the relay says of the upstream behind it.
pub(super) async fn upstream_check(connection: &Connection, limit: Duration) -> Check {
    // The relay waits up to 10 s per key for the upstream.
    let wait = limit.max(Duration::from_secs(25));
    let answer = tokio::time::timeout(
        wait,
        ask(connection, DOCTOR_UPSTREAM, None, 64 * 1024, None),
    )
    .await;
    match answer {
        Ok(Ok(Answer {
            status: 200, body, ..
        })) => match serde_json::from_slice::<UpstreamReport>(&body) {
            Ok(report) => report.check(),
            Err(e) => Check::warn(
                "upstream",
                format!("the relay's answer is unreadable: {e}"),
                "is the relay the same version as this client?",
            ),
        },
        Ok(Ok(Answer { status, .. })) => Check::warn(
            "upstream",
            format!("the relay does not answer doctor questions (HTTP {status})"),
            "upgrade the relay to a passage with `doctor`",
        ),
        Ok(Err(e)) => Check::fail(
            "upstream",
            format!("the question to the relay failed: {e}"),
            "see the relay's log",
        ),
        Err(_) => Check::fail(
            "upstream",
            format!("the relay gave no answer within {} s", wait.as_secs()),
            "see the relay's log",
        ),
    }
}

/// Round trip, loss (of what this end sends) and throughput each way; a
/// round trip that fails ends the checks there.
pub(super) async fn path_checks(
    connection: &Connection,
    over: TransportKind,
    options: &DoctorOptions,
) -> Vec<Check> {
    let rtt = rtt_check(connection, over, options.timeout).await;
    if rtt.verdict != Verdict::Ok {
        return vec![rtt];
    }
    let (loss, up) = upload_and_loss(connection, over, options).await;
    let throughput = throughput_check(connection, up, options).await;
    vec![rtt, loss, throughput]
}

/// The round trip to the relay: the median of five echoed requests.
async fn rtt_check(connection: &Connection, over: TransportKind, limit: Duration) -> Check {
    let mut rtts = Vec::new();
    for _ in 0..5 {
        match tokio::time::timeout(limit, ask(connection, DOCTOR_ECHO, None, 0, None)).await {
            Ok(Ok(Answer {
                status: 200, took, ..
            })) => rtts.push(took),
            Ok(Ok(Answer { status, .. })) => {
                return Check::warn(
                    "rtt",
                    format!("the relay does not answer doctor questions (HTTP {status})"),
                    "upgrade the relay to a passage with `doctor`",
                );
            }
            Ok(Err(e)) => {
                return Check::fail(
                    "rtt",
                    format!("a round trip failed: {e}"),
                    "see the relay's log",
                );
            }
            Err(_) => {
                return Check::fail(
                    "rtt",
                    format!("no answer to a round trip within {} s", limit.as_secs()),
                    "the path stalls: see the loss figure with --transport tcp and quic",
                );
            }
        }
    }
    rtts.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Check::ok(
        "rtt",
        format!(
            "{:.1} ms over {over} (median of 5 requests; least {:.1} ms; the transport's estimate {:.1} ms)",
            ms(rtts[2]),
            ms(rtts[0]),
            ms(connection.rtt())
        ),
    )
}

/// Uploads for the transfer time: the loss check (from the transport's
/// counts around the upload) and the upload's figure, bytes the relay
/// counted and over how long, if it answered.
async fn upload_and_loss(
    connection: &Connection,
    over: TransportKind,
    options: &DoctorOptions,
) -> (Check, Option<(u64, Duration)>) {
    let before = connection.sent_and_lost();
    let upload = tokio::time::timeout(
        options.transfer_time + options.timeout,
        ask(
            connection,
            DOCTOR_UPLOAD,
            Some(options.transfer_time),
            32,
            None,
        ),
    )
    .await;
    let after = connection.sent_and_lost();
    // The relay's count of what arrived, over the time from the head to
    // its answer (the upload stops early at the most a doctor may send).
    let up = match upload {
        Ok(Ok(Answer {
            status: 200,
            body,
            took,
            ..
        })) => {
            let bytes: u64 = String::from_utf8_lossy(&body).trim().parse().unwrap_or(0);
            Some((bytes, took))
        }
        _ => None,
    };
    let loss = loss_check(over, before, after)
        .unwrap_or_else(|| Check::skip("loss", "the transport gave no counts"));
    (loss, up)
}

/// The share of what was sent that the transport lost (QUIC) or
/// retransmitted (TCP) between two of its counts; `None` without counts.
fn loss_check(
    over: TransportKind,
    before: Option<(u64, u64)>,
    after: Option<(u64, u64)>,
) -> Option<Check> {
    match (before, after) {
        (Some((sent0, lost0)), Some((sent1, lost1))) if sent1 > sent0 => {
            let (sent, lost) = (sent1 - sent0, lost1.saturating_sub(lost0));
            let share = lost as f64 / sent as f64 * 100.0;
            let what = match over {
                TransportKind::Quic => "packets lost",
                TransportKind::Tcp => "segments retransmitted",
            };
            let detail = format!("{share:.1}% of {sent} {what} on the way to the relay");
            Some(if share >= 5.0 {
                Check::warn(
                    "loss",
                    detail,
                    "a lossy path: streaming may stutter; try the other transport with --transport",
                )
            } else {
                Check::ok("loss", detail)
            })
        }
        _ => None,
    }
}

/// Downloads for the transfer time; with the upload's figure (`up`), the
/// throughput each way.
async fn throughput_check(
    connection: &Connection,
    up: Option<(u64, Duration)>,
    options: &DoctorOptions,
) -> Check {
    let started = Instant::now();
    let download = tokio::time::timeout(
        options.transfer_time + options.timeout,
        ask(
            connection,
            &format!("{DOCTOR_DOWNLOAD} {DOCTOR_MAX_DOWNLOAD}"),
            None,
            0,
            Some(options.transfer_time),
        ),
    )
    .await;
    let mbit = |bytes: u64, took: Duration| bytes as f64 * 8.0 / took.as_secs_f64().max(1e-6) / 1e6;
    match download {
        Ok(Ok(Answer {
            status: 200,
            bytes,
            took,
            ..
        })) => {
            let up_text = up
                .map(|(bytes, took)| format!(", up {:.1} Mbit/s", mbit(bytes, took)))
                .unwrap_or_default();
            Check::ok(
                "throughput",
                format!(
                    "down {:.1} Mbit/s ({} KiB in {:.1} s){up_text}",
                    mbit(bytes, took),
                    bytes / 1024,
                    started.elapsed().as_secs_f64()
                ),
            )
        }
        Ok(Ok(Answer { status, .. })) => Check::warn(
            "throughput",
            format!("the relay refused the transfer (HTTP {status})"),
            "upgrade the relay to a passage with `doctor`",
        ),
        Ok(Err(e)) => Check::fail(
            "throughput",
            format!("the transfer failed: {e}"),
            "the path breaks under load: see the relay's log",
        ),
        Err(_) => Check::fail(
            "throughput",
            "the transfer stalled",
            "the path breaks under load",
        ),
    }
}
