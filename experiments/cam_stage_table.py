"""The Hemorica-study shape of a CAM benchmark: methods x stages, Dice / IoU / box IoU (Otsu) and pointing game.

    python experiments/cam_stage_table.py RUN/cam_benchmark/cam_benchmark.csv [--out table.md]

Reads the CSV ``lclsc benchmark-cams`` writes and prints one row per method, one column group per
stage (the study thresholded each map with Otsu's method; so does this table), plus the class-blind
floor rows (``blind:*``) that any CAM must beat.
"""

from __future__ import annotations

import argparse
import csv

COLS = (("dice@otsu", "Dice"), ("iou@otsu", "IoU"), ("bbox_iou@otsu", "box IoU"), ("pointing_game", "PG"))


def table(rows: list[dict[str, str]]) -> str:
    """Markdown: method | for each stage: Dice, IoU, box IoU, pointing game."""
    stages = sorted({r["stage"] for r in rows if r["stage"] not in ("-", "")})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["stage"]): r for r in rows}
    head = "| method | " + " | ".join(f"{s} {name}" for s in stages for _, name in COLS) + " |"
    lines = [head, "|---" * (1 + len(stages) * len(COLS)) + "|"]
    for m in methods:
        cells = []
        for s in stages:
            r = by.get((m, s)) or by.get((m, "-"))
            cells += [f"{float(r[c]):.3f}" if r and r.get(c) not in (None, "") else "–" for c, _ in COLS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with open(args.csv) as f:
        out = table(list(csv.DictReader(f)))
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
