"""relret: text-based audio retrieval trained from similarities between audio captions (Xie et al.)."""

from relret import compat as _compat

_compat.install()  # the torchvision/torchaudio check runs when either is first looked for

__version__ = "0.1.0"


def __getattr__(name: str):
    # `relret.RetrievalModel` without importing torch models on every `import relret`.
    if name == "RetrievalModel":
        from relret.retrieval import RetrievalModel

        return RetrievalModel
    raise AttributeError(f"module 'relret' has no attribute {name!r}")
