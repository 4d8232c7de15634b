"""`python -m relret calibrate`: fit the relevance function's constants to crowdsourced ratings.

The paper's g = 1/(1+exp(2.73 - 4.58 h)) was fitted for all-mpnet-base-v2; the constants do not carry over to other
Sentence-BERT models. This fits (a, b) by beta regression with a logit link (statsmodels' BetaModel) of
y = rating/100, squeezed into (0, 1) as (y (n-1) + 0.5) / n (Smithson & Verkuilen), on h = mean cosine similarity
between the query caption and the rated clip's captions, the query's own caption left out. logit(mu) = c0 + c1 h,
so a = -c0 and b = c1.

    python -m relret calibrate --ratings ../shared/data/relevance_ratings/development_relevances_joined.csv \
        --captions ../shared/data/clotho/clotho_captions_development.csv --out calibration.yaml \
        --sbert all-mpnet-base-v2      # the paper's model, once `python -m relret sbert install all-mpnet-base-v2`

Captions are looked up by (split, file name): Clotho reuses some file names across splits for different clips (4 in
v2.1, 12 of the 10,200 ratings), so a rating's clip is the one of the rating's split. A captions file belongs to the
rated split its name contains (`clotho_captions_validation.csv`), or to the one given as `SPLIT=PATH`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from relret.captions import read_caption_table
from relret.relevance import PAPER_A, PAPER_B

RATING_COLUMNS = ("query_text", "query_source_file", "file_name", "rating")
RATING_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class Rating:
    """One crowdsourced judgement: how well clip `file_name` matches `query_text` (a caption of `query_file`)."""

    split: str
    query_text: str
    query_file: str
    file_name: str
    rating: float


def read_ratings(path: str | Path) -> list[Rating]:
    """Rows of a joined ratings CSV (`split,tid,query_text,query_source_file,fid,file_name,fid_group,rating`)."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in RATING_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: ratings CSV lacks column(s) {', '.join(missing)}; expected at least {', '.join(RATING_COLUMNS)} "
                f"(found {', '.join(reader.fieldnames or []) or 'no header'})"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rating = float(row["rating"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: rating {row['rating']!r} is not a number") from None
            if not 0 <= rating <= RATING_SCALE:
                raise ValueError(f"{path}:{line}: rating {rating} is outside [0, {RATING_SCALE:g}]")
            rows.append(
                Rating(
                    row.get("split") or path.stem, row["query_text"], row["query_source_file"], row["file_name"], rating
                )
            )
    if not rows:
        raise ValueError(f"{path}: no ratings")
    return rows


def query_clip_similarity(ratings: Sequence[Rating], captions: dict[str, list[str]], embed) -> tuple[np.ndarray, int]:
    """h per rating: mean cosine between the query and the rated clip's captions, the query's own caption left out.

    `embed(texts) -> [n, D]` unit-norm embeddings. The ratings were collected on an earlier revision of Clotho's
    captions, so a query is sometimes not verbatim among its own clip's captions (a typo fixed since); the caption
    nearest to it is then the one left out. Returns h and how many queries were matched that way.
    """
    missing = sorted({r.file_name for r in ratings if r.file_name not in captions})
    if missing:
        raise ValueError(
            f"{len(missing)} rated clip(s) have no captions in the given captions file(s), e.g. {missing[:3]}; "
            "pass the Clotho captions CSV of every split the ratings come from"
        )
    texts = sorted({r.query_text for r in ratings} | {c for r in ratings for c in captions[r.file_name]})
    index = {t: i for i, t in enumerate(texts)}
    emb = np.asarray(embed(texts), dtype=np.float64)
    h = np.empty(len(ratings))
    approximate: set[str] = set()
    for i, r in enumerate(ratings):
        clip_caps = list(captions[r.file_name])
        sims = emb[[index[c] for c in clip_caps]] @ emb[index[r.query_text]]
        if r.file_name == r.query_file:
            if len(clip_caps) < 2:
                raise ValueError(f"clip {r.file_name} has no caption left once its query caption is left out")
            own = clip_caps.index(r.query_text) if r.query_text in clip_caps else int(np.argmax(sims))
            if r.query_text not in clip_caps:
                approximate.add(r.query_text)
            sims = np.delete(sims, own)
        h[i] = float(np.mean(sims))
    return h, len(approximate)


def caption_splits(captions_paths: Sequence[str | Path], splits: Sequence[str]) -> dict[str, list[Path]]:
    """{split: captions files} for the rated `splits`: `SPLIT=PATH` names the split; a bare path belongs to the one
    split whose name is a word of its file name (`clotho_captions_evaluation.csv`), or, with one rated split, to it.
    Every rated split must get a file."""
    by_split: dict[str, list[Path]] = {split: [] for split in splits}
    for given in map(str, captions_paths):
        split, sep, rest = given.partition("=")
        if sep and split and "/" not in split and not Path(given).exists():
            if split not in by_split:
                raise ValueError(
                    f"--captions {given}: no ratings of split {split!r} were given (rated: {', '.join(splits)})"
                )
            by_split[split].append(Path(rest))
            continue
        path = Path(given)
        words = set(re.split(r"[^0-9A-Za-z]+", path.stem.lower()))
        named = [split for split in splits if split.lower() in words]
        if len(named) == 1:
            by_split[named[0]].append(path)
        elif len(splits) == 1:
            by_split[splits[0]].append(path)
        else:
            raise ValueError(
                f"--captions {given}: its name does not say which rated split ({', '.join(splits)}) its clips belong "
                f"to; pass it as SPLIT=PATH (e.g. {splits[0]}={given})"
            )
    unmatched = [split for split, paths in by_split.items() if not paths]
    if unmatched:
        raise ValueError(
            f"no captions file for the rated split(s) {', '.join(unmatched)}: pass the Clotho captions CSV of every "
            f"rated split (clotho_captions_{unmatched[0]}.csv, or {unmatched[0]}=PATH)"
        )
    return by_split


def read_split_captions(files_by_split: dict[str, list[Path]]) -> dict[str, dict[str, list[str]]]:
    """{split: {file_name: captions}} from `caption_splits`' {split: files}: each split's own caption table."""
    tables: dict[str, dict[str, list[str]]] = {}
    for split, paths in files_by_split.items():
        tables[split] = {}
        for path in paths:
            tables[split].update(read_caption_table(path))
    return tables


def split_similarity(
    ratings: Sequence[Rating], captions: dict[str, dict[str, list[str]]], embed
) -> tuple[np.ndarray, int]:
    """`query_clip_similarity` of each rating against its own split's captions (`captions[rating.split]`), every
    distinct text embedded once; h in the order of `ratings` and the number of revised queries over all splits."""
    missing_splits = sorted({r.split for r in ratings} - set(captions))
    if missing_splits:
        raise ValueError(f"no captions given for the rated split(s) {', '.join(missing_splits)}")
    texts = sorted(
        {r.query_text for r in ratings} | {c for r in ratings for c in captions[r.split].get(r.file_name, ())}
    )
    vectors = dict(zip(texts, np.asarray(embed(texts), dtype=np.float64))) if texts else {}

    def lookup(batch: Sequence[str]) -> np.ndarray:
        return np.stack([vectors[t] for t in batch])

    h = np.empty(len(ratings))
    n_approximate = 0
    for split in sorted({r.split for r in ratings}):
        idx = [i for i, r in enumerate(ratings) if r.split == split]
        try:
            h[idx], n = query_clip_similarity([ratings[i] for i in idx], captions[split], lookup)
        except ValueError as exc:
            raise ValueError(f"split {split}: {exc}") from None
        n_approximate += n
    return h, n_approximate


def squeeze(y: np.ndarray) -> np.ndarray:
    """(y (n-1) + 0.5) / n: maps [0, 1] into (0, 1) so the beta likelihood is finite."""
    n = len(y)
    return (y * (n - 1) + 0.5) / n


def fit_beta_regression(h: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Beta regression with logit link of squeezed y on h; returns a, b, precision, log-likelihood and n."""
    import statsmodels.api as sm
    from statsmodels.othermod.betareg import BetaModel

    exog = sm.add_constant(np.asarray(h, dtype=np.float64), has_constant="add")
    result = BetaModel(squeeze(np.asarray(y, dtype=np.float64)), exog).fit(disp=False)
    c0, c1, log_precision = (float(v) for v in result.params)
    se = np.sqrt(np.diag(result.cov_params()))
    return {
        "a": -c0,
        "b": c1,
        "a_se": float(se[0]),
        "b_se": float(se[1]),
        "precision": math.exp(log_precision),
        "log_likelihood": float(result.llf),
        "n": len(h),
    }


def fit_quality(h: np.ndarray, y: np.ndarray, a: float, b: float) -> dict[str, float]:
    """How well g = logistic(h; a, b) matches y = rating / 100."""
    from scipy.stats import pearsonr, spearmanr

    g = 1.0 / (1.0 + np.exp(a - b * h))
    return {
        "n": len(h),
        "spearman_h_rating": float(spearmanr(h, y).statistic),
        "pearson_g_rating": float(pearsonr(g, y).statistic),
        "mae": float(np.mean(np.abs(g - y))),
        "rmse": float(np.sqrt(np.mean((g - y) ** 2))),
    }


def calibrate(
    ratings_paths: Sequence[str | Path],
    captions_paths: Sequence[str | Path],
    sbert_path: str | None = None,
    embed=None,
) -> dict:
    """Fit (a, b) on all given ratings; report fit quality per split for the fit and for the paper's constants.

    `sbert_path`: a known model name (`relret.sbert.MODELS`) or a model directory; default all-MiniLM-L6-v2.
    `embed(texts) -> [n, D]` unit-norm embeddings replaces the model (tests)."""
    from relret import sbert

    if embed is None:
        sbert_dir = sbert.resolve_sbert(sbert_path)  # a missing model fails here, before any work

        def embed(texts):  # the model is loaded only once the inputs have been checked
            return sbert.embed_captions(sbert.load_sbert(sbert_dir), texts, progress=True)

    ratings = [r for p in ratings_paths for r in read_ratings(p)]
    splits = sorted({r.split for r in ratings})
    caption_files = caption_splits(captions_paths, splits)
    captions = read_split_captions(caption_files)
    h, n_approximate = split_similarity(ratings, captions, embed)
    y = np.array([r.rating / RATING_SCALE for r in ratings])
    fit = fit_beta_regression(h, y)
    quality = {}
    for split in [*splits, "all"] if len(splits) > 1 else splits:
        sel = np.array([split in ("all", r.split) for r in ratings])
        quality[split] = {
            "fitted": fit_quality(h[sel], y[sel], fit["a"], fit["b"]),
            "paper": fit_quality(h[sel], y[sel], PAPER_A, PAPER_B),
        }
    return {
        "a": round(fit["a"], 6),
        "b": round(fit["b"], 6),
        "sbert": sbert.model_name(sbert_path),
        "similarity": "mean cosine to the clip's captions, the query's own caption left out",
        "queries_matched_to_a_revised_caption": n_approximate,
        "fit": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in fit.items()},
        "ratings": [str(p) for p in ratings_paths],
        "captions": {split: [str(p) for p in paths] for split, paths in caption_files.items()},
        "quality": quality,
    }


def write_yaml_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def format_report(result: dict) -> str:
    lines = [
        f"Sentence-BERT model: {result['sbert']}",
        f"fitted a = {result['a']:.3f} (se {result['fit']['a_se']:.3f}), b = {result['b']:.3f} "
        f"(se {result['fit']['b_se']:.3f}), precision {result['fit']['precision']:.2f}, n = {result['fit']['n']}",
        f"paper  a = {PAPER_A}, b = {PAPER_B}",
        f"queries whose own caption was revised since the ratings (nearest caption left out): "
        f"{result['queries_matched_to_a_revised_caption']}",
        f"{'split':<12} {'constants':<9} {'n':>5} {'spearman(h,r)':>14} {'pearson(g,r)':>13} {'MAE':>7} {'RMSE':>7}",
    ]
    for split, q in result["quality"].items():
        for which in ("fitted", "paper"):
            m = q[which]
            lines.append(
                f"{split:<12} {which:<9} {m['n']:>5} {m['spearman_h_rating']:>14.3f} {m['pearson_g_rating']:>13.3f} "
                f"{m['mae']:>7.3f} {m['rmse']:>7.3f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relret calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ratings", nargs="+", required=True, help="joined ratings CSV(s) (relevance_ratings/*_joined.csv)"
    )
    parser.add_argument(
        "--captions",
        nargs="+",
        required=True,
        help="Clotho captions CSV of each rated split (its name holds the split's name, or pass SPLIT=PATH)",
    )
    parser.add_argument(
        "--sbert",
        default=None,
        help="Sentence-BERT model: a known name (all-MiniLM-L6-v2, the default; all-mpnet-base-v2, the paper's, after "
        "`python -m relret sbert install all-mpnet-base-v2`) or a local sentence-transformers directory",
    )
    parser.add_argument("--out", required=True, help="YAML to write (top-level a, b), usable as relevance.calibration")
    args = parser.parse_args(argv)
    try:
        result = calibrate(args.ratings, args.captions, args.sbert)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2
    write_yaml_atomic(args.out, result)
    print(format_report(result))
    print(f"wrote {args.out}; use it with `loss.listnet.relevance.calibration={args.out}`")
    return 0
