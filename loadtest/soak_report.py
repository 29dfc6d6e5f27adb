#!/usr/bin/env python3
"""Turns a loadtest/soak.sh run into results/NAME.md (+ NAME.png): the sampled curves,
what the legitimate and hostile clients saw, and a verdict (growth trend, failures)."""
import argparse
import csv
import json
import re
from pathlib import Path


def slope_per_minute(ts, values):
    """Least-squares slope of values over time, per minute."""
    n = len(ts)
    if n < 3:
        return 0.0
    mean_t, mean_v = sum(ts) / n, sum(values) / n
    var = sum((t - mean_t) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in zip(ts, values)) / var


def number(pattern, text, default=0):
    found = re.search(pattern, text)
    return int(found.group(1)) if found else default


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--work", "--out", "--name", "--rev", "--log"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--seconds", type=int, required=True)
    parser.add_argument("--rotations", type=int, required=True)
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)

    # Samples from the last 15 s are left out: the load generators stop at the end.
    rows = [r for r in csv.DictReader(open(work / "samples.csv")) if int(r["t"]) <= args.seconds - 15]
    ts = [int(r["t"]) for r in rows]
    series = {k: [float(r[k] or 0) for r in rows] for k in ("rss_kib", "fds", "threads", "connections_open", "websockets_open")}
    # Load comes in cycles (one-minute WebSocket rounds and slow downloads), so a fitted
    # slope depends on where the run stops. Growth is judged on peaks instead: the highest
    # sample of the last third against the highest of the middle third (the first third
    # fills caches, pools and buffers).
    third = len(ts) // 3
    rss_growth = max(series["rss_kib"][2 * third:]) - max(series["rss_kib"][third:2 * third])
    fds_growth = max(series["fds"][2 * third:]) - max(series["fds"][third:2 * third])
    half = len(ts) // 2
    rss_slope = slope_per_minute(ts[half:], series["rss_kib"][half:])
    fds_slope = slope_per_minute(ts[half:], series["fds"][half:])

    wrk = (work / "wrk.txt").read_text(errors="replace")
    wrk_requests = number(r"(\d+) requests in", wrk)
    wrk_non2xx = number(r"Non-2xx or 3xx responses: (\d+)", wrk)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", wrk)
    wrk_socket = sum(int(x) for x in socket.groups()) if socket else 0
    h2 = (work / "h2load.txt").read_text(errors="replace")
    h2_done = number(r"requests: \d+ total, \d+ started, (\d+) done", h2)
    h2_ok = number(r"(\d+) succeeded", h2)
    h2_failed = number(r"(\d+) failed", h2) + number(r"(\d+) errored", h2) + number(r"(\d+) timeout", h2)
    ws_rounds = [json.loads(l) for l in (work / "ws.jsonl").read_text().splitlines() if l.startswith("{")] if (work / "ws.jsonl").exists() else []
    ws_messages = sum(r.get("messages", r.get("count", 0)) for r in ws_rounds)
    ws_errors = len((work / "ws.err").read_text().splitlines()) if (work / "ws.err").exists() else 0
    hostile = {}
    if (work / "hostile.json").exists() and (work / "hostile.json").read_text().strip():
        hostile = json.loads((work / "hostile.json").read_text().strip().splitlines()[-1])
    metrics = (work / "metrics.txt").read_text() if (work / "metrics.txt").exists() else ""
    stalls = dict(re.findall(r'gatehouse_connections_closed_stalled_total\{reason="(\w+)"\} (\d+)', metrics))
    reloads = dict(re.findall(r'gatehouse_certificate_reloads_total\{outcome="(\w+)"\} (\d+)', metrics))
    upstream_errors = dict(re.findall(r'gatehouse_upstream_errors_total\{kind="(\w+)"\} (\d+)', metrics))
    log_lines = Path(args.log).read_text(errors="replace").splitlines()
    warn_lines = [l for l in log_lines if " WARN " in l or " ERROR " in l]

    legit_failed = wrk_non2xx + wrk_socket + h2_failed
    grows = rss_growth > 1024 or fds_growth > 20  # KiB, descriptors
    verdict = "PASS" if not grows and legit_failed == 0 else "FAIL"

    png = out / f"{args.name}.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
        minutes = [t / 60 for t in ts]
        axes[0].plot(minutes, [v / 1024 for v in series["rss_kib"]])
        axes[0].set_ylabel("RSS (MiB)")
        axes[1].plot(minutes, series["fds"], label="open fds")
        axes[1].plot(minutes, series["threads"], label="threads")
        axes[1].legend()
        axes[2].plot(minutes, series["connections_open"], label="connections open")
        axes[2].plot(minutes, series["websockets_open"], label="websockets open")
        axes[2].legend()
        axes[2].set_xlabel("minutes")
        for r, m in zip(rows, minutes):
            for ax in axes:
                if "redis" in r["event"]:
                    ax.axvline(m, color="red", alpha=0.2)
                if "upstream" in r["event"]:
                    ax.axvline(m, color="orange", alpha=0.3)
        fig.suptitle(f"Gatehouse soak {args.rev}: red = Redis restart, orange = upstream restart")
        fig.tight_layout()
        fig.savefig(png)
    except ImportError:
        png = None

    md = out / f"{args.name}.md"
    md.write_text(
        f"""# Soak test, {args.name} (Gatehouse {args.rev}, {args.seconds} s)

Command: `SOAK_SECONDS={args.seconds} loadtest/soak.sh`. Two origin instances, Redis-backed
rate limiting (limit too high to reject), watchdog limits 10 s / 30 s / 10 s, everything on
one 2-core machine.

**Verdict: {verdict}** — peak RSS {rss_growth:+.0f} KiB and peak fds {fds_growth:+.0f} from the
middle to the last third (fitted over the second half: {rss_slope:+.1f} KiB/min, {fds_slope:+.2f}
fds/min); {legit_failed} failed legitimate HTTP requests.

| Legitimate traffic | Result |
|---|---|
| HTTP/1.1 (wrk, 16 connections) | {wrk_requests} requests, {wrk_non2xx} non-2xx, {wrk_socket} socket errors |
| HTTP/2 (h2load, 4 × 8 streams) | {h2_done} done, {h2_ok} succeeded, {h2_failed} failed/errored/timed out |
| WebSocket echo (16 sockets, 1-min rounds) | {len(ws_rounds)} rounds, {ws_errors} error lines (tunnels cut by an upstream restart are expected) |

| Hostile clients | Result |
|---|---|
| silent sockets opened / closed by the gateway | {hostile.get('silent_opened', '?')} / {hostile.get('silent_closed_by_gateway', '?')} |
| slow-reader downloads started / seen cut by the client | {hostile.get('slow_opened', '?')} / {hostile.get('slow_cut_by_gateway', '?')} (the gateway's own count is `send_timeout` below) |
| flood connections / errors | {hostile.get('flood_connections', '?')} / {hostile.get('flood_errors', '?')} |
| watchdog closes by reason | {stalls} |

| Events | Count |
|---|---|
| certificate rotations written / reloads ok / refused | {args.rotations} / {reloads.get('success', '?')} / {reloads.get('failure', '?')} |
| upstream errors by kind | {upstream_errors} |
| WARN/ERROR log lines | {len(warn_lines)} |

| Sample | first | last | max |
|---|---|---|---|
"""
        + "".join(
            f"| {k} | {series[k][0]:.0f} | {series[k][-1]:.0f} | {max(series[k]):.0f} |\n"
            for k in series
        )
        + (f"\n![curves]({png.name})\n" if png else "\n(no PNG: matplotlib missing)\n")
        + "\nFirst WARN/ERROR lines:\n\n```text\n"
        + "\n".join(warn_lines[:15])
        + "\n```\n"
    )
    print(md)


if __name__ == "__main__":
    main()
