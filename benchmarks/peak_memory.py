"""Run one loss step in this (fresh) process and print the peak RSS it added, as JSON.

Run with MALLOC_MMAP_THRESHOLD_ set low (the caller does) so freed buffers go back to the
system at once and resident memory tracks live tensors.

Usage: python peak_memory.py BACKEND B SIDE D K   (BACKEND: reference, authors, streaming)
"""
import json
import resource
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import full_loss_step, make_inputs  # noqa: E402

from iddc.reference import pair_sums_masked_gather  # noqa: E402

BACKENDS = {"reference": "reference", "authors": pair_sums_masked_gather,
            "streaming": "streaming"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(backend, batch, side, dim, classes):
    # warm up libraries on a tiny case so their one-off allocations are not counted
    full_loss_step(BACKENDS[backend], make_inputs(4, 4, 8, 3))()
    inputs = make_inputs(int(batch), int(side), int(dim), int(classes))
    step = full_loss_step(BACKENDS[backend], inputs)
    if reset_peak():
        before = _status_kib("VmRSS")
        step()
        extra = _status_kib("VmHWM") - before
    else:  # the lifetime peak: may hide a step smaller than the set-up's temporaries
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"extra_peak_bytes": extra * 1024, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
