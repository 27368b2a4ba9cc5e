"""The README's main job (qat-demo) on its built-in default: composes, runs, reports exact parity."""
import subprocess
import sys


from qat.demo import run


def test_demo_default_recipe_table():
    import qat

    report = run(qat.load_recipe("w4a16_g128").to_dict(), tokens=16, hidden_size=128, intermediate_size=256,
                 vocab_size=128, max_position_embeddings=1024)
    assert "| module" in report and "sqnr_db" in report and "bits_per_weight" in report
    assert "model.layers.1.mlp.down_proj" in report
    assert "converted == fake-quant (atol=0): True" in report


def test_demo_cli_with_hydra_override(tmp_path):
    cmd = [sys.executable, "-m", "qat.cli.demo", "quant=w3a16_g64", "tiny.hidden_size=128", "tiny.intermediate_size=256",
           f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "int3 sym g64" in out.stdout and "atol=0): True" in out.stdout


def test_demo_cli_rejects_unknown_recipe(tmp_path):
    cmd = [sys.executable, "-m", "qat.cli.demo", "quant=w4a16_g129", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "w4a16_g129" in out.stderr and "w4a16_g128" in out.stderr  # Hydra lists the available options
