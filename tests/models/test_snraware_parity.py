"""SNRAware reference weights: converted params reproduce the reference outputs, our sizes have the released
structure, and bad checkpoints fail with a one-line error (fixture: tests/fixtures/snraware_upstream/README.md)."""

import json
from pathlib import Path

import numpy as np
import pytest

from cinema_jax.convert_snraware import (
    check_shapes,
    fixture_config,
    import_state_dict,
    load_state_dict,
    model_kwargs_from_config,
    path_to_ref_key,
    ref_key_to_path,
    snraware_fixture_outputs,
)
from cinema_jax.errors import CheckpointError, ConfigError
from cinema_jax.models.imaging_transformer import make_model, num_params

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "snraware_upstream"


def _meta():
    return json.loads((FIX / "meta.json").read_text())


@pytest.mark.parametrize("name", ["hrnet", "unet"])
def test_converted_weights_reproduce_reference_outputs(name):
    out = snraware_fixture_outputs(FIX, name)["output"]
    with np.load(FIX / f"{name}.npz") as z:
        ref = z["output"]
    assert out.shape == ref.shape
    assert float(np.max(np.abs(out - ref))) <= 1e-4, float(np.max(np.abs(out - ref)))


def test_small_has_the_released_structure():
    meta = _meta()
    assert num_params(make_model("small")) == meta["released_param_counts"]["small_hrnet"] == 27_701_329
    # every key / shape of the released small state dict maps onto our small model, built from a reference config
    rel = meta["released_config"]
    cell = dict(fixture_config(FIX, "hrnet")["backbone"]["block"]["cell"], window_size=rel["window_size"],
                patch_size=rel["patch_size"], n_head=rel["n_head"])
    cfg = {"backbone": dict(fixture_config(FIX, "hrnet")["backbone"], num_of_channels=rel["num_of_channels"],
                            block_str=rel["block_str"]["small"], block=dict(cell=cell)),
           "dataset": {"cutout_shape": rel["cutout_shape"]}}
    kw = model_kwargs_from_config(cfg)
    assert make_model("small") == make_model("small", **kw)
    shapes = json.loads((FIX / "small_hrnet_shapes.json").read_text())["shapes"]
    paths = check_shapes(shapes, kw, "small")
    assert len(paths) == sum(1 for k in shapes if ref_key_to_path(k) is not None) == 273
    assert all(path_to_ref_key(p) == k for k, p in paths.items())


@pytest.fixture(scope="module")
def hrnet_sd():
    return load_state_dict(FIX / "hrnet.safetensors"), model_kwargs_from_config(fixture_config(FIX, "hrnet"))


def test_bad_state_dicts_fail_clearly(hrnet_sd, tmp_path):
    sd, kw = hrnet_sd
    key = "bk.B11.block.cell_1.attn.relative_position_bias_table"
    with pytest.raises(CheckpointError, match=f"missing key {key}"):
        import_state_dict({k: v for k, v in sd.items() if k != key}, kw)
    with pytest.raises(CheckpointError, match="unexpected key bk.B00.block.cell_0.attn.gate.weight"):
        import_state_dict({**sd, "bk.B00.block.cell_0.attn.gate.weight": np.zeros(3, np.float32)}, kw)
    conv = "bk.B00.block.cell_2.mlp.0.conv.weight"
    with pytest.raises(CheckpointError, match=f"shape mismatch for {conv}"):
        import_state_dict({**sd, conv: sd[conv][:, :2]}, kw)
    with pytest.raises(CheckpointError, match="shape mismatch .*relative_position_bias_table"):
        import_state_dict(sd, dict(kw, heads=2))  # a config that does not match the weights
    with pytest.raises(CheckpointError, match="not an SNRAware"):
        import_state_dict({k.replace("pre.", "stem."): v for k, v in sd.items()}, kw)
    wrapped = {f"model.{k}": v for k, v in sd.items()}  # Lightning-style prefix is stripped
    assert import_state_dict(wrapped, kw)[1]["pre"]["kernel"].shape == (3, 3, 3, 4)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((FIX / "hrnet.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "absent.pts")


def test_unsupported_reference_options_fail_clearly():
    entry = fixture_config(FIX, "hrnet")
    cell = entry["backbone"]["block"]["cell"]
    for option, value in [("norm_mode", "instance2d"), ("attention_type", "lin"), ("cosine_att", False)]:
        cfg = dict(entry, backbone=dict(entry["backbone"], block=dict(cell=dict(cell, **{option: value}))))
        with pytest.raises(ConfigError, match=option):
            model_kwargs_from_config(cfg)
    with pytest.raises(ConfigError, match="SOAnet"):
        model_kwargs_from_config(dict(entry, backbone=dict(entry["backbone"], name="SOAnet")))
    with pytest.raises(ConfigError, match="not an SNRAware config"):
        model_kwargs_from_config({"model": {}})


@pytest.mark.parametrize("name", ["torch_zip_sample.pth", "torchscript_sample.pts"])
def test_torch_files_read_without_torch(name):
    sd = load_state_dict(FIX / name)
    with np.load(FIX / name.replace(".pth", "_expected.npz").replace(".pts", "_expected.npz")) as z:
        assert sorted(sd) == sorted(z.files)  # float tensors only; int / bool buffers dropped
        for k in z.files:
            np.testing.assert_array_equal(sd[k], z[k])


def test_cli_import_gives_a_checkpoint_that_infer_denoise_uses(tmp_path):
    """`cinema-jax convert import --kind snraware` writes a params checkpoint + denoise config; the inference path
    loads it and reproduces the reference output."""
    import jax

    from cinema_jax.cli import main as cli_main
    from cinema_jax.convert_snraware import to_model_layout, to_reference_layout
    from cinema_jax.infer import denoise as infer

    ref_cfg = tmp_path / "ref.json"
    ref_cfg.write_text(json.dumps(fixture_config(FIX, "hrnet")))
    out = tmp_path / "ckpt"
    assert cli_main(["convert", "import", "--kind", "snraware", str(FIX / "hrnet.safetensors"), str(out),
                     "--ref-config", str(ref_cfg)]) == 0
    model, params, config = infer._load_model(out)
    assert config.task == "denoise" and tuple(config.model.image_size) == tuple(model.image_size)
    with np.load(FIX / "hrnet.npz") as z:
        x, ref = to_model_layout(z["input"]).astype(np.float32), z["output"]
    with jax.default_matmul_precision("float32"):
        y = to_reference_layout(np.asarray(infer._forward(model)(params, x)))
    assert float(np.max(np.abs(y - ref))) <= 1e-4
    assert cli_main(["convert", "import", "--kind", "snraware", str(FIX / "hrnet.safetensors"),
                     str(tmp_path / "x")]) == 2  # no --ref-config: one-line error
