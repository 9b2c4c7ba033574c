"""Bind this rank's process to an exclusive slice of the allowed CPUs, then run the script (argv[1])."""
import os, runpy, sys
cpus = sorted(os.sched_getaffinity(0))
lr, lw = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
per = len(cpus) // lw
mine = cpus[lr * per:(lr + 1) * per]
os.sched_setaffinity(0, mine)
print(f"rank {lr}: cpus {mine[0]}-{mine[-1]} of {len(cpus)}", flush=True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
