"""Make transformers, sentence-transformers and timm importable next to a CPU-only torch.

PyPI's torchvision and torchaudio are CUDA builds. Beside the CPU torch wheel their native libraries fail to load
(`operator torchvision::nms does not exist`, `libc10_cuda.so` missing), and transformers, sentence-transformers and
timm then fail to import because they import both whenever installed. relret never uses either library's native
ops (audio is decoded with soundfile and resampled with soxr), so where, and only where, the native load fails, the
two modules that load it are replaced by inert stand-ins. Where the native libraries load (a GPU cluster with
matching CUDA builds) this does nothing.

`import relret` calls `install()`: the check runs when torchvision or torchaudio is first imported, so code that
never imports them (the shard job's driver and audio workers) does not pay for importing torch.
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.util
import sys
import types

_STAND_IN = "<relret.compat stand-in>"
_patched: list[str] = []


def _drop(package: str) -> None:
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


def _stand_in(name: str, **attributes: object) -> None:
    module = types.ModuleType(name)
    module.__file__ = _STAND_IN
    module.__dict__.update(attributes)
    sys.modules[name] = module


def _torchaudio_unavailable(function):
    def fail(*args, **kwargs):
        raise RuntimeError(
            f"{function.__name__} needs torchaudio's native extension, which does not load beside this torch build"
        )

    return fail


def _patch_torchvision() -> None:
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        importlib.import_module("torchvision")
    except (RuntimeError, OSError):
        # The failing step registers fake kernels for native ops that do not exist in this build.
        _drop("torchvision")
        _stand_in("torchvision._meta_registrations")
        importlib.import_module("torchvision")
        _patched.append("torchvision._meta_registrations")


def _patch_torchaudio() -> None:
    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is None:
        return
    try:
        importlib.import_module("torchaudio")
    except (RuntimeError, OSError):
        _drop("torchaudio")
        _stand_in(
            "torchaudio._extension",
            _IS_TORCHAUDIO_EXT_AVAILABLE=False,
            _IS_ALIGN_AVAILABLE=False,
            fail_if_no_align=_torchaudio_unavailable,
        )
        importlib.import_module("torchaudio")
        _patched.append("torchaudio._extension")


def ensure_importable() -> list[str]:
    """Apply the stand-ins where needed (idempotent); returns the names of the modules that were replaced."""
    uninstall()
    _patch_torchvision()
    _patch_torchaudio()
    return list(_patched)


class _PatchOnFirstImport(importlib.abc.MetaPathFinder):
    """Runs `ensure_importable` when torchvision or torchaudio is first looked up (imported, or probed with
    importlib.util.find_spec as transformers does).

    Importing torchvision to test it costs about 2 s and 250 MB. Deferring it keeps `import relret` cheap for code
    that never touches torch: the shard job's driver and audio workers, command-line tools.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _GUARDED:
            return None
        ensure_importable()  # removes this finder first, then imports both packages (with stand-ins if needed)
        module = sys.modules.get(fullname)
        if module is None:
            return None
        # The import system, seeing the module already in sys.modules, continues with `module.__spec__`: hand it a
        # copy whose loader returns the module as it is instead of executing it again (it restores the original).
        spec = copy.copy(module.__spec__)
        spec.loader = _AlreadyImported(module)
        module.__spec__ = spec
        return spec


class _AlreadyImported(importlib.abc.Loader):
    """Loader of a module that is already imported; anything else is asked of the module's own loader."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec

    def __getattr__(self, name: str):
        return getattr(self.spec.loader, name)


_GUARDED = ("torchvision", "torchaudio")
_finder = _PatchOnFirstImport()


def install() -> None:
    """Apply the stand-ins when torchvision or torchaudio is first imported (at once if one already is)."""
    if any(name in sys.modules for name in _GUARDED):
        ensure_importable()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
