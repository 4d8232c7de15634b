"""Make transformers, sentence-transformers and timm importable next to a CPU-only torch.

PyPI's torchvision and torchaudio are CUDA builds. Beside the CPU torch wheel their native libraries fail to load
(`operator torchvision::nms does not exist`, `libc10_cuda.so` missing), and transformers, sentence-transformers and
timm then fail to import because they import both whenever installed. relret never uses either library's native
ops (audio is decoded with soundfile and resampled with soxr), so where, and only where, the native load fails, the
two modules that load it are replaced by inert stand-ins. Where the native libraries load (a GPU cluster with
matching CUDA builds) this does nothing.
"""

from __future__ import annotations

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
    _patch_torchvision()
    _patch_torchaudio()
    return list(_patched)


class _LoadedModule(importlib.abc.Loader):
    """Hands the import system a module that the check below has already imported."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        pass


class _CheckOnFirstImport(importlib.abc.MetaPathFinder):
    """Runs the check when torchvision or torchaudio is first looked for (an import, or transformers' availability
    probe through importlib.util.find_spec), so `import relret` itself stays cheap."""

    _patches = {"torchvision": _patch_torchvision, "torchaudio": _patch_torchaudio}

    def __init__(self) -> None:
        self.busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self._patches or self.busy:
            return None
        self.busy = True  # the check imports the module itself; let the normal finders serve that import
        try:
            self._patches[fullname]()
        finally:
            self.busy = False
        module = sys.modules.get(fullname)
        if module is None:
            return None  # not installed
        return importlib.util.spec_from_loader(fullname, _LoadedModule(module))


def install() -> None:
    """Check lazily from now on (idempotent); `ensure_importable()` checks at once."""
    if not any(isinstance(f, _CheckOnFirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckOnFirstImport())
