"""Peak resident memory of this process, as the memory benchmarks measure it (Linux /proc; one place for both
bench/finetune_memory.py and bench/ctr_bahe.py, which run as scripts from this folder)."""

from __future__ import annotations


def reset_hwm() -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS, so a peak covers only what follows; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_bytes(field: str) -> int:
    """`VmRSS`, `VmHWM`, ... of /proc/self/status in bytes (0 where absent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0
