#!/usr/bin/env python3
"""A CPU profile of one proxy path under load: `perf record -g` on the proxy for a few
seconds while sipp runs calls through it at a fixed rate (the bench's set-up, see
scripts/bench.py), then the top entries of `perf report`.

    python3 scripts/profile.py                          # sidecar-bearer, udp, 2000 calls/s, 6 s
    python3 scripts/profile.py --path kamailio --transport tcp --seconds 10

Build the release binary first (scripts/bench.sh does; `cargo build --release` here).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="sidecar-bearer")
    parser.add_argument("--transport", default="udp")
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="profile-")) / "perf.data"

    def record(proxy, uac):
        # Past the ramp-up, then a fixed window on every process of the proxy.
        time.sleep(2)
        pids = ",".join(str(pid) for pid in proxy.pids())
        subprocess.run(["perf", "record", "-g", "-o", str(data), "-p", pids, "--", "sleep",
                        str(args.seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    calls = args.rate * (args.seconds + 6)
    result = bench.run(args.path, args.transport, args.rate, calls, measure=record)
    print(f"{args.path}/{args.transport} at {args.rate}/s: {result['successful']} calls, "
          f"{result['failed']} failed")
    for sort in ("dso", "symbol"):
        report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio",
                                 "--sort", sort, "--percent-limit", "0.8"],
                                capture_output=True, text=True)
        lines = [line for line in report.stdout.splitlines()
                 if line.strip() and not line.startswith("#") and "%" in line
                 and not line.lstrip().startswith(("|", "-", "--"))]
        print(f"\nby {sort}:")
        # perf pads the symbol column and adds empty columns: trim them.
        print("\n".join(line.rstrip(" -") for line in lines[: args.top]))


if __name__ == "__main__":
    main()
