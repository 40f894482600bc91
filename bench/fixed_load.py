#!/usr/bin/env python3
"""Sends exactly N HTTP/1.1 requests over C keep-alive connections and exits (loopback only).

    fixed_load.py URL N C [--post-bytes B]

A fixed count (wrk stops on time, not on count) lets bench/callgrind.py compare runs.
Fails on any non-2xx answer or broken connection. Bounded by a 600 s timeout.
"""
import asyncio
import sys
import urllib.parse


async def worker(host, port, request, counter):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while counter[0] > 0:
            counter[0] -= 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if not 200 <= status < 300:
                raise RuntimeError(f"status {status}")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
    finally:
        writer.close()


async def main():
    url, total, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    post = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--post-bytes" else None
    u = urllib.parse.urlsplit(url)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    hostport = f"{u.hostname}:{u.port}"
    if post is None:
        request = f"GET {target} HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode()
    else:
        request = (f"POST {target} HTTP/1.1\r\nHost: {hostport}\r\n"
                   f"Content-Type: application/octet-stream\r\nContent-Length: {post}\r\n\r\n"
                   ).encode() + b"x" * post
    counter = [total]
    await asyncio.wait_for(
        asyncio.gather(*(worker(u.hostname, u.port, request, counter) for _ in range(conns))),
        timeout=600)


if __name__ == "__main__":
    asyncio.run(main())
