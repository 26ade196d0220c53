"""What the benchmarks print their figures with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(seconds: list[float]) -> str:
    """Latencies in seconds, as the benchmarks print them."""
    return f"p50 {pct(seconds, 0.5) * 1000:.1f} / p99 {pct(seconds, 0.99) * 1000:.1f} ms"


async def each_way(
    run: Callable[[bool], Awaitable[tuple[float, float]]], names: tuple[str, str], what: str
) -> None:
    """Runs a noisy-neighbour measurement with the defence on, then off (`run` returns the
    quiet account's p99 alone and with its neighbour), and prints the ratio of the two."""
    ratios = {}
    for on in (True, False):
        alone99, busy99 = await run(on)
        ratios[on] = busy99 / alone99
    print(
        f"  {what}:", ", ".join(f"{names[0] if k else names[1]} {v:.1f}" for k, v in ratios.items())
    )
