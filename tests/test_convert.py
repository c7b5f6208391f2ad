"""Reference-weight conversion: fixture parity (<= 1e-4), export/import round trip, errors, CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cinema_jax.convert import (
    import_state_dict,
    infer_model_config,
    load_state_dict,
    main,
    params_to_state_dict,
    path_to_ref_key,
    ref_key_to_path,
    upstream_fixture_outputs,
)
from cinema_jax.errors import CheckpointError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "cinema_upstream"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.safetensors") if (FIXTURES / f"{p.stem}.npz").is_file())


def _kind(name):
    return "mae" if name.startswith("mae") else "convvit" if name.startswith("convvit") else "convunetr"


@pytest.mark.parametrize("name", NAMES or ["mae"])
def test_fixture_parity(upstream_fixtures, name):
    out = upstream_fixture_outputs(upstream_fixtures, name)
    with np.load(upstream_fixtures / f"{name}.npz") as z:
        expected = {k: z[k] for k in z.files if not k.startswith(("in_", "mask_"))}
    assert set(expected) <= set(out)
    for key, ref in expected.items():
        assert out[key].shape == ref.shape, key
        err = float(np.max(np.abs(out[key].astype(np.float64) - ref))) if ref.size else 0.0
        assert err <= 1e-4, f"{name}:{key} max abs err {err:.2e}"


def test_key_mapping_is_invertible():
    for key in ["enc_down_dict.lax_2c.conv_blocks.1.conv.0.mlp.fc2.weight", "encoder.blocks.11.attn.kv.bias",
                "decoder_dict.sax.blocks.4.up.weight", "dec_conv_blocks_dict.lax_4c.3.shortcut.weight",
                "pred_head_dict.cls.weight", "dec_embed_dict.sax.mask_token", "dec_linear.weight"]:
        path = ref_key_to_path(key)
        leaf = {"weight": "kernel"}.get(path[-1], path[-1])
        assert path_to_ref_key(path[:-1] + (leaf,)) == key
    assert ref_key_to_path("enc_down_dict.sax.pos_embed") is None


@pytest.mark.parametrize("name", ["mae", "convunetr_sax"])
def test_export_import_round_trip(upstream_fixtures, name):
    sd = load_file(str(upstream_fixtures / f"{name}.safetensors"))
    meta = json.loads((upstream_fixtures / "meta.json").read_text())
    model, params = import_state_dict(sd, _kind(name), infer_model_config(sd, _kind(name), meta))
    back = params_to_state_dict(params, model)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape, k
        np.testing.assert_allclose(back[k], v, atol=1e-6, err_msg=k)


def test_bad_inputs_raise_checkpoint_error(upstream_fixtures, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(bad)
    sd = load_file(str(upstream_fixtures / "convvit.safetensors"))
    meta = json.loads((upstream_fixtures / "meta.json").read_text())
    cfg = infer_model_config(sd, "convvit", meta)
    with pytest.raises(CheckpointError, match="unexpected key"):
        import_state_dict({**sd, "encoder.extra.weight": np.zeros((2, 2), np.float32)}, "convvit", cfg)
    with pytest.raises(CheckpointError, match="missing key"):
        import_state_dict({k: v for k, v in sd.items() if k != "encoder.norm.bias"}, "convvit", cfg)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        import_state_dict({**sd, "encoder.norm.bias": np.zeros((7,), np.float32)}, "convvit", cfg)
    with pytest.raises(CheckpointError, match="not a CineMA MAE"):
        infer_model_config(sd, "mae", meta)


def test_cli_import_export(upstream_fixtures, tmp_path):
    pytest.importorskip("cinema_jax.train.checkpoint", reason="train checkpoint helpers not available")
    src = upstream_fixtures / "convunetr_lax_4c.safetensors"
    out_dir = tmp_path / "ckpt"
    assert main(["import", str(src), str(out_dir), "--kind", "convunetr",
                 "--meta", str(upstream_fixtures / "meta.json")]) == 0
    out = tmp_path / "back.safetensors"
    assert main(["export", str(out_dir), str(out)]) == 0
    ref, back = load_file(str(src)), load_file(str(out))
    assert set(ref) == set(back)
    for k in ref:
        np.testing.assert_allclose(back[k], ref[k], atol=1e-6, err_msg=k)
    with pytest.raises(CheckpointError):
        main(["import", str(tmp_path / "nope.safetensors"), str(tmp_path / "x"), "--kind", "mae"])
    save_file({"encoder.cls_token": np.zeros((1, 1, 8), np.float32)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(CheckpointError):
        main(["import", str(tmp_path / "junk.safetensors"), str(tmp_path / "y"), "--kind", "mae"])
