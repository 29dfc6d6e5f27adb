#!/usr/bin/env python3
"""Hostile clients for loadtest/soak.sh: silent sockets, slow readers and connection floods
against a Gatehouse on 127.0.0.1, until --seconds have passed. Prints one JSON line of
counts at the end (what the gateway did to them), never sends traffic off loopback.

  soak_hostile.py --https PORT --http PORT --ca ROOT.pem --seconds 1800 \
      [--silent 100] [--slow 20] [--flood-per-second 50] [--slow-path /static/big.bin]
"""
import argparse
import asyncio
import json
import ssl
import time

counts = {
    "silent_opened": 0,
    "silent_closed_by_gateway": 0,
    "slow_opened": 0,
    "slow_cut_by_gateway": 0,
    "flood_connections": 0,
    "flood_errors": 0,
}


def tls_context(ca):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def wait_closed(reader):
    """Reads until the gateway closes the connection; True if it did."""
    try:
        while await reader.read(65536):
            pass
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    return True


async def silent(args, ctx, deadline, plain):
    """Opens a connection, says nothing, and reopens once the gateway closes it."""
    while time.monotonic() < deadline:
        try:
            if plain:
                reader, writer = await asyncio.open_connection("127.0.0.1", args.http)
            else:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", args.https, ssl=ctx, server_hostname="localhost"
                )
        except OSError:
            await asyncio.sleep(0.5)
            continue
        counts["silent_opened"] += 1
        left = deadline - time.monotonic()
        try:
            await asyncio.wait_for(wait_closed(reader), timeout=max(left, 0.1))
            counts["silent_closed_by_gateway"] += 1
        except asyncio.TimeoutError:
            pass
        writer.close()


async def slow(args, ctx, deadline):
    """Asks for a large file and reads 1 KiB a second for up to a minute, then starts
    over. The gateway's cut shows in its metrics (send_timeout closes): the client still
    has megabytes of socket buffer to read before it would see the end."""
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", args.https, ssl=ctx, server_hostname="localhost"
            )
            writer.write(
                f"GET {args.slow_path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
            )
            await writer.drain()
        except OSError:
            await asyncio.sleep(0.5)
            continue
        counts["slow_opened"] += 1
        cut = False
        give_up = min(deadline, time.monotonic() + 60)
        while time.monotonic() < give_up:
            try:
                data = await asyncio.wait_for(reader.read(1024), timeout=5)
            except asyncio.TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError, OSError):
                data = b""
            if not data:
                cut = True
                break
            await asyncio.sleep(1)
        if cut:
            counts["slow_cut_by_gateway"] += 1
        writer.close()


async def flood(args, ctx, deadline):
    """Opens and drops connections at a fixed rate on both ports (TLS handshakes too)."""
    interval = 1.0 / max(args.flood_per_second, 1)
    turn = 0
    while time.monotonic() < deadline:
        turn += 1
        try:
            if turn % 2:
                _, writer = await asyncio.open_connection("127.0.0.1", args.http)
            else:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        "127.0.0.1", args.https, ssl=ctx, server_hostname="localhost"
                    ),
                    timeout=5,
                )
            counts["flood_connections"] += 1
            writer.close()
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            counts["flood_errors"] += 1
        await asyncio.sleep(interval)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--https", type=int, required=True)
    parser.add_argument("--http", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--silent", type=int, default=100)
    parser.add_argument("--slow", type=int, default=20)
    parser.add_argument("--flood-per-second", type=int, default=50)
    parser.add_argument("--slow-path", default="/static/big.bin")
    args = parser.parse_args()
    ctx = tls_context(args.ca)
    deadline = time.monotonic() + args.seconds
    tasks = [silent(args, ctx, deadline, plain=i % 2 == 0) for i in range(args.silent)]
    tasks += [slow(args, ctx, deadline) for _ in range(args.slow)]
    tasks.append(flood(args, ctx, deadline))
    await asyncio.gather(*tasks)
    print(json.dumps(counts))


if __name__ == "__main__":
    asyncio.run(main())
