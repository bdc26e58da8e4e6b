"""Load test for `gpt2 serve`: N concurrent streaming clients against one server.

    uv run python benchmarks/serve_load.py ../bench/gpt2-124m-random.npz
    uv run python benchmarks/serve_load.py MODEL --clients 1 8 --requests 3
    uv run python benchmarks/serve_load.py MODEL --overload   # 64 clients, --max-batch 8 --max-queue 16
    uv run python benchmarks/serve_load.py MODEL --chat-turns 10   # one client chatting

Prints, per number of clients: aggregate generated tokens/s, the decode tokens/s one stream
sees, time to first token p50 / p99 and errors; next to `gpt2 bench --batch 1` and
`--batch MAX_BATCH` (decode tokens/s) on the same model: the engine's own batching gain.

`--overload` has 64 clients send requests to a server with --max-batch 8 --max-queue 16
until 500 have completed (a 503 waits its Retry-After): each must complete or get a 503 at
once (none may hang), and the server's resident memory is sampled every 50.

`--chat-turns N` has one client chat N turns through /v1/chat/completions, sending the whole
history each turn (as the page at / and OpenAI clients do), once with the prefix cache and
once with `--prefix-cache-mb 0`: time to first token and cached prompt tokens per turn.

Prompts are random token ids (the same per run), greedy, <|endoftext|> banned so every
request generates exactly --max-tokens tokens.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

EOS = 50256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        ["gpt2", "serve", "-m", model, "--port", str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 900
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not become ready")


def stream_one(port: int, prompt: list[int], max_tokens: int, timeout: float = 300) -> dict:
    """One streaming completion; returns status, tokens, time to first token, decode rate."""
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logit_bias": {str(EOS): -100},
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return {"status": response.status, "seconds": time.perf_counter() - start}
        first = last = None
        tokens = 0
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                first = first or now
                last = now
        decode = (tokens - 1) / (last - first) if last and last > first else None
        return {
            "status": 200,
            "tokens": tokens,
            "first_token_s": (first or time.perf_counter()) - start,
            "decode_tps": decode,
            "seconds": time.perf_counter() - start,
        }
    except (OSError, http.client.HTTPException) as exc:
        return {"status": f"error: {type(exc).__name__}", "seconds": time.perf_counter() - start}
    finally:
        conn.close()


def chat_turn(port: int, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat turn: its reply, time to first token, prompt and cached tokens."""
    body = json.dumps(
        {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logit_bias": {str(EOS): -100, "198": -100},  # no end of text, no "\nUser:" stop
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            sys.exit(f"chat turn failed: {response.status} {response.read()[:300]!r}")
        first, reply, usage = None, [], {}
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                reply.append(event["choices"][0]["delta"]["content"])
        return {
            "reply": "".join(reply),
            "first_token_s": (first or time.perf_counter()) - start,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens"),
        }
    finally:
        conn.close()


def chat_client(model: str, turns: int, max_tokens: int, *flags: str) -> list[dict]:
    """A server with `flags`, and one client chatting `turns` turns with it."""
    proc, port = start_server(model, *flags)
    words = ["tell", "me", "more", "of", "the", "ships", "in", "the", "harbour", "at", "dawn"]
    try:
        chat_turn(port, [{"role": "user", "content": "warm up"}], 4)  # outside the timings
        messages, out = [], []
        for turn in range(turns):
            text = " ".join(words[(turn + i) % len(words)] for i in range(24))
            messages.append({"role": "user", "content": text})
            result = chat_turn(port, messages, max_tokens)
            messages.append({"role": "assistant", "content": result["reply"]})
            out.append(result)
        return out
    finally:
        proc.terminate()
        proc.wait(120)


def chat_turns(model: str, turns: int, max_tokens: int, max_batch: int) -> None:
    rows = {
        name: chat_client(model, turns, max_tokens, "--max-batch", str(max_batch), *flags)
        for name, flags in (("cache", ()), ("no cache", ("--prefix-cache-mb", "0")))
    }
    print(f"{'turn':>4} {'prompt':>6} | {'TTFT':>8} {'cached':>6} | {'TTFT, no cache':>14}")
    for i, (warm, cold) in enumerate(zip(rows["cache"], rows["no cache"], strict=True)):
        print(f"{i + 1:>4} {warm['prompt_tokens']:>6} | {warm['first_token_s']:>7.3f}s "
              f"{warm['cached_tokens']:>6} | {cold['first_token_s']:>13.3f}s")  # fmt: skip
    for name, row in rows.items():
        ratio = row[-1]["first_token_s"] / row[0]["first_token_s"]
        print(f"{name}: turn {turns} TTFT / turn 1 TTFT = {ratio:.2f}x")


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def in_threads(client, clients: int) -> float:
    """Run client(0) .. client(clients - 1) on a thread each; -> seconds until all ended."""
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def run_clients(port: int, clients: int, requests: int, prompts: list, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(requests):
            out = stream_one(port, prompts[(i * requests + r) % len(prompts)], max_tokens)
            with lock:
                results.append(out)

    wall = in_threads(client, clients)
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["first_token_s"] for r in ok]
    decode = [r["decode_tps"] for r in ok if r["decode_tps"]]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "aggregate_tps": sum(r["tokens"] for r in ok) / wall,
        "stream_decode_tps": sum(decode) / len(decode) if decode else None,
        "ttft_p50_s": percentile(ttft, 50) if ttft else None,
        "ttft_p99_s": percentile(ttft, 99) if ttft else None,
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def overload(
    model: str, prompts: list, max_tokens: int, total: int = 500, clients: int = 64
) -> dict:
    """`clients` clients send requests until `total` have completed; a 503 waits Retry-After."""
    proc, port = start_server(model, "--max-batch", "8", "--max-queue", "16")
    try:
        done: list[dict] = []
        memory: list[float] = [rss_mib(proc.pid)]
        lock = threading.Lock()
        completed = 0

        def client(i: int) -> None:
            nonlocal completed
            n = i
            while True:
                with lock:
                    if completed >= total:
                        return
                out = stream_one(port, prompts[n % len(prompts)], max_tokens, timeout=600)
                n += clients
                with lock:
                    done.append(out)
                    if out["status"] == 200:
                        completed += 1
                        if completed % 50 == 0:
                            memory.append(rss_mib(proc.pid))
                if out["status"] == 503:
                    time.sleep(1.0)  # what Retry-After asks

        wall = in_threads(client, clients)
        refused = [r["seconds"] for r in done if r["status"] == 503]
        return {
            "requests": len(done),
            "completed": sum(r["status"] == 200 and r["tokens"] == max_tokens for r in done),
            "refused_503": len(refused),
            "other": [r["status"] for r in done if r["status"] not in (200, 503)],
            "slowest_503_s": max(refused) if refused else None,
            "slowest_completion_s": max(r["seconds"] for r in done if r["status"] == 200),
            "wall_s": wall,
            "rss_mib_every_50_completed": [round(m) for m in memory],
        }
    finally:
        proc.terminate()
        proc.wait(120)


def bench_decode(model: str, prompt_tokens: int, max_tokens: int, batch: int = 1) -> float:
    out = subprocess.run(
        ["gpt2", "bench", "-m", model, "--batch", str(batch), "--prompt-tokens", str(prompt_tokens),
         "--new-tokens", str(max_tokens), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)["decode_tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default="../bench/gpt2-124m-random.npz")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--overload", action="store_true", help="the 64-client / 500-request test")
    ap.add_argument("--chat-turns", type=int, help="one client chatting this many turns")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(0)
    prompts = [[rng.randrange(EOS) for _ in range(args.prompt_tokens)] for _ in range(64)]

    if args.chat_turns:
        chat_turns(args.model, args.chat_turns, args.max_tokens, args.max_batch)
        return
    if args.overload:
        print(json.dumps(overload(args.model, prompts, args.max_tokens)))
        return
    proc, port = start_server(args.model, "--max-batch", str(args.max_batch))
    try:
        stream_one(port, prompts[0], 8)  # a first request, outside the timings
        rows = [run_clients(port, n, args.requests, prompts, args.max_tokens) for n in args.clients]
    finally:
        proc.terminate()
        proc.wait(120)
    bench = bench_decode(args.model, args.prompt_tokens, args.max_tokens)
    bench_many = bench_decode(args.model, args.prompt_tokens, args.max_tokens, args.max_batch)
    print(f"gpt2 bench --batch 1 decode: {bench:.1f} tokens/s")
    print(
        f"gpt2 bench --batch {args.max_batch} decode: {bench_many:.1f} tokens/s "
        f"({bench_many / bench:.2f}x batch 1: the most batching can give on this machine)"
    )
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'aggregate tok/s':>15} "
          f"{'per-stream decode tok/s':>23} {'TTFT p50':>9} {'TTFT p99':>9}")  # fmt: skip
    for r in rows:
        decode = f"{r['stream_decode_tps']:.1f}" if r["stream_decode_tps"] else "-"
        p50 = f"{r['ttft_p50_s']:.3f}s" if r["ttft_p50_s"] is not None else "-"
        p99 = f"{r['ttft_p99_s']:.3f}s" if r["ttft_p99_s"] is not None else "-"
        print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} "
              f"{r['aggregate_tps']:>15.1f} {decode:>23} {p50:>9} {p99:>9}")  # fmt: skip
    one = next((r for r in rows if r["clients"] == 1), None)
    if one:
        print(f"one stream / bench batch 1: {one['stream_decode_tps'] / bench:.0%}")
        for r in rows:
            if r["clients"] > 1:
                print(f"{r['clients']} clients / one client, aggregate: "
                      f"{r['aggregate_tps'] / one['aggregate_tps']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
