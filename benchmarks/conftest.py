"""Benchmarks: print every measured row as one table at the end of the run."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("IDDC loss: forward + backward (positive + 3 negatives + Weibull)")
    tr.write_line("| case | time (s) | GFLOP/s | matmul GFLOP/s | of matmul | extra peak memory |")
    tr.write_line("|---|---|---|---|---|---|")
    for label, r in RESULTS:
        mem = r.get("extra_peak_bytes")
        mem = "out of memory" if r.get("oom") else ("-" if mem is None else f"{mem / 2**20:.0f} MiB")
        tr.write_line(f"| {label} | {r['seconds']:.3f} | {r['gflops']:.1f} | "
                      f"{r['matmul_gflops']:.1f} | {100 * r['fraction_of_matmul']:.0f}% | {mem} |")
