"""The demo's documented table as a claim with its spread: the demo's recipe run with several seeds.

Runs ``python demo.py --seed <k> --out <out>/seed<k>`` for each seed, reads every row of its ``--compare``
tables (``utils.demo_reference``) and writes the reference ``demo.py`` checks itself against — each row's value
at the documented seed (1) and its range over the seeds — with the machine, threads and each run's wall time:

    python bench/demo_spread.py                      # seeds 1-3, writes docs/demo_spread.json (about 3 demos)
    python bench/demo_spread.py --seeds 1 2 3 4 5 --out /tmp/spread
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchmark import machine  # noqa: E402
from utils.demo_reference import REFERENCE, run_values, spread  # noqa: E402
from utils.io import atomic_write  # noqa: E402
from utils.runtime import run_script  # noqa: E402

IN_DATASET = "digits-012345"  # demo.py's


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds; 1 is documented")
    parser.add_argument("--out", default="demo_spread_output", help="folder for each seed's demo output")
    parser.add_argument("--write", default=str(REFERENCE), help="the reference file to write")
    args = parser.parse_args(argv)
    if 1 not in args.seeds:
        parser.error("--seeds must include 1, the documented seed")

    runs, seconds = {}, {}
    for seed in args.seeds:
        out = Path(args.out).resolve() / f"seed{seed}"
        start = time.time()
        subprocess.run([sys.executable, str(ROOT / "demo.py"), f"--seed={seed}", f"--out={out}"], check=True, cwd=ROOT)
        seconds[seed] = round(time.time() - start)
        runs[seed] = run_values(out / "results", IN_DATASET)
    reference = {**spread(runs, documented_seed=1), "machine": machine(), "demo_seconds": seconds,
                 "command": "python bench/demo_spread.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write(args.write, lambda f: f.write((json.dumps(reference, indent=1) + "\n").encode()))
    widest = sorted(reference["rows"].items(), key=lambda item: item[1]["average"]["min"] - item[1]["average"]["max"])
    print(f"\nwrote {args.write}: {len(reference['rows'])} rows over seeds {args.seeds}; demo wall time "
          + ", ".join(f"{s} s" for s in seconds.values()) + "; widest average-AUROC ranges:")
    for key, columns in widest[:8]:
        print(f"  {key}: {columns['average']['min']:.2f}-{columns['average']['max']:.2f}")


if __name__ == "__main__":
    run_script(main)
