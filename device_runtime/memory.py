"""Peak memory of the current process, measured the same way everywhere.

``ru_maxrss`` survives ``exec`` on Linux: a child started by a large parent (a demo or an
exporter holding torch) reports the parent's peak. ``VmHWM`` in /proc belongs to the
current process image only, so it is preferred; ``ru_maxrss`` is the fallback elsewhere.
"""

from __future__ import annotations


def peak_rss_mb() -> float:
    """Peak resident set size of this process image, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not POSIX
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
