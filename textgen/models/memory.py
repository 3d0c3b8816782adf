"""Worker memory: giving back what loading freed, and reporting RSS and PSS.

The weights are not private to a worker: safetensors maps its files and hands out tensors over
the mapping (transformers keeps them when the dtype already matches; the quantized layers use
the cache file's tensors as they are), so their pages sit once in the page cache whatever the
number of workers. PSS (proportional set size) is the honest per-worker figure: shared pages
are divided among the processes that map them, where RSS counts them in full for each.
"""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Give the heap that loading freed (its temporaries; on a first start, quantizing's) back.

    glibc keeps freed heap pages mapped: without this a worker held about 30 MB more (int4) and,
    after quantizing on a first start, stayed at its loading peak.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def process_memory(pid: int | str = "self") -> dict[str, float]:
    """A process's memory in MiB: RSS, its peak, PSS, and PSS split into anonymous and file."""
    fields = {
        "Rss": "rss_mib",
        "Pss": "pss_mib",
        "Pss_Anon": "pss_anon_mib",
        "Pss_File": "pss_file_mib",
    }
    report: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                key, _, value = line.partition(":")
                if key in fields:
                    report[fields[key]] = round(int(value.split()[0]) / 1024, 1)
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    report["peak_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:  # not Linux
        return {}
    return report
