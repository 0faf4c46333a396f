"""`nlakit serve`'s "explain every token" over real HTTP: one request for all positions vs one
request per position, measured side by side in one run.

    python benchmarks/serve_explain.py [--nla smollm2-135m] [--max-new-tokens 96] [--port 8766]

Starts `nlakit serve` on 127.0.0.1 (the default threads of this process's environment, e.g.
OMP_NUM_THREADS=2), waits for it, then times, with a client on the same machine: (a) one
`POST /api/explain` with `positions: "all"` and `wait: true`; (b) the same positions one
request each. Prints the token count, both wall times and their ratio. Greedy decoding: both
write the same explanations.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import httpx

TEXT = ("The Python language reference says that an assignment statement evaluates the "
        "expression list and assigns the single resulting object to each of the target lists, "
        "from left to right. Each target list is then bound in turn to the")


def wait_for(client: httpx.Client, seconds: float = 180) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            if client.get("/api/openapi.json").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not come up")


def explain(client: httpx.Client, positions, cap: int) -> tuple[float, int]:
    t = time.perf_counter()
    job = client.post("/api/explain", json={"text": TEXT, "positions": positions,
                                            "max_new_tokens": cap, "wait": True}).json()
    if job.get("status") != "done":
        raise SystemExit(f"explain failed: {job}")
    return time.perf_counter() - t, len(job.get("results") or job.get("partial") or [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nla", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--port", type=int, default=8766)
    args = ap.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "nlakit.run.cli", "serve", "--nla", args.nla,
                               "--port", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=1800) as client:
            wait_for(client)
            n = client.post("/api/tokenize", json={"text": TEXT}).json()["n_tokens"]
            all_s, done = explain(client, "all", args.max_new_tokens)
            single_s = sum(explain(client, [i], args.max_new_tokens)[0] for i in range(n))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"text {n} tokens ({done} explained), max_new_tokens {args.max_new_tokens}")
    print(f"one request, all positions   {all_s:8.1f} s")
    print(f"one request per position     {single_s:8.1f} s")
    print(f"ratio                        {single_s / all_s:8.2f}x")


if __name__ == "__main__":
    main()
