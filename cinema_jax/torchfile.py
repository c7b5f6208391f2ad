"""Torch-free reader of torch zip checkpoints (`torch.save` since torch 1.6: `.pt` / `.pth` / Lightning `.ckpt`) and
TorchScript archives (`.pts`).

Why not `torch.load`: unpickling runs whatever the file names, and its `weights_only=True` guard was bypassed
(CVE-2025-32434, torch <= 2.5.1). Here torch is never imported and nothing from the file is executed: the unpickler
resolves only `OrderedDict`, the tensor / parameter rebuild functions, the storage types and TorchScript module
objects; every other global becomes an inert stand-in. The pickle cannot be trusted about its tensors either (an
unchecked `as_strided` reads heap bytes into the weights or segfaults), so every view is bounded by its storage
before a byte is copied, and sizes are capped. Any problem is one CheckpointError naming the file and the tensor key.
"""

from __future__ import annotations

import io
import math
import pickle
import reprlib
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from cinema_jax.errors import CheckpointError

# Elements one file may hold in its storages, and separately in the tensors rebuilt from them (2**30: 4 GiB as
# float32, ~10x the largest model converted here, SNRAware large at 110M params). Only a crafted file gets near it:
# overlapping or zero strides let a few bytes of storage claim any number of elements.
MAX_ELEMENTS = 2**30
MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl holds names and view geometry only (kilobytes for real checkpoints)
MAX_DIMS = 64  # no weight has more; bounds the work of multiplying a crafted size tuple out
# what a state dict may be wrapped in (Lightning `.ckpt`, common training-loop dicts)
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_short = reprlib.Repr(maxlevel=2, maxtuple=8, maxlong=24).repr  # hostile values stay short in messages


class Inert:
    """Stands in for any pickled object that is not a tensor or a container: accepts and ignores everything."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):
        return Inert()


class ScriptModule:
    """A TorchScript module object of a `.pts` archive: keeps its attribute dict (params, buffers, submodules)."""

    def __init__(self, *args, **kwargs):
        self.attrs: dict = {}

    def __setstate__(self, state):
        self.attrs = dict(state) if isinstance(state, Mapping) else {}


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Storage:
    """A storage named by the pickle: its bytes stay in the zip until a tensor that uses it is rebuilt."""

    def __init__(self, key: str, dtype):
        self.key, self.dtype = key, dtype


class _TensorRef:
    """`_rebuild_tensor_v2` arguments, checked and copied out only once the tensor's key is known."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, offset, size, stride, *args):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, *args):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if module.startswith("__torch__"):
            return ScriptModule
        return Inert

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unsupported persistent id {_short(pid)}")
        dtype = _DTYPES.get(getattr(pid[1], "name", ""))
        if dtype is None:
            raise pickle.UnpicklingError(f"unsupported storage type {_short(pid[1])}")
        return self._storages.setdefault(pid[2], _Storage(pid[2], dtype))


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class _Archive:
    """An open torch zip: rebuilds tensors from their storages within the element budgets."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str):
        self.path, self.zf, self.prefix = path, zf, prefix
        self._flat: dict[str, np.ndarray] = {}
        self._done: dict[int, np.ndarray] = {}
        self._stored = self._built = 0

    def _fail(self, key: str | None, msg: str) -> NoReturn:
        raise CheckpointError(f"{self.path}: tensor {key}: {msg}" if key else f"{self.path}: {msg}")

    def _storage(self, st: _Storage, key: str | None) -> np.ndarray:
        """The storage as a flat array (bfloat16 widened to float32), read once."""
        if st.key in self._flat:
            return self._flat[st.key]
        name = f"{self.prefix}data/{st.key}"
        try:
            nbytes = self.zf.getinfo(name).file_size
        except KeyError:
            self._fail(key, f"its storage {name} is missing")
        itemsize = 2 if st.dtype == "bfloat16" else np.dtype(st.dtype).itemsize
        if nbytes % itemsize:
            self._fail(key, f"storage {name} has {nbytes} bytes, not a multiple of the {itemsize}-byte item size")
        self._stored += nbytes // itemsize
        if self._stored > MAX_ELEMENTS:
            self._fail(key, f"storages hold more than {MAX_ELEMENTS} elements (torchfile.MAX_ELEMENTS)")
        data = self.zf.read(name)
        if st.dtype == "bfloat16":
            flat = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            flat = np.frombuffer(data, np.dtype(st.dtype).newbyteorder("<"))
        self._flat[st.key] = flat
        return flat

    def tensor(self, ref: _TensorRef, key: str | None) -> np.ndarray:
        """The view `ref` describes, copied out of its storage once every element is known to lie inside it."""
        if id(ref) in self._done:
            return self._done[id(ref)]
        offset, size, stride = ref.offset, ref.size, ref.stride
        if not isinstance(ref.storage, _Storage):
            self._fail(key, f"storage is {_short(ref.storage)}, not a tensor storage")
        if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
                and all(map(_is_index, size)) and all(map(_is_index, stride)) and _is_index(offset)):
            self._fail(key, f"size {_short(size)}, stride {_short(stride)} and offset {_short(offset)} must be "
                            "non-negative integers")
        if len(size) != len(stride):
            self._fail(key, f"size {_short(size)} and stride {_short(stride)} have different lengths")
        if len(size) > MAX_DIMS:
            self._fail(key, f"{len(size)} dimensions, more than {MAX_DIMS}")
        numel = math.prod(size)
        self._built += numel
        if self._built > MAX_ELEMENTS:
            self._fail(key, f"{_short(numel)} elements ({_short(tuple(size))}) exceed the limit of {MAX_ELEMENTS} "
                            "per file (torchfile.MAX_ELEMENTS)")
        flat = self._storage(ref.storage, key)
        if numel == 0:
            out = np.zeros(tuple(size), flat.dtype)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= flat.size:
                self._fail(key, f"view (offset {_short(offset)}, size {_short(tuple(size))}, stride "
                                f"{_short(tuple(stride))}) reaches element {_short(last)} of a storage of {flat.size}")
            strides = tuple(s * flat.itemsize for s in stride)
            out = np.lib.stride_tricks.as_strided(flat[offset:], tuple(size), strides).copy()
        self._done[id(ref)] = out
        return out

    def materialize(self, obj, key: str | None = None, seen: frozenset = frozenset()):
        """`obj` with every tensor in it rebuilt; keys are dotted paths (a container met twice on one path, which
        only a crafted pickle has, is refused rather than followed forever)."""
        if isinstance(obj, _TensorRef):
            return self.tensor(obj, key)
        if not isinstance(obj, (Mapping, list, tuple, ScriptModule)):
            return obj
        if id(obj) in seen:
            self._fail(key, "the pickle refers to itself")
        seen = seen | {id(obj)}

        def sub(k):
            return f"{key}.{k}" if key else str(k)

        if isinstance(obj, ScriptModule):
            out = ScriptModule()
            out.attrs = {k: self.materialize(v, sub(k), seen) for k, v in obj.attrs.items()}
            return out
        if isinstance(obj, Mapping):
            return {k: self.materialize(v, sub(k), seen) for k, v in obj.items()}
        items = [self.materialize(v, sub(i), seen) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _open(path: Path, use):
    """Unpickle `path`'s data.pkl and return `use(archive, obj)` while the zip is open; CheckpointError otherwise."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":  # a pickle stream: the torch < 1.6 format
            raise CheckpointError(f"{path}: a legacy (pre-1.6) torch pickle checkpoint; loading that format can run "
                                  "arbitrary code, so it is not read: re-save it with a current torch "
                                  "(torch.save) or convert it to .safetensors")
        raise CheckpointError(f"{path}: not a torch zip checkpoint or TorchScript archive")
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                raise CheckpointError(f"{path}: no data.pkl inside: not a torch checkpoint or TorchScript archive")
            prefix = pkl[0][: -len("data.pkl")]
            if zf.getinfo(pkl[0]).file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{path}: {pkl[0]} is larger than {MAX_PICKLE_BYTES} bytes")
            order = f"{prefix}byteorder"
            if order in zf.namelist() and zf.read(order).strip() not in (b"", b"little"):
                raise CheckpointError(f"{path}: a big-endian checkpoint; only little-endian ones are read")
            obj = _Unpickler(io.BytesIO(zf.read(pkl[0]))).load()
            return use(_Archive(path, zf, prefix), obj)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise CheckpointError(f"cannot read {path}: {_one_line(e)}") from None


def read_torch_zip(path: str | Path) -> Any:
    """The pickled object of a torch zip checkpoint with every tensor as a numpy array (bfloat16 as float32); a
    TorchScript archive gives a `ScriptModule` whose `attrs` hold its params, buffers and submodules."""
    return _open(Path(path), lambda archive, obj: archive.materialize(obj))


def _script_tensors(module: ScriptModule, prefix: str = "") -> dict[str, _TensorRef]:
    out: dict[str, _TensorRef] = {}
    for name, value in module.attrs.items():
        if isinstance(value, _TensorRef):
            out[prefix + str(name)] = value
        elif isinstance(value, ScriptModule):
            out.update(_script_tensors(value, f"{prefix}{name}."))
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """key -> array of a torch zip checkpoint's state dict (the top-level mapping, or the one under one of
    STATE_DICT_KEYS) or of a TorchScript archive's params and buffers. Non-tensor entries are dropped and only the
    state dict's tensors are rebuilt (e.g. optimizer state is never read)."""
    path = Path(path)

    def use(archive: _Archive, obj):
        if isinstance(obj, ScriptModule):
            obj = _script_tensors(obj)
        for key in STATE_DICT_KEYS:
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} does not hold a state dict")
        out = {str(k): archive.tensor(v, str(k)) for k, v in obj.items() if isinstance(v, _TensorRef)}
        if not out:
            raise CheckpointError(f"{path}: its state dict holds no tensors")
        return out

    return _open(path, use)
