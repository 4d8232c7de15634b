"""Evaluation results: one run's metrics with per-query values, aggregation over seeds, Table II, paired t-tests.

An `EvalResult` is what `python -m relret evaluate` writes for one checkpoint on one evaluation set:

- text-to-audio: every caption is a query; its clip is the one relevant item (query id `{clip_id}:{caption_index}`);
- audio-to-text: every clip is a query; its captions are the relevant items (query id `{clip_id}`).

Metrics come from `relret.metrics` (one implementation). Several runs of a method (seeds) are summarised as
mean ± sd (sample sd, ddof=1) and laid out like the paper's Table II: methods as rows, the two directions as column
groups. `paired_ttest` compares two runs on per-query AP@10 (scipy's ttest_rel), as the paper reports.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from relret.config import RETRIEVAL_DIRECTIONS as DIRECTIONS
from relret.config import SELECTION_METRICS
from relret.metrics import per_query_metrics, per_query_metrics_from_embeddings, summarize

DIRECTION_TITLES = {"t2a": "Text-to-audio", "a2t": "Audio-to-text"}
TABLE_METRICS = {"t2a": SELECTION_METRICS, "a2t": (*SELECTION_METRICS, "hit@1", "hit@10")}


@dataclasses.dataclass
class EvalResult:
    """Metrics of one model on one evaluation set, with per-query values for significance tests."""

    metrics: dict[str, dict[str, float]]
    """direction -> metric name -> value (fractions)."""
    per_query: dict[str, dict[str, list[float]]]
    """direction -> per-query metric name (AP@10, R@1, ...) -> values in the order of `query_ids`."""
    query_ids: dict[str, list[str]]
    """direction -> query ids (t2a: "{clip_id}:{caption_index}", a2t: "{clip_id}")."""
    info: dict[str, object] = dataclasses.field(default_factory=dict)
    """Where it came from: checkpoint, shards, counts, config."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        path = Path(path)
        if path.is_dir():
            path = path / "eval.json"
        if not path.is_file():
            raise ValueError(f"no evaluation result at {path}; run `python -m relret evaluate` first")
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a relret evaluation result: {exc}") from exc


def evaluate_embeddings(
    audio_emb: np.ndarray,
    audio_clip_ids: Sequence[int],
    text_emb: np.ndarray,
    text_clip_ids: Sequence[int],
    text_caption_index: Sequence[int] | None = None,
    info: Mapping[str, object] | None = None,
    merge_captions: Sequence[str] | None = None,
) -> EvalResult:
    """Both directions from unit-norm audio embeddings [N, E] (one per clip) and text embeddings [M, E] (one per
    caption, `text_clip_ids[m]` naming its clip). Scores are cosine similarities (dot products of unit vectors).

    With `merge_captions` (the M caption texts), text-to-audio treats identical texts as one query whose relevant
    items are all the clips they caption (by default a caption shared by several clips counts only its own clip, and
    is asked once per copy); the query keeps the id of its first caption. Audio-to-text is unchanged."""
    audio_ids = np.asarray(audio_clip_ids, dtype=np.int64)
    text_ids = np.asarray(text_clip_ids, dtype=np.int64)
    if len(np.unique(audio_ids)) != len(audio_ids):
        raise ValueError("audio_clip_ids must be unique: one embedding per clip")
    missing = np.setdiff1d(text_ids, audio_ids)
    if len(missing):
        raise ValueError(f"{len(missing)} caption(s) belong to clips without audio embeddings, e.g. clip {missing[0]}")
    if text_caption_index is None:
        text_caption_index = _caption_index(text_ids)
    t2a_ids = [f"{c}:{i}" for c, i in zip(text_ids.tolist(), list(text_caption_index))]
    info = dict(info or {}, n_clips=len(audio_ids), n_captions=len(text_ids))
    if merge_captions is None:
        t2a = per_query_metrics_from_embeddings(text_emb, audio_emb, text_ids, audio_ids)
    else:
        t2a, first = _merged_text_queries(audio_emb, audio_ids, text_emb, text_ids, merge_captions)
        t2a_ids = [t2a_ids[m] for m in first]
        info.update(merged_identical_captions=True, n_text_queries=len(first))
    per_query = {"t2a": t2a, "a2t": per_query_metrics_from_embeddings(audio_emb, text_emb, audio_ids, text_ids)}
    return EvalResult(
        metrics={d: summarize(per_query[d]) for d in DIRECTIONS},
        per_query={d: {k: v.tolist() for k, v in per_query[d].items()} for d in DIRECTIONS},
        query_ids={"t2a": t2a_ids, "a2t": [str(c) for c in audio_ids.tolist()]},
        info=info,
    )


def _merged_text_queries(
    audio_emb, audio_ids: np.ndarray, text_emb, text_ids: np.ndarray, captions: Sequence[str]
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Text-to-audio per-query metrics with one query per distinct caption text (its first caption's embedding; the
    copies embed identically) relevant to every clip it captions; returns them and each query's first caption."""
    if len(captions) != len(text_ids):
        raise ValueError(f"{len(captions)} caption texts for {len(text_ids)} text embeddings")
    groups: dict[str, list[int]] = {}
    for m, text in enumerate(captions):
        groups.setdefault(text, []).append(m)
    first = [members[0] for members in groups.values()]
    column = {int(c): n for n, c in enumerate(audio_ids.tolist())}
    relevant = np.zeros((len(first), len(audio_ids)), dtype=bool)
    for q, members in enumerate(groups.values()):
        relevant[q, [column[int(text_ids[m])] for m in members]] = True
    queries = torch.as_tensor(text_emb)[first]
    scores = queries @ torch.as_tensor(audio_emb).to(queries.device, queries.dtype).T
    return per_query_metrics(scores, relevant), first


def _caption_index(text_ids: np.ndarray) -> list[int]:
    seen: dict[int, int] = {}
    out = []
    for c in text_ids.tolist():
        out.append(seen.get(c, 0))
        seen[c] = out[-1] + 1
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single run)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize_runs(runs: Sequence[EvalResult]) -> dict[str, dict[str, dict[str, float]]]:
    """direction -> metric -> {"mean", "sd", "n"} over the runs."""
    if not runs:
        raise ValueError("no runs to summarise")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for d in DIRECTIONS:
        out[d] = {}
        for m in runs[0].metrics[d]:
            mean, sd = mean_sd([r.metrics[d][m] for r in runs])
            out[d][m] = {"mean": mean, "sd": sd, "n": len(runs)}
    return out


def table2(methods: Mapping[str, Sequence[EvalResult]], percent: bool = True) -> dict[str, object]:
    """The Table II layout as data: {"columns": {direction: [metric...]}, "rows": {method: summary}}."""
    return {
        "columns": {d: list(TABLE_METRICS[d]) for d in DIRECTIONS},
        "rows": {name: summarize_runs(runs) for name, runs in methods.items()},
        "units": "percent" if percent else "fraction",
    }


def _cell(stat: Mapping[str, float], percent: bool) -> str:
    scale = 100.0 if percent else 1.0
    if stat["n"] > 1:
        return f"{stat['mean'] * scale:.2f} ± {stat['sd'] * scale:.2f}"
    return f"{stat['mean'] * scale:.2f}"


def format_table2(methods: Mapping[str, Sequence[EvalResult]], percent: bool = True) -> str:
    """Markdown: methods as rows, text-to-audio and audio-to-text as column groups, mean ± sd over runs."""
    data = table2(methods, percent)
    header1 = ["Method", "runs"]
    header2 = ["", ""]
    for d in DIRECTIONS:
        cols = TABLE_METRICS[d]
        header1 += [DIRECTION_TITLES[d]] + [""] * (len(cols) - 1)
        header2 += list(cols)
    lines = ["| " + " | ".join(header1) + " |", "|" + "---|" * len(header1), "| " + " | ".join(header2) + " |"]
    for name, summary in data["rows"].items():
        n = next(iter(summary["t2a"].values()))["n"]
        cells = [name, str(n)] + [_cell(summary[d][m], percent) for d in DIRECTIONS for m in TABLE_METRICS[d]]
        lines.append("| " + " | ".join(cells) + " |")
    unit = "%" if percent else "fractions"
    lines.append("")
    lines.append(
        f"Values in {unit}, mean ± sd over runs. R@k: relevant items in the top k / relevant items (DCASE; "
        "audio-to-text R@1 is at most 1/captions per clip). hit@k: any relevant caption in the top k "
        "(the CLAP/WavCaps convention for audio-to-text)."
    )
    return "\n".join(lines)


def ttest_over_queries(
    ids_a: Sequence[str], va, ids_b: Sequence[str], vb, direction: str, what: str = "runs"
) -> dict[str, float]:
    """Paired t-test (scipy.stats.ttest_rel) of per-query values `va` and `vb`, aligned by query id; both sides must
    hold the same queries. Identical values give t = 0, p = 1 (scipy would return nan)."""
    from scipy.stats import ttest_rel

    if sorted(ids_a) != sorted(ids_b):
        raise ValueError(
            f"the two {what} were evaluated on different {direction} queries ({len(ids_a)} vs {len(ids_b)}); "
            "evaluate them on the same shards"
        )
    order_b = {q: i for i, q in enumerate(ids_b)}
    va = np.asarray(va, dtype=np.float64)
    vb = np.asarray(vb, dtype=np.float64)[[order_b[q] for q in ids_a]]
    diff = va - vb
    if np.allclose(diff, 0):
        t, p = 0.0, 1.0
    else:
        res = ttest_rel(va, vb)
        t, p = float(res.statistic), float(res.pvalue)
    return {
        "n": len(va),
        "mean_a": float(va.mean()),
        "mean_b": float(vb.mean()),
        "mean_diff": float(diff.mean()),
        "t": t,
        "p": p,
    }


def paired_ttest(a: EvalResult, b: EvalResult, direction: str = "t2a", metric: str = "AP@10") -> dict[str, float]:
    """Paired t-test of per-query `metric` between runs a and b over the same queries (scipy.stats.ttest_rel)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    if metric not in a.per_query[direction]:
        raise ValueError(f"no per-query {metric!r}; available: {', '.join(a.per_query[direction])}")
    test = ttest_over_queries(
        a.query_ids[direction],
        a.per_query[direction][metric],
        b.query_ids[direction],
        b.per_query[direction][metric],
        direction,
    )
    return {"direction": direction, "metric": metric, **test}


def format_ttest(name_a: str, name_b: str, res: Mapping[str, float]) -> str:
    verdict = "significant at 0.05" if res["p"] < 0.05 else "not significant at 0.05"
    return (
        f"{name_a} vs {name_b}, {DIRECTION_TITLES[res['direction']]} per-query {res['metric']} over {res['n']} queries: "
        f"{res['mean_a']:.4f} vs {res['mean_b']:.4f} (diff {res['mean_diff']:+.4f}), paired t = {res['t']:.3f}, "
        f"p = {res['p']:.3g} ({verdict})"
    )


def dcase_submission_rows(
    text_emb: np.ndarray, captions: Sequence[str], audio_emb: np.ndarray, file_names: Sequence[str], k: int = 10
) -> list[list[str]]:
    """Rows `caption, file_name_1..file_name_k` of the DCASE text-to-audio submission file (ties by lower index)."""
    import torch

    from relret.metrics import topk_indices

    if len(file_names) < k:
        raise ValueError(f"the DCASE file lists {k} clips per caption but only {len(file_names)} clips were embedded")
    rows = []
    audio = torch.as_tensor(audio_emb)
    text = torch.as_tensor(text_emb)
    for start in range(0, len(captions), 1024):
        idx = topk_indices(text[start : start + 1024] @ audio.T, k)
        for caption, ranked in zip(captions[start : start + 1024], idx.tolist()):
            rows.append([caption] + [file_names[j] for j in ranked])
    return rows


def _load_group(spec: str) -> tuple[str, list[EvalResult]]:
    """`NAME=PATH[,PATH...]` -> (NAME, results); a PATH is an eval.json or a directory holding one."""
    name, sep, paths = spec.partition("=")
    if not sep or not name or not paths:
        raise ValueError(f"--method {spec!r} is not of the form NAME=EVAL_DIR[,EVAL_DIR...]")
    return name, [EvalResult.load(p) for p in paths.split(",")]


def main_table(argv: Sequence[str] | None = None) -> int:
    """`python -m relret table --method NAME=EVAL[,EVAL..] ... [--out DIR]`: Table II over seeds."""
    import argparse
    import sys

    from relret.storage import write_bytes

    parser = argparse.ArgumentParser(prog="python -m relret table", description=main_table.__doc__)
    parser.add_argument("--method", action="append", required=True, help="NAME=EVAL_DIR[,EVAL_DIR...] (one per seed)")
    parser.add_argument("--out", default=None, help="directory for table2.md and table2.json")
    args = parser.parse_args(argv)
    try:
        methods = dict(_load_group(spec) for spec in args.method)
    except ValueError as exc:
        print(f"table: {exc}", file=sys.stderr)
        return 2
    text = format_table2(methods)
    print(text)
    if args.out:
        out = Path(args.out)
        write_bytes(out / "table2.md", (text + "\n").encode())
        write_bytes(out / "table2.json", json.dumps(table2(methods), indent=2).encode())
    return 0


def main_compare(argv: Sequence[str] | None = None) -> int:
    """`python -m relret compare RUN_A RUN_B`: paired t-test on per-query AP@10 (both directions)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m relret compare", description=main_compare.__doc__)
    parser.add_argument("run_a", help="eval.json or the evaluation directory holding it")
    parser.add_argument("run_b")
    parser.add_argument("--metric", default="AP@10", help="per-query metric to compare (AP@10, R@1, R@5, R@10, ...)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        a, b = EvalResult.load(args.run_a), EvalResult.load(args.run_b)
        results = [paired_ttest(a, b, d, args.metric) for d in DIRECTIONS]
    except ValueError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    for res in results:
        print(format_ttest(str(a.info.get("name", args.run_a)), str(b.info.get("name", args.run_b)), res))
    if args.out:
        from relret.storage import write_bytes

        write_bytes(args.out, json.dumps(results, indent=2).encode())
    return 0
