"""The relevance constants fitted with the paper's Sentence-BERT model, all-mpnet-base-v2, on all 10,200 ratings.

    .venv/bin/python -m relret sbert install all-mpnet-base-v2      # once (about 30 s)
    .venv/bin/python bench/calibrate_mpnet.py [--data ../shared/data] [--out /tmp/calibration_mpnet.yaml]

Runs `relret.calibrate.calibrate` on the development, validation and evaluation ratings and Clotho captions and
prints the fit against the paper's a = 2.73, b = 4.58: each should lie within two standard errors of the fit.
Captions are looked up by (split, file name) (`relret.calibrate`). Measured on 2 CPU cores: a = 2.720 (se 0.029),
b = 4.539 (se 0.069), about 6 minutes (most of it embedding the captions); the exit status is 1 when either constant
lies outside two standard errors. The progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("development", "validation", "evaluation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with relevance_ratings/")
    parser.add_argument("--sbert", default="all-mpnet-base-v2", help="model name or directory")
    parser.add_argument("--out", default=None, help="also write the calibration YAML here")
    args = parser.parse_args(argv)

    from relret.calibrate import calibrate, format_report, write_yaml_atomic
    from relret.relevance import PAPER_A, PAPER_B

    data = Path(args.data)
    ratings = [data / "relevance_ratings" / f"{s}_relevances_joined.csv" for s in SPLITS]
    captions = [data / "clotho" / f"clotho_captions_{s}.csv" for s in SPLITS]
    start = time.monotonic()
    try:
        result = calibrate(ratings, captions, args.sbert)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:  # e.g. the model is not installed: say what to run
        print(f"calibrate_mpnet: {exc}", file=sys.stderr)
        return 2
    wall_s = time.monotonic() - start
    if args.out:
        write_yaml_atomic(args.out, result)
    print(format_report(result))
    print(f"wall time {wall_s:.0f} s")
    ok = True
    for key, paper in (("a", PAPER_A), ("b", PAPER_B)):
        fitted, se = result[key], result["fit"][f"{key}_se"]
        within = abs(fitted - paper) <= 2 * se
        ok &= within
        print(
            f"{key}: fitted {fitted:.3f} ± {se:.3f}, paper {paper}: difference {fitted - paper:+.3f} = "
            f"{(fitted - paper) / se:+.1f} se ({'within' if within else 'OUTSIDE'} two standard errors)"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
