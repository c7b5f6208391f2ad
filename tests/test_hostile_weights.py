"""Hostile weight files: crafted torch zips cannot read outside their buffers, crash, run code or smuggle in
non-float / non-finite weights; each is one CheckpointError naming the file (and the tensor key), and `convert
import` writes nothing. The torch zips are written by hand (torch is not a dependency): `archive/data.pkl` holds the
pickle opcodes torch.save writes, `archive/data/<key>` the raw storage bytes."""

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cinema_jax import convert, convert_snraware
from cinema_jax.cli import main as cli
from cinema_jax.errors import CheckpointError

FIX = Path(__file__).resolve().parent / "fixtures" / "snraware_upstream"
STORAGE = np.arange(12, dtype=np.float32)  # storage '0' of every crafted file: 12 float32 elements, 48 bytes


# ----------------------------------------------------------------------------------------------- crafted torch zips
def _ops(value) -> bytes:
    """The opcodes of a plain value (int, str, tuple, ...) without PROTO / STOP (their memo puts are harmless)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _tensor(offset, size, stride, storage="0", stype="FloatStorage", numel=12) -> bytes:
    """`torch._utils._rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())`."""
    pid = b"(" + _ops("storage") + f"ctorch\n{stype}\n".encode() + _ops(storage) + _ops("cpu") + _ops(numel) + b"tQ"
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + _ops(offset) + _ops(tuple(size)) + _ops(tuple(stride))
            + b"\x89ccollections\nOrderedDict\n)RtR")


def _torch_zip(path, tensors: dict, storages: dict | None = None, pkl: bytes | None = None) -> Path:
    """A torch zip whose data.pkl is a dict key -> `_tensor(...)` opcodes (or the given `pkl`)."""
    if pkl is None:
        pkl = b"\x80\x02}(" + b"".join(_ops(k) + v for k, v in tensors.items()) + b"u."
    storages = {"0": STORAGE.tobytes()} if storages is None else storages
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def _one_line_error(excinfo, path, key=None):
    msg = str(excinfo.value)
    assert "\n" not in msg and Path(path).name in msg, msg
    if key is not None:
        assert key in msg, msg
    return msg


def test_a_valid_crafted_file_reads_correctly(tmp_path):
    half = np.array([1.5, -2.0], np.float16)
    path = _torch_zip(tmp_path / "ok.pth", {
        "w": _tensor(0, (3, 4), (4, 1)),
        "wt": _tensor(0, (4, 3), (1, 4)),  # a transposed view
        "tail": _tensor(5, (3,), (2,)),  # an offset, a stride
        "last": _tensor(11, (1,), (1,)),  # the very last element
        "empty": _tensor(0, (0, 3), (3, 1)),  # an empty view is fine
        "h": _tensor(0, (2,), (1,), storage="1", stype="HalfStorage", numel=2),
    }, {"0": STORAGE.tobytes(), "1": half.tobytes()})
    want = {"w": STORAGE.reshape(3, 4), "wt": STORAGE.reshape(3, 4).T, "tail": np.array([5.0, 7, 9]),
            "last": np.array([11.0]), "empty": np.zeros((0, 3)), "h": half.astype(np.float32)}
    for load in (convert_snraware.load_state_dict, convert.load_state_dict):  # the CineMA one used torch.load
        sd = load(path)
        assert sorted(sd) == sorted(want)
        for k, v in want.items():
            np.testing.assert_array_equal(sd[k], v, err_msg=k)
            assert np.issubdtype(sd[k].dtype, np.floating), k


BAD_VIEWS = {  # name -> (offset, size, stride)
    "offset_past_the_end": (12, (1,), (1,)),
    "extent_past_the_end": (10, (3,), (1,)),
    "reads_heap_bytes": (8, (4, 4), (4, 1)),
    "stride_1e9": (0, (2,), (10 ** 9,)),
    "negative_stride": (2, (3,), (-1,)),
    "negative_offset": (-1, (1,), (1,)),
    "negative_size": (0, (-1,), (1,)),
    "size_stride_length_mismatch": (0, (3, 4), (1,)),
    "float_size": (0, (2.0,), (1,)),
    "huge_offset": (2 ** 70, (1,), (1,)),
    "absurd_broadcast": (0, (2 ** 20, 2 ** 20), (0, 0)),  # in bounds, but 2**40 elements
}


@pytest.mark.parametrize("name", sorted(BAD_VIEWS))
def test_views_outside_their_storage_are_refused(tmp_path, name):
    offset, size, stride = BAD_VIEWS[name]
    path = _torch_zip(tmp_path / f"{name}.pth", {"ok.weight": _tensor(0, (2,), (1,)),
                                                  "bad.weight": _tensor(offset, size, stride)})
    for load in (convert_snraware.load_state_dict, convert.load_state_dict):
        with pytest.raises(CheckpointError) as e:
            load(path)
        _one_line_error(e, path, "bad.weight")


def test_a_storage_that_is_not_whole_items_is_refused(tmp_path):
    path = _torch_zip(tmp_path / "odd.pth", {"bad.weight": _tensor(0, (2,), (1,))}, {"0": STORAGE.tobytes()[:47]})
    with pytest.raises(CheckpointError, match="multiple") as e:
        convert_snraware.load_state_dict(path)
    _one_line_error(e, path, "bad.weight")


def test_a_missing_storage_or_a_foreign_persistent_id_is_refused(tmp_path):
    path = _torch_zip(tmp_path / "nostore.pth", {"w": _tensor(0, (2,), (1,), storage="7")})
    with pytest.raises(CheckpointError) as e:
        convert.load_state_dict(path)
    _one_line_error(e, path)
    path = _torch_zip(tmp_path / "pid.pth", {}, pkl=b"\x80\x02" + _ops(("not-a-storage", 1)) + b"Q.")
    with pytest.raises(CheckpointError) as e:
        convert.load_state_dict(path)
    _one_line_error(e, path)


def test_the_cli_refuses_a_crafted_view_with_one_line(tmp_path, capsys):
    path = _torch_zip(tmp_path / "evil.pth", {"pre.conv.weight": _tensor(0, (2,), (10 ** 9,))})
    cfg = tmp_path / "ref.json"
    cfg.write_text(json.dumps(convert_snraware.fixture_config(FIX, "hrnet")))
    out = tmp_path / "out"
    assert cli(["convert", "import", "--kind", "snraware", str(path), str(out), "--ref-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "evil.pth" in err and "pre.conv.weight" in err, err
    assert not out.exists()


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    call = b"cposix\nsystem\n" + _ops((f"touch {marker}",)) + b"R"
    for name, pkl in [("top.pt", b"\x80\x02" + call + b"."),  # the whole file is a call
                      ("inside.pt", b"\x80\x02}(" + _ops("w") + call + b"u.")]:  # a 'tensor' that is a call
        path = _torch_zip(tmp_path / name, {}, pkl=pkl)
        with pytest.raises(CheckpointError) as e:
            convert.load_state_dict(path)  # was torch.load(weights_only=True): CVE-2025-32434 on torch <= 2.5.1
        msg = _one_line_error(e, path)
        assert "state dict" in msg or "no tensors" in msg, msg
        assert not marker.exists()


def test_read_torch_zip_gives_the_whole_tree_and_refuses_a_cycle(tmp_path):
    from cinema_jax.torchfile import read_torch_zip

    obj = read_torch_zip(FIX / "torch_zip_sample.pth")
    assert obj["epoch"] == 3 and obj["hyper_parameters"] == {"lr": 1e-5}
    with np.load(FIX / "torch_zip_sample_expected.npz") as z:
        np.testing.assert_array_equal(obj["state_dict"]["model.bk.x.weight"], z["model.bk.x.weight"])
    assert obj["state_dict"]["model.bk.attn.relative_position_index"].dtype == np.int64
    loop: list = []
    loop.append(loop)
    path = _torch_zip(tmp_path / "loop.pt", {}, pkl=pickle.dumps(loop, protocol=2))
    with pytest.raises(CheckpointError, match="refers to itself") as e:
        read_torch_zip(path)
    _one_line_error(e, path)


def test_a_legacy_pickle_checkpoint_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "old.pt"  # torch < 1.6 format: a bare pickle stream starting with torch's magic number
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    for load in (convert.load_state_dict, convert_snraware.load_state_dict):
        with pytest.raises(CheckpointError, match="legacy.*safetensors") as e:
            load(path)
        _one_line_error(e, path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as e:
        convert.load_state_dict(junk)
    _one_line_error(e, junk)


# ----------------------------------------------------------------------------------------------- import: CineMA
SAX = "sax=32,32,4"


@pytest.fixture(scope="module")
def mae_sd(tmp_path_factory):
    """The reference state dict of a tiny SAX-only MAE (the smoke config at 32 x 32 x 4), exported once."""
    from helpers import init_params

    from cinema_jax.train.checkpoint import save_params

    root = tmp_path_factory.mktemp("mae")
    config, params = init_params("pretrain_mae", "configs/mae_pretrain.py:smoke", ["data.views=sax"])
    save_params(root / "run", params, config)
    assert convert.main(["export", str(root / "run"), str(root / "mae.safetensors")]) == 0
    return load_file(str(root / "mae.safetensors"))


def _edit(sd, key, fn):
    assert key in sd, sorted(sd)
    return {**sd, key: fn(sd[key])}


def _nan(v):
    v = v.copy()
    v.flat[::7] = np.nan
    v.flat[1] = np.inf
    return v


CINEMA_BAD = {  # name -> (key, edit, message)
    "nan": ("encoder.blocks.0.attn.q.weight", _nan, r"holds \d+ NaN/Inf values"),
    "inf_cls": ("encoder.cls_token", lambda v: np.full_like(v, -np.inf), r"holds \d+ NaN/Inf values"),
    "int32": ("encoder.blocks.0.mlp.fc1.weight", lambda v: v.astype(np.int32),
              "has dtype int32, weights must be floating point"),
    "bool": ("encoder.norm.weight", lambda v: v > 0, "has dtype bool, weights must be floating point"),
    "nan_pos_embed": ("enc_down_dict.sax.pos_embed", _nan, r"holds \d+ NaN/Inf values"),
}


@pytest.mark.parametrize("name", sorted(CINEMA_BAD))
def test_cinema_import_refuses_non_finite_and_non_float_weights(mae_sd, tmp_path, name):
    key, fn, message = CINEMA_BAD[name]
    src = tmp_path / f"{name}.safetensors"
    save_file(_edit(mae_sd, key, fn), str(src))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message) as e:
        convert.main(["import", str(src), str(out), "--kind", "mae", "--size", "tiny", "--image-size", SAX])
    _one_line_error(e, src, key)
    assert not out.exists()


def test_cinema_import_cli_exit_2_and_a_clean_file_still_imports(mae_sd, tmp_path, capsys):
    src = tmp_path / "nan.safetensors"
    save_file(_edit(mae_sd, "encoder.blocks.0.attn.q.weight", _nan), str(src))
    assert cli(["convert", "import", str(src), str(tmp_path / "x"), "--kind", "mae", "--size", "tiny",
                "--image-size", SAX]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "NaN/Inf" in err, err
    assert not (tmp_path / "x").exists()
    good = tmp_path / "good.safetensors"
    save_file({k: v.astype(np.float16) for k, v in mae_sd.items()}, str(good))  # half precision is fine
    assert convert.main(["import", str(good), str(tmp_path / "ok"), "--kind", "mae", "--size", "tiny",
                         "--image-size", SAX]) == 0


# ----------------------------------------------------------------------------------------------- import: SNRAware
@pytest.fixture(scope="module")
def hrnet():
    return load_file(str(FIX / "hrnet.safetensors"))


def _snraware_import(sd, tmp_path, name):
    src = tmp_path / f"{name}.safetensors"
    save_file(sd, str(src))
    cfg = tmp_path / "ref.json"
    cfg.write_text(json.dumps(convert_snraware.fixture_config(FIX, "hrnet")))
    out = tmp_path / f"out_{name}"
    return src, out, ["import", "--kind", "snraware", str(src), str(out), "--ref-config", str(cfg)]


SNRAWARE_BAD = {  # name -> (key, edit, message)
    "nan": ("pre.conv.weight", _nan, r"holds \d+ NaN/Inf values"),
    "inf_table": ("bk.B00.block.cell_1.attn.relative_position_bias_table", lambda v: np.full_like(v, np.inf),
                  r"holds \d+ NaN/Inf values"),
    "int32": ("pre.conv.bias", lambda v: v.astype(np.int32), "has dtype int32, weights must be floating point"),
    "bool": ("bk.B00.block.cell_0.mlp.1.weight", lambda v: v > 0, "has dtype bool, weights must be floating point"),
}


@pytest.mark.parametrize("name", sorted(SNRAWARE_BAD))
def test_snraware_import_refuses_non_finite_and_non_float_weights(hrnet, tmp_path, name):
    key, fn, message = SNRAWARE_BAD[name]
    src, out, args = _snraware_import(_edit(hrnet, key, fn), tmp_path, name)
    with pytest.raises(CheckpointError, match=message) as e:
        convert.main(args)
    _one_line_error(e, src, key)
    assert not out.exists()


def test_snraware_import_cli_exit_2(hrnet, tmp_path, capsys):
    src, out, args = _snraware_import(_edit(hrnet, "pre.conv.bias", lambda v: v.astype(np.int64)), tmp_path, "int")
    assert cli(["convert", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "int64" in err and "pre.conv.bias" in err, err
    assert not out.exists()


def test_snraware_integer_buffers_stay_ignored_and_bfloat16_imports(hrnet, tmp_path):
    import ml_dtypes

    extra = {"bk.B00.block.cell_1.attn.relative_position_index": np.arange(6, dtype=np.int64),
             "bk.B00.block.cell_0.attn.mask": np.ones(4, bool),
             "bk.B00.block.cell_0.norm.num_batches_tracked": np.array(3, np.int64)}
    sd = convert_snraware.load_state_dict(_save({**hrnet, **extra}, tmp_path / "buf.safetensors"))
    assert set(sd) == set(hrnet)  # the integer bookkeeping buffers are dropped, not refused
    _, out, args = _snraware_import({**hrnet, **extra}, tmp_path, "buffers")
    assert convert.main(args) == 0 and out.is_dir()
    # bfloat16 is a floating dtype: it used to be dropped silently (then 'missing key')
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in hrnet.items()}
    _, out, args = _snraware_import(bf, tmp_path, "bf16")
    assert convert.main(args) == 0 and out.is_dir()


def _save(sd, path):
    save_file(sd, str(path))
    return path
