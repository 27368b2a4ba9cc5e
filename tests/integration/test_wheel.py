"""The built wheel works outside the checkout: recipes and Hydra configs ship inside it as package data."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# what the wheel is built from (a copy, so the build leaves no build/ or *.egg-info in the checkout)
SOURCES = ["pyproject.toml", "setup.py", "README.md", "qat", "configs"]


def _build_and_install(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = dist.glob("qat-*.whl")
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    return site


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "HOME": str(cwd), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_wheel_installed_outside_the_checkout(tmp_path):
    site = _build_and_install(tmp_path)
    assert sorted(p.name for p in (site / "qat" / "configs").iterdir()) == sorted(
        p.name for p in (REPO / "configs").iterdir())
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = _run(site, cwd, "-c", "import qat; from qat.recipes import config_root; "
               "print(qat.__file__); print(config_root()); print(qat.load_recipe('w4a16_g128').base.weight.group_size)")
    file, root, group = out.stdout.split()
    assert Path(file).is_relative_to(site) and Path(root) == site / "qat" / "configs"  # not the checkout's qat
    assert group == "128"
    demo = _run(site, cwd, "-m", "qat.cli.demo", "tiny.hidden_size=128", "tiny.intermediate_size=256", "tiny.vocab_size=128",
                "tokens=16", f"hydra.run.dir={cwd / 'demo'}")
    assert "converted == fake-quant (atol=0): True" in demo.stdout
    train_help = _run(site, cwd, "-m", "qat.cli.train", "--help")
    assert "== Config ==" in train_help.stdout and "quant: ct_w4a16," in train_help.stdout  # groups found
    # the default data (the fixture corpus) ships too: a PTQ job on the tiny model runs from the wheel as it is
    ptq = _run(site, cwd, "-m", "qat.cli.ptq", "method=rtn", "calibration.samples=2", "calibration.seq_len=32",
               "eval.max_blocks=2", "save=false", f"hydra.run.dir={cwd / 'ptq'}")
    assert "rtn" in ptq.stdout + ptq.stderr and (cwd / "ptq" / "result.json").is_file()
