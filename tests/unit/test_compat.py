import subprocess
import sys
import textwrap


def _run(code: str, extra_path: str | None = None) -> str:
    env_code = f"import sys; sys.path.insert(0, {extra_path!r})\n" if extra_path else ""
    out = subprocess.run([sys.executable, "-c", env_code + textwrap.dedent(code)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_transformers_and_passt_import_after_relret():
    """After `import relret`, transformers, sentence-transformers, timm and hear21passt import on this machine."""
    out = _run(
        """
        import relret
        from transformers import RobertaModel
        import sentence_transformers, timm
        from hear21passt.models.passt import get_model
        print("ok")
        """
    )
    assert out.endswith("ok")


def test_does_nothing_where_native_libraries_load(tmp_path):
    """With a torchvision/torchaudio that import cleanly, no stand-in is installed."""
    for name in ("torchvision", "torchaudio"):
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text("LOADED = 'real'\n")
    out = _run(
        """
        from relret import compat
        import sys, torchvision, torchaudio
        print(compat.ensure_importable(), torchvision.LOADED, "torchvision._meta_registrations" in sys.modules)
        """,
        extra_path=str(tmp_path),
    )
    assert out.splitlines()[-1] == "[] real False"


def test_import_relret_defers_the_check_until_torchvision_is_imported(tmp_path):
    """`import relret` loads no torch; the first lookup of torchvision (an import, or importlib.util.find_spec as
    transformers probes packages) runs the check, and each package is executed exactly once, keeping its origin."""
    for name in ("torchvision", "torchaudio"):
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text(
            f"import builtins\nbuiltins.RUNS = getattr(builtins, 'RUNS', []) + [{name!r}]\n"
        )
    for first in ("import torchvision", "importlib.util.find_spec('torchvision')"):
        out = _run(
            f"""
            import builtins, importlib.util, sys
            import relret
            before = "torch" in sys.modules, "torchvision" in sys.modules
            {first}
            import torchvision, torchaudio
            from relret import compat
            print(before, builtins.RUNS, torchvision.__spec__.origin, compat._finder in sys.meta_path)
            """,
            extra_path=str(tmp_path),
        )
        assert out.splitlines()[-1] == (
            f"(False, False) ['torchvision', 'torchaudio'] {tmp_path}/torchvision/__init__.py False"
        ), first


def test_stand_ins_are_applied_when_transformers_imports_torchvision():
    """On this machine (CPU torch, CUDA torchvision/torchaudio) the deferred check installs both stand-ins."""
    out = _run(
        """
        import relret, sys
        import sentence_transformers
        from relret import compat
        print(sorted(compat.ensure_importable()), "torch" in sys.modules)
        """
    )
    assert out.splitlines()[-1] == "['torchaudio._extension', 'torchvision._meta_registrations'] True"
