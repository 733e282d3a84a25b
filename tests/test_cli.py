import subprocess
import sys

import resunet


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resunet", *args], capture_output=True, text=True, timeout=120)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and resunet.__version__ in r.stdout


def test_models_table_lists_every_network_with_its_parameters():
    r = run_cli("models", "--size", "64", "--base", "32")
    assert r.returncode == 0, r.stderr
    for name, params in (("resunet", "8.11"), ("unet", "7.76"), ("attention_unet", "7.85"),
                         ("resunet_transformer", "14.42")):
        assert name in r.stdout and params in r.stdout


def test_user_error_exits_2_with_message_and_no_traceback():
    r = run_cli("models", "--size", "0")
    assert r.returncode == 2
    assert "--size must be positive" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
