"""Run a Python module's main under cProfile: `python -m bench.profiled OUT.prof MODULE [ARGS...]`.

The bench starts workers through this when `--profile DIR` (or PERQ_BENCH_PROFILE) is given. The profile
is written when the process ends normally, which a worker does on SIGTERM, so stop it gracefully.
"""

from __future__ import annotations

import cProfile
import runpy
import sys


def main() -> None:
    out, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    profile = cProfile.Profile()
    profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
