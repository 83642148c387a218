#!/usr/bin/env python3
"""The proxy benchmark of issue 15, measured side by side in one run on one sipp pair.

Paths: sipp to sipp directly (the ceiling), through Kamailio as a transaction-stateful
proxy (tm + rr, bench/kamailio/proxy.cfg), through the sidecar with auth = "none", and
through the sidecar injecting bearer tokens from `byoc-sidecar sim idp` (10 s tokens);
each over UDP and over TCP. For each it reports:

- the highest call rate: steps of `--calls` calls (INVITE/100/180/200/ACK/BYE/200, no
  hold), doubling from `--start` then bisecting; a step passes with 0 failed calls, at
  most 0.01 % retransmitted messages, and the calls placed within 5 % of the time the
  rate asks for;
- the proxy's CPU time per call (user + system, every process of it) at `--cpu-rate`;
- the time an INVITE spends in the proxy (its arrival to its departure toward the UAS,
  from a tcpdump capture on loopback, microseconds), p50/p99 at `--latency-rate`, on an
  idle machine and with every vCPU kept busy by a niced spinner;
- the sidecar's resident memory with `--dialogs` concurrent dialogs (long calls).

Repetitions give medians and ranges. A benchmark, not a test: it prints and writes
numbers (bench/results/) and asserts nothing. Every load is bounded in calls and time,
on loopback only.
"""

import argparse
import datetime
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "release" / "byoc-sidecar"
SCENARIOS = ROOT / "tests" / "scenarios"
BUFFER = 1 << 20  # sipp socket buffers: large enough that the direct path is not socket-bound
PATHS = ["direct", "kamailio", "sidecar-none", "sidecar-bearer"]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        try:
            tcp.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def modules_dir():
    for candidate in Path("/usr/lib").glob("*/kamailio/modules"):
        if (candidate / "tm.so").is_file():
            return candidate
    sys.exit("kamailio modules not found: apt-get install kamailio")


def ticks_of(pids):
    """User + system clock ticks of processes (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def group_pids(pgid):
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def read_stats(path):
    """The last line of a sipp -trace_stat file, by column."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    header, last = lines[0].split(";"), lines[-1].split(";")
    values = {}
    for name, value in zip(header, last):
        try:
            values[name] = int(value)
        except ValueError:
            pass
    return values


class Proxy:
    """What sits between the sipp pair: nothing, Kamailio, or a sidecar."""

    def __init__(self, path, transport, uas_port, work):
        self.path, self.transport, self.work = path, transport, work
        self.processes = []
        self.port = uas_port
        if path == "direct":
            return
        self.port = free_port()
        if path == "kamailio":
            text = (ROOT / "bench" / "kamailio" / "proxy.cfg").read_text()
            text = (
                text.replace("@PORT@", str(self.port))
                .replace("@MODULES@", str(modules_dir()))
                .replace("@TARGET@", f"127.0.0.1:{uas_port}")
                .replace("@TRANSPORT@", transport)
            )
            config = work / "kamailio.cfg"
            config.write_text(text)
            self.start(
                ["/usr/sbin/kamailio", "-f", str(config), "-DD", "-E", "-m", "2048", "-M", "64",
                 "-Y", str(work), "-w", str(work)]
            )
            return
        core_port = free_port()
        credentials = ""
        auth = "none"
        if path == "sidecar-bearer":
            idp = free_port()
            self.start([str(BINARY), "sim", "idp", "--idp-listen", f"127.0.0.1:{idp}", "--ttl", "10s",
                        "--client", "bench:bench-secret:org-bench"])
            (work / "secret").write_text("bench-secret")
            auth = "bearer"
            credentials = (
                f'\n[trunk.credentials]\nkind = "oauth2"\ntoken_url = "http://127.0.0.1:{idp}/oauth/token"\n'
                f'client_id = "bench"\nclient_secret_file = "{work / "secret"}"\norganization = "org-bench"\n'
            )
        config = work / "sidecar.toml"
        config.write_text(
            f'[edge]\nlisten = ["{transport}:127.0.0.1:{self.port}"]\nallow = ["127.0.0.0/8"]\n'
            f'[core_side]\nlisten = ["{transport}:127.0.0.1:{core_port}"]\nallow = ["127.0.0.0/8"]\n'
            f'[sip]\nmax_transactions = 1000000\n[log]\nlevel = "warn"\n'
            f'[[trunk]]\nname = "bench"\nedge = "{transport}:127.0.0.1:9"\n'
            f'core = "{transport}:127.0.0.1:{uas_port}"\nauth = "{auth}"\n{credentials}'
        )
        self.start([str(BINARY), "run", "--config", str(config)])
        time.sleep(1.0 if path == "sidecar-bearer" else 0.3)

    def start(self, command):
        log = open(self.work / f"{Path(command[0]).name}-{len(self.processes)}.log", "w")
        self.processes.append(
            subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             process_group=0)
        )

    def pids(self):
        """Every process of the proxy itself (not the token endpoint)."""
        if not self.processes:
            return []
        main = self.processes[-1]
        return group_pids(main.pid) if self.path == "kamailio" else [main.pid]

    def stop(self):
        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def sipp(scenario, port, transport, work, name, extra):
    # A proxy with several worker processes (Kamailio's UDP children) can pass a 180 on
    # after the 200 that followed it: such a message is ignored (-abortunexp off), not a
    # failed call, or the scenario would be measured instead of the proxy.
    command = ["sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port),
               "-default_behaviors", "all,-abortunexp",
               "-buff_size", str(BUFFER), "-nostdin", "-trace_stat", "-stf", str(work / f"{name}.csv"),
               "-fd", "1", "-cp", str(free_port()), "-mp", str(free_port())]
    if transport == "tcp":
        command += ["-t", "t1", "-max_socket", "60000"]
    return subprocess.Popen(command + extra, cwd=work, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(path, transport, rate, calls, hold_ms=0, measure=None, busy=False):
    """One run of `calls` calls at `rate`: sipp's statistics, the elapsed time, and what
    `measure(proxy)` returned while the load ran."""
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    uas_port, uac_port = free_port(), free_port()
    limit = int(calls / rate * 2 + 10 + hold_ms / 1000)
    uas = sipp("uas.xml", uas_port, transport, work, "uas", ["-m", str(calls), "-timeout", f"{limit}s"])
    proxy = Proxy(path, transport, uas_port, work)
    spinners = []
    if busy:
        spinners = [subprocess.Popen(["nice", "-n", "19", "sh", "-c", "while :; do :; done"])
                    for _ in range(os.cpu_count() or 1)]
    # Kamailio forks its workers and sizes 2 GB of shared memory before it answers.
    time.sleep(2.0 if path == "kamailio" else 0.5)
    capture = None
    if measure == "latency":
        capture = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-U", "-s", "2048", "-w", str(work / "cap.pcap"),
             f"{'tcp' if transport == 'tcp' else 'udp'} and (dst port {proxy.port} or dst port {uas_port})"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    before = ticks_of(proxy.pids())
    started = time.monotonic()
    uac = sipp("uac.xml", uac_port, transport, work, "uac",
               [f"127.0.0.1:{proxy.port}", "-m", str(calls), "-r", str(rate), "-d", str(hold_ms),
                "-l", "1000000", "-timeout", f"{limit}s"])
    result = {}
    if callable(measure):
        result["measured"] = measure(proxy, uac)
    try:
        # sipp's own -timeout does not always end a run whose calls hang: enforce it.
        uac.wait(timeout=limit + 5)
    except subprocess.TimeoutExpired:
        uac.kill()
        uac.wait()
    elapsed = time.monotonic() - started
    result["ticks"] = ticks_of(proxy.pids()) - before
    for spinner in spinners:
        spinner.kill()
        spinner.wait()
    uas.kill()
    uas.wait()
    if capture:
        time.sleep(0.5)
        capture.terminate()
        capture.wait()
    proxy.stop()
    stats = read_stats(work / "uac.csv")
    result.update(
        exit=uac.returncode,
        elapsed=elapsed,
        successful=stats.get("SuccessfulCall(C)", 0),
        failed=stats.get("FailedCall(C)", 0),
        retransmissions=stats.get("Retransmissions(C)", 0),
    )
    if measure == "latency":
        times = sorted(transit_times(work / "cap.pcap", proxy.port, uas_port))
        if times:
            result["p50_us"] = times[len(times) // 2]
            result["p99_us"] = times[min(len(times) - 1, int(len(times) * 0.99))]
            result["invites"] = len(times)
    shutil.rmtree(work, ignore_errors=True)
    return result


def transit_times(capture, proxy_port, uas_port):
    """Microseconds from each INVITE's arrival at `proxy_port` to its departure to
    `uas_port`, by Call-ID, from a pcap of loopback (Ethernet or cooked framing, IPv4)."""
    try:
        data = Path(capture).read_bytes()
    except OSError:
        return []
    if len(data) < 24:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nanos = magic in (0xA1B23C4D, 0x4D3CB2A1)
    link = struct.unpack(endian + "I", data[20:24])[0]
    offset, arrived, departed = 24, {}, {}
    while offset + 16 <= len(data):
        seconds, fraction, length, _ = struct.unpack(endian + "IIII", data[offset:offset + 16])
        packet = data[offset + 16:offset + 16 + length]
        offset += 16 + length
        stamp = seconds * 1e6 + (fraction / 1000 if nanos else fraction)
        ip = packet[14:] if link == 1 else packet[16:] if link == 113 else packet[4:] if link == 0 else None
        if not ip or ip[0] >> 4 != 4:
            continue
        header = (ip[0] & 15) * 4
        protocol = ip[9]
        transport = ip[header:]
        if protocol == 17:
            port, payload = struct.unpack(">H", transport[2:4])[0], transport[8:]
        elif protocol == 6 and len(transport) >= 20:
            port, payload = struct.unpack(">H", transport[2:4])[0], transport[(transport[12] >> 4) * 4:]
        else:
            continue
        # A TCP segment can carry several messages (a writer gathers what is queued):
        # every INVITE in it counts, not only one at its start.
        table = arrived if port == proxy_port else departed if port == uas_port else None
        if table is None:
            continue
        for call_id in invite_call_ids(payload):
            table.setdefault(call_id, stamp)
    return [departed[key] - arrived[key] for key in arrived if key in departed and departed[key] >= arrived[key]]


def invite_call_ids(payload):
    """The Call-ID of every INVITE that starts in `payload` (at its start or at a line
    start after the previous message)."""
    ids, start = [], 0
    while True:
        at = payload.find(b"INVITE ", start)
        if at < 0:
            return ids
        start = at + 7
        if at > 0 and payload[at - 1:at] != b"\n":
            continue
        for line in payload[at:].split(b"\r\n"):
            if not line:
                break
            lower = line.lower()
            if lower.startswith(b"call-id:") or lower.startswith(b"i:"):
                ids.append(line.split(b":", 1)[1].strip())
                break


def passes(result, rate, calls):
    # Three messages a call leave the UAC (INVITE, ACK, BYE): 0.01 % of them.
    return (
        result["exit"] == 0
        and result["failed"] == 0
        and result["successful"] == calls
        and result["retransmissions"] <= calls * 3 * 0.0001
        # Placed within 5 % of the time the rate asks for (plus sipp's start): a
        # looser bound lets short steps at high rates pass well below their rate.
        and result["elapsed"] <= calls / rate * 1.05 + 0.25
    )


def search(path, transport, calls, start, ceiling, trace):
    """The highest passing rate: doubling, then bisecting to within 5 %."""
    low, rate, high = 0, start, None
    while high is None:
        result = run(path, transport, rate, calls)
        ok = passes(result, rate, calls)
        trace.append((path, transport, rate, calls / result["elapsed"], ok))
        print(f"  {path}/{transport} {rate}/s: {'pass' if ok else 'fail'} "
              f"({result['successful']} ok, {result['failed']} failed, {result['retransmissions']} retransmitted, "
              f"{calls / result['elapsed']:.0f}/s achieved)", flush=True)
        if ok:
            low = rate
            if rate >= ceiling:
                return low
            rate = min(rate * 2, ceiling)
        else:
            high = rate
    while high - low > max(low // 20, 50):
        rate = (low + high) // 2
        result = run(path, transport, rate, calls)
        ok = passes(result, rate, calls)
        trace.append((path, transport, rate, calls / result["elapsed"], ok))
        print(f"  {path}/{transport} {rate}/s: {'pass' if ok else 'fail'} "
              f"({calls / result['elapsed']:.0f}/s achieved)", flush=True)
        if ok:
            low = rate
        else:
            high = rate
    return low


def summary(values):
    values = [value for value in values if value is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def shown(summary_value, unit="", digits=0):
    if summary_value is None:
        return "—"
    median, low, high = summary_value
    text = f"{median:,.{digits}f}{unit}"
    if len({round(low, digits), round(high, digits)}) > 1:
        text += f" ({low:,.{digits}f}–{high:,.{digits}f})"
    return text


def plot(trace, path):
    """An SVG of achieved against offered rate, one colour per path and transport."""
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
    series = sorted({(p, t) for p, t, *_ in trace})
    top = max([max(offered, achieved) for _, _, offered, achieved, _ in trace] + [1])
    width, height, margin = 720, 480, 60
    scale = lambda value: value / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="black"/>',
             f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>',
             f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{margin}" stroke="#ccc" stroke-dasharray="4"/>',
             f'<text x="{width / 2}" y="{height - 20}" text-anchor="middle">offered calls/s (max {top:,.0f})</text>',
             f'<text x="15" y="{height / 2}" transform="rotate(-90 15 {height / 2})" text-anchor="middle">achieved calls/s</text>']
    for index, key in enumerate(series):
        colour = colours[index % len(colours)]
        for p, t, offered, achieved, ok in trace:
            if (p, t) != key:
                continue
            x = margin + scale(offered) * (width - 2 * margin)
            y = height - margin - scale(achieved) * (height - 2 * margin)
            fill = colour if ok else "white"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{fill}" stroke="{colour}"/>')
        parts.append(f'<rect x="{width - margin - 150}" y="{margin + index * 16}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{width - margin - 135}" y="{margin + index * 16 + 9}">{key[0]}/{key[1]}</text>')
    parts.append(f'<text x="{margin}" y="{margin - 20}">filled: step passed; hollow: failed</text></svg>')
    path.write_text("\n".join(parts) + "\n")


def machine():
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) // 1024
    except OSError:
        pass
    versions = []
    for command in (["sipp", "-v"], ["/usr/sbin/kamailio", "-v"], [str(BINARY), "--version"]):
        try:
            output = subprocess.run(command, capture_output=True, text=True, timeout=10)
            text = (output.stdout + output.stderr).strip().splitlines()
            versions.append(next((line.strip() for line in text if line.strip()), "?"))
        except (OSError, subprocess.TimeoutExpired):
            versions.append("?")
    return (f"{os.cpu_count()} vCPUs ({model}), {memory:,} MiB, Linux {platform.release()}; "
            f"{versions[0]}; {versions[1]}; {versions[2]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20000, help="calls per search step")
    parser.add_argument("--start", type=int, default=500, help="first rate of a search")
    parser.add_argument("--ceiling", type=int, default=16000, help="highest rate tried")
    parser.add_argument("--cpu-rate", type=int, default=2000)
    parser.add_argument("--cpu-calls", type=int, default=20000)
    parser.add_argument("--latency-rate", type=int, default=500)
    parser.add_argument("--latency-calls", type=int, default=5000)
    parser.add_argument("--dialogs", type=int, default=10000)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--transports", default="udp,tcp")
    parser.add_argument("--skip", default="", help="comma list of: rate, cpu, latency, rss")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help="where the results go (a trial run can write elsewhere)")
    args = parser.parse_args()
    paths = args.paths.split(",")
    transports = args.transports.split(",")
    skip = set(filter(None, args.skip.split(",")))
    trace, rates, cpu, latency, busy_latency = [], {}, {}, {}, {}
    for repetition in range(args.repetitions):
        print(f"repetition {repetition + 1}", flush=True)
        for transport in transports:
            for path in paths:
                key = (path, transport)
                if "rate" not in skip:
                    rates.setdefault(key, []).append(search(path, transport, args.calls, args.start, args.ceiling, trace))
                if "cpu" not in skip and path != "direct":
                    result = run(path, transport, args.cpu_rate, args.cpu_calls)
                    per_call = result["ticks"] / os.sysconf("SC_CLK_TCK") / max(result["successful"], 1) * 1e6
                    cpu.setdefault(key, []).append(per_call if result["failed"] == 0 else None)
                    print(f"  {path}/{transport} CPU per call at {args.cpu_rate}/s: {per_call:.0f} us "
                          f"({result['failed']} failed)", flush=True)
                if "latency" not in skip and path != "direct":
                    for table, busy in ((latency, False), (busy_latency, True)):
                        result = run(path, transport, args.latency_rate, args.latency_calls,
                                     measure="latency", busy=busy)
                        table.setdefault(key, []).append((result.get("p50_us"), result.get("p99_us")))
                        print(f"  {path}/{transport} INVITE through the proxy at {args.latency_rate}/s"
                              f"{' busy' if busy else ''}: p50 {result.get('p50_us')} us, p99 {result.get('p99_us')} us "
                              f"({result.get('invites')} INVITEs)", flush=True)
    rss = {}
    if "rss" not in skip:
        for path in ("sidecar-none", "kamailio"):
            if path not in paths:
                continue
            # Long calls at 500/s until the dialogs are all up, then the proxy's memory.
            def measure(proxy, uac, dialogs=args.dialogs):
                time.sleep(dialogs / 500 + 5)
                return sum(rss_kib(pid) for pid in proxy.pids())
            result = run(path, "udp", 500, args.dialogs, hold_ms=(args.dialogs / 500 + 15) * 1000, measure=measure)
            rss[path] = result.get("measured")
            print(f"  {path} RSS with {args.dialogs} dialogs: {rss[path] / 1024:.1f} MiB", flush=True)

    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(trace, out / f"{stamp}.svg")
    lines = [f"# Benchmark {stamp}", "", f"Machine: {machine()}", "",
             f"Command: scripts/bench.sh {' '.join(sys.argv[1:])}", "",
             f"{args.repetitions} repetition(s); medians, ranges in parentheses. Steps of {args.calls} calls;"
             f" CPU per call at {args.cpu_rate} calls/s; an INVITE's time in the proxy (tcpdump) at {args.latency_rate} calls/s,"
             " idle and with every vCPU kept busy by a niced spinner.", "",
             "| path | transport | highest rate, calls/s | proxy CPU per call | INVITE in the proxy p50 / p99, idle | … busy |",
             "|---|---|---|---|---|---|"]
    for transport in transports:
        for path in paths:
            key = (path, transport)
            idle = latency.get(key, [])
            busy = busy_latency.get(key, [])
            pair = lambda values: (f"{shown(summary([v[0] for v in values]), ' µs')} / "
                                   f"{shown(summary([v[1] for v in values]), ' µs')}") if values else "—"
            lines.append(f"| {path} | {transport} | {shown(summary(rates.get(key, [])))} | "
                         f"{shown(summary(cpu.get(key, [])), ' µs')} | {pair(idle)} | {pair(busy)} |")
    lines.append("")
    for transport in transports:
        def median_of(path):
            value = summary(rates.get((path, transport), []))
            return value[0] if value else None
        kamailio, direct = median_of("kamailio"), median_of("direct")
        for path in ("sidecar-none", "sidecar-bearer"):
            mine = median_of(path)
            if mine and kamailio:
                lines.append(f"- {transport}: {path} / kamailio rate = {mine / kamailio:.2f}"
                             + (f", / direct = {mine / direct:.2f}" if direct else ""))
            cpu_mine, cpu_kam = summary(cpu.get((path, transport), [])), summary(cpu.get(("kamailio", transport), []))
            if cpu_mine and cpu_kam:
                lines.append(f"- {transport}: {path} / kamailio CPU per call = {cpu_mine[0] / cpu_kam[0]:.2f}")
    for path, value in rss.items():
        if value:
            lines.append(f"- RSS with {args.dialogs} dialogs: {path} {value / 1024:.1f} MiB")
    lines += ["", f"Plot: [{stamp}.svg]({stamp}.svg) (achieved against offered rate, every step)."]
    (out / f"{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out / stamp}.md and .svg")


if __name__ == "__main__":
    main()
