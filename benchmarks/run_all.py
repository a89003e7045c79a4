"""`make bench`: every benchmark, each printing its table of side-by-side measurements."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = [
    ["pyramid_build.py"],
    ["optimizers.py"],
    ["cross_resolution.py", "--seeds", "0", "1", "2", "--epochs", "3", "--sigma", "0"],
    ["cross_resolution.py", "--seeds", "0", "1", "2", "--epochs", "3", "--sigma", "1"],
]

if __name__ == "__main__":
    for args in BENCHES:
        print(f"\n=== {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], check=True)
