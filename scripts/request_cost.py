#!/usr/bin/env python3
"""Per-request cost accounting of passage (run through scripts/request_cost.sh).

Starts the mock upstream, passage-relay and passage-client from BIN_DIR on
127.0.0.1, drives a fixed chat completion POST through them with wrk (one
thread, keep-alive) at 1 and 32 connections over each transport, and
reports per request, for each program:

- CPU µs (perf's task-clock of the process over the run, / requests);
- syscalls (raw_syscalls:sys_enter), context switches (thread wake-ups);
- task polls (uprobes on every instance of tokio's task::raw::poll: each
  poll is one hop of the request from one task to another);
- packets each way between client and relay (nftables counters on the
  relay's port: UDP datagrams for QUIC, TCP segments for TCP);
- the CPU split into buckets by a sampling profile (perf record, cpu-clock)
  in a second run: each sample's symbol is put in a bucket by name, and a
  bucket's µs is its share of samples times the measured CPU µs.

Counting runs and profiling runs are separate, so the profiler's own cost
does not bias the counts. Needs root for uprobes, nftables and perf; the
missing parts are reported as such, not guessed.
"""

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'

# Buckets, first match wins: (name, regex on the symbol). Samples in the
# kernel go to the first three by symbol, whatever their regex.
KERNEL_BUCKETS = [
    ("kernel: scheduling, wake-ups", r"schedul|wake|futex|epoll|ep_poll|ep_|task_switch|pick_next|enqueue|dequeue|update_curr|switch_|__switch|hrtimer|idle|_raw_spin|irq|rcu|tick"),
    ("kernel: network send/receive", r"udp|tcp|\bip|_ip|skb|sock|net|loopback|nf_|nft_|inet|dev_|napi|csum|copy_|_copy|iov|sendmsg|recvmsg|__sys_send|__sys_recv|gro|gso|neigh|dst_|fib|xmit"),
    ("kernel: other (syscall entry, files)", r""),
]
BUCKETS = [
    ("logging, formatting", r"tracing|core::fmt|alloc::fmt|\bfmt::|itoa|ryu|time::format"),
    ("crypto", r"\bring\b|ring_core|aes_|gcm|chacha|poly1305|sha2|_GFp|aws_lc"),
    ("QUIC packets (quinn)", r"quinn"),
    ("TLS records (rustls)", r"rustls"),
    ("HTTP/2 tunnel (h2)", r"^h2::|<h2::"),
    ("HTTP parse/serve (hyper)", r"hyper|httparse|\bhttp::"),
    ("frames (encode/decode)", r"frame|bincode|tokio_util::codec|FramedRead|FramedWrite"),
    ("JSON (serde)", r"serde"),
    ("allocation", r"\bje_|jemalloc|_rjem_|\bmalloc|\bfree\b|realloc|__rust_(alloc|dealloc|realloc)|cfree|arena_"),
    ("copies (memcpy)", r"memcpy|memmove|memset|__memcmp|bcmp"),
    ("async runtime (tokio)", r"tokio::|mio::|parking_lot|epoll_wait|clock_gettime|\[vdso\]"),
    ("passage code", r"passage_"),
]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def free_port():
    """A port free on 127.0.0.1 for both UDP and TCP."""
    for _ in range(100):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    raise RuntimeError("no free port")


class Stack:
    """The mock upstream, a relay and a client over one transport."""

    started = 0

    def __init__(self, bin_dir, work, transport, log=None):
        self.procs = []
        Stack.started += 1
        tag = f"{transport}-{Stack.started}"
        mock_out = open(os.path.join(work, f"mock-{tag}.url"), "w+")
        mock = subprocess.Popen([f"{bin_dir}/passage-mock-upstream", "--listen", "127.0.0.1:0"],
                                stdout=mock_out, stderr=subprocess.DEVNULL)
        self.procs.append(mock)
        for _ in range(200):
            mock_out.seek(0)
            url = mock_out.read().strip()
            if url:
                break
            time.sleep(0.05)
        pki = os.path.join(work, "pki")
        if not os.path.isdir(pki):
            run([f"{bin_dir}/passage-relay", "init", "--dir", pki])
        self.relay_port = free_port()
        bundle = os.path.join(work, f"client-{tag}.toml")
        run([f"{bin_dir}/passage-relay", "issue", "--dir", pki, "--name", f"cost-{tag}",
             "--relay", f"127.0.0.1:{self.relay_port}", "--out", bundle])
        env = dict(os.environ, RUST_LOG=log) if log else None
        self.relay = subprocess.Popen(
            [f"{bin_dir}/passage-relay", "serve", "--pki", pki, "--listen",
             f"127.0.0.1:{self.relay_port}", "--upstream", url], env=env,
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"relay-{tag}.log"), "w"))
        self.procs.append(self.relay)
        self.client_port = free_port()
        self.client = subprocess.Popen(
            [f"{bin_dir}/passage-client", "run", "--bundle", bundle, "--state-file", "none",
             "--transport", transport, "--listen", f"127.0.0.1:{self.client_port}"], env=env,
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"client-{tag}.log"), "w"))
        self.procs.append(self.client)
        health = f"http://127.0.0.1:{self.client_port}/healthz"
        for _ in range(200):
            try:
                if json.load(urllib.request.urlopen(health, timeout=1)).get("transport") == transport:
                    return
            except Exception:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the {transport} tunnel did not come up (logs in {work})")

    def url(self):
        return f"http://127.0.0.1:{self.client_port}/v1/chat/completions"

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def wrk(script, url, conns, seconds):
    out = run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", script, url]).stdout
    m = re.search(r"(\d+) requests in", out)
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failures:\n{out}")
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1, "ms": 1000, "s": 1_000_000}
    return int(m.group(1)), float(p50.group(1)) * scale[p50.group(2)]


class Probes:
    """Uprobes on tokio's task::raw::poll in both binaries, in a group of our own."""

    def __init__(self, bins):
        self.group = f"passage_cost_{os.getpid()}"
        self.events = []
        self.ok = False
        tracing = "/sys/kernel/tracing/uprobe_events"
        if not os.path.exists(tracing):
            tracing = "/sys/kernel/debug/tracing/uprobe_events"
        self.path = tracing
        try:
            lines = []
            for label, binary in bins.items():
                for i, offset in enumerate(poll_offsets(binary)):
                    name = f"{label}_poll{i}"
                    lines.append(f"p:{self.group}/{name} {binary}:0x{offset:x}")
                    self.events.append(name)
            # One write per probe, unbuffered: tracefs takes a command per write.
            fd = os.open(tracing, os.O_WRONLY | os.O_APPEND)
            try:
                for line in lines:
                    os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
            self.ok = bool(self.events)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"request_cost: task polls not counted (uprobes: {e})", file=sys.stderr)
            self.remove()

    def perf_events(self, label):
        """The events of the binary labelled `label`."""
        return [f"{self.group}:{e}" for e in self.events if e.startswith(label + "_poll")] if self.ok else []

    def remove(self):
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return
        for name in self.events:
            try:
                os.write(fd, f"-:{self.group}/{name}\n".encode())
            except OSError:
                pass  # never added
        os.close(fd)


def poll_offsets(binary):
    """File offsets of every tokio::runtime::task::raw::poll in `binary`."""
    segments = []
    for line in run(["readelf", "-lW", binary]).stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD":
            offset, vaddr, filesz = int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)
            segments.append((vaddr, offset, filesz))
    offsets = []
    for line in run(["nm", binary]).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tT" and "5tokio7runtime4task3raw4poll" in parts[2]:
            vaddr = int(parts[0], 16)
            for seg_vaddr, seg_offset, size in segments:
                if seg_vaddr <= vaddr < seg_vaddr + size:
                    offsets.append(vaddr - seg_vaddr + seg_offset)
    return offsets


class Packets:
    """nftables counters of packets to and from the relay's port on loopback."""

    def __init__(self, port):
        self.table = f"passage_cost_{os.getpid()}"
        self.ok = False
        rules = f"""table inet {self.table} {{
  chain out {{
    type filter hook output priority 0; policy accept;
    udp dport {port} counter
    udp sport {port} counter
    tcp dport {port} counter
    tcp sport {port} counter
  }}
}}"""
        if shutil.which("nft") is None:
            print("request_cost: packets not counted (nft is not installed)", file=sys.stderr)
            return
        try:
            subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
            self.ok = True
        except subprocess.CalledProcessError as e:
            print(f"request_cost: packets not counted (nft: {e.stderr.strip()})", file=sys.stderr)

    def read(self):
        """(udp to relay, udp from relay, tcp to relay, tcp from relay) packets so far."""
        if not self.ok:
            return None
        out = run(["nft", "list", "table", "inet", self.table]).stdout
        return tuple(int(n) for n in re.findall(r"counter packets (\d+)", out))

    def remove(self):
        if self.ok:
            subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)


def perf_stat(pid, events, seconds):
    """Starts `perf stat` on `pid` for `seconds`; returns the process."""
    return subprocess.Popen(["perf", "stat", "-x", ";", "-e", ",".join(events), "-p", str(pid),
                             "--", "sleep", str(seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read_perf_stat(proc):
    _, err = proc.communicate()
    counts = collections.Counter()
    for line in err.splitlines():
        parts = line.split(";")
        if len(parts) >= 3:
            try:
                value = float(parts[0])
            except ValueError:
                continue
            event = parts[2]
            counts["task polls" if "_poll" in event else event] += value
    return counts


def profile(pid, seconds, out):
    return subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-p", str(pid),
                             "-o", out, "--", "sleep", str(seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def buckets(data):
    """Samples per bucket, the total, and samples per symbol."""
    out = run(["perf", "script", "-i", data, "-F", "ip,sym,dso"]).stdout
    counts = collections.Counter()
    symbols = collections.Counter()
    compiled = [(name, re.compile(rx)) for name, rx in BUCKETS]
    kernel = [(name, re.compile(rx)) for name, rx in KERNEL_BUCKETS]
    total = 0
    for line in out.splitlines():
        line = line.strip()
        if not line:
            continue
        line = line.split(None, 1)[1] if " " in line else line  # drop the address
        # perf prints "symbol (dso)"; the kernel's dso is [kernel.kallsyms].
        symbol, _, dso = line.rpartition(" (")
        symbol = symbol or line
        in_kernel = dso.startswith("[kernel")
        symbols[f"{symbol} ({'kernel' if in_kernel else os.path.basename(dso.rstrip(')'))})"] += 1
        total += 1
        for name, rx in (kernel if in_kernel else compiled):
            if rx.search(symbol):
                counts[name] += 1
                break
        else:
            counts["other (std, collections, ...)"] += 1
    return counts, total, symbols


def measure(stack, probes, packets, script, conns, seconds, work, label, build):
    pids = {"client": stack.client.pid, "relay": stack.relay.pid}
    wrk(script, stack.url(), conns, 1)  # warm up
    events = ["task-clock", "context-switches", "raw_syscalls:sys_enter"]
    stats = {name: perf_stat(pid, events + probes.perf_events(f"{build}_{name}"), seconds + 1)
             for name, pid in pids.items()}
    time.sleep(0.3)
    before = packets.read()
    requests, p50 = wrk(script, stack.url(), conns, seconds)
    after = packets.read()
    counts = {name: read_perf_stat(p) for name, p in stats.items()}
    # perf counts a little longer than wrk runs (it starts first and ends
    # after); the idle margins cost next to nothing, so they are ignored.
    result = {"requests": requests, "p50_us": p50, "programs": {}}
    for name in pids:
        c = counts[name]
        result["programs"][name] = {
            "cpu_us": c["task-clock"] * 1000 / requests,  # task-clock is in ms
            "syscalls": c["raw_syscalls:sys_enter"] / requests,
            "context_switches": c["context-switches"] / requests,
            "task_polls": c["task polls"] / requests if probes.ok else None,
        }
    if before is not None and after is not None:
        d = [(a - b) / requests for a, b in zip(after, before)]
        result["packets"] = {"udp_to_relay": d[0], "udp_from_relay": d[1],
                             "tcp_to_relay": d[2], "tcp_from_relay": d[3]}
    # The profile: a second run of the same load.
    profiles = {name: profile(pid, seconds, os.path.join(work, f"{label}-{name}.data"))
                for name, pid in pids.items()}
    time.sleep(0.3)
    wrk(script, stack.url(), conns, seconds)
    for name, p in profiles.items():
        p.wait()
        split, total, symbols = buckets(os.path.join(work, f"{label}-{name}.data"))
        cpu = result["programs"][name]["cpu_us"]
        result["programs"][name]["top_symbols"] = [
            (sym, round(cpu * n / total, 2)) for sym, n in symbols.most_common(40)] if total else []
        result["programs"][name]["buckets"] = {
            bucket: cpu * n / total for bucket, n in split.most_common()} if total else {}
    return result


ROWS = [("cpu_us", "CPU µs"), ("syscalls", "syscalls"), ("context_switches", "context switches"),
        ("task_polls", "task polls")]


def figure(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def report(results, base_results):
    """Markdown: one table per transport and load; with a baseline, before and after."""
    lines = []
    for label, r in results.items():
        b = base_results.get(label) if base_results else None
        heading = f"**{label}**: {r['requests']} requests in the counting run, wrk p50 {r['p50_us']:.0f} µs"
        if b:
            heading += f" (before: {b['requests']} requests, p50 {b['p50_us']:.0f} µs)"
        lines += ["", heading, ""]
        if b:
            lines += ["| per request | client before | client after | relay before | relay after "
                      "| both before | both after | after ÷ before |",
                      "|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| per request | client | relay | both |", "|---|---|---|---|"]

        def row(title, get):
            after = [get(r, p) for p in ("client", "relay")]
            both = None if None in after else sum(after)
            if not b:
                lines.append(f"| {title} | {figure(after[0])} | {figure(after[1])} | {figure(both)} |")
                return
            before = [get(b, p) for p in ("client", "relay")]
            both_before = None if None in before else sum(before)
            ratio = f"{both / both_before:.2f}" if both is not None and both_before else "–"
            lines.append(f"| {title} | {figure(before[0])} | {figure(after[0])} | {figure(before[1])} "
                         f"| {figure(after[1])} | {figure(both_before)} | {figure(both)} | {ratio} |")

        for key, title in ROWS:
            row(title, lambda res, p, key=key: res["programs"][p][key])
        if "packets" in r:
            def packets(key):
                return lambda res, p: (res.get("packets") or {}).get(f"{key}_{'to' if p == 'client' else 'from'}_relay")
            row("UDP datagrams sent (client: to relay; relay: to client)", packets("udp"))
            row("TCP segments sent (client: to relay; relay: to client)", packets("tcp"))
        names = []
        for res in [r] + ([b] if b else []):
            for p in ("client", "relay"):
                for name in res["programs"][p].get("buckets", {}):
                    if name not in names:
                        names.append(name)
        for name in names:
            row(f"CPU µs: {name}", lambda res, p, name=name: res["programs"][p].get("buckets", {}).get(name, 0.0))
    return "\n".join(lines) + "\n"


METHOD = """Method (`scripts/request_cost.sh`): the mock upstream, passage-relay and passage-client \
(release builds, default settings, log level info to a file) on 127.0.0.1; wrk (1 thread, keep-alive) POSTs \
the fixed chat completion of section 1 for {seconds} s per run. Counting run: `perf stat` on each program \
counts task-clock (CPU), context switches, syscalls (raw_syscalls:sys_enter) and uprobes on every \
instance of tokio's `task::raw::poll` (one per task poll: a hop of the request from task to task); \
nftables counters on the relay's port count the packets each way. Profiling run (a second wrk run, \
so the profiler does not bias the counts): `perf record -e cpu-clock -F 4999` on each program; each \
sample's symbol goes to a bucket by name (regexes in the script) and a bucket's µs is its share of \
samples times the CPU µs of the counting run. Kernel time spent switching to and from a sleeping \
thread lands in `finish_task_switch` and `_raw_spin_unlock_irqrestore` on this VM (interrupts are \
re-enabled there), hence the scheduling bucket. All figures are per request."""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", default="target/release")
    parser.add_argument("--base-bin-dir", help="a second build to measure in the same run, as 'before'")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--transports", default="quic,tcp")
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--log", help="RUST_LOG for both programs (default: theirs, info)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("request_cost: SKIP: needs root (perf on other processes, uprobes, nftables)")
        return 0
    for program in ("perf", "wrk", "nm", "readelf"):
        if shutil.which(program) is None:
            print(f"request_cost: SKIP: {program} is not installed (scripts/request_cost.sh installs it)")
            return 0
    # SIGTERM unwinds like Ctrl-C, so the probes and the table are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    builds = {"after": os.path.abspath(args.bin_dir)}
    if args.base_bin_dir:
        builds = {"before": os.path.abspath(args.base_bin_dir), **builds}
    work = tempfile.mkdtemp(prefix="passage-cost-")
    script = os.path.join(work, "post.lua")
    with open(script, "w") as f:
        f.write(f"wrk.method = \"POST\"\nwrk.body = '{BODY}'\n"
                "wrk.headers[\"Content-Type\"] = \"application/json\"\n"
                "wrk.headers[\"Authorization\"] = \"Bearer sk-bench\"\n")
    binaries = {}
    for build, bin_dir in builds.items():
        binaries[f"{build}_client"] = f"{bin_dir}/passage-client"
        binaries[f"{build}_relay"] = f"{bin_dir}/passage-relay"
    probes = Probes(binaries)
    results = {build: {} for build in builds}
    try:
        # Builds alternate per transport, so both meet the same noise.
        for transport in args.transports.split(","):
            for build, bin_dir in builds.items():
                stack = Stack(bin_dir, work, transport, args.log)
                packets = Packets(stack.relay_port)
                try:
                    for conns in [int(c) for c in args.connections.split(",")]:
                        label = f"{transport} @{conns} conn{'s' if conns > 1 else ''}"
                        results[build][label] = measure(
                            stack, probes, packets, script, conns, args.seconds, work,
                            f"{build}-{transport}-{conns}", build)
                finally:
                    packets.remove()
                    stack.stop()
    finally:
        probes.remove()
    text = METHOD.format(seconds=args.seconds) + "\n" + report(results["after"], results.get("before"))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
