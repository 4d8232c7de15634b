"""`python -m relret evaluate`: retrieval metrics of a trained model on evaluation shards.

    python -m relret evaluate --model runs/finetune_clotho --shards shards/clotho/evaluation --out runs/eval/clotho
    torchrun --nproc-per-node 8 -m relret evaluate ...   # or srun: embeddings computed on all ranks

Every clip of the shards is embedded once and every caption once, in batches, split over ranks and DataLoader
workers (the reader training validation uses, so the two agree). Text-to-audio: each caption queries the clips;
audio-to-text: each clip queries the captions. Writes OUT/eval.json (metrics and per-query values, see
`relret.results.EvalResult`), OUT/metrics.md and, with --dcase, OUT/dcase_submission.csv
(`caption,file_name_1,...,file_name_10`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from relret import distributed


@dataclasses.dataclass
class Collection:
    """Unit-norm embeddings of every clip and caption of a shard set, gathered from all ranks (rank order)."""

    audio: torch.Tensor
    """[N, E] one per clip."""
    clip_ids: torch.Tensor
    """[N] (CPU)."""
    text: torch.Tensor
    """[M, E] one per caption."""
    text_clip_ids: torch.Tensor
    """[M] the clip each caption belongs to (CPU)."""
    text_caption_index: list[int]
    """[M] position of each caption among its clip's captions."""
    captions: list[str]
    """[M] caption texts (only when embedded `with_names`, else empty)."""
    source_files: list[str]
    """[N] source file names (only `with_names`)."""


def _gather_objects(items: list) -> list:
    if distributed.get_world_size() == 1:
        return items
    parts: list[list] = [[] for _ in range(distributed.get_world_size())]
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


@torch.no_grad()
def embed_collection(
    model,
    shard_sets: Sequence,
    data_cfg,
    device: torch.device,
    bf16: bool = False,
    with_names: bool = False,
) -> Collection:
    """Embed every clip and caption of `shard_sets` (relret.data.ShardSet) once across all ranks and workers."""
    from relret.data import ValStream, make_loader

    rank, world = distributed.get_rank(), distributed.get_world_size()
    audio, clip_ids, text, text_ids, caption_index, captions, sources = [], [], [], [], [], [], []
    with (
        make_loader(ValStream(shard_sets, data_cfg, rank, world), data_cfg) as loader,
        torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16),
    ):
        for batch in loader:
            audio.append(model.encode_audio(batch.to(device).audio, batch.audio_len.to(device), normalize=True))
            clip_ids.append(batch.clip_ids)
            batch_captions = [c for caps in batch.all_captions for c in caps]
            text.append(model.encode_text(batch_captions, normalize=True))
            for clip_id, caps in zip(batch.clip_ids.tolist(), batch.all_captions):
                text_ids.extend([clip_id] * len(caps))
                caption_index.extend(range(len(caps)))
            if with_names:
                captions.extend(batch_captions)
                sources.extend(batch.source_files)
    dim = model.cfg.embed_dim
    local_audio = torch.cat(audio).float() if audio else torch.zeros(0, dim, device=device)
    local_text = torch.cat(text).float() if text else torch.zeros(0, dim, device=device)
    local_ids = torch.cat(clip_ids) if clip_ids else torch.zeros(0, dtype=torch.long)
    gathered_ids = distributed.all_gather_cat(local_ids.to(device), with_grad=False).cpu()
    gathered_text_ids = distributed.all_gather_cat(torch.tensor(text_ids, dtype=torch.long, device=device), False)
    return Collection(
        audio=distributed.all_gather_cat(local_audio, with_grad=False),
        clip_ids=gathered_ids,
        text=distributed.all_gather_cat(local_text, with_grad=False),
        text_clip_ids=gathered_text_ids.cpu(),
        text_caption_index=_gather_objects(caption_index),
        captions=_gather_objects(captions) if with_names else [],
        source_files=_gather_objects(sources) if with_names else [],
    )


def evaluate_collection(
    collection: Collection, info: dict | None = None, what: str = "evaluation", merge_identical: bool = False
):
    """The EvalResult of a collection (both directions, per-query values); `what` names the set in errors;
    `merge_identical` makes identical caption texts one text-to-audio query (the collection needs its captions)."""
    from relret.results import evaluate_embeddings

    if collection.audio.shape[0] == 0:
        raise RuntimeError(f"the {what} shards gave no readable clip")
    return evaluate_embeddings(
        collection.audio,
        collection.clip_ids,
        collection.text,
        collection.text_clip_ids,
        collection.text_caption_index,
        info,
        merge_captions=collection.captions if merge_identical else None,
    )


def coverage(sets: Sequence, n_clips: int) -> dict:
    """How many of the clips the split's metadata lists were evaluated, from the shard manifests: the official test
    set minus the clips whose audio was missing (AudioCaps' YouTube clips that are gone), unreadable, or excluded by a
    blacklist when the shards were built. `listed` is None for shards whose manifest does not record it (built by
    hand or by an older shard job)."""
    listed = missing = unreadable = excluded = 0
    known = True
    for shard_set in sets:
        config = shard_set.manifest.config
        if "clips_total" not in config:
            known = False
            continue
        listed += int(config["clips_total"])
        missing += int(config.get("skipped_missing_audio", 0))
        # the shard job's skipped_bad_input counts the missing audio too
        unreadable += int(config.get("skipped_bad_input", 0)) - int(config.get("skipped_missing_audio", 0))
        excluded += int(config.get("blacklisted", 0))
    return {
        "listed": listed if known else None,
        "evaluated": n_clips,
        "missing_audio": missing,
        "unreadable": unreadable,
        "excluded": excluded,
    }


def coverage_line(cov: dict) -> str:
    """One line for the report, e.g. "evaluated 4,871 of the 4,875 clips the metadata lists (4 missing audio)"."""
    if cov["listed"] is None:
        return f"evaluated {cov['evaluated']:,} clips (the shards' manifests do not record how many the metadata lists)"
    reasons = [
        f"{cov[key]:,} {label}"
        for key, label in (("missing_audio", "missing audio"), ("unreadable", "unreadable"), ("excluded", "excluded"))
        if cov[key]
    ]
    line = f"evaluated {cov['evaluated']:,} of the {cov['listed']:,} clips the metadata lists"
    return line + (f" ({', '.join(reasons)})" if reasons else " (all of them)")


def _is_previous_evaluation(out: Path) -> bool:
    try:
        if (out / "zeroshot.json").is_file():
            return "top1_acc" in json.loads((out / "zeroshot.json").read_text(encoding="utf-8"))
        return "per_query" in json.loads((out / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _zero_shot(args: argparse.Namespace, out: Path) -> int:
    """Zero-shot classification of a labelled folder (relret.zeroshot): top-1/top-5 accuracy and per-class mAP."""
    from relret.audio import BadAudio
    from relret.retrieval import RetrievalModel
    from relret.run_dir import atomic_output_dir
    from relret.zeroshot import (
        DEFAULT_TEMPLATES,
        class_text_embeddings,
        format_zero_shot,
        read_labels,
        zero_shot_metrics,
    )

    templates = args.template or list(DEFAULT_TEMPLATES)
    try:
        if any("{class}" not in t for t in templates):
            raise ValueError(f"--template must contain {{class}}, got {templates}")
        files = read_labels(args.labels, args.audio_dir)
        model = RetrievalModel.load(args.model)
        audio = model.encode_audio_files(files.paths, args.max_duration_s, args.batch_size)
    except (ValueError, FileNotFoundError, BadAudio) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    classes = class_text_embeddings(files.class_names, model.encode_text, templates)
    metrics = zero_shot_metrics(audio, files.labels, classes, files.class_names)
    metrics.update(
        model=model.source, labels=str(args.labels), templates=templates, missing_files=files.missing,
        csv_rows=files.rows,
    )  # fmt: skip
    line = format_zero_shot(metrics, title=args.name or "zero-shot")
    if files.missing:
        line += f" ({len(files.missing)} of {files.rows} listed files missing, skipped)"
    with atomic_output_dir(out) as tmp:
        (tmp / "zeroshot.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        (tmp / "zeroshot.md").write_text(line + "\n", encoding="utf-8")
    print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relret evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory, checkpoint directory or exported model")
    parser.add_argument("--shards", nargs="+", default=None, help="evaluation shard directories (local or s3://)")
    parser.add_argument(
        "--labels",
        default=None,
        help="zero-shot classification instead of retrieval: a CSV of file name -> class (ESC-50's meta/esc50.csv, "
        "UrbanSound8K's metadata/UrbanSound8K.csv, or file_name,class), with --audio-dir",
    )
    parser.add_argument("--audio-dir", default=None, help="the labelled clips' folder (with --labels)")
    parser.add_argument(
        "--template",
        action="append",
        default=None,
        help='caption template of a class (repeat to average several; default "the sound of a {class}")',
    )
    parser.add_argument("--out", required=True, help="output directory for eval.json, metrics.md, the DCASE file")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out directory")
    parser.add_argument("--max-duration-s", type=float, default=30.0, help="clips are cut to their first N seconds")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per batch and rank")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--dcase", action="store_true", help="also write dcase_submission.csv (text-to-audio top 10)")
    parser.add_argument("--name", default=None, help="label of this result in tables (default: the model path)")
    parser.add_argument(
        "--merge-identical-captions",
        action="store_true",
        help="text-to-audio: identical caption texts are one query whose relevant clips are all the clips they caption "
        "(default: each caption is a query with its own clip only, the DCASE convention)",
    )
    parser.add_argument(
        "--ratings",
        default=None,
        help="graded relevance: a directory of crowdsourced ratings ({split}_relevances_joined.csv, the layout of "
        "../shared/data/relevance_ratings); adds nDCG@k and Spearman/Kendall correlations against the ratings",
    )
    parser.add_argument(
        "--ratings-split",
        default=None,
        help="the ratings split these shards hold (e.g. evaluation); default: every split in --ratings",
    )
    parser.add_argument(
        "--ratings-sbert",
        default=None,
        help="Sentence-BERT model (name or path) to also score the training target g = 1/(1+exp(a-bh)) against "
        "the ratings; default: the model only",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from relret.data import eval_data_config, open_eval_shards
    from relret.results import dcase_submission_rows, format_table2
    from relret.retrieval import RetrievalModel
    from relret.run_dir import atomic_output_dir, check_output_dir

    out = Path(args.out)
    ratings = None
    try:
        if (args.shards is None) == (args.labels is None):
            raise ValueError("give either --shards (retrieval) or --labels with --audio-dir (zero-shot)")
        if args.labels is not None and args.audio_dir is None:
            raise ValueError("--labels needs --audio-dir, the folder of the labelled clips")
        if args.ratings is not None:
            ratings = _read_ratings(args.ratings, args.ratings_split)
        if args.batch_size < 1 or args.workers < 0 or not args.max_duration_s > 0:
            raise ValueError("--batch-size must be >= 1, --workers >= 0 and --max-duration-s > 0")
        check_output_dir(out, _is_previous_evaluation(out), "evaluation", args.overwrite)
    except ValueError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    if args.labels is not None:
        return _zero_shot(args, out)
    info = distributed.init_distributed()
    try:
        try:
            sets = open_eval_shards(args.shards)
            model = RetrievalModel.load(args.model)
        except (ValueError, FileNotFoundError) as exc:
            print(f"evaluate: {exc}", file=sys.stderr)
            return 2
        data_cfg = eval_data_config(sets, args.max_duration_s, args.batch_size, args.workers)
        bf16 = model.device.type == "cuda" and torch.cuda.is_bf16_supported()
        collection = embed_collection(model.model, sets, data_cfg, model.device, bf16, with_names=True)
        result = evaluate_collection(
            collection,
            {
                "model": model.source,
                "name": args.name or str(args.model),
                "shards": list(args.shards),
                "max_duration_s": args.max_duration_s,
                "coverage": coverage(sets, int(collection.audio.shape[0])),
            },
            merge_identical=args.merge_identical_captions,
        )
        graded = None
        if ratings is not None and info.is_main:
            try:
                graded = _graded(model, collection, ratings, args.ratings_sbert)
            except ValueError as exc:
                print(f"evaluate: --ratings: {exc}", file=sys.stderr)
                return 2
        if info.is_main:
            table = format_table2({args.name or Path(args.model).name: [result]})
            line = coverage_line(result.info["coverage"])
            table += f"\n\n{line[0].upper()}{line[1:]}."
            with atomic_output_dir(out) as tmp:
                (tmp / "eval.json").write_text(result.to_json(), encoding="utf-8")
                (tmp / "metrics.md").write_text(table + "\n", encoding="utf-8")
                if graded is not None:
                    (tmp / "graded.json").write_text(json.dumps(graded.to_dict(), indent=2) + "\n", encoding="utf-8")
                    (tmp / "graded.md").write_text(_graded_markdown(graded), encoding="utf-8")
                if args.dcase:
                    rows = dcase_submission_rows(
                        collection.text.cpu().numpy(),
                        collection.captions,
                        collection.audio.cpu().numpy(),
                        collection.source_files,
                    )
                    _write_csv(
                        tmp / "dcase_submission.csv", ["caption"] + [f"file_name_{i}" for i in range(1, 11)], rows
                    )
            print(table)
            if graded is not None:
                print(_graded_markdown(graded))
            print(f"wrote {out}/eval.json ({result.info['n_clips']} clips, {result.info['n_captions']} captions)")
            print(line)
        return 0
    finally:
        distributed.cleanup_distributed()


def _read_ratings(directory: str, split: str | None) -> list:
    from relret.graded import read_ratings_dir

    ratings = read_ratings_dir(directory)
    if split is not None:
        splits = sorted({q.split for q in ratings})
        ratings = [q for q in ratings if q.split == split]
        if not ratings:
            raise ValueError(f"--ratings-split {split!r}: {directory} holds the splits {', '.join(splits)}")
    return ratings


def _graded(model, collection: Collection, ratings: list, sbert: str | None):
    """The model's cosine (and the target g's, with `sbert`) against the ratings over the evaluated clips."""
    from relret.graded import graded_metrics, target_similarity

    splits = sorted({q.split for q in ratings})
    if len(splits) > 1:
        raise ValueError(
            f"the ratings hold the splits {', '.join(splits)} but one set of clips was evaluated (Clotho reuses file "
            "names across splits): pass --ratings-split with the split of --shards"
        )
    query_emb = model.encode_text([q.query_text for q in ratings])
    clips = (collection.source_files, collection.audio.cpu().numpy())
    target_h = None
    if sbert is not None:
        from relret.sbert import load_sbert

        encoder = load_sbert(sbert, device="cpu")
        captions: dict[str, list[str]] = {}
        names = dict(zip(collection.clip_ids.tolist(), collection.source_files))
        for clip_id, caption in zip(collection.text_clip_ids.tolist(), collection.captions):
            captions.setdefault(names[clip_id], []).append(caption)
        target_h, _ = target_similarity(
            ratings, captions, lambda texts: encoder.encode(list(texts), convert_to_numpy=True, batch_size=64)
        )
    return graded_metrics(query_emb, clips, ratings, target_h=target_h)


def _graded_markdown(report) -> str:
    from relret.graded import format_graded

    return "## Graded relevance against the human ratings\n\n" + format_graded(report) + "\n"


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
