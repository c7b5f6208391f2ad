"""Small builders several test files share (on sys.path through tests/conftest.py)."""

import jax
import numpy as np


def init_params(task_name: str, spec: str, overrides=()):
    """(config, numpy params) of `task_name`'s model for the config `spec`, freshly initialised (no training)."""
    import flax.linen as nn

    from cinema_jax.config import load_config
    from cinema_jax.tasks import get_task

    config = load_config(spec, list(overrides))
    task = get_task(task_name)
    model = task.make_model(config)
    ex = task.example_batch(config, 1)
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}  # the MAE draws its mask at init too
    params = nn.meta.unbox(model.init(rngs, **task.model_inputs(ex), train=False)["params"])
    return config, jax.tree_util.tree_map(np.asarray, params)


def seg_checkpoint(directory, lv_bias: bool = True, overrides=()):
    """A params export of the segmentation smoke model; `lv_bias`: its head calls every pixel LV (a mask is always
    found, so inference runs end to end deterministically)."""
    from cinema_jax.train.checkpoint import save_params

    config, params = init_params("segment", "configs/finetune_seg.py:smoke", overrides)
    if lv_bias:
        for k in params:
            if k.startswith("pred_head"):
                params[k]["bias"] = np.array([0.0, 0.0, 0.0, 5.0], np.float32)
    return save_params(directory, params, config)


def dicom_dataset(syntax=None):
    """An empty MR image Dataset with its file meta (SOP class / instance UIDs, transfer syntax) filled in."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    return ds
