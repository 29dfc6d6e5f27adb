#!/usr/bin/env python3
"""Turns the raw outputs of loadtest/run.sh into results/YYYY-MM-DD-<mode>[-workersN].md and
a PNG chart of the Gatehouse/nginx (and Gatehouse/bare server) ratios; with --mark-stale,
prepends a STALE banner to results measured before the last change to src/ or Cargo.lock.

    report.py RAW_DIR OUT_DIR
    report.py --mark-stale OUT_DIR REPO
"""

import csv
import json
import os
import re
import statistics
import subprocess
import sys

STALE_MARK = "<!-- stale -->"


# ------------------------------------------------------------------ parsing
def to_us(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text.strip())
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]


def parse_wrk(text):
    out = {"errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rate"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", text)
    out["ops"] = int(m.group(1)) if m else 0
    for pct, key in (("50%", "p50"), ("99%", "p99")):
        m = re.search(r"^\s+" + re.escape(pct) + r"\s+(\S+)", text, re.M)
        out[key] = to_us(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["errors"] += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"] += sum(int(x) for x in m.groups())
    return out


def parse_h2load(text, log_path):
    out = {}
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text)
    out["rate"] = float(m.group(1)) if m else None
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
    out["ops"] = int(m.group(1)) if m else 0
    out["errors"] = sum(int(x) for x in m.groups()[1:]) if m else 0
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        out["errors"] += int(m.group(3)) + int(m.group(4))
    durations = []
    try:
        with open(log_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    durations.append(int(parts[2]))
    except OSError:
        pass
    durations.sort()
    out["p50"] = pct(durations, 0.5)
    out["p99"] = pct(durations, 0.99)
    return out


def parse_client(text):
    try:
        data = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"rate": None, "ops": 0, "errors": None}
    if data.get("mode") == "idle":
        before = sum(p["rss_before_kb"] or 0 for p in data["pids"])
        after = sum(p["rss_after_kb"] or 0 for p in data["pids"])
        opened = data["opened"]
        return {
            "idle_kb": before,
            "after_kb": after,
            "per_conn": (after - before) * 1024 / opened if opened else None,
            "opened": opened,
            "errors": data["failed"],
            "ops": opened,
            "rate": None,
        }
    return {
        "rate": data["per_sec"],
        "ops": data["ok"],
        "errors": data["errors"],
        "p50": data["p50_us"],
        "p99": data["p99_us"],
    }


def pct(values, p):
    if not values:
        return None
    return values[round((len(values) - 1) * p)]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ------------------------------------------------------------------ report
def load(raw):
    meta = {}
    with open(os.path.join(raw, "meta.env")) as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                meta[k] = v
    tck = int(meta.get("CLK_TCK", "100"))
    # With more than one worker the servers share the generators' core, so CPU 0's busy time
    # no longer tells other processes' load apart: not reported then.
    shared_cores = int(meta.get("WORKERS", "1")) > 1
    runs = []
    with open(os.path.join(raw, "index.tsv")) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            with open(row["file"]) as g:
                text = g.read()
            if row["kind"] == "wrk":
                r = parse_wrk(text)
            elif row["kind"] == "h2load":
                log = os.path.join(raw, f"{row['scenario']}.{row['target']}.{row['round']}.log")
                r = parse_h2load(text, log)
            else:
                r = parse_client(text)
            wall = float(row["wall_s"])
            proxy_s = int(row["proxy_ticks"]) / tck
            origin_s = int(row["origin_ticks"]) / tck
            ops = r.get("ops") or 0
            is_origin = row["target"] == "origin"
            r["cpu_us"] = proxy_s * 1e6 / ops if ops else None
            r["origin_cpu_us"] = origin_s * 1e6 / ops if ops else None
            extra_s = int(row.get("extra_ticks") or 0) / tck
            r["extra_cpu_us"] = extra_s * 1e6 / ops if ops and extra_s else None
            own = proxy_s if is_origin else proxy_s + origin_s
            r["foreign_pct"] = max(0.0, (int(row["cpu_busy_ticks"]) / tck - own) / wall * 100) if wall and not shared_cores else None
            r["server_util_pct"] = proxy_s / wall * 100 if wall else None
            try:
                with open(row["file"] + ".cmd") as g:
                    r["cmd"] = g.read().strip()
            except OSError:
                r["cmd"] = ""
            r.update(scenario=row["scenario"], target=row["target"], round=int(row["round"]))
            runs.append(r)
    return meta, runs


def summarize(runs):
    groups = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["target"]), []).append(r)
    summary = {}
    for key, rs in groups.items():
        s = {"n": len(rs), "cmd": rs[0]["cmd"]}
        for field in ("rate", "p50", "p99", "cpu_us", "origin_cpu_us", "foreign_pct", "server_util_pct", "idle_kb", "per_conn", "opened", "extra_cpu_us"):
            s[field] = median([r.get(field) for r in rs])
        rates = [r["rate"] for r in rs if r.get("rate") is not None]
        s["rate_min"] = min(rates) if rates else None
        s["rate_max"] = max(rates) if rates else None
        s["errors"] = sum(r.get("errors") or 0 for r in rs)
        summary[key] = s
    return summary


def fmt(v, digits=0, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float) and digits == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{digits}f}{unit}"


def ms(us):
    return "–" if us is None else f"{us / 1000:.2f} ms"


# Issue 16's targets, Gatehouse / nginx in the same run; rows without a target are shown for
# context. (label, scenario, field, unit kind, target ratio, higher is better)
TARGETS = [
    ("1. HTTP/1.1 keep-alive, 50 conns: req/s", "h1-c50", "rate", "rate", 1.1, True),
    ("1. HTTP/1.1, 50 conns: server CPU per request", "h1-c50", "cpu_us", "us", 0.95, False),
    ("1. HTTP/1.1, 50 conns: p99", "h1-c50", "p99", "lat", 1.0, False),
    ("1. HTTP/1.1 keep-alive, 256 conns: req/s", "h1-c256", "rate", "rate", 1.1, True),
    ("1. HTTP/1.1, 256 conns: server CPU per request", "h1-c256", "cpu_us", "us", 0.95, False),
    ("1. HTTP/1.1, 256 conns: p99", "h1-c256", "p99", "lat", 1.0, False),
    ("2. HTTP/2, 500 streams (10×50): req/s", "h2-c10m50", "rate", "rate", 1.0, True),
    ("2. HTTP/2, 500 streams: server CPU per request", "h2-c10m50", "cpu_us", "us", 1.0, False),
    ("2. HTTP/2, 500 streams: p99", "h2-c10m50", "p99", "lat", 1.0, False),
    ("2. HTTP/2, 32 streams (4×8): req/s", "h2-c4m8", "rate", "rate", 1.0, True),
    ("2. HTTP/2, 32 streams: server CPU per request", "h2-c4m8", "cpu_us", "us", 1.0, False),
    ("2. HTTP/2, 32 streams: p99", "h2-c4m8", "p99", "lat", 1.0, False),
    ("3. full TLS 1.3 handshakes/s (1 request each)", "handshake", "rate", "rate", None, True),
    ("3. server CPU per handshake (target: against the bare server, below)", "handshake", "cpu_us", "us", None, False),
    ("3. handshake + request p99", "handshake", "p99", "lat", None, False),
    ("4. RSS idle (fresh process)", "idle-tls", "idle_kb", "kb", None, False),
    ("4. RSS per idle TLS keep-alive connection (target: against the bare server, below)", "idle-tls", "per_conn", "bytes", None, False),
    ("4. RSS per idle WebSocket", "idle-ws", "per_conn", "bytes", 1.0, False),
    ("5. WebSocket echo p50 (50 sockets)", "ws-echo", "p50", "lat", None, False),
    ("5. WebSocket echo p99 (50 sockets)", "ws-echo", "p99", "lat", None, False),
]

# Issue 16's targets against the bare hyper + rustls server (no upstream hop, the floor):
# Gatehouse / bare, same tuple layout as TARGETS.
BARE_TARGETS = [
    ("3. server CPU per full TLS 1.3 handshake / bare", "handshake", "cpu_us", "us", 1.1, False),
    ("4. RSS per idle TLS keep-alive connection / bare", "idle-tls", "per_conn", "bytes", 1.0, False),
]
# An absolute bound on Gatehouse's RSS per idle TLS connection (issue 16), in bytes.
IDLE_TLS_MAX = 24 * 1024
# Informative: Gatehouse's CPU per request minus the bare server's, what the upstream hop
# (and the proxy's own work on top of hyper + rustls) costs. (label, scenario)
HOP_COST = [
    ("1. HTTP/1.1, 50 conns", "h1-c50"),
    ("2. HTTP/2, 500 streams (10×50)", "h2-c10m50"),
]
# Redis rate limiting keeps at least this share of the throughput with limiting off.
REDIS_TARGET = 0.93


def value_text(v, kind):
    if v is None:
        return "–"
    return {
        "rate": lambda: f"{v:,.0f}/s",
        "us": lambda: f"{v:.1f} µs",
        "lat": lambda: ms(v),
        "kb": lambda: f"{v / 1024:.1f} MiB",
        "bytes": lambda: f"{v / 1024:.1f} KiB",
    }[kind]()


def verdict(ratio, target, higher):
    if ratio is None or target is None:
        return ""
    ok = ratio >= target if higher else ratio <= target
    return "met" if ok else "**missed**"


def write_report(raw, out_dir):
    meta, runs = load(raw)
    s = summarize(runs)
    workers = int(meta.get("WORKERS", "1"))
    proxy_cpus = meta.get("PROXY_CPUS", meta["SERVER_CPU"])
    base = f"{meta['DATE']}-{meta['MODE']}" + (f"-workers{workers}" if workers > 1 else "")
    name = base
    i = 2
    while os.path.exists(os.path.join(out_dir, name + ".md")):
        name = f"{base}-{i}"
        i += 1
    md_path = os.path.join(out_dir, name + ".md")
    png_name = name + ".png"

    def target_text(target, higher):
        return "" if target is None else (f"≥ {target:g}×" if higher else f"≤ {target:g}×")

    def ruled(scen, targets, ratio, target, higher):
        # A server answering errors fast (a 421, a 502) is not a fast server: no verdict.
        failed = sum(s.get((scen, t), {}).get("errors") or 0 for t in targets)
        return f"**invalid: {failed:,} errors**" if failed else verdict(ratio, target, higher)

    rows = []
    chart = []
    for label, scen, field, kind, target, higher in TARGETS:
        g = s.get((scen, "gatehouse"), {}).get(field)
        n = s.get((scen, "nginx"), {}).get(field)
        b = s.get((scen, "bare"), {}).get(field)
        o = s.get((scen, "origin"), {}).get(field)
        ratio = g / n if g is not None and n else None
        ruling = ruled(scen, ("gatehouse", "nginx"), ratio, target, higher)
        rows.append(
            f"| {label} | {value_text(g, kind)} | {value_text(n, kind)} | {fmt(ratio, 2, '×') if ratio else '–'} | {target_text(target, higher)} | {ruling} | {value_text(b, kind) if b is not None else ''} | {value_text(o, kind) if o is not None else ''} |"
        )
        if ratio is not None:
            # The chart's labels stay short: the pointer to the bare table is for the table.
            chart.append((label.split(" (target:")[0], ratio, target, higher))

    bare_rows = []
    if meta.get("BARE") != "yes":
        bare_rows.append("| not measured: the measured revision has no `loadtest-bare` | | | | | |")
    else:
        for label, scen, field, kind, target, higher in BARE_TARGETS:
            g = s.get((scen, "gatehouse"), {}).get(field)
            b = s.get((scen, "bare"), {}).get(field)
            ratio = g / b if g is not None and b else None
            ruling = ruled(scen, ("gatehouse", "bare"), ratio, target, higher)
            bare_rows.append(
                f"| {label} | {value_text(g, kind)} | {value_text(b, kind)} | {fmt(ratio, 2, '×') if ratio else '–'} | {target_text(target, higher)} | {ruling} |"
            )
            if ratio is not None:
                chart.append((label, ratio, target, higher))
        g = s.get(("idle-tls", "gatehouse"), {}).get("per_conn")
        ruling = ruled("idle-tls", ("gatehouse",), g, IDLE_TLS_MAX, False)
        bare_rows.append(
            f"| 4. RSS per idle TLS keep-alive connection, absolute | {value_text(g, 'bytes')} | | | ≤ {value_text(IDLE_TLS_MAX, 'bytes')} | {ruling} |"
        )
        for label, scen in HOP_COST:
            g = s.get((scen, "gatehouse"), {}).get("cpu_us")
            b = s.get((scen, "bare"), {}).get("cpu_us")
            cost = f"{g - b:+.1f} µs ({g / b:.2f}×)" if g is not None and b else "–"
            failed = sum(s.get((scen, t), {}).get("errors") or 0 for t in ("gatehouse", "bare"))
            bare_rows.append(
                f"| {label}: server CPU per request, Gatehouse − bare (the hop's cost) | {value_text(g, 'us')} | {value_text(b, 'us')} | {cost} | | {f'**invalid: {failed:,} errors**' if failed else ''} |"
            )

    off = s.get(("ratelimit", "gatehouse"), {})
    rl_rows = []
    for t, label in (("gatehouse-local", "local (governor)"), ("gatehouse-redis", "Redis")):
        r = s.get(("ratelimit", t))
        if not r:
            why = meta.get("RL_REDIS_REFUSED") if t.endswith("redis") else ""
            rl_rows.append(f"| 6. rate limiting {label} vs off: req/s | not measured{': ' + why if why else ' (config refused or Redis unavailable)'} | | | | | | |")
            continue
        ratio = r["rate"] / off["rate"] if r.get("rate") and off.get("rate") else None
        target = REDIS_TARGET if t.endswith("redis") else None
        tgt = target_text(target, True)
        ver = verdict(ratio, target, True)
        failed = (r.get("errors") or 0) + (off.get("errors") or 0)
        if failed:
            ver = f"**invalid: {failed:,} errors**"
        rl_rows.append(
            f"| 6. rate limiting {label} vs off: req/s (50 conns) | {value_text(r['rate'], 'rate')} | off: {value_text(off.get('rate'), 'rate')} | {fmt(ratio, 2, '×') if ratio else '–'} | {tgt} | {ver} | | |"
        )
        cpu_ratio = off["cpu_us"] / r["cpu_us"] if r.get("cpu_us") and off.get("cpu_us") else None
        redis_cpu = f"; Redis itself {r['extra_cpu_us']:.1f} µs" if t.endswith("redis") and r.get("extra_cpu_us") else ""
        # Reported, no target (issue 16 sets one on req/s only).
        rl_rows.append(
            f"| 6. rate limiting {label}: Gatehouse CPU per request{redis_cpu} | {value_text(r.get('cpu_us'), 'us')} | off: {value_text(off.get('cpu_us'), 'us')} | {fmt(cpu_ratio, 2, '×') if cpu_ratio else '–'} (off/on: share of throughput per core kept) | | | | |"
        )
        if ratio is not None:
            chart.append((f"6. rate limiting {label} / off: req/s", ratio, target, True))

    detail = []
    order = ["h1-c50", "h1-c256", "h2-c10m50", "h2-c4m8", "handshake", "ws-echo", "ratelimit", "idle-tls", "idle-ws"]
    for scen in order:
        for (sc, t), v in sorted(s.items(), key=lambda kv: kv[0][1]):
            if sc != scen:
                continue
            if scen.startswith("idle"):
                detail.append(
                    f"| {scen} | {t} | {v['n']} | {fmt(v['opened'])} opened | idle {value_text(v['idle_kb'], 'kb')} | per conn {value_text(v['per_conn'], 'bytes')} | | | | {v['errors']} | |"
                )
                continue
            spread = ""
            if v["rate_min"] is not None and v["n"] > 1:
                spread = f"{v['rate_min']:,.0f}–{v['rate_max']:,.0f}"
            # The origin's own row and the bare server (no upstream) have no origin CPU.
            detail.append(
                f"| {scen} | {t} | {v['n']} | {fmt(v['rate'])} | {spread} | {ms(v['p50'])} | {ms(v['p99'])} | {fmt(v['cpu_us'], 1)} | {fmt(v['origin_cpu_us'], 1) if t not in ('origin', 'bare') else ''} | {v['errors']} | {fmt(v['foreign_pct'], 0, '%')} |"
            )

    commands = []
    seen = set()
    for (scen, t), v in sorted(s.items()):
        if t in ("gatehouse", "origin", "gatehouse-redis") and scen not in seen or (scen, t) == ("ratelimit", "gatehouse-redis"):
            seen.add(scen)
            commands.append(f"# {scen} ({t})\ntaskset -c {meta['LOAD_CPU']} {v['cmd']}")
    if meta.get("BARE_CMD"):
        commands.append(f"# the bare server (a fresh one on 18448 for idle-tls)\ntaskset -c {proxy_cpus} {meta['BARE_CMD']}")

    foreign = median([r.get("foreign_pct") for r in runs])
    noisy = foreign is not None and foreign > 5
    has_bare = meta.get("BARE") == "yes"
    if workers == 1:
        layout = (
            f"- proxies{', bare server' if has_bare else ''} and origin pinned to CPU {meta['SERVER_CPU']}, load generators to CPU {meta['LOAD_CPU']}; "
            f"one worker each (Gatehouse `worker_threads = 1`, nginx `worker_processes 1`{', the bare server a current-thread runtime' if has_bare else ''})"
        )
        other_load = f"CPU used on the server core by other processes during the measurements (median): {fmt(foreign, 0, '%')}"
    else:
        layout = (
            f"- **workers = {workers}** (`LOADTEST_WORKERS={workers}`): Gatehouse, nginx and the bare server pinned to CPUs {proxy_cpus} "
            f"(`taskset -c {proxy_cpus}`), {workers} workers each (Gatehouse `worker_threads = {workers}`, nginx `worker_processes {workers}`, "
            f"`loadtest-bare --workers {workers}`); origin on CPU {meta['SERVER_CPU']}, load generators on CPU {meta['LOAD_CPU']}. "
            "The servers share the generators' core, so req/s and latency are bounded by it: compare CPU per request"
        )
        other_load = "CPU used by other processes: not measured with the servers on both cores"
    md = [
        f"<!-- gatehouse-rev: {meta['REV']} -->",
        f"# Gatehouse vs nginx: {meta['MODE']} run{f', workers = {workers}' if workers > 1 else ''}, {meta['DATETIME']}",
        "",
        f"Produced by `{f'LOADTEST_WORKERS={workers} ' if workers > 1 else ''}loadtest/run.sh {meta['MODE']}` ({meta['ROUNDS']} rounds × {meta['DUR']} s per measurement, Gatehouse and nginx interleaved A B / B A, the bare hyper + rustls server after each pair, medians; {meta['ELAPSED']} s wall time after the build).",
        "",
        "## Machine and versions",
        f"- CPU: {meta['CPU_MODEL']}, {meta['CORES']} cores; kernel {meta['KERNEL']}; {meta['OS']}",
        layout,
        f"- load average before: {meta['LOAD_BEFORE']}; after: {meta['LOAD_AFTER']}; {other_load}"
        + (" — **noisy: the machine was shared, rerun when idle**" if noisy else ""),
        f"- Gatehouse {meta['REV']}; nginx {meta['NGINX_VERSION']} ({meta['OPENSSL_VERSION']}); {meta['RUSTC']}; wrk {meta['WRK']}; h2load {meta['H2LOAD']}",
        f"- rate limiting: Redis {meta.get('REDIS_VERSION', '?')} on 127.0.0.1:{meta.get('REDIS_PORT', '?')}, started by the script and pinned to the load-generator core (in production Redis is on another host)",
        f"- open-file limit {meta['NOFILE']}: idle scenario holds {meta['IDLE_TLS']} TLS connections and {meta['IDLE_WS']} WebSockets (a proxy needs two descriptors per WebSocket)",
        *(
            ["- bare server: `loadtest-bare`, hyper + rustls with Gatehouse's TLS settings (same chain and key, TLS 1.3, ALPN h2 + http/1.1, session cache and ticketer), hyper settings and allocator (mimalloc), answering the origin's 1 KiB body itself (no upstream hop): the floor for a proxy built from those parts"]
            if has_bare
            else []
        ),
        "",
        "## Targets (issue 16)",
        "",
        "### Gatehouse / nginx",
        "",
        "| measure | Gatehouse | nginx | ratio | target | verdict | bare hyper + rustls (no hop) | origin direct (plain HTTP ceiling) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        *rl_rows,
        "",
        "### Gatehouse / bare hyper + rustls server (no upstream hop)",
        "",
        "| measure | Gatehouse | bare | ratio | target | verdict |",
        "|---|---|---|---|---|---|",
        *bare_rows,
        "",
        "Server CPU is the proxy process's own user+system time (`/proc/PID/stat`) divided by the requests it served; it does not depend on which side of the machine saturates first. Latency is what the load generator saw (wrk/h2load/loadtest-client).",
        "",
        f"![ratios]({png_name})",
        "",
        "## All measurements (medians over rounds)",
        "",
        "| scenario | target | rounds | req/s (or msg/s, handshakes/s) | min–max | p50 | p99 | proxy CPU µs/op | origin CPU µs/op | errors | other load on server core |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *detail,
        "",
        "## Commands",
        "",
        "Each run as below (URL and port per target: Gatehouse 18443, nginx 19443, bare server 18447, origin 18000; rate limiting local 18444, Redis 18445; fresh processes for the idle scenario 18446/19446/18448).",
        "",
        "```sh",
        *commands,
        "```",
        "",
        "<details><summary>Gatehouse and nginx configuration</summary>",
        "",
        "```toml",
        open(os.path.join(raw, "gatehouse.toml")).read().rstrip(),
        "```",
        "",
        "```nginx",
        open(os.path.join(raw, "nginx.conf")).read().rstrip(),
        "```",
        "</details>",
        "",
    ]
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    chart_png(chart, os.path.join(out_dir, png_name), meta)
    print(md_path)


def chart_png(chart, path, meta):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    labels = [c[0] for c in chart][::-1]
    ratios = [c[1] for c in chart][::-1]
    colors = []
    for _, ratio, target, higher in chart[::-1]:
        if target is None:
            colors.append("#999999")
        elif (ratio >= target) if higher else (ratio <= target):
            colors.append("#2a9d4b")
        else:
            colors.append("#d1495b")
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(labels) + 1.6))
    ax.barh(range(len(labels)), ratios, color=colors)
    for i, (_, ratio, target, higher) in enumerate(chart[::-1]):
        ax.text(ratio, i, f" {ratio:.2f}×", va="center", fontsize=8)
        if target is not None:
            ax.plot([target, target], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="#555555", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(
        "Gatehouse / nginx (rows ending “/ bare”: Gatehouse / bare server; “/ off”: limiting on / off)\n"
        "black tick: target; green met, red missed, grey no target"
    )
    workers = int(meta.get("WORKERS", "1"))
    ax.set_title(
        f"Gatehouse {meta['REV'][:10]} vs nginx {meta['NGINX_VERSION']} — {meta['MODE']} run{f', workers {workers},' if workers > 1 else ''} {meta['DATETIME']}",
        fontsize=10,
    )
    ax.set_xlim(0, max(max(ratios) * 1.15, 2.8))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------ stale marking
def mark_stale(out_dir, repo):
    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)

    code_rev = git("log", "-1", "--format=%H", "--", "src", "Cargo.lock").stdout.strip()
    if not code_rev:
        return
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".md"):
            continue
        path = os.path.join(out_dir, name)
        with open(path) as f:
            text = f.read()
        if STALE_MARK in text:
            continue
        m = re.search(r"<!-- gatehouse-rev: ([0-9a-f]+)(-dirty)? -->", text)
        if not m:
            continue
        rev = m.group(1)
        fresh = git("merge-base", "--is-ancestor", code_rev, rev).returncode == 0
        if fresh:
            continue
        banner = (
            f"{STALE_MARK}\n> **STALE**: measured at `{rev[:12]}`; `src/` or `Cargo.lock` changed since "
            f"(last change `{code_rev[:12]}`). Kept for history; rerun `loadtest/run.sh` for current figures.\n\n"
        )
        with open(path, "w") as f:
            f.write(banner + text)
        print(f"marked stale: {name}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--mark-stale":
        mark_stale(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3:
        write_report(sys.argv[1], sys.argv[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
