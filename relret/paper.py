"""`python -m relret paper-tables --results DIR [DIR ...] --out DIR`: the paper's Table II, Table III and the
Section V-A relevance ablation from evaluation results, with the paper's paired t-tests.

Results are read from the layout the evaluation stages of configs/paper.yaml write:

    DIR/TABLE/DATASET/METHOD/SEED/eval.json        e.g. runs/paper/results/table2/clotho/listnet_audio/s0/eval.json

(each eval.json written by `python -m relret evaluate`, relret.results.EvalResult). Per table and dataset:

- mean ± sd over seeds (sample sd) of mAP@10 and R@1/5/10, text-to-audio (and audio-to-text for Table II), in %;
- the paired t-test as the paper runs it: per text query, AP@10 averaged over the runs of each method, then
  scipy.stats.ttest_rel over the queries, reported as t(df) with df = queries - 1, and p;
- the paper's published numbers beside ours with the difference, where we have them. Built in are only the t-tests'
  t(df) values quoted from the paper's text (ListNet_audio against InfoNCE, text-to-audio; Clotho t(5224) = 11.658 and
  AudioCaps t(4699) = 0.532 in Table II, t(5224) = 2.438 and t(4699) = 2.601 in Table III). The tables' published
  values could not be retrieved reliably here, so none are built in; `--published FILE` adds them (layout in
  `read_published`).

Writes OUT/paper_tables.md, OUT/paper_tables.json (fractions, not %) and OUT/paper_tables.png (per-method means with
sd as error bars). Missing runs are shown as missing, never filled in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from relret.config import SELECTION_METRICS
from relret.results import DIRECTION_TITLES, EvalResult, summarize_runs, ttest_over_queries

LAYOUT = "TABLE/DATASET/METHOD/SEED/eval.json"
METRIC = "AP@10"
"""The per-query metric of the paired t-tests."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One method row of a table and where its runs are in the results layout."""

    name: str
    """As the paper names it."""
    table: str
    """The TABLE directory of its runs."""
    method: str
    """The METHOD directory of its runs (a label of configs/paper.yaml's method axis)."""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A paired t-test of row `a` against row `b`."""

    a: str
    b: str
    direction: str = "t2a"


@dataclasses.dataclass(frozen=True)
class TableSpec:
    key: str
    title: str
    datasets: tuple[str, ...]
    rows: tuple[Row, ...]
    directions: tuple[str, ...]
    comparisons: tuple[Comparison, ...]


DATASET_TITLES = {"clotho": "Clotho", "audiocaps": "AudioCaps"}

TABLES = (
    TableSpec(
        "table2",
        "Table II: trained from the AudioSet PaSST and RoBERTa-large",
        ("clotho", "audiocaps"),
        (
            Row("InfoNCE", "table2", "infonce"),
            Row("ListNet_audio", "table2", "listnet_audio"),
            Row("ListNet_text", "table2", "listnet_text"),
            Row("ListNet_audio+text", "table2", "listnet_both"),
        ),
        ("t2a", "a2t"),
        (Comparison("ListNet_audio", "InfoNCE"),),
    ),
    TableSpec(
        "table3",
        "Table III: pretrained on WavCaps + AudioCaps + Clotho, then fine-tuned",
        ("clotho", "audiocaps"),
        (Row("InfoNCE", "table3", "infonce"), Row("ListNet_audio", "table3", "listnet_audio")),
        ("t2a",),
        (Comparison("ListNet_audio", "InfoNCE"),),
    ),
    TableSpec(
        "ablation",
        "Section V-A: relevance function of ListNet_audio (logistic, the paper's; min-max)",
        ("clotho",),
        (Row("logistic", "table2", "listnet_audio"), Row("min-max", "ablation", "listnet_audio_minmax")),
        ("t2a",),
        (Comparison("logistic", "min-max"),),
    ),
)

PUBLISHED: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's text: ListNet_audio against InfoNCE, text-to-audio per-query AP@10 (our reading of which pair).
    "table2": {
        "clotho": {"ttest": {"df": 5224, "t": 11.658}},
        "audiocaps": {"ttest": {"df": 4699, "t": 0.532}},
    },
    "table3": {
        "clotho": {"ttest": {"df": 5224, "t": 2.438}},
        "audiocaps": {"ttest": {"df": 4699, "t": 2.601}},
    },
}


# ---------------------------------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class Runs:
    """The runs of one (table, dataset, method): seed -> result, and where each came from."""

    results: dict[str, EvalResult] = dataclasses.field(default_factory=dict)
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)

    def ordered(self) -> list[EvalResult]:
        return [self.results[s] for s in sorted(self.results, key=_natural)]


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_results(roots: Sequence[str | Path]) -> dict[tuple[str, str, str], Runs]:
    """Every DIR/TABLE/DATASET/METHOD/SEED/eval.json under the roots, by (table, dataset, method)."""
    found: dict[tuple[str, str, str], Runs] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise ValueError(f"--results {root} is not a directory")
        for path in sorted(root.glob("*/*/*/*/eval.json")):
            table, dataset, method, seed = path.relative_to(root).parts[:4]
            runs = found.setdefault((table, dataset, method), Runs())
            if seed in runs.results:
                raise ValueError(f"two results for {table}/{dataset}/{method}/{seed}: {runs.paths[seed]} and {path}")
            runs.results[seed] = EvalResult.load(path)
            runs.paths[seed] = path
    if not found:
        raise ValueError(
            f"no evaluation results laid out as {LAYOUT} under {', '.join(map(str, roots))}; the evaluation stages of "
            "configs/paper.yaml write them"
        )
    return found


def read_published(path: str | Path | None) -> dict[str, dict[str, dict[str, Any]]]:
    """The built-in published values, with a YAML/JSON file's merged over them. The file's layout, values in %:
    `{TABLE: {DATASET: {"rows": {ROW: {DIRECTION: {METRIC: value}}}, "ttest": {"df", "t", "p" (optional)}}}}`, e.g.
    `{table2: {clotho: {rows: {InfoNCE: {t2a: {mAP@10: 24.0, R@1: 14.0}}}, ttest: {df: 5224, t: 11.658}}}}` (the
    numbers of this example are placeholders, not the paper's); ROW is a row name of TABLES (InfoNCE, ListNet_audio,
    ...)."""
    out = json.loads(json.dumps(PUBLISHED))
    if path is None:
        return out
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"--published {path}: expected a mapping TABLE -> DATASET -> {{rows, ttest}}")
    known = {t.key: t for t in TABLES}
    for table, datasets in data.items():
        if table not in known or not isinstance(datasets, Mapping):
            raise ValueError(f"--published {path}: unknown table {table!r}; the tables are {', '.join(known)}")
        for dataset, entry in datasets.items():
            if dataset not in known[table].datasets or not isinstance(entry, Mapping):
                raise ValueError(f"--published {path}: {table} has no dataset {dataset!r}")
            names = {r.name for r in known[table].rows}
            for row in (entry.get("rows") or {}).keys():
                if row not in names:
                    raise ValueError(f"--published {path}: {table}/{dataset} has no row {row!r}; rows: {sorted(names)}")
            target = out.setdefault(table, {}).setdefault(dataset, {})
            target.setdefault("rows", {}).update(entry.get("rows") or {})
            if "ttest" in entry:
                target["ttest"] = dict(entry["ttest"])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def per_query_mean(runs: Sequence[EvalResult], direction: str = "t2a", metric: str = METRIC) -> tuple[list, np.ndarray]:
    """Query ids (in the first run's order) and each query's `metric` averaged over the runs."""
    ids = runs[0].query_ids[direction]
    columns = []
    for run in runs:
        if sorted(run.query_ids[direction]) != sorted(ids):
            raise ValueError(
                f"runs evaluated on different {direction} queries ({len(run.query_ids[direction])} vs {len(ids)}); "
                "evaluate every run on the same shards"
            )
        position = {q: i for i, q in enumerate(run.query_ids[direction])}
        columns.append(np.asarray(run.per_query[direction][metric], dtype=np.float64)[[position[q] for q in ids]])
    return list(ids), np.mean(columns, axis=0)


def averaged_ttest(
    a: Sequence[EvalResult], b: Sequence[EvalResult], direction: str = "t2a", metric: str = METRIC
) -> dict[str, Any]:
    """The paper's test: per query, `metric` averaged over each method's runs; then a paired t-test over queries."""
    ids_a, va = per_query_mean(a, direction, metric)
    ids_b, vb = per_query_mean(b, direction, metric)
    test = ttest_over_queries(ids_a, va, ids_b, vb, direction, what="methods")
    return {
        "direction": direction,
        "metric": metric,
        "n": test["n"],
        "df": test["n"] - 1,
        "runs_a": len(a),
        "runs_b": len(b),
        **{k: test[k] for k in ("mean_a", "mean_b", "mean_diff", "t", "p")},
    }


def build_tables(
    found: Mapping[tuple[str, str, str], Runs], published: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The tables as data (fractions): per table and dataset, each row's summary and seeds, the t-tests, and the
    published values where known. Tables or datasets without any run are left out."""
    published = published if published is not None else PUBLISHED
    tables: dict[str, Any] = {}
    for spec in TABLES:
        datasets = {}
        for dataset in spec.datasets:
            runs = {r.name: found.get((r.table, dataset, r.method), Runs()) for r in spec.rows}
            if not any(x.results for x in runs.values()):
                continue
            pub = published.get(spec.key, {}).get(dataset, {})
            rows = {}
            for r in spec.rows:
                ordered = runs[r.name].ordered()
                rows[r.name] = {
                    "source": f"{r.table}/{dataset}/{r.method}",
                    "seeds": sorted(runs[r.name].results, key=_natural),
                    "summary": summarize_runs(ordered) if ordered else None,
                    "published": (pub.get("rows") or {}).get(r.name),
                }
            ttests = []
            for c in spec.comparisons:
                entry: dict[str, Any] = {"a": c.a, "b": c.b, "published": pub.get("ttest")}
                a, b = runs[c.a].ordered(), runs[c.b].ordered()
                if a and b:
                    entry.update(averaged_ttest(a, b, c.direction))
                else:
                    entry.update(
                        direction=c.direction, metric=METRIC, missing=[n for n, x in ((c.a, a), (c.b, b)) if not x]
                    )
                ttests.append(entry)
            datasets[dataset] = {"rows": rows, "ttests": ttests}
        if datasets:
            tables[spec.key] = {"title": spec.title, "directions": list(spec.directions), "datasets": datasets}
    used = {(r.table, d, r.method) for s in TABLES for d in s.datasets for r in s.rows}
    unused = sorted("/".join(k) for k in found if k not in used)
    return {
        "layout": LAYOUT,
        "units": "fractions",
        "metrics": list(SELECTION_METRICS),
        "tables": tables,
        "unused": unused,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Output


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def format_markdown(data: Mapping[str, Any]) -> str:
    """The tables in the paper's layout (values in %), the t-tests, and the published values with the difference."""
    lines: list[str] = []
    for table in data["tables"].values():
        directions = table["directions"]
        for dataset, block in table["datasets"].items():
            lines += [f"## {table['title']} ({DATASET_TITLES.get(dataset, dataset)})", ""]
            header = ["Method", "runs"] + [f"{d} {m}" for d in directions for m in SELECTION_METRICS]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for name, row in block["rows"].items():
                summary, pub = row["summary"], row["published"]
                if summary is None:
                    cells = ["no runs"] + ["—"] * (len(header) - 2)
                else:
                    n = len(row["seeds"])
                    cells = [str(n)] + [
                        _pct(s["mean"]) + (f" ± {_pct(s['sd'])}" if n > 1 else "")
                        for d in directions
                        for s in (summary[d][m] for m in SELECTION_METRICS)
                    ]
                lines.append("| " + " | ".join([name, *cells]) + " |")
                if pub:
                    values = [(pub.get(d) or {}).get(m) for d in directions for m in SELECTION_METRICS]
                    lines.append(
                        "| "
                        + " | ".join([f"{name} (paper)", ""] + ["—" if v is None else f"{v:.2f}" for v in values])
                        + " |"
                    )
                    if summary is not None:
                        ours = [100 * summary[d][m]["mean"] for d in directions for m in SELECTION_METRICS]
                        diffs = ["—" if v is None else f"{o - v:+.2f}" for o, v in zip(ours, values)]
                        lines.append("| " + " | ".join([f"{name} (ours − paper)", ""] + diffs) + " |")
            lines.append("")
            for test in block["ttests"]:
                lines.append(_format_ttest(test))
            lines.append("")
    lines.append(
        "Values in %, mean ± sd (sample sd) over seeds. R@k: relevant items in the top k / relevant items (DCASE). "
        f"t-tests: per text query, {METRIC} averaged over each method's runs, then a paired t-test over the queries "
        "(scipy.stats.ttest_rel), df = queries - 1, as in the paper. Published values appear only where we have "
        "them: the paper's t(df) values are built in; the tables' published values are not (pass --published FILE)."
    )
    if data["unused"]:
        lines.append("")
        lines.append("Results in no table: " + ", ".join(data["unused"]) + ".")
    return "\n".join(lines)


def _format_ttest(test: Mapping[str, Any]) -> str:
    what = f"{DIRECTION_TITLES[test['direction']]} {test['metric']}"
    pub = test.get("published")
    paper = (
        f" Paper: t({pub['df']}) = {pub['t']:.3f}" + (f", p = {pub['p']:.3g}" if "p" in pub else "") + "."
        if pub
        else ""
    )
    if "missing" in test:
        return f"- {test['a']} vs {test['b']} ({what}): not computed, no runs of {', '.join(test['missing'])}.{paper}"
    return (
        f"- {test['a']} vs {test['b']} ({what} per query, averaged over {test['runs_a']} and {test['runs_b']} runs): "
        f"t({test['df']}) = {test['t']:.3f}, p = {test['p']:.3g}; mean {test['mean_a']:.4f} vs {test['mean_b']:.4f}."
        f"{paper}"
    )


def plot(data: Mapping[str, Any], path: Path) -> None:
    """One panel per table and dataset: text-to-audio mAP@10 per method, mean with sd as error bars (published as x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, d, block) for t, table in data["tables"].items() for d, block in table["datasets"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.6), squeeze=False)
    for ax, (table, dataset, block) in zip(axes[0], panels):
        names = list(block["rows"])
        rows = [block["rows"][n] for n in names]
        means = [100 * r["summary"]["t2a"]["mAP@10"]["mean"] if r["summary"] else 0.0 for r in rows]
        sds = [100 * r["summary"]["t2a"]["mAP@10"]["sd"] if r["summary"] else 0.0 for r in rows]
        x = np.arange(len(names))
        ax.bar(x, means, yerr=sds, capsize=3, color="#4c72b0")
        for i, r in enumerate(rows):
            value = ((r["published"] or {}).get("t2a") or {}).get("mAP@10")
            if value is not None:
                ax.plot(i, value, "kx", markersize=8)
            if r["summary"] is None:
                ax.text(i, 0, "no runs", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{table} / {DATASET_TITLES.get(dataset, dataset)}", fontsize=9)
        ax.set_ylabel("text-to-audio mAP@10 (%)")
    published = any(r["published"] for _, _, block in panels for r in block["rows"].values())
    fig.suptitle("Mean ± sd over seeds" + (" (x: published)" if published else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m relret paper-tables --results DIR [DIR ...] --out DIR`."""
    from relret.run_dir import atomic_output_dir, check_output_dir

    parser = argparse.ArgumentParser(prog="python -m relret paper-tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="+", required=True, help=f"directories laid out as {LAYOUT}")
    parser.add_argument("--out", required=True, help="directory for paper_tables.md, .json and .png")
    parser.add_argument("--published", default=None, help="YAML/JSON of the paper's values (layout: read_published)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        check_output_dir(out, (out / "paper_tables.json").is_file(), "paper tables", args.overwrite)
        data = build_tables(find_results(args.results), read_published(args.published))
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"paper-tables: {exc}", file=sys.stderr)
        return 2
    text = format_markdown(data)
    with atomic_output_dir(out) as tmp:
        (tmp / "paper_tables.md").write_text(text + "\n", encoding="utf-8")
        (tmp / "paper_tables.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        plot(data, tmp / "paper_tables.png")
    print(text)
    print(f"\nwrote {out}/paper_tables.md, paper_tables.json, paper_tables.png")
    return 0
