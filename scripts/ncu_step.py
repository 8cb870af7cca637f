"""Prints one decode step from an `ncu --csv --metrics gpu__time_duration.sum` log of `qcc-run
generate` (scripts/gpu_decode_profile.sh): the kernels between the last two embedding gathers
(`gather_rows_*`), in microseconds, and their sum. With --tail (a `qcc-run run` log): the kernels
from the last embedding gather to the end (the last run of a prefill)."""
import csv
import sys

tail = "--tail" in sys.argv[2:]
lines = open(sys.argv[1], encoding="utf-8", errors="replace").read().splitlines()
head = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
rows = [r for r in csv.DictReader(lines[head:]) if r.get("Metric Name") == "gpu__time_duration.sum"]
gathers = [i for i, r in enumerate(rows) if "gather_rows" in r["Kernel Name"]]
if len(gathers) < (1 if tail else 2):
    sys.exit(f"{sys.argv[1]}: too few gather_rows kernels (runs or decode steps) in the log")
total = 0.0
for r in rows[gathers[-1] :] if tail else rows[gathers[-2] : gathers[-1]]:
    us = float(r["Metric Value"].replace(",", "")) / 1000.0
    total += us
    print(f"{us:8.1f} us  grid {r['Grid Size']:>14}  {r['Kernel Name'][:90]}")
print(f"{total:8.1f} us  sum of the step's kernels")
