"""`python -m relret relevance-stats`: how much ListNet's graded targets carry at each global batch size (issue #17).

ListNet's target for a caption is p = softmax(g / omega) over the clips of the global batch, g = f(h) the relevance
of each clip (Xie et al., eq. 1-2). With omega = 0.05 and the paper's logistic f, the caption's own clip (h = 1)
outweighs every other clip by exp((g(1) - g(h)) / omega), so in a small batch p is nearly one-hot and ListNet
nearly InfoNCE; the graded part grows with the number of other clips. This measures it from a shard directory:

    python -m relret relevance-stats --shards shards/clotho/development --batch-sizes 32,256,1024,2048

`target_diagnostics` defines the three numbers (mass on the own clip, entropy, largest other-clip probability) and
the command averages it over batches of the drawn clips. Training logs the same three numbers per step for the
targets its loss computes (relret.losses reports them); tests/integration/test_target_diagnostics.py checks that a
logged step equals `batch_target_stats` on that step's batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tarfile
from collections.abc import Sequence

import numpy as np
import torch

from relret import shard_format, storage
from relret.config import RELEVANCE_FNS, RelevanceConfig
from relret.relevance import apply_relevance, as_tensor, caption_similarity

DEFAULT_BATCH_SIZES = (32, 256, 1024, 2048)
DEFAULT_CLIPS = 2048
OWN_MASS = "target_own_mass"
ENTROPY = "target_entropy"
MAX_OTHER = "target_max_other"


# ---------------------------------------------------------------------------------------------------------------------
# The diagnostic (per step in training, per batch here)


def target_diagnostics(targets: torch.Tensor, own: torch.Tensor) -> dict[str, torch.Tensor]:
    """Means over rows of three properties of target distributions `targets` [R, N] (rows sum to 1):

    - `target_own_mass`: the probability on the row's own clip, column `own[r]` (`own` [R] integers in [0, N));
    - `target_entropy`: -sum_j p_j ln p_j, in nats (0 ln 0 = 0);
    - `target_max_other`: the largest probability on any other column (0 when N = 1).

    Returns 0-dim detached tensors on `targets`' device and dtype. Nothing is gathered across ranks and nothing is
    synchronised with the host, so a trainer can fold the values into its per-step all-reduce; with equal row counts
    per rank the mean of the ranks' values is the value on the whole global batch.
    """
    if targets.dim() != 2:
        raise ValueError(f"targets must be [R, N], got shape {tuple(targets.shape)}")
    own = torch.as_tensor(own, device=targets.device)
    if own.shape != targets.shape[:1] or own.is_floating_point() or own.dtype == torch.bool:
        raise ValueError(
            f"own must be [R]={targets.shape[0]} integer column indices, got {own.dtype} {tuple(own.shape)}"
        )
    p = targets.detach()
    # A mask rather than advanced indexing: no gather, and no copy of p with the own column overwritten.
    is_own = torch.arange(p.shape[1], device=p.device) == own[:, None]  # [R, N]
    return {
        OWN_MASS: torch.where(is_own, p, torch.zeros_like(p)).sum(dim=1).mean(),
        ENTROPY: torch.special.entr(p).sum(dim=1).mean(),
        MAX_OTHER: p.masked_fill(is_own, 0.0).amax(dim=1).mean(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Targets over batches of clips


def listnet_targets(sbert: torch.Tensor | np.ndarray, omega: float, relevance: RelevanceConfig) -> torch.Tensor:
    """ListNet's text-to-audio targets [B, B] of one batch of B distinct clips, `sbert` [B, D] one caption per clip
    (row i: caption i; column j: clip j, whose paired caption is caption j): softmax(f(h) / omega) per row, with
    `relevance` resolved (a calibration file already read)."""
    s = as_tensor(sbert, "sbert", 2)
    h = caption_similarity(s, s, "paired")
    positives = torch.eye(s.shape[0], dtype=torch.bool) if relevance.fn == "binary" else None
    return torch.softmax(apply_relevance(h, relevance, positives) / omega, dim=1)


@dataclasses.dataclass(frozen=True)
class BatchTargetStats:
    """`target_diagnostics` at one global batch size, averaged over the batches the clips make."""

    global_batch_size: int
    own_mass: float
    """Mean target probability on the caption's own clip."""
    entropy_nats: float
    """Mean target entropy."""
    max_other: float
    """Mean over captions of the largest target probability on another clip."""
    batches: int
    """Consecutive batches the clips were cut into."""
    clips_dropped: int
    """Clips of the incomplete tail batch, left out."""


def batch_target_stats(
    sbert: torch.Tensor | np.ndarray,
    batch_sizes: Sequence[int],
    omega: float = 0.05,
    relevance: RelevanceConfig | None = None,
) -> list[BatchTargetStats]:
    """One row per global batch size: `sbert` [M, D] (one caption per clip, M distinct clips, in the order drawn) cut
    into consecutive batches of that size, the incomplete tail dropped; each batch's `listnet_targets` go through
    `target_diagnostics` (own clip: the diagonal), and the batches' values are averaged (they weigh alike)."""
    relevance = (relevance or RelevanceConfig()).resolved()
    if relevance.aggregate != "paired":
        raise ValueError(
            f"relevance.aggregate={relevance.aggregate!r}: these statistics take one caption per clip (the paired "
            "aggregate, as in the paper)"
        )
    if not omega > 0:
        raise ValueError(f"omega must be > 0, got {omega}")
    vectors = as_tensor(sbert, "sbert", 2)
    n_clips = vectors.shape[0]
    bad = [b for b in batch_sizes if not (isinstance(b, (int, np.integer)) and 0 < b <= n_clips)]
    if bad:
        raise ValueError(
            f"batch size(s) {', '.join(map(str, bad))} outside [1, {n_clips}]: a batch needs that many distinct clips "
            f"and {n_clips} were drawn; draw more clips or use smaller batch sizes"
        )
    rows = []
    for batch_size in batch_sizes:
        n_batches = n_clips // batch_size
        sums = {OWN_MASS: 0.0, ENTROPY: 0.0, MAX_OTHER: 0.0}
        own = torch.arange(batch_size)
        for start in range(0, n_batches * batch_size, batch_size):
            diag = target_diagnostics(listnet_targets(vectors[start : start + batch_size], omega, relevance), own)
            for key in sums:
                sums[key] += float(diag[key])
        rows.append(
            BatchTargetStats(
                global_batch_size=int(batch_size),
                own_mass=sums[OWN_MASS] / n_batches,
                entropy_nats=sums[ENTROPY] / n_batches,
                max_other=sums[MAX_OTHER] / n_batches,
                batches=n_batches,
                clips_dropped=n_clips - n_batches * batch_size,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Caption vectors from shards


@dataclasses.dataclass
class CaptionVectors:
    """Every caption's Sentence-BERT vector of each clip in some shard directories, in manifest and member order."""

    keys: list[str]
    """Sample key of each clip."""
    vectors: list[np.ndarray]
    """float16 [n_captions, D] per clip, as stored."""
    sbert_model: str
    sbert_dim: int


def _shard_members(url: str) -> tuple[tarfile.TarFile, object | None]:
    """The shard open as a tar: a local one seekably (the audio members are skipped, never read), an S3 one as a
    stream. Returns the TarFile and the stream to close after it (None when tarfile owns the file)."""
    if storage.is_s3(url):
        stream = storage.open_read(url)
        return tarfile.open(fileobj=stream, mode="r|"), stream
    return tarfile.open(url, mode="r:"), None


def read_caption_vectors(directories: Sequence[str]) -> CaptionVectors:
    """The `json` and `sbert.npy` members of every sample in the shard directories (no audio is decoded); a clip
    found twice, a sample missing a member, or a shard whose sample count differs from its manifest is refused."""
    from relret.data import open_shard_dir  # the data pipeline's imports stay out of the loss's (target_diagnostics)

    keys: list[str] = []
    vectors: list[np.ndarray] = []
    where: dict[str, str] = {}
    model, dim = None, None
    for directory in directories:
        shard_set = open_shard_dir(directory, None, what="--shards")
        manifest = shard_set.manifest
        if model is not None and (manifest.sbert_model, manifest.sbert_dim) != (model, dim):
            raise ValueError(
                f"{directory} holds {manifest.sbert_model} vectors ({manifest.sbert_dim}-d) but an earlier directory "
                f"holds {model} ({dim}-d); similarities between two models' vectors mean nothing"
            )
        model, dim = manifest.sbert_model, manifest.sbert_dim
        for url, expected in zip(shard_set.urls, shard_set.samples):
            members: dict[str, dict[str, bytes]] = {}
            try:
                tar, stream = _shard_members(url)
                try:
                    for info in tar:
                        key, _, ext = info.name.rpartition("/")[2].partition(".")
                        if info.isfile() and ext in (shard_format.META_EXT, shard_format.SBERT_EXT):
                            members.setdefault(key, {})[ext] = tar.extractfile(info).read()
                finally:
                    tar.close()
                    if stream is not None:
                        stream.close()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ValueError(f"shard {url} cannot be read ({exc}); rebuild it") from None
            if len(members) != expected:
                raise ValueError(
                    f"shard {url} holds {len(members)} samples but its manifest lists {expected}; rebuild the shard"
                )
            for key, raw in members.items():
                missing = [m for m in (shard_format.META_EXT, shard_format.SBERT_EXT) if m not in raw]
                if missing:
                    raise ValueError(f"sample {key} in {url} lacks member(s) {', '.join(missing)}")
                try:
                    meta = shard_format.SampleMeta(**json.loads(raw[shard_format.META_EXT]))
                    sbert = shard_format.decode_npy(raw[shard_format.SBERT_EXT])
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"sample {key} in {url} cannot be decoded ({exc}); rebuild the shard") from None
                if sbert.ndim != 2 or sbert.shape != (len(meta.captions), dim):
                    raise ValueError(
                        f"sample {key} in {url}: sbert.npy is {sbert.shape} for {len(meta.captions)} captions of "
                        f"dimension {dim} (the manifest's)"
                    )
                if key in where:
                    raise ValueError(f"clip {key} is in {where[key]} and in {url}: pass each shard directory once")
                where[key] = url
                keys.append(key)
                vectors.append(sbert)
    return CaptionVectors(keys, vectors, model, dim)


def draw_captions(vectors: Sequence[np.ndarray], n_clips: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n_clips` distinct clips at random, in random order, one random caption each (seeded).

    Returns the vectors [n_clips, D] (dtype as stored), the clip indices [n_clips] into `vectors` and the caption
    index [n_clips] within each clip."""
    if not 0 < n_clips <= len(vectors):
        raise ValueError(f"--clips {n_clips}: the shards hold {len(vectors)} clips; draw between 1 and {len(vectors)}")
    rng = np.random.default_rng(seed)
    clips = rng.permutation(len(vectors))[:n_clips]
    captions = np.array([rng.integers(len(vectors[c])) for c in clips], dtype=np.int64)
    return np.stack([vectors[c][k] for c, k in zip(clips, captions)]), clips, captions


# ---------------------------------------------------------------------------------------------------------------------
# Command


def format_table(rows: Sequence[BatchTargetStats]) -> str:
    """The markdown table of issue #17."""
    lines = [
        "| global batch | ListNet target mass on the caption's own clip | target entropy (nats) "
        "| largest other-clip probability | batches |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.global_batch_size} | {r.own_mass:.3f} | {r.entropy_nats:.3f} | {r.max_other:.3f} | {r.batches} |"
        )
    return "\n".join(lines)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes {text!r}: expected comma-separated integers, e.g. 32,256,1024") from None
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"--batch-sizes {text!r}: expected positive integers, e.g. 32,256,1024")
    return sizes


def run(args: argparse.Namespace) -> dict:
    """What `main` prints and writes, as a JSON-able dict."""
    batch_sizes = _batch_sizes(args.batch_sizes)
    if args.calibration is not None and (args.a is not None or args.b is not None):
        raise ValueError("--calibration sets a and b: pass either it or --a/--b")
    defaults = RelevanceConfig()
    relevance = RelevanceConfig(
        fn=args.relevance_fn,
        a=defaults.a if args.a is None else args.a,
        b=defaults.b if args.b is None else args.b,
        calibration=args.calibration,
    ).resolved()
    if not args.omega > 0:
        raise ValueError(f"--omega must be > 0, got {args.omega}")
    found = read_caption_vectors(args.shards)
    n_clips = min(DEFAULT_CLIPS, len(found.vectors)) if args.clips is None else args.clips
    too_large = [b for b in batch_sizes if b > n_clips]
    if too_large:
        raise ValueError(
            f"batch size(s) {', '.join(map(str, too_large))} exceed the {n_clips} clips drawn (the shards hold "
            f"{len(found.vectors)}): a global batch needs that many distinct clips; pass smaller --batch-sizes "
            "or shard directories with more clips"
        )
    sbert, _, _ = draw_captions(found.vectors, n_clips, args.seed)
    rows = batch_target_stats(sbert, batch_sizes, args.omega, relevance)
    return {
        "shards": list(args.shards),
        "clips_in_shards": len(found.vectors),
        "clips_drawn": n_clips,
        "seed": args.seed,
        "sbert_model": found.sbert_model,
        "sbert_dim": found.sbert_dim,
        "omega": args.omega,
        "relevance": dataclasses.asdict(relevance),
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def format_report(result: dict) -> str:
    rel = result["relevance"]
    fn = rel["fn"] if rel["fn"] == "binary" else f"{rel['fn']} (a={rel['a']:g}, b={rel['b']:g})"
    rows = [BatchTargetStats(**r) for r in result["rows"]]
    lines = [
        f"{result['clips_drawn']} of {result['clips_in_shards']} clips drawn (seed {result['seed']}), one random "
        f"caption each; {result['sbert_model']} vectors ({result['sbert_dim']}-d); relevance {fn}, paired; "
        f"omega {result['omega']:g}",
        "",
        format_table(rows),
    ]
    dropped = [r for r in rows if r.clips_dropped]
    if dropped:
        lines.append("")
        lines += [
            f"batch {r.global_batch_size}: the incomplete last batch ({r.clips_dropped} clips) is left out"
            for r in dropped
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relret relevance-stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", nargs="+", required=True, metavar="DIR", help="shard directories (local or s3://)")
    parser.add_argument(
        "--batch-sizes",
        default=",".join(map(str, DEFAULT_BATCH_SIZES)),
        help="comma-separated global batch sizes (default: %(default)s)",
    )
    parser.add_argument("--omega", type=float, default=0.05, help="temperature of softmax(g / omega)")
    parser.add_argument("--relevance-fn", default=RelevanceConfig.fn, choices=RELEVANCE_FNS.names())
    parser.add_argument("--a", type=float, default=None, help=f"logistic offset (default {RelevanceConfig.a})")
    parser.add_argument("--b", type=float, default=None, help=f"logistic slope (default {RelevanceConfig.b})")
    parser.add_argument("--calibration", default=None, metavar="YAML", help="a and b from `relret calibrate`")
    parser.add_argument(
        "--clips", type=int, default=None, help=f"clips to draw (default {DEFAULT_CLIPS}, or all when fewer)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the clips, their order and their captions")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    try:
        result = run(args)
        print(format_report(result))
        if args.json:
            storage.write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
            print(f"wrote {args.json}")
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        print(f"relevance-stats: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
