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


def test_import_relret_is_cheap_and_checks_lazily():
    """`import relret.config` imports neither torch nor torchvision; the check runs on the first look for them."""
    out = _run(
        """
        import sys, importlib.util
        import relret.config
        print("torch" in sys.modules, "torchvision" in sys.modules)
        importlib.util.find_spec("torchvision")  # what transformers does to see what is installed
        print("torchvision" in sys.modules)
        """
    )
    assert out.splitlines()[-2:] == ["False False", "True"]
