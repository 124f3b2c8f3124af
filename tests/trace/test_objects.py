"""The writer's low-level HDF5 objects are the ones h5py's high-level calls create."""

import h5py
import numpy as np

from lightning_tda.trace.objects import new_dataset, new_extendable_dataset, new_group, set_new_attributes

ARRAYS = {
    "matrix": np.arange(12, dtype=np.float32).reshape(3, 4),
    "transposed": np.arange(12, dtype=np.float64).reshape(3, 4).T,  # not contiguous
    "scalar": np.array(7.5),
    "count": np.array(3, dtype=np.int64),
    "empty": np.zeros((0, 5), dtype=np.float32),
    "bits": np.arange(4, dtype=np.uint16),
    "flags": np.array([True, False]),
    "config": '{"segments": 3, "model": "çonv"}',  # a JSON record: a scalar variable-length UTF-8 string
}
ATTRIBUTES = {"index": 3, "mean_lr": [0.1, 0.2], "has_bias": True, "ratio": 0.5, "reason": "planned", "kind": "çonv"}


def _describe(obj: h5py.HLObject) -> dict:
    out = {"attrs": {k: (np.asarray(v).tolist(), np.asarray(v).dtype.str) for k, v in obj.attrs.items()}}
    out["timestamped"] = h5py.h5o.get_info(obj.id).ctime != 0
    if isinstance(obj, h5py.Dataset):
        layout = obj.id.get_create_plist().get_layout()
        out |= {"shape": obj.shape, "maxshape": obj.maxshape, "chunks": obj.chunks, "dtype": obj.dtype.str}
        values, string = obj[()], h5py.check_string_dtype(obj.dtype)
        out |= {"values": values.tolist() if isinstance(values, np.ndarray) else values, "layout": layout}
        out["string"] = None if string is None else (string.encoding, string.length)
    return out


def test_low_level_objects_read_back_as_h5py_writes_them(tmp_path):
    with (
        h5py.File(tmp_path / "low.h5", "w", libver=("earliest", "v110")) as low,
        h5py.File(tmp_path / "high.h5", "w", libver=("earliest", "v110")) as high,
    ):
        low_group, high_group = new_group(low, "segments/0000"), high.create_group("segments/0000")
        set_new_attributes(low_group, ATTRIBUTES)
        high_group.attrs.update(ATTRIBUTES)
        for name, array in ARRAYS.items():
            new_dataset(low_group, name, array)
            high_group.create_dataset(name, data=array)
        for name, dtype, shape, chunks in (("step", np.int64, (0,), (4096,)), ("lr", np.float64, (0, 3), (1024, 3))):
            new_extendable_dataset(low_group, name, dtype, shape, chunks)
            high_group.create_dataset(name, shape=shape, maxshape=(None, *shape[1:]), dtype=dtype, chunks=chunks)
            for group in (low_group, high_group):
                group[name].resize(5, axis=0)
                group[name][:] = 1
        assert _describe(low_group) == _describe(high_group)
        for name in [*ARRAYS, "step", "lr"]:
            assert _describe(low_group[name]) == _describe(high_group[name]), name
        assert not _describe(low_group)["timestamped"] and not _describe(low_group["matrix"])["timestamped"]
        assert _describe(low["segments"]) == _describe(high["segments"])  # an intermediate group, as h5py makes it
