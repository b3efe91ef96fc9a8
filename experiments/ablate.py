"""Ablation sweeps of LCL-SC (losses, TK-MMP, GEI vs linear head, EMA momentum, k, tau, seeds).

    python experiments/ablate.py --preset quick --out runs/ablation_quick --workers 2
    python experiments/ablate.py --preset full --out /shared/abl --slurm --nodes 2 --gpus-per-node 4
    python experiments/ablate.py --out /shared/abl --run-index 3        # one run (a SLURM array task)
    python experiments/ablate.py --out /shared/abl --collect            # gather the table

Each run trains on the fixed patient-wise split (or ``--folds K`` cross-validation), is
evaluated on held-out patients and its Grad-CAM / SC maps are scored against the synthetic
masks. Finished runs (``runs/<name>/results.json``) are skipped, so an interrupted sweep is
resumed by re-running the same command. The machinery (and these flags) live in
``lclsc_jax.protocols.ablation``; see docs/protocols.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lclsc_jax.protocols.ablation import (  # noqa: F401  (re-exported: `from ablate import run_ablation`)
    ABLATION_GRIDS,
    ablation_command,
    ablation_table,
    expand_grid,
    run_ablation,
    run_index,
    write_slurm_script,
)
from lclsc_jax.cli import add_ablation_arguments


def build_parser() -> argparse.ArgumentParser:
    """The ablation command's parser."""
    p = argparse.ArgumentParser(prog="ablate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_ablation_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, plan (SLURM), run one entry, or collect an ablation sweep."""
    return ablation_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
