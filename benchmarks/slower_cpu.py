"""Run a command as if on a slower CPU: a CPU quota (Linux cgroup ``cpu`` controller) sized so
that the 2048 x 2048 fp32 matmul reads ``--gflops`` inside it.

The project's time goals are set at a machine speed (``make test`` within 12 minutes at about
90 GFLOP/s), and our machines differ 2x; scaling a time measured here by the matmul figure
assumes all of it is compute, which overstates what start-ups, file I/O and waits cost. Under a
quota everything slows alike (a throttled core runs nothing), so a time measured this way is an
upper bound too, but a closer one, and it is measured, not scaled:

    python benchmarks/slower_cpu.py --gflops 90 -- .venv/bin/python -m pytest --durations=25

The quota is calibrated by measuring the matmul (2 threads) in the cgroup and correcting it
until it reads within 5 % of the target; the figures before and inside are printed, then the
command runs in the cgroup (its children too) and its exit status is returned. Needs root and a
writable cgroup ``cpu`` hierarchy (v1 ``cpu.cfs_quota_us`` or v2 ``cpu.max``); says so in one line
otherwise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from _machine import matmul_gflops  # benchmarks/_machine.py, beside this script

V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
PERIOD_US = 5_000  # short periods (the kernel takes a quota of 1 ms or more): a 50 ms matmul spans 10 of them


def make_cgroup(name: str) -> tuple[Path, str]:
    """A fresh cgroup ``name``; returns its folder and the kind (``v1`` or ``v2``).

    Raises:
        SystemExit: no writable cgroup cpu controller here.
    """
    if (V1 / "cpu.cfs_quota_us").is_file():
        folder, kind = V1 / name, "v1"
    elif (V2 / "cgroup.controllers").is_file() and "cpu" in (V2 / "cgroup.controllers").read_text().split():
        folder, kind = V2 / name, "v2"
    else:
        sys.exit("slower_cpu: no cgroup cpu controller under /sys/fs/cgroup (v1 cpu/ or v2 with cpu)")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        sys.exit(f"slower_cpu: cannot create cgroup {folder}: {e.strerror} (needs root and a writable cgroup hierarchy)")
    if kind == "v2" and not (folder / "cpu.max").is_file():  # the controller is not on for the root's children
        try:
            (V2 / "cgroup.subtree_control").write_text("+cpu")
        except OSError as e:
            folder.rmdir()
            sys.exit(f"slower_cpu: cannot create cgroup {folder}: the cpu controller cannot be enabled: {e.strerror}")
    return folder, kind


def set_quota(folder: Path, kind: str, quota_us: int) -> None:
    """Let the cgroup run ``quota_us`` of CPU time (all cores together) in every 5 ms period."""
    if kind == "v1":
        (folder / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (folder / "cpu.cfs_quota_us").write_text(str(quota_us))
    else:
        (folder / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")


def own_cgroup(kind: str) -> Path:
    """The folder of the cgroup this process is in (``/proc/self/cgroup``), for the cpu controller."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (kind == "v1" and "cpu" in controllers.split(",")) or (kind == "v2" and controllers == ""):
            return (V1 if kind == "v1" else V2) / path.lstrip("/")
    sys.exit(f"slower_cpu: /proc/self/cgroup names no {kind} cpu cgroup")


def join(folder: Path) -> None:
    """Move this whole process (every thread: ``cgroup.procs``) into the cgroup ``folder``."""
    try:
        (folder / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as e:
        sys.exit(f"slower_cpu: cannot move this process into cgroup {folder}: {e.strerror}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gflops", type=float, required=True, help="the matmul figure to slow down to")
    ap.add_argument("--matmul-size", type=int, default=2048,
                    help="side of the calibration matmul (default 2048, the figure the docs quote; smaller is quicker)")
    ap.add_argument("--cgroup", default="cellkit-slower-cpu", help="cgroup name (default cellkit-slower-cpu)")
    ap.add_argument("--readings", type=int, default=5,
                    help="matmul readings, a second apart, to calibrate on (default 5 free and 3 inside the quota; "
                         "fewer are quicker and trust a busy host's figure)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.readings < 1:
        ap.error(f"--readings must be at least 1, not {args.readings}")
    if not cmd:
        ap.error("give the command after --")
    folder, kind = make_cgroup(args.cgroup)
    try:
        home = own_cgroup(kind)
    except SystemExit:
        folder.rmdir()
        raise
    try:
        return run_slowed(folder, kind, home, args.gflops, args.matmul_size, cmd, args.readings)
    finally:
        try:  # back where this process started, and the cgroup goes (unless the command left a process in it)
            (home / "cgroup.procs").write_text(str(os.getpid()))
            folder.rmdir()
        except OSError as e:
            print(f"slower_cpu: warning: cgroup {folder} not removed: {e.strerror}", file=sys.stderr)


def steady_gflops(n: int, samples: int = 5) -> float:
    """The best of ``samples`` readings of the 2-thread matmul, a second apart: on a shared host
    one reading can fall to half while a neighbour is busy (95 against 188 seen a minute apart),
    and a quota calibrated on it would be set twice too generous."""
    best = 0.0
    for i in range(samples):
        if i:
            time.sleep(1.0)
        best = max(best, matmul_gflops(2, n=n, repeats=3))
    return best


def run_slowed(folder: Path, kind: str, home: Path, gflops: float, n: int, cmd: list[str], readings: int = 5) -> int:
    """Calibrate the quota of ``folder`` to ``gflops`` (2-thread matmul of side ``n``, the best of
    ``readings`` free and of up to 3 inside), run ``cmd`` in it and return its exit status."""
    free = steady_gflops(n, samples=readings)
    if gflops >= free:
        sys.exit(f"slower_cpu: this machine reads {free:.0f} GFLOP/s, not above the target {gflops:.0f}")
    # the matmul runs on 2 threads: a quota of 2 * PERIOD_US lets it run free
    quota = max(1000, int(PERIOD_US * 2 * gflops / free))
    join(folder)
    for attempt in range(8):
        set_quota(folder, kind, quota)
        inside = steady_gflops(n, samples=min(3, readings))
        if abs(inside / gflops - 1) <= 0.05 or attempt == 7:
            break
        quota = max(1000, int(quota * gflops / inside))
    close = "" if abs(inside / gflops - 1) <= 0.05 else f" (not within 5 % of {gflops:.0f} after 8 tries)"
    print(f"slower_cpu: matmul {free:.0f} GFLOP/s free, {inside:.0f} inside the quota{close} "
          f"({quota / PERIOD_US:.2f} cores' time, {kind} cgroup {folder})", flush=True)
    t = time.perf_counter()
    rc = subprocess.run(cmd).returncode  # a child of a process in the cgroup starts in it
    seconds = time.perf_counter() - t
    after = matmul_gflops(2, n=n, repeats=3)
    join(home)
    print(f"slower_cpu: the command took {seconds:.0f} s (exit status {rc}); matmul inside the quota after it: "
          f"{after:.0f} GFLOP/s, free: {matmul_gflops(2, n=n, repeats=3):.0f}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
