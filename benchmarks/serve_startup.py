"""Seconds from `gpt2 serve` starting to `/health` answering 200, cold and warm, beside the
figures before the background warm-up (issue 22: `--warm-up all` was the only way).

    uv run python benchmarks/serve_startup.py
    uv run python benchmarks/serve_startup.py --model /path/to/gpt2-124m --warm-up all

Cold: a fresh compile-cache folder (XDG_CACHE_HOME in a temporary folder); warm: the same
folder again. Each run also times one short greedy request sent as soon as /health is 200, and
reads the programs compiled and still waiting (/metrics) and the peak resident memory then.
"CPU" is the server's CPU time until /health is 200 (user + system): on a machine shared
with other work the wall time grows, the CPU time much less.
Targets on 2 CPU cores: GPT-2 124M 200 within 30 s cold and 5 s warm, the demo within 3 s warm.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEFORE = {"shakespeare": (72.0, 11.0), "gpt2-124m": (109.0, 35.0)}  # cold, warm seconds
DEFAULT_MODELS = [
    "shakespeare",
    "../bench/gpt2-124m-random",
]  # as the other benchmarks: an HF folder beside the checkout


def get(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        data = json.dumps(body).encode() if body else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def metric(port: int, name: str) -> float:
    _, text = get(port, "GET", "/metrics")
    line = next(x for x in text.decode().splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def peak_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far: what a loaded machine does not inflate."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_start(model: str, cache: str, extra: list[str]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpt2 = shutil.which("gpt2", path=str(Path(sys.executable).parent)) or "gpt2"
    env = {**os.environ, "XDG_CACHE_HOME": cache, "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(
        [gpt2, "serve", "-m", model, "--port", str(port), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"error: gpt2 serve -m {model} exited with {proc.returncode}")
            try:
                if get(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        ready, cpu = time.monotonic() - start, cpu_seconds(proc.pid)
        asked = time.monotonic()
        body = {"prompt": "Hello there", "max_tokens": 8, "temperature": 0}
        status, _ = get(port, "POST", "/v1/completions", body)
        answered = time.monotonic() - asked
        return {
            "ready": ready,
            "cpu": cpu,
            "first": answered if status == 200 else float("nan"),
            "compiled": metric(port, "gpt2_programs_compiled"),
            "waiting": metric(port, "gpt2_programs_waiting"),
            "rss": peak_rss_gb(proc.pid),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="model references (default: both)")
    parser.add_argument("--warm-up", default=None, help="passed to gpt2 serve")
    args = parser.parse_args()
    extra = ["--warm-up", args.warm_up] if args.warm_up else []
    print(
        f"{'model':<14} {'start':<5} {'health 200':>10} {'CPU':>6} {'before':>7} {'1st request':>11} "
        f"{'compiled':>8} {'waiting':>7} {'peak RSS':>8}"
    )
    for model in args.model or DEFAULT_MODELS:
        name = "gpt2-124m" if "124m" in model else Path(model).name
        with tempfile.TemporaryDirectory() as cache:
            for i, kind in enumerate(("cold", "warm")):
                r = one_start(model, cache, extra)
                before = BEFORE.get(name, (float("nan"),) * 2)[i]
                print(
                    f"{name:<14} {kind:<5} {r['ready']:>9.1f}s {r['cpu']:>5.1f}s {before:>6.0f}s "
                    f"{r['first']:>10.2f}s {r['compiled']:>8.0f} {r['waiting']:>7.0f} "
                    f"{r['rss']:>6.2f}GB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
