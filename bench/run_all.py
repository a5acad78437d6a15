"""Run every CPU benchmark in turn (each in its own process) and print their tables.

    python -m bench.run_all                  # the CPU suite, about 6-10 minutes on 2 cores
    python -m bench.run_all --smoke          # tiny sizes, seconds (what the tests run)
    python -m bench.run_all --only align,storage --out bench-cpu.md

Each bench runs as ``python -m bench.<name>`` with ``--device cpu`` (plus ``--smoke`` and any
``--extra`` flags), so the numbers of one do not depend on what the previous one left in memory.
The exit status is non-zero when any bench failed; the others still run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCHES = ["align", "storage", "train_step", "jit_step", "repae_step", "loader", "build"]
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds per bench)")
    p.add_argument("--only", default=None, help=f"comma list out of {','.join(BENCHES)}")
    p.add_argument("--device", default="cpu", help="device passed to every bench (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every bench")
    p.add_argument("--out", default=None, help="also write everything printed to this file")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per bench (default 600)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown bench(es) {unknown}; choose from {BENCHES}")
    out = open(args.out, "w") if args.out else None

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        if out:
            out.write(text)
            out.flush()

    failed = []
    t_all = time.perf_counter()
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}", "--device", args.device]
        if args.smoke:
            cmd.append("--smoke")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        emit(f"\n## bench.{name}\n\n```\n$ python -m bench.{name} {' '.join(cmd[3:])}\n")
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=args.timeout)
            emit(proc.stdout)
            rc = proc.returncode
        except subprocess.TimeoutExpired as e:
            emit((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            emit(f"\n[timed out after {args.timeout} s]\n")
            rc = -1
        dt = time.perf_counter() - t0
        emit(f"```\n\n(bench.{name}: {dt:.1f} s, exit {rc})\n")
        if rc != 0:
            failed.append(name)
    emit(f"\nall benches: {time.perf_counter() - t_all:.1f} s" + (f"; FAILED: {failed}" if failed else "") + "\n")
    if out:
        out.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
