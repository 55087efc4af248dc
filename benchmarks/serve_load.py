"""A bounded load generator for an OpenAI-compatible ``/v1/completions`` server (used by benchmarks/serve.py).

Sends each request (token-id prompt, ``max_tokens`` forced with ``ignore_eos``) at a fixed concurrency or with
Poisson arrivals, and records what ``vllm bench serve`` reports: time to first token (first chunk with text), the
gaps between chunks (ITL), time per output token after the first (TPOT) and end-to-end latency. A request can also
be cancelled after some chunks or be malformed on purpose (the soak run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    stream: bool = True
    cancel_after: int | None = None  # close the stream after this many chunks
    malformed: dict | bytes | None = None  # sent instead of the well-formed body


@dataclass
class Result:
    ok: bool = False
    status: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cancelled: bool = False
    malformed: bool = False
    error: str = ""


async def send(client: httpx.AsyncClient, request: Request, model: str) -> Result:
    result = Result(malformed=request.malformed is not None)
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": request.stream,
    }
    start = time.perf_counter()
    try:
        if request.malformed is not None:
            kwargs = (
                {"content": request.malformed} if isinstance(request.malformed, bytes) else {"json": request.malformed}
            )
            response = await client.post("/v1/completions", **kwargs)
            result.status = response.status_code
            result.ok = 400 <= response.status_code < 500 and "error" in response.json()
            return result
        if not request.stream:
            response = await client.post("/v1/completions", json=body)
            result.status = response.status_code
            if response.status_code != 200:
                result.error = response.text[:300]
                return result
            data = response.json()
            result.e2e = result.ttft = time.perf_counter() - start
            result.output_tokens = data["usage"]["completion_tokens"]
            result.ok = response.status_code == 200 and result.output_tokens == request.max_tokens
            return result
        async with client.stream("POST", "/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode()[:300]
                return result
            last = None
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result.ok = result.output_tokens == request.max_tokens
                    break
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                chunks += 1
                if request.cancel_after is not None and chunks >= request.cancel_after:
                    result.cancelled = result.ok = True
                    break
        result.e2e = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_load(
    base: str,
    requests: list[Request],
    model: str,
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    timeout: float = 600,
) -> tuple[list[Result], float]:
    """All requests, at most ``concurrency`` in flight, or arriving as a Poisson process of ``rate`` per second;
    -> (results in request order, wall seconds)."""
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256), max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency) if concurrency else None
        rng = random.Random(seed)

        async def one(request: Request) -> Result:
            if gate is None:
                return await send(client, request, model)
            async with gate:
                return await send(client, request, model)

        start = time.perf_counter()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(one(request)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        return list(results), time.perf_counter() - start


def percentiles(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p = np.percentile(np.asarray(values) * scale, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def summarize(results: list[Result], seconds: float) -> dict:
    """``vllm bench serve``'s figures (latencies in ms)."""
    done = [r for r in results if r.ok and not r.cancelled and not r.malformed]
    tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1 and r.itl]
    return {
        "completed": len(done),
        "failed": sum(1 for r in results if not r.ok),
        "seconds": seconds,
        "request_throughput": len(done) / seconds,
        "output_throughput": tokens / seconds,
        "total_token_throughput": (tokens + sum(r.prompt_tokens for r in done)) / seconds,
        "ttft_ms": percentiles([r.ttft for r in done if r.itl or r.ttft]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([gap for r in done for gap in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in done]),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "load_avg": os.getloadavg()[0],  # 1-minute load average at the end (2 cores: above ~2 = shared)
    }
