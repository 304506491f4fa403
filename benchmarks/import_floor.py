"""The memory floor of a participant process: resident memory after each import and set-up
step, before any voxel is read. It bounds what the peak-RSS ratio to the reference can be.

    .venv/bin/python benchmarks/import_floor.py [--json benchmarks/results/import_floor.json]

Each step runs in one fresh process, in the order the app does them; the table gives the RSS
after the step and what it added. (Shared libraries count in RSS as soon as they are mapped
and touched, which is how the kernel's peak RSS counts them too.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]

#: (label, Python statement) in the app's order
STEPS: tuple[tuple[str, str], ...] = (
    ("python + numpy", "import numpy"),
    ("scipy.ndimage, nibabel", "import scipy.ndimage, nibabel"),
    ("torch", "import torch"),
    ("nnU-Net predictor, without torch._dynamo (spineps.models.nnunet_import; pre-processing stack: pandas, "
     "scikit-image, blosc2 ...)",
     "from spineps.models.nnunet_import import nnunet_predictor_class\n_p = nnunet_predictor_class()"),
    ("spineps participant + loading", "import spineps.participant, spineps.loading"),
    ("both bundled models loaded",
     "from spineps.loading import load_segmenters\n"
     "from spineps.settings import Settings\n"
     "from pathlib import Path\n"
     "s = Settings(bids_dir=Path('.'), output_dir=Path('.'), analysis_level='participant', nprocs=2, "
     "omp_nthreads=2, device='cpu', version='x')\n"
     "_models = load_segmenters(s)"),
    ("pybids (scan discovery)", "import bids"),
    ("matplotlib (QC figure)", "import matplotlib.figure"),
)

#: the N4 helper process (``spineps.semantic.n4_helper``), one per N4: SimpleITK is imported
#: there, never in the participant process
HELPER_STEPS: tuple[tuple[str, str], ...] = (
    ("python + numpy", "import numpy"),
    ("the helper's modules (nibabel: it reads the first scan itself)",
     "import spineps.semantic.n4_helper, spineps.semantic.preprocess, spineps.geometry.io"),
    ("SimpleITK (N4)", "import SimpleITK"),
)

_PROBE = """
import json, sys
def rss():
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
out = []
for label, stmt in json.loads(sys.argv[1]):
    exec(stmt, globals())
    out.append([label, round(rss(), 1)])
print(json.dumps(out))
"""


def measure(steps: Sequence[tuple[str, str]] = STEPS) -> list[dict[str, float]]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(steps))], capture_output=True, text=True,
                          cwd=str(REPO), check=True)
    rows, prev = [], 0.0
    for label, rss in json.loads(proc.stdout.strip().splitlines()[-1]):
        rows.append({"step": label, "rss_mib": rss, "added_mib": round(rss - prev, 1)})
        prev = rss
    return rows


def _table(rows: list[dict[str, float]]) -> list[str]:
    lines = ["| step | RSS after (MiB) | added (MiB) |", "| --- | --- | --- |"]
    return lines + [f"| {r['step']} | {r['rss_mib']:.0f} | {r['added_mib']:.0f} |" for r in rows]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "import_floor.json")
    args = ap.parse_args(argv)
    rows, helper = measure(), measure(HELPER_STEPS)
    lines = ["participant process:", *_table(rows), "", "N4 helper process (one per N4, while it runs):",
             *_table(helper)]
    sys.stdout.write("\n".join(lines) + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"python": sys.version.split()[0], "steps": rows, "n4_helper_steps": helper},
                                    indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
