"""tools/gpu_check.sh runs only where a device is lent, so its config flags are checked here: every
`--config.key=...` it passes must be a key of the bench config (bench lines) or of the MAE pretraining config (the
training run); a renamed key would otherwise surface only on the device, at the cost of its time budget."""

import re
import subprocess
from pathlib import Path

import pytest

from cinema_jax.config import ConfigError, apply_overrides, load_base

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _keys(text: str) -> list[str]:
    return [f"{k}=1" for k in re.findall(r"--config\.([\w.]+)=", text)]


def _check(spec: str, overrides: list[str]) -> None:
    for override in overrides:  # one at a time: the value (1) may not parse for the key's type, the key must exist
        try:
            apply_overrides(load_base(str(ROOT / "configs" / spec)), [override])
        except ConfigError as e:
            assert "unknown config key" not in str(e), (spec, override, e)
        except (ValueError, TypeError):
            pass


def test_script_parses_and_its_config_keys_exist():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    bench_part, train_part = text.split("cinema_jax train", 1)
    train_part, denoise_part = train_part.split("GPU_CHECK_DENOISE_BENCH:-", 1)
    bench_keys, train_keys = _keys(bench_part), _keys(train_part)
    assert _keys(denoise_part) == ["conv=1"]
    _check("bench.py:denoise", _keys(denoise_part))
    assert {"conv=1", "attention=1", "matmul_size=1"} <= set(bench_keys)
    assert {"total_steps=1", "batch_size=1"} <= set(train_keys)
    _check("bench.py:mae_base", bench_keys)
    _check("mae_pretrain.py:base", train_keys)
    data = re.search(r"GPU_CHECK_DATA:-([\w,]+)", text).group(1).split(",")
    assert data == ["record_data", "synth_data", "noise_h5"]
    for name in data + ["record_tiny", "synth_tiny", "noise_h5_tiny"]:  # default host-side benches, dry-run ones
        assert load_base(f"{ROOT / 'configs' / 'bench.py'}:{name}").mode in ("record_data", "synth_data",
                                                                              "noise_pipeline")
    denoise = re.search(r"GPU_CHECK_DENOISE_BENCH:-(\w+)", text).group(1)
    assert load_base(f"{ROOT / 'configs' / 'bench.py'}:{denoise}").train.task == "denoise"
    with pytest.raises(AssertionError, match="unknown config key"):  # the check itself can fail
        _check("mae_pretrain.py:base", ["no_such_key=1"])
