"""Shared helpers for ``python -m benchmarks.<name>``: timing, peak memory, progress and the JSON result line.

Every benchmark prints progress to stderr and exactly one JSON object as its last stdout line (``emit``).
CPU only; ``setup()`` pins torch to 2 threads so runs are comparable on the shared machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

NUM_THREADS = 2


def setup(seed: int = 0, threads: int = NUM_THREADS) -> None:
    """Pin torch to ``threads`` CPU threads and seed the RNG (call once at the top of a benchmark)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


setup()


def progress(msg: str) -> None:
    """Print a progress line to stderr (stdout is reserved for the final JSON line)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def time_ms(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2) -> dict[str, Any]:
    """Wall-clock time of ``fn()`` in milliseconds.

    Runs ``warmup`` untimed calls, then ``repeats`` timed calls (``time.perf_counter``).
    Returns ``{"median": ..., "p99": ..., "all": [...]}``; with few repeats p99 is the slowest run.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return _summary(times)


def _summary(times: list[float]) -> dict[str, Any]:
    ordered = sorted(times)
    p99_idx = min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))
    return {"median": statistics.median(times), "p99": ordered[p99_idx], "all": [round(t, 3) for t in times]}


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int = 7, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """``time_ms`` for several functions, run round-robin (A, B, C, A, B, C, ...).

    Interleaving makes baseline and candidate see the same background load on a shared machine.
    ``repeats`` may be an int or a dict name -> int (fewer rounds for a slow baseline).
    """
    reps = repeats if isinstance(repeats, dict) else {name: repeats for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(reps.values())):
        for name, fn in fns.items():
            if r < reps[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000.0)
    return {name: _summary(ts) for name, ts in times.items()}


def _profiler_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live torch CPU allocations during one call, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and str(ev.extra_fields.device) == "cpu":
            allocs.append((ev.start_time_ns, int(ev.extra_fields.alloc_size)))
        stack.extend(ev.children)
    allocs.sort()
    live = peak = 0
    for _, size in allocs:
        live += size
        peak = max(peak, live)
    return peak


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Peak extra tensor memory (MiB) that one call of ``fn()`` holds at any moment.

    Method: run ``fn`` once under ``torch.profiler.profile(profile_memory=True)``, take every CPU
    allocation / free event the allocator reported (signed sizes), order them by time and return the
    maximum of the running sum. Memory allocated before the call (weights, inputs) is not counted; the
    returned output is counted until it is dropped. Only torch tensor memory is seen (not Python objects
    or allocator fragmentation), which is exactly what "materialises an n x n matrix or not" is about.
    The profiler's overhead changes time, not allocation sizes, so do not time under this call.
    """
    return _profiler_peak_bytes(fn) / 2**20


def emit(result: dict[str, Any]) -> None:
    """Print ``result`` as one JSON line on stdout; call it last."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=False), flush=True)
