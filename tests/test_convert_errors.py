"""`cinema-jax convert` on bad input: every mistake is one CheckpointError / ConfigError (the CLI: exit 2, one line),
nothing is deleted or half-written; and `export` of a run trained at a non-default image size round-trips.

The MAE checkpoint is saved straight from initialised params of the smoke config (SAX only, 32 x 32 x 4): no
training, and the image size differs from the model defaults (192 x 192 x 16), which is what the export must keep."""

import json
import math
import shutil

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from cinema_jax import convert_snraware
from cinema_jax.cli import main as cli
from cinema_jax.convert import build_from_config, import_state_dict, infer_model_config, main
from cinema_jax.errors import CheckpointError, ConfigError

SAX = "sax=32,32,4"


@pytest.fixture(scope="module")
def mae(tmp_path_factory):
    """(checkpoint dir, task model, params, exported .safetensors) of a tiny SAX-only MAE at 32 x 32 x 4."""
    from helpers import init_params

    from cinema_jax.tasks import get_task
    from cinema_jax.train.checkpoint import save_params

    root = tmp_path_factory.mktemp("mae")
    config, params = init_params("pretrain_mae", "configs/mae_pretrain.py:smoke", ["data.views=sax"])
    model = get_task("pretrain_mae").make_model(config)
    save_params(root / "run", params, config)
    assert main(["export", str(root / "run"), str(root / "mae.safetensors")]) == 0
    return root / "run", model, params, root / "mae.safetensors"


def _flat(tree):
    return {k: np.asarray(v) for k, v in flatten_dict(dict(tree)).items()}


def test_export_keeps_the_trained_image_size_and_round_trips(mae, tmp_path):
    from cinema_jax.models.conv_stem import effective_patch
    from cinema_jax.train.checkpoint import load_params

    run, model, params, exported = mae
    sd = load_file(str(exported))
    size, p, s = model.view_geometry("sax")
    assert size == (32, 32, 4)
    n = math.prod(a // b for a, b in zip(size, effective_patch(p, s, len(model.conv_chans))))
    assert sd["enc_down_dict.sax.pos_embed"].shape == (1, n, 16)  # was (1, 2304, 16): the 192x192x16 default
    # re-import at the trained size: identical params, identical re-export (pos_embeds included), same features
    with pytest.raises(CheckpointError, match="image size of view sax is not the default"):
        main(["import", str(exported), str(tmp_path / "x"), "--kind", "mae"])
    assert main(["import", str(exported), str(tmp_path / "imp"), "--kind", "mae", "--size", "tiny",
                 "--image-size", SAX]) == 0
    back, config = load_params(tmp_path / "imp")
    want, got = _flat(params), _flat(back)
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    assert main(["export", str(tmp_path / "imp"), str(tmp_path / "again.safetensors")]) == 0
    again = load_file(str(tmp_path / "again.safetensors"))
    assert set(again) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k], err_msg=k)
    imported = build_from_config("mae", config.model.to_dict())
    x = {"sax": np.random.default_rng(0).random((1, 32, 32, 4, 1)).astype(np.float32)}
    f1 = model.apply({"params": params}, x, train=False, method=type(model).features)
    f2 = imported.apply({"params": back}, x, train=False, method=type(imported).features)
    for k in f1:
        np.testing.assert_allclose(np.asarray(f2[k]), np.asarray(f1[k]), atol=1e-6, err_msg=k)


def test_export_refuses_another_kind_and_params_that_do_not_fit(mae, tmp_path):
    run, _, _, _ = mae
    out = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError, match="holds a mae model, not convunetr"):
        main(["export", str(run), str(out), "--kind", "convunetr"])
    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["model"]["conv_chans"] = [8, 32]
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="edited: shape mismatch"):
        main(["export", str(edited), str(out)])
    with pytest.raises(CheckpointError, match=r"must end in .safetensors, got .*x.pt"):
        main(["export", str(run), str(tmp_path / "x.pt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


def test_export_refuses_denoise_unknown_and_configless_checkpoints(tmp_path, capsys):
    from cinema_jax.train.checkpoint import save_params

    w = {"w": np.zeros(2, np.float32)}
    save_params(tmp_path / "den", w, {"task": "denoise"})
    save_params(tmp_path / "foo", w, {"task": "foo"})
    save_params(tmp_path / "none", w, None)
    out = tmp_path / "o.safetensors"
    with pytest.raises(CheckpointError, match=r"a denoise \(SNRAware\) checkpoint.*not supported"):
        main(["export", str(tmp_path / "den"), str(out)])
    with pytest.raises(CheckpointError, match="task 'foo' cannot be exported"):
        main(["export", str(tmp_path / "foo"), str(out)])
    with pytest.raises(CheckpointError, match="no config.json naming the task"):
        main(["export", str(tmp_path / "none"), str(out)])
    assert cli(["convert", "export", str(tmp_path / "den"), str(out)]) == 2  # was rc 0, 'exported ... (convvit)'
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "denoise" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_import_refuses_a_non_empty_output_dir(mae, tmp_path):
    """`convert import` into an existing directory used to delete it (a whole training workdir)."""
    _, _, _, exported = mae
    out = tmp_path / "workdir"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    args = ["import", str(exported), str(out), "--kind", "mae", "--image-size", SAX]
    with pytest.raises(CheckpointError, match=r"workdir already exists and is not empty \(pass --overwrite"):
        main(args)
    with pytest.raises(CheckpointError, match="already exists"):
        main(["import", str(tmp_path / "m.pts"), str(out), "--kind", "snraware", "--ref-config", "m.yaml"])
    assert (out / "metrics.jsonl").read_text() == "{}\n"
    # --overwrite replaces only an import cinema-jax wrote: never a folder holding someone else's files
    with pytest.raises(CheckpointError, match="was not written by cinema-jax"):
        main(args + ["--overwrite"])
    assert (out / "metrics.jsonl").read_text() == "{}\n"
    ours = tmp_path / "imported"
    assert main(args[:2] + [str(ours)] + args[3:]) == 0
    assert main(args[:2] + [str(ours)] + args[3:] + ["--overwrite"]) == 0
    assert (ours / "config.json").is_file()


def test_import_size_meta_and_image_size_errors(mae, tmp_path):
    _, _, _, exported = mae
    src, out = str(exported), str(tmp_path / "o")
    with pytest.raises(CheckpointError, match="--size base has embed dim 768 but the state dict has 16"):
        main(["import", src, out, "--kind", "mae", "--size", "base", "--image-size", SAX])
    sd = load_file(src)
    cfg = infer_model_config(sd, "mae", {"enc_n_heads": 12}, image_size={"sax": [32, 32, 4]})
    with pytest.raises(CheckpointError, match="cannot build a mae model for these weights .*divisible"):
        import_state_dict(sd, "mae", cfg, "mae.safetensors")  # was a ValueError traceback from eval_shape
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object, got list"):
        main(["import", src, out, "--kind", "mae", "--meta", str(tmp_path / "meta.json")])
    with pytest.raises(CheckpointError, match="unknown view 'bogus'"):
        main(["import", src, out, "--kind", "mae", "--image-size", "bogus=32,32"])
    with pytest.raises(CheckpointError, match=r"sax needs X,Y,Z"):
        main(["import", src, out, "--kind", "mae", "--image-size", "sax=32,32"])
    with pytest.raises(CheckpointError, match=r"view\(s\) \['lax_4c'\] the state dict does not have"):
        main(["import", src, out, "--kind", "mae", "--image-size", SAX, "--image-size", "lax_4c=32,32"])
    assert not (tmp_path / "o").exists()


def test_snraware_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: [1, 2\nbackbone: x\n")
    with pytest.raises(ConfigError, match="bad.yaml") as err:
        convert_snraware.load_config(bad)
    assert "\n" not in str(err.value)
