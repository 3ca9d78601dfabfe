//! The transport scenario's section of the report: its table of QUIC
//! beside TCP, the notes on the link and on failures, and its targets.

use crate::Settings;
use crate::overhead::WrkRun;
use crate::report::{Section, fixed};
use crate::stats::percentile;

use super::{Figures, LINK_LOSSES, LINK_RTT, LinkReport, TRANSPORTS, some_median};

/// The section for what was measured: `figures` per transport (QUIC first),
/// the emulated link's report if it ran, and the notes gathered so far.
pub(super) fn section(
    settings: &Settings,
    selectable: bool,
    figures: &[Figures],
    link_report: Option<&LinkReport>,
    mut notes: Vec<String>,
) -> Section {
    let quic = &figures[0];
    let tcp = figures.get(1);
    let tcp_missing = if selectable { "failed" } else { "not measured" };
    let mut rows = loopback_rows(settings, quic, tcp);
    if let Some(report) = link_report {
        rows.extend(link_rows(quic, tcp));
        notes.extend(link_notes(report));
    }
    failure_notes(selectable, figures, &mut notes);
    let mut section = Section {
        title: "6. Transports: QUIC beside TCP".into(),
        method: method(settings),
        notes,
        ..Section::default()
    };
    section.table.push(
        ["measure", "QUIC", "TCP", "TCP / QUIC", "how"]
            .map(String::from)
            .to_vec(),
    );
    section
        .table
        .extend(rows.iter().map(|row| row.cells(tcp_missing)));
    targets(&mut section, selectable, quic, tcp);
    section
}

/// The request rate and latency rows wrk measured on loopback.
fn wrk_rows(settings: &Settings, quic: &Figures, tcp: Option<&Figures>) -> Vec<Row> {
    let wrk_how = format!(
        "wrk 1 thread, {} s per run, median of {} rounds (transports take turns)",
        settings.wrk_duration.as_secs(),
        settings.rounds
    );
    let mut rows = Vec::new();
    for connections in [1u32, 32] {
        let conns = if connections == 1 { "conn" } else { "conns" };
        for (what, pick, digits) in [
            ("req/s", (|r: &WrkRun| r.rps) as fn(&WrkRun) -> f64, 0),
            ("p50 (µs)", |r: &WrkRun| r.p50_us, 0),
            ("p99 (µs)", |r: &WrkRun| r.p99_us, 0),
        ] {
            rows.push(Row {
                measure: format!("{what} @{connections} {conns}"),
                quic: quic.wrk_median(connections, pick),
                tcp: tcp.and_then(|t| t.wrk_median(connections, pick)),
                digits,
                marks: [
                    quic.wrk_mark(connections),
                    tcp.and_then(|t| t.wrk_mark(connections)),
                ],
                how: wrk_how.clone(),
            });
        }
    }
    rows
}

/// The wrk, CPU, bulk and memory rows measured on loopback.
fn loopback_rows(settings: &Settings, quic: &Figures, tcp: Option<&Figures>) -> Vec<Row> {
    let mut rows = wrk_rows(settings, quic, tcp);
    rows.push(Row {
        measure: "client + relay CPU per request @32 conns (µs)".into(),
        quic: some_median(&quic.cpu_us_32),
        tcp: tcp.and_then(|t| some_median(&t.cpu_us_32)),
        digits: 0,
        marks: [quic.wrk_mark(32), tcp.and_then(|t| t.wrk_mark(32))],
        how: "user + system time of both programs during a run / requests served; median".into(),
    });
    rows.push(Row {
        measure: "machine idle @32 conns (%)".into(),
        quic: some_median(&quic.idle_32),
        tcp: tcp.and_then(|t| some_median(&t.idle_32)),
        digits: 0,
        marks: Default::default(),
        how: "share of all cores' time `/proc/stat` counts idle during a run; median".into(),
    });
    let bulk_how = format!(
        "one {} MiB transfer, 10^6 bytes per second of wall time",
        settings.bulk_bytes >> 20
    );
    rows.push(Row {
        measure: "download MB/s".into(),
        quic: quic.download_mbs,
        tcp: tcp.and_then(|t| t.download_mbs),
        digits: 0,
        marks: Default::default(),
        how: bulk_how.clone(),
    });
    rows.push(Row {
        measure: "upload MB/s".into(),
        quic: quic.upload_mbs,
        tcp: tcp.and_then(|t| t.upload_mbs),
        digits: 0,
        marks: Default::default(),
        how: bulk_how,
    });
    let mib = |kib: Option<u64>| kib.map(|kib| kib as f64 / 1024.0);
    let rss_how = "VmHWM, reset after warm-up; peak over the wrk runs and both transfers";
    rows.push(Row {
        measure: "client peak RSS (MiB)".into(),
        quic: mib(quic.client_peak_kib),
        tcp: tcp.and_then(|t| mib(t.client_peak_kib)),
        digits: 1,
        marks: Default::default(),
        how: rss_how.into(),
    });
    rows.push(Row {
        measure: "relay peak RSS (MiB)".into(),
        quic: mib(quic.relay_peak_kib),
        tcp: tcp.and_then(|t| mib(t.relay_peak_kib)),
        digits: 1,
        marks: Default::default(),
        how: rss_how.into(),
    });
    rows
}

/// The TTFB rows measured across the emulated link.
fn link_rows(quic: &Figures, tcp: Option<&Figures>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (index, loss) in LINK_LOSSES.into_iter().enumerate() {
        let samples = |f: Option<&Figures>| f?.ttfb_ms.get(index).cloned().flatten();
        let (quic_ttfb, tcp_ttfb) = (samples(Some(quic)), samples(tcp));
        let count = quic_ttfb.as_ref().or(tcp_ttfb.as_ref()).map_or(0, Vec::len);
        let how =
            format!("{count} warm streaming requests one after another, time to the first event");
        for (what, p) in [("p50", 50.0), ("p99", 99.0)] {
            rows.push(Row {
                measure: format!(
                    "TTFB {what} (ms), {} ms RTT, {:.0}% loss",
                    LINK_RTT.as_millis(),
                    loss * 100.0
                ),
                quic: quic_ttfb.as_ref().map(|t| percentile(t, p)),
                tcp: tcp_ttfb.as_ref().map(|t| percentile(t, p)),
                digits: 1,
                marks: Default::default(),
                how: how.clone(),
            });
        }
    }
    rows
}

/// The notes on the emulated link itself: its checks and what it carried.
fn link_notes(report: &LinkReport) -> Vec<String> {
    let mut notes = Vec::new();
    for (probe, loss) in report.probes.iter().zip(LINK_LOSSES) {
        let expected = 1.0 - (1.0 - loss).powi(2);
        notes.push(format!(
            "Link check at {:.0}% loss per direction (UDP echo across the emulator, {} probes \
             2 ms apart, before the tunnels): round trip min {:.1} / p50 {:.1} / p99 {:.1} ms \
             for a configured {} ms; {:.1}% of probes lost (either way), {:.1}% expected.",
            loss * 100.0,
            probe.sent,
            probe.rtt_min_ms,
            probe.rtt_p50_ms,
            probe.rtt_p99_ms,
            LINK_RTT.as_millis(),
            probe.lost_share() * 100.0,
            expected * 100.0
        ));
    }
    notes.push(format!(
        "The emulator carried {} packets client → relay and {} relay → client in these runs; \
         {} were dropped by a full delay queue (beyond the emulated loss; the figures are \
         clean when this is 0).",
        report.packets.0, report.packets.1, report.overflow
    ));
    notes
}

/// Notes on what could not be measured and on each transport's failures.
fn failure_notes(selectable: bool, figures: &[Figures], notes: &mut Vec<String>) {
    if !selectable {
        notes.insert(
            0,
            "TCP not measured: these binaries' passage-client has no `--transport` option (QUIC \
             only), so only the QUIC half ran."
                .into(),
        );
    }
    for ((name, _), figures) in TRANSPORTS.into_iter().zip(figures) {
        if figures.failures.is_empty() {
            continue;
        }
        notes.push(format!(
            "{name} failures ({}): {}.",
            figures.failures.len(),
            figures.failures.join("; ")
        ));
        if !figures.warnings.is_empty() {
            notes.push(format!(
                "{name}: first warnings in the programs' logs: `{}`.",
                figures.warnings.join("` · `")
            ));
        }
    }
}

/// How the section measured, for its method paragraph.
fn method(settings: &Settings) -> String {
    format!(
        "The same binaries, one tunnel per transport started side by side: the relay at its \
                 defaults (QUIC on UDP and TLS over TCP with HTTP/2 on the same port number), the \
                 client with `--transport quic` or `--transport tcp`, everything else at defaults. \
                 Loopback rows: wrk POSTs the fixed chat completion of section 1 through each \
                 tunnel (1 thread, {} s per run, {} rounds, the transports back to back in each \
                 round; medians), then one {} MiB download and one upload as in section 3. \
                 Emulated-link rows: two network namespaces joined by TUN devices and a userspace \
                 forwarder in passage-bench (`bench/src/linkem/`) that carries every IP packet, \
                 TCP and UDP alike, with a fixed one-way delay of {} ms and independent random loss \
                 in each direction (MTU 1500, no bandwidth limit); passage-client runs in one \
                 namespace, passage-relay and the mock upstream in the other, and a fresh tunnel \
                 per transport and loss measures the time to the first SSE event (`/v1/stamped`, \
                 one event) of streaming requests sent one at a time from inside the client's \
                 namespace. TCP / QUIC is the TCP figure divided by the QUIC one. A wrk run that saw \
                 failed requests still counts (its figures include the failures, fast error \
                 answers and the stalls around them) and is marked; its failures are listed below \
                 the table. A transfer or TTFB measurement that failed is marked failed.",
        settings.wrk_duration.as_secs(),
        settings.rounds,
        settings.bulk_bytes >> 20,
        LINK_RTT.as_millis() / 2
    )
}

/// The section's targets: TCP's request rate, bulk throughput and memory
/// against QUIC's.
fn targets(section: &mut Section, selectable: bool, quic: &Figures, tcp: Option<&Figures>) {
    let missing = if selectable {
        "failed (see the notes)"
    } else {
        "not measured (no TCP transport in these binaries)"
    };
    let failures = tcp.map_or(0, |t| t.failures.len());
    let rps = |f: Option<&Figures>| f?.wrk_median(32, |r| r.rps);
    match (rps(Some(quic)), rps(tcp)) {
        (Some(quic_rps), Some(tcp_rps)) => {
            let ratio = tcp_rps / quic_rps;
            let caveat = if failures > 0 {
                format!(" ({failures} TCP measurements saw failed requests)")
            } else {
                String::new()
            };
            if ratio < 0.8
                && let Some(note) = cpu_note(ratio, quic, tcp)
            {
                section.notes.push(note);
            }
            section.target(
                "TCP vs QUIC req/s @32 conns",
                format!("{ratio:.2}×{caveat}"),
                "≥ 0.8×, no failed request",
                ratio >= 0.8 && failures == 0,
            );
        }
        _ => section.target(
            "TCP vs QUIC req/s @32 conns",
            missing.into(),
            "≥ 0.8×, no failed request",
            false,
        ),
    }
    match tcp.and_then(|t| Some(t.download_mbs?.min(t.upload_mbs?))) {
        Some(slower) => section.target(
            "TCP bulk throughput, slower direction",
            format!("{slower:.0} MB/s"),
            "≥ 250 MB/s",
            slower >= 250.0,
        ),
        None => section.target(
            "TCP bulk throughput, slower direction",
            missing.into(),
            "≥ 250 MB/s",
            false,
        ),
    }
    let peak_ratio = |pick: fn(&Figures) -> Option<u64>| -> Option<f64> {
        Some(pick(tcp?)? as f64 / pick(quic)?.max(1) as f64)
    };
    match (
        peak_ratio(|f| f.client_peak_kib),
        peak_ratio(|f| f.relay_peak_kib),
    ) {
        (Some(client), Some(relay)) => section.target(
            "TCP vs QUIC peak RSS (client, relay)",
            format!("{client:.2}×, {relay:.2}×"),
            "≤ 1.10× each",
            client <= 1.10 && relay <= 1.10,
        ),
        _ => section.target(
            "TCP vs QUIC peak RSS (client, relay)",
            missing.into(),
            "≤ 1.10× each",
            false,
        ),
    }
}

/// Why TCP missed the request-rate target, in CPU figures, when they exist.
fn cpu_note(ratio: f64, quic: &Figures, tcp: Option<&Figures>) -> Option<String> {
    let cpu = |f: Option<&Figures>| some_median(&f?.cpu_us_32);
    let idle = |f: Option<&Figures>| some_median(&f?.idle_32);
    let (Some(quic_cpu), Some(tcp_cpu), Some(tcp_idle)) = (cpu(Some(quic)), cpu(tcp), idle(tcp))
    else {
        return None;
    };
    let bound = if tcp_idle < 10.0 {
        "so the rate is bound by CPU, "
    } else {
        ""
    };
    Some(format!(
        "TCP misses the 0.8× target at 32 connections by {:.2} ({ratio:.2}×). \
         The machine was {tcp_idle:.0}% idle during TCP's runs, {bound}and \
         client + relay spent {tcp_cpu:.0} µs of CPU per request over TCP \
         against {quic_cpu:.0} µs over QUIC ({:.2}×).",
        0.8 - ratio,
        tcp_cpu / quic_cpu
    ))
}

/// One table row: what, QUIC's and TCP's figures, decimals, how.
struct Row {
    measure: String,
    quic: Option<f64>,
    tcp: Option<f64>,
    digits: usize,
    /// Remarks appended to the QUIC and TCP figures (failed requests).
    marks: [Option<String>; 2],
    how: String,
}

impl Row {
    /// The row's cells; a missing TCP figure reads `tcp_missing`.
    fn cells(&self, tcp_missing: &str) -> Vec<String> {
        let show = |value: Option<f64>, missing: &str, mark: &Option<String>| {
            let shown = value.map_or_else(|| missing.to_owned(), |v| fixed(v, self.digits));
            match mark {
                Some(mark) => format!("{shown} ({mark})"),
                None => shown,
            }
        };
        let ratio = match (self.quic, self.tcp) {
            (Some(quic), Some(tcp)) if quic > 0.0 => fixed(tcp / quic, 2),
            _ => "–".to_owned(),
        };
        vec![
            self.measure.clone(),
            show(self.quic, "failed", &self.marks[0]),
            show(self.tcp, tcp_missing, &self.marks[1]),
            ratio,
            self.how.clone(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_show_ratios_and_missing_figures() {
        let row = Row {
            measure: "req/s".into(),
            quic: Some(1000.0),
            tcp: Some(900.0),
            digits: 0,
            marks: Default::default(),
            how: "wrk".into(),
        };
        assert_eq!(row.cells("failed"), ["req/s", "1000", "900", "0.90", "wrk"]);
        let row = Row { tcp: None, ..row };
        assert_eq!(row.cells("not measured")[2..4], ["not measured", "–"]);
    }
}
