"""Where slow requests of router_vs_sglang.py's concurrent runs spent their time: the driver's rows
(results.json) joined with the router's timeline (router-trace.jsonl, traced_router.py) by trace id.

    python3 stall_report.py OUT            # OUT: the driver's --out directory

For each concurrent run and target: first-byte percentiles and the slow requests (first byte over
max(4 x median, median + 100 ms)); for each slow request through the router, its phases in ms:
client -> router (``in``), router -> engine request start, connection (new/reused/queued), the
engine's answer head after the body went out, the first events written to the client after the
head; and the event-loop lags (traced_router.py) that overlap it. Standard library only.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def phases(row: dict[str, Any], tr: dict[str, Any]) -> dict[str, str]:
    def gap(a: str, b: str) -> float | None:
        return tr[b] - tr[a] if a in tr and b in tr else None

    conn = "reused" if "conn_reused" in tr else ("new" if "conn_new" in tr else "?")
    if "queued" in tr:
        conn += f"+queued {ms(gap('queued', 'queued_end'))}"
    if "conn_new" in tr:
        conn += f" {ms(gap('conn_new', 'conn_new_end'))}"
    return {
        "to_router": ms(tr["in"] - row["start"]),
        "to_upstream": ms(gap("in", "up_start")),
        "conn": conn,
        "send": ms(gap("up_start", "up_body_sent")),
        "engine_head": ms(gap("up_body_sent", "head")),
        "head_to_first": ms(gap("head", "client_first")),
        "first_byte": ms(row["first_byte"]),
        "total": ms(row["total"]),
    }


def _after_freeze(latency: dict[str, Any], run: str) -> bool:
    """Whether ``run`` came after the driver's freeze_gc call (the keys keep their order)."""
    keys = list(latency)
    frozen = (latency.get("freeze_gc") or {}).get("status") == 200
    return frozen and keys.index(run) > keys.index("freeze_gc")


def read_trace(path: Path) -> tuple[dict[str, dict[str, Any]], list[tuple[float, float]]]:
    """The router's request timelines by trace id, and its event-loop lags (start, seconds)."""
    traces: dict[str, dict[str, Any]] = {}
    lags: list[tuple[float, float]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "lag" in rec:
                lags.append((rec["lag"][0], rec["lag"][1]))
            elif rec.get("id"):
                traces[rec["id"]] = rec
    return traces, lags


def slow_line(r: dict[str, Any], t0: float, traces: dict[str, dict[str, Any]], lags: list[tuple[float, float]]) -> str:
    line = f"    {r['id']:24s} at {r['start'] - t0:7.3f} s"
    if r.get("reconnected"):
        line += " (client reconnected)"
    tr = traces.get(r["id"])
    if tr is None:
        return line + f" first_byte={ms(r['first_byte'])} total={ms(r['total'])}"
    line += " " + " ".join(f"{k}={v}" for k, v in phases(r, tr).items())
    end = r["start"] + (r["first_byte"] or r["total"] or 0)
    over = [(t, lag) for t, lag in lags if t < end and t + lag > r["start"]]
    if over:
        line += " loop lags: " + ", ".join(f"{lag * 1000:.0f} ms at {t - t0:.3f}" for t, lag in over)
    return line


def report_run(data: dict[str, Any], traces: dict[str, dict[str, Any]], lags: list[tuple[float, float]]) -> None:
    rows = [dict(zip(data["row_keys"], r, strict=True)) for r in data["rows"]]
    if not rows:
        print("  no requests")
        return
    t0 = min(r["start"] for r in rows)
    by_target: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_target.setdefault(r["id"].split("/")[1], []).append(r)
    for target, trs in by_target.items():
        fb = [r["first_byte"] for r in trs if r["first_byte"] is not None]
        if not fb:
            continue
        med = statistics.median(fb)
        limit = max(4 * med, med + 0.1)
        # A stream that never sent a byte is the slowest of all.
        slow = sorted((r for r in trs if r["first_byte"] is None or r["first_byte"] > limit), key=lambda r: r["start"])
        print(
            f"  {target:13s} n={len(fb)} first byte p50 {ms(med)} p90 {ms(pct(fb, 90))} p99 {ms(pct(fb, 99))}"
            f" max {ms(max(fb))} ms; slow (> {ms(limit)} ms): {len(slow)}"
        )
        for r in slow:
            print(slow_line(r, t0, traces, lags))


def main(out: Path) -> int:
    results = json.loads((out / "results.json").read_text())
    traces, lags = read_trace(out / "router-trace.jsonl")
    print(f"router trace: {len(traces)} requests, {len(lags)} loop lags over 10 ms", end="")
    print(f" (max {max(lag for _, lag in lags) * 1000:.0f} ms)" if lags else "")
    server_log = out / "server.log"
    if server_log.exists():
        # The engine's own account (--gc-warning-threshold-secs): collections of its HTTP process.
        long_gc = [line for line in server_log.read_text(errors="replace").splitlines() if "LONG GARBAGE" in line]
        print(f"engine: {len(long_gc)} long garbage collections logged")
        for line in long_gc:
            print("  " + line.split(" | This may", 1)[0])
    latency = results.get("latency") or {}
    for run, data in latency.items():
        if isinstance(data, dict) and "rows" in data:
            print(f"\n== {run}" + (" (after freeze_gc)" if _after_freeze(latency, run) else ""))
            report_run(data, traces, lags)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
