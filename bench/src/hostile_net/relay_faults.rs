//! The scenarios where the relay, not the network, goes wrong: restarted,
//! dead, and the doctor's verdict on each broken path.

use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::bed::Impairment;
use super::procs::{Stack, Transport};
use super::scenarios::{Row, client_on, summarize_failures};

/// `passage-client doctor` on each broken network names the hop that
/// broke: UDP dropped (QUIC warns, TCP carries, exit 0), TCP dropped (the
/// reverse), both dropped and the relay stopped (the relay, exit 1).
pub(super) async fn doctor(stack: &mut Stack, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const TARGET_ONE: &str = "exit 0; the blocked transport warns, the other is ok";
    if !stack.caps.doctor {
        rows.push(Row::new(
            "doctor",
            "runs",
            "not run: this build has no doctor".to_owned(),
            false,
        ));
        return Ok(());
    }
    for (label, impairment, warned, carried) in [
        ("doctor, UDP blocked", Impairment::BlockUdp, "quic", "tcp"),
        ("doctor, TCP blocked", Impairment::BlockTcp, "tcp", "quic"),
    ] {
        stack.bed.impose(impairment)?;
        let found = stack.doctor().await?;
        let pass = found.code == 0
            && found.verdict(warned) == "warn"
            && found.verdict(carried) == "ok"
            && found.verdict("upstream") == "ok";
        rows.push(Row::new(label, TARGET_ONE, found.summary(), pass));
    }
    stack.bed.impose(Impairment::None)?;
    stack
        .stop_relay(Signal::KILL, Duration::from_secs(5))
        .await?;
    let found = stack.doctor().await?;
    let pass = found.code == 1 && found.first_failure.as_deref() == Some("relay");
    rows.push(Row::new(
        "doctor, relay down",
        "exit 1, first failing check: relay",
        format!(
            "{}; first failure {}",
            found.summary(),
            found.first_failure.as_deref().unwrap_or("none")
        ),
        pass,
    ));
    Ok(())
}

pub(super) async fn relay_restart(
    stack: &mut Stack,
    rows: &mut Vec<Row>,
    transport: Transport,
) -> anyhow::Result<()> {
    let t = transport.name();
    let target = "next request 200, no error before it, ≤ 2 s after the relay is back";
    let kinds = [
        ("SIGTERM, restart", Signal::TERM),
        ("SIGKILL, restart", Signal::KILL),
    ];
    if !stack.caps.supports(transport) {
        for (label, _) in kinds {
            rows.push(Row::not_in_build(format!("relay {label} [{t}]"), target));
        }
        return Ok(());
    }
    let client = client_on(stack, transport).await?;
    for (label, signal) in kinds {
        client.wait_on(transport, Duration::from_secs(15)).await?;
        let warm = client.chat(Duration::from_secs(5)).await;
        anyhow::ensure!(warm.ok, "request before the {label}: {}", warm.detail);
        stack.stop_relay(signal, Duration::from_secs(10)).await?;
        stack.start_relay()?;
        let back = Instant::now();
        let limit = Duration::from_secs(10);
        let mut errors = Vec::new();
        let outcome = loop {
            let outcome = client.chat(limit).await;
            if outcome.ok || back.elapsed() > limit {
                break outcome;
            }
            errors.push(outcome);
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let secs = outcome.secs_since(back);
        let mut measured = if outcome.ok {
            format!("200 after {secs:.2} s")
        } else {
            format!("no 200 within {limit:?}: {}", outcome.detail)
        };
        if !errors.is_empty() {
            measured = format!("{measured}, after {}", summarize_failures(&errors));
        }
        rows.push(Row::new(
            format!("relay {label} [{t}]"),
            target,
            measured,
            outcome.ok && errors.is_empty() && secs <= 2.0,
        ));
    }
    Ok(())
}

pub(super) async fn relay_dead(
    stack: &mut Stack,
    rows: &mut Vec<Row>,
    transport: Transport,
) -> anyhow::Result<()> {
    let t = transport.name();
    let name = format!("relay dead (SIGKILL, no restart) [{t}]");
    let target = "in-flight stream and a new request both end in an error ≤ 5 s after the kill";
    if !stack.caps.supports(transport) {
        rows.push(Row::not_in_build(name, target));
        return Ok(());
    }
    let client = client_on(stack, transport).await?;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let stream = client.endless(Duration::from_secs(20), Some(first_tx));
    let kill = async {
        first_rx
            .await
            .map_err(|_| anyhow::anyhow!("the stream broke before its first event"))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stack
            .stop_relay(Signal::KILL, Duration::from_secs(5))
            .await?;
        let killed = Instant::now();
        let health = async {
            while killed.elapsed() < Duration::from_secs(15) {
                if client.health().await.is_ok_and(|h| !h.up) {
                    return Some(killed.elapsed().as_secs_f64());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None
        };
        let request = client.chat(Duration::from_secs(15));
        let (health_down, request) = tokio::join!(health, request);
        anyhow::Ok((killed, health_down, request))
    };
    let (stream, kill) = tokio::join!(stream, kill);
    let (killed, health_down, request) = kill?;
    let stream_secs = stream.secs_since(killed);
    let request_secs = request.secs_since(killed);
    let stream_cut = stream.detail.starts_with("cut after");
    let request_error = !request.ok && request.status.is_some_and(|s| s >= 400);
    let health_text = match health_down {
        Some(secs) => format!("/healthz not ok from {secs:.1} s"),
        None => "/healthz still ok after 15 s".to_owned(),
    };
    rows.push(Row::new(
        name,
        target,
        format!(
            "stream {} at {stream_secs:.3} s; new request {} at {request_secs:.3} s; {health_text}",
            if stream_cut { "cut" } else { &stream.detail },
            request.detail
        ),
        stream_cut && stream_secs <= 5.0 && request_error && request_secs <= 5.0,
    ));
    Ok(())
}
