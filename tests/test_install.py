"""kclip installed *non-editable* into a fresh venv works from another directory: the console script, both
presets by name and the DeepSpeed JSONs all come from the installed package, not from the checkout.

The venv is made with ``--system-site-packages`` and also sees this interpreter's site-packages (one
``.pth`` line), so kclip's dependencies need no download; kclip itself is built from a copy of the files
setup.py packages (no build/ or egg-info left in the checkout) and installed with ``--no-deps``. The build
runs without isolation when setuptools can build wheels offline here (``wheel`` installed, or setuptools
>= 70.1); otherwise pip's isolated build fetches setuptools from the configured index.
Skipped only when no venv can be created on this machine, with the reason.
"""
import os
import shutil
import site
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT

PACKAGED = ("setup.py", "kclip")  # the top-level kernels/ and configs/ are links into kclip/


def _run(cmd, cwd, env, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in PACKAGED:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO_ROOT / name, src / name)
    env_dir = root / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], check=True,
                       capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        pytest.skip(f"cannot create a venv on this machine ({type(exc).__name__}: {exc} {detail.strip()[-300:]})")
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this interpreter's packages (torch, deepspeed, ...) after the venv's own (plain path lines: .pth files
    # in those folders, e.g. an editable kclip finder, are not run, so the installed kclip is the one imported)
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    with open(os.path.join(purelib, "_kclip_test_outer.pth"), "w") as f:
        f.write("\n".join(outer) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    offline_build = subprocess.run(
        [python, "-c", "import importlib.util as u, setuptools as s; v = tuple(int(x) for x in s.__version__.split('.')[:2]); "
                       "raise SystemExit(0 if u.find_spec('wheel') or v >= (70, 1) else 1)"], capture_output=True).returncode == 0
    cmd = [python, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check", "--quiet", src]
    _run(cmd + (["--no-build-isolation"] if offline_build else []), cwd=root, env=env)
    return env_dir, root, env


def test_console_script_and_presets_from_the_installed_package(installed):
    env_dir, root, env = installed
    work = root / "elsewhere"  # no configs/ here, and not the checkout
    work.mkdir()
    help_text = _run([env_dir / "bin" / "kclip", "--help"], cwd=work, env=env)
    assert "--rebuild" in help_text and "--config" in help_text
    shown = _run([env_dir / "bin" / "kclip", "config", "--config", "paper", "model.name=kclip-tiny",
                  "model.pretrained=", "train.zero_stage=3"], cwd=work, env=env)
    assert "meta-llama/Llama-2-7b-hf" in shown and "name: kclip-tiny" in shown and "pretrained: ''" in shown
    check = textwrap.dedent(f"""
        import json, pathlib
        import kclip
        from kclip.config import Config, deepspeed_config, find_config_file, find_deepspeed_file, load_config, to_dict
        venv = pathlib.Path({str(env_dir)!r}).resolve()
        assert venv in pathlib.Path(kclip.__file__).resolve().parents, kclip.__file__
        for name in ("tiny", "paper", "configs/paper.yaml"):
            assert venv in pathlib.Path(str(find_config_file(name))).resolve().parents, find_config_file(name)
        assert to_dict(load_config("tiny")) == to_dict(Config())
        paper = load_config("paper")
        assert paper.teacher.name == "meta-llama/Llama-2-7b-hf" and paper.train.zero_stage == 2
        for stage in (1, 2, 3):
            ds = deepspeed_config(load_config("paper", [f"train.zero_stage={{stage}}"]), world_size=2)
            assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 512
        ds = deepspeed_config(load_config("paper", ["train.deepspeed_config=configs/ds/zero3.json"]), world_size=1)
        assert ds["zero_optimization"]["stage"] == 3
        assert venv in pathlib.Path(str(find_deepspeed_file("zero2"))).resolve().parents
        import importlib  # packages of their own: setup.py must ship every one
        for name in ("kclip.pipeline.stages", "kclip.kernels.clip_contrastive_loss.resident"):
            assert venv in pathlib.Path(importlib.import_module(name).__file__).resolve().parents, name
        print("ok")
    """)
    assert _run([env_dir / "bin" / "python", "-c", check], cwd=work, env=env).strip().endswith("ok")


def test_the_repo_root_never_shadows_hugging_face_kernels():
    """From the checkout's root (on sys.path for `python -m` and `python -c`), `kernels` is never this project's
    folder: kernels/ holds links for readers but no __init__.py, so Hugging Face's package (a dependency of
    transformers >= 5.25, imported by every model) wins, and without it no probe takes the folder for it."""
    top = REPO_ROOT / "kernels"
    assert top.is_dir() and not (top / "__init__.py").exists()
    for link in top.glob("*.py"):  # each a link to the op's one file in kclip/kernels
        assert link.resolve().parent == REPO_ROOT / "kclip" / "kernels", link
    probe = textwrap.dedent("""
        import importlib.util, json, kclip.kernels
        spec = importlib.util.find_spec("kernels")
        origin = getattr(spec, "origin", None) if spec else None
        if origin:  # Hugging Face's package is installed: it must be the one imported, and transformers works
            import kernels, transformers.activations
            assert kernels.__file__ == origin, kernels.__file__
        print(json.dumps({"kernels": origin, "kclip.kernels": kclip.kernels.__file__}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    got = _run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env).strip().splitlines()[-1]
    assert str(REPO_ROOT / "kernels") not in got and "kclip/kernels/__init__.py" in got, got
    out = _run([sys.executable, "-m", "kclip.cli", "config", "--config", "tiny"], cwd=REPO_ROOT, env=env)
    assert "run_dir: runs/tiny" in out
