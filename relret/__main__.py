"""`python -m relret <command> ...`: the user-facing commands. Each lives in its own module with a `main(argv)`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sbert": ("relret.sbert:main", "install, locate and list Sentence-BERT models (`sbert install all-mpnet-base-v2`)"),
    "calibrate": ("relret.calibrate:main", "fit the relevance function's constants to crowdsourced ratings"),
    "relevance-stats": ("relret.target_stats:main", "how much ListNet's graded targets carry per global batch size"),
    "evaluate": ("relret.evaluate:main", "mAP@10, R@k, hit@k of a model on evaluation shards (both directions)"),
    "table": ("relret.results:main_table", "Table II of several methods' evaluations, mean ± sd over seeds"),
    "compare": ("relret.results:main_compare", "paired t-test of two evaluations on per-query AP@10"),
    "paper-tables": ("relret.paper:main", "Tables II and III and the relevance ablation from a results tree, t-tests"),
    "index": ("relret.index:main_index", "a faiss index of a collection's audio embeddings"),
    "search": ("relret.index:main_search", "text queries against an index"),
    "export": ("relret.retrieval:main_export", "a self-contained model directory for RetrievalModel.from_pretrained"),
    "demo": ("relret.demo:main", "the embedded run on this machine (what `make demo` calls)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        usage = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: python -m relret <command> [args]\n\ncommands:\n{usage}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module_name, _, function = COMMANDS[argv[0]][0].partition(":")
    return getattr(importlib.import_module(module_name), function)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
