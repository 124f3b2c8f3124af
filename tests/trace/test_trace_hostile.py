"""Hostile and broken traces, one named case each: a ``TraceError`` naming the part and what was expected.

Every case starts from a valid small trace (``hostile_traces.record_base_trace``) and breaks one thing.
The huge declared shapes would need exabytes if they were read: the error must come from the checks,
before anything is allocated. Cases the fuzzer found are marked "found by the fuzzer".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hostile_traces import attribute, model, record_base_trace

import lightning_tda.trace.probe
from lightning_tda import Trace, TraceError
from lightning_tda.cli import main
from lightning_tda.scores import Scores

HUGE = 10**9


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return record_base_trace(tmp_path_factory.mktemp("base") / "trace.h5")


@pytest.fixture
def hostile(base, tmp_path) -> Callable[[Callable[[h5py.File], None]], Path]:
    """A copy of the base trace changed by ``edit(file)``."""

    def make(edit: Callable[[h5py.File], None]) -> Path:
        path = tmp_path / f"hostile{len(list(tmp_path.glob('hostile*.h5')))}.h5"
        shutil.copy(base, path)
        f = h5py.File(path, "a")
        edit(f)
        if f.id.valid:  # an edit of the raw bytes closes the file itself
            f.close()
        return path

    return make


def replace(f: h5py.File, name: str, **dataset: object) -> None:
    """Replace dataset ``name`` (keeping its attributes) by one made with ``create_dataset(**dataset)``."""
    attrs = dict(f[name].attrs)
    del f[name]
    f.create_dataset(name, **dataset)
    f[name].attrs.update(attrs)


def declared_only(shape: tuple[int, ...], dtype: str = "f8") -> dict:
    """A dataset that declares ``shape`` but stores nothing (a few bytes of metadata)."""
    return {"shape": shape, "dtype": dtype, "chunks": (1,) * len(shape), "maxshape": (None,) * len(shape)}


def set_json(f: h5py.File, name: str, text: str) -> None:
    del f[name]
    f.create_dataset(name, data=text)


def optimizer_with(f: h5py.File, **group: object) -> None:
    record = json.loads(f["meta/optimizer"][()])
    record["param_groups"][0].update(group)
    set_json(f, "meta/optimizer", json.dumps(record))


def cache_key(f: h5py.File) -> str:
    return f"cache/{sorted(f['cache'])[0]}"  # SOURCE caches one fit per segment; all are read


# ------------------------------------------------------------------------------ declared sizes
def test_a_huge_declared_covariance_is_refused_before_it_is_read(hostile):
    path = hostile(lambda f: replace(f, "segments/0000/kfac/net.0/A_sum", **declared_only((HUGE, HUGE))))
    with pytest.raises(
        TraceError, match=r"segments/0000/kfac/net\.0/A_sum: has shape \(1000000000, 1000000000\), expected \(9, 9\)"
    ):
        Trace.open(path).covariances(0, "net.0")

    def consistent(f: h5py.File) -> None:  # the layer record agrees with the huge factor
        f["layers/net.0"].attrs["in_features"] = HUGE - 1
        replace(f, "segments/0000/kfac/net.0/A_sum", **declared_only((HUGE, HUGE)))

    trace = Trace.open(hostile(consistent))
    with pytest.raises(TraceError, match=r"A_sum: declares shape \(1000000000, 1000000000\) .* holds only 0 bytes"):
        trace.covariances(0, "net.0")
    with pytest.raises(TraceError, match=r"Layer 'net\.0' has shape \(6, 9\) .* in the model but \(6, 1000000000\)"):
        trace.tracked_layers(model())


def test_a_huge_declared_step_log_is_refused_when_read(hostile):
    def huge_log(f: h5py.File) -> None:
        for column in f["steps"]:
            shape = (HUGE,) if column != "lr" else (HUGE, 1)
            replace(f, f"steps/{column}", **declared_only(shape, str(f["steps"][column].dtype)))

    trace = Trace.open(hostile(huge_log))  # the shapes agree, nothing is read at open
    with pytest.raises(TraceError, match=r"steps/step: declares shape \(1000000000,\)"):
        trace.summary()


def test_checkpoints_that_do_not_fit_the_model_are_refused_before_they_are_read(hostile):
    extra = hostile(lambda f: f.create_dataset("checkpoints/000001/head.weight", data=np.zeros((3, 3), np.float32)))
    with pytest.raises(
        TraceError, match=r"checkpoints/000001/head\.weight: does not fit the given model, which has no"
    ):
        Trace.open(extra).load_checkpoint(model(), 1)

    wrong = hostile(lambda f: replace(f, "checkpoints/000001/net.0.weight", **declared_only((HUGE, HUGE), "f4")))
    with pytest.raises(
        TraceError, match=r"000001/net\.0\.weight: has shape \(1000000000, 1000000000\), expected \(6, 8\)"
    ):
        Trace.open(wrong).load_checkpoint(model(), 1)

    initial = hostile(lambda f: replace(f, "checkpoints/initial/net.2.weight", data=np.zeros((4, 6), np.float32)))
    with pytest.raises(
        TraceError, match=r"initial/net\.2\.weight: has shape \(4, 6\): it does not fit the given model's \(3, 6\)"
    ):
        Trace.open(initial).load_checkpoint(model(), 0)

    def fake_bfloat16(f: h5py.File) -> None:
        f["checkpoints/000002/net.0.bias"].attrs["dtype"] = "bfloat16"

    with pytest.raises(TraceError, match=r"net\.0\.bias: is marked bfloat16 but stored as float32"):
        Trace.open(hostile(fake_bfloat16)).load_checkpoint(model(), 2)


# ------------------------------------------------------------------------------------ values
@pytest.mark.parametrize(
    ("edit", "read", "message"),
    [
        (lambda v: v.__setitem__((1, 1), np.nan), "covariances", r"kfac/net\.2/S_sum: holds NaN or Inf"),
        (lambda v: v.__setitem__((0, 1), v[0, 1] + 1.0), "covariances", r"net\.2/S_sum: is not symmetric"),
        (lambda v: v.__setitem__((2, 2), -1.0), "covariances", r"net\.2/S_sum: has negative variances"),
    ],
    ids=["nan", "asymmetric", "negative-variance"],
)
def test_nonfinite_or_asymmetric_covariances_are_refused(hostile, edit, read, message):
    def poison(f: h5py.File) -> None:
        values = f["segments/0001/kfac/net.2/S_sum"][()]
        edit(values)
        f["segments/0001/kfac/net.2/S_sum"][...] = values

    with pytest.raises(TraceError, match=message):
        Trace.open(hostile(poison)).covariances(1, "net.2")


def test_a_variance_rounded_just_below_zero_is_read(hostile):
    """Found on a ResNet-18 trace: a float32 convolution factor formed from shifted products stored a
    variance of -1.3e-7 of its largest entry (zero in exact arithmetic), and SOURCE refused the trace.
    Rounding of the stored dtype is accepted; anything beyond it stays an error (test above)."""

    def round_below_zero(f: h5py.File) -> None:
        values = f["segments/0001/kfac/net.2/S_sum"][()]
        values[2, 2] = -8 * np.finfo(values.dtype).eps * np.abs(values).max()
        f["segments/0001/kfac/net.2/S_sum"][...] = values

    _, s = Trace.open(hostile(round_below_zero)).covariances(1, "net.2")
    assert s[2, 2] < 0


def test_negative_counts_and_second_moments_are_refused(hostile):
    count = hostile(lambda f: f["segments/0000/kfac/net.0/A_count"].write_direct(np.array(-5.0)))
    with pytest.raises(TraceError, match=r"net\.0/A_count: is -5\.0, expected a non-negative count"):
        Trace.open(count).covariances(0, "net.0")
    moments = hostile(lambda f: f["segments/0000/preconditioner/net.0/v_mean"].__setitem__((0, 0), -1.0))
    with pytest.raises(TraceError, match=r"preconditioner/net\.0/v_mean: holds negative second moments"):
        Trace.open(moments).preconditioner(0, "net.0")


def test_negative_learning_rates_and_step_counts_are_refused(hostile):
    lr = hostile(lambda f: f["steps/lr"].__setitem__((3, 0), -0.05))
    with pytest.raises(TraceError, match=r"steps/lr: is not as recorded: expected a column that holds finite, non-neg"):
        Trace.open(lr).steps()
    cases = {
        r"segments/0000 attribute 'mean_lr': is -0\.05, expected a finite number ≥ 0": lambda f: f[
            "segments/0000"
        ].attrs.__setitem__("mean_lr", np.array([-0.05])),
        r"meta/optimizer param group 0 'lr': is -1, expected a finite number ≥ 0": lambda f: optimizer_with(f, lr=-1),
        r"segments/0001 attribute 'num_steps': is -4, expected an integer between 4 and 4": lambda f: f[
            "segments/0001"
        ].attrs.__setitem__("num_steps", -4),
        r"checkpoints/000003 attribute 'step': is -2, expected an integer between 1 and 8": lambda f: f[
            "checkpoints/000003"
        ].attrs.__setitem__("step", -2),
        r"meta/optimizer param group 0 'betas': is \[0\.9, 1\.5\], expected two values below 1": lambda f: (
            optimizer_with(f, betas=[0.9, 1.5])
        ),
    }
    for message, edit in cases.items():
        with pytest.raises(TraceError, match=message):
            Trace.open(hostile(edit))
    steps = hostile(lambda f: f["steps/step"].__setitem__(5, 5))
    with pytest.raises(TraceError, match=r"steps/step: is not as recorded: expected a column that counts 1, 2"):
        Trace.open(steps).summary()


def test_segments_out_of_order_or_overlapping_are_refused(hostile):
    def swapped(f: h5py.File) -> None:
        first, second = f["segments/0000"].attrs, f["segments/0001"].attrs
        (first["start_step"], first["end_step"]), (second["start_step"], second["end_step"]) = (4, 8), (0, 4)

    with pytest.raises(TraceError, match=r"segments/0000: covers steps 5-8, expected it to start right after step 0"):
        Trace.open(hostile(swapped))

    def overlapping(f: h5py.File) -> None:
        f["segments/0001"].attrs.update(start_step=2, num_steps=6)

    with pytest.raises(TraceError, match=r"segments/0001: covers steps 3-8, expected it to start right after step 4"):
        Trace.open(hostile(overlapping))
    with pytest.raises(TraceError, match=r"segments/0000 attribute 'end_step': is 0, expected an integer at least 1"):
        Trace.open(hostile(lambda f: f["segments/0000"].attrs.__setitem__("end_step", 0)))
    with pytest.raises(TraceError, match=r"checkpoints/000001: is at step 4, outside its segment 1 \(steps 5-8\)"):
        Trace.open(hostile(lambda f: f["checkpoints/000001"].attrs.__setitem__("segment", 1)))


# ------------------------------------------------------------------------- JSON and attributes
def test_json_that_is_huge_deep_or_of_the_wrong_type_is_refused(hostile):
    cases = {
        r"meta/config: holds 2,000,009 bytes, at most 1,048,576": json.dumps({"x": "a" * 2_000_000}),
        r"meta/config: is nested too deeply to read": "[" * 100_000 + "]" * 100_000,
        r"meta/config: holds JSON nested deeper than 32 levels": '{"a": ' * 40 + "1" + "}" * 40,
        r"meta/config: holds JSON list, expected dict": "[1, 2]",
        r"meta/config: cannot be read \(JSONDecodeError": "{not json",
        r"meta/config: cannot be read \(UnicodeDecodeError": b'{"a": "\xff\xfe"}',  # found by the fuzzer
    }
    for message, text in cases.items():
        with pytest.raises(TraceError, match=message):
            Trace.open(hostile(lambda f, text=text: set_json(f, "meta/config", text)))
    groups = hostile(lambda f: set_json(f, "meta/optimizer", json.dumps({"class": "SGD", "param_groups": "x"})))
    with pytest.raises(
        TraceError, match=r"meta/optimizer: lists param groups 'x', expected 1 \(the columns of steps/lr\)"
    ):
        Trace.open(groups)
    with pytest.raises(
        TraceError, match=r"param group 0 'weight_decay': is 1000000000000000000000\d+\.\.\., expected a finite"
    ):
        Trace.open(hostile(lambda f: optimizer_with(f, weight_decay=10**400)))


def test_attributes_of_the_wrong_type_or_size_are_refused(hostile):
    cases = {
        r"layers/net\.0 attribute 'in_features': is str 'eight', expected an integer": (
            "layers/net.0",
            "in_features",
            "eight",
        ),
        r"layers/net\.2 attribute 'has_bias': is int 7, expected true or false": ("layers/net.2", "has_bias", 7),
        r"meta attribute 'fisher': is int 3, expected a string": ("meta", "fisher", 3),
        r"meta attribute 'fisher': is 'exact', expected one of 'true', 'empirical'": ("meta", "fisher", "exact"),
        r"meta attribute 'notes': is a string of 60,000 characters": ("meta", "notes", "x" * 60_000),
        r"segments/0000 attribute 'reason': has shape \(2, 2\)": ("segments/0000", "reason", np.zeros((2, 2))),
        r"attribute 'kind': has dtype complex128": ("layers/net.0", "kind", np.complex128(1j)),
        r"/ attribute 'schema_version': is float 1\.5, expected an integer": ("/", "schema_version", 1.5),
    }
    for message, (where, name, value) in cases.items():
        with pytest.raises(TraceError, match=message):
            Trace.open(hostile(lambda f, where=where, name=name, value=value: f[where].attrs.__setitem__(name, value)))


# ---------------------------------------------------------------------- links out of the file
def test_external_links_and_virtual_datasets_are_refused(hostile, tmp_path):
    elsewhere = tmp_path / "elsewhere.h5"
    with h5py.File(elsewhere, "w") as f:
        f["config"] = json.dumps({"taken": "from another file"})
        f["lr"] = np.full((8, 1), 0.1)

    def external_link(f: h5py.File) -> None:
        del f["meta/config"]
        f["meta/config"] = h5py.ExternalLink(str(elsewhere), "/config")

    with pytest.raises(TraceError, match=r"meta/config: is an external link to another file, which is refused"):
        Trace.open(hostile(external_link))

    def virtual(f: h5py.File) -> None:
        del f["steps/lr"]
        layout = h5py.VirtualLayout(shape=(8, 1), dtype="f8")
        layout[...] = h5py.VirtualSource(str(elsewhere), "lr", shape=(8, 1))
        f.create_virtual_dataset("steps/lr", layout)

    with pytest.raises(TraceError, match=r"steps/lr: is a virtual dataset \(its data would come from other files\)"):
        Trace.open(hostile(virtual))

    def external_storage(f: h5py.File) -> None:
        replace(f, "checkpoints/000001/net.0.bias", shape=(6,), dtype="f4", external=[(str(elsewhere), 0, 24)])

    with pytest.raises(TraceError, match=r"net\.0\.bias: keeps its data in an external file, which is refused"):
        Trace.open(hostile(external_storage)).load_checkpoint(model(), 1)

    def soft_loop(f: h5py.File) -> None:
        f["segments/0001/kfac/again"] = h5py.SoftLink("/segments")

    with pytest.raises(TraceError, match=r"segments/0001/kfac/again: is a soft link"):
        Trace.open(hostile(soft_loop))

    def hard_loop(f: h5py.File) -> None:
        f["segments/0000/loop"] = f["segments"]

    with pytest.raises(TraceError, match=r"is reached twice \(a cycle or a shared group\)"):
        Trace.open(hostile(hard_loop))

    def plugin_filter(f: h5py.File) -> None:
        replace(f, "checkpoints/000001/net.2.bias", data=np.zeros(3, np.float32), chunks=(3,), scaleoffset=0)

    with pytest.raises(TraceError, match=r"net\.2\.bias: uses HDF5 filter 6; only gzip, shuffle, fletcher32, lzf"):
        Trace.open(hostile(plugin_filter)).load_checkpoint(model(), 1)


# ------------------------------------------------------------------------------ wrong dtypes
def test_object_and_variable_length_dtypes_where_numbers_belong_are_refused(hostile):
    loss = hostile(lambda f: replace(f, "steps/loss", shape=(8,), dtype=h5py.string_dtype()))
    with pytest.raises(TraceError, match=r"steps/loss: has dtype object, expected floats or integers"):
        Trace.open(loss)
    references = hostile(lambda f: replace(f, "segments/0000/kfac/net.2/A_sum", shape=(7, 7), dtype=h5py.ref_dtype))
    with pytest.raises(TraceError, match=r"net\.2/A_sum: has dtype object, expected floats"):
        Trace.open(references).covariances(0, "net.2")
    compound = np.zeros((3, 6), dtype=[("a", "f4"), ("b", "i4")])
    record = hostile(lambda f: replace(f, "checkpoints/000002/net.2.weight", data=compound))
    with pytest.raises(TraceError, match=r"000002/net\.2\.weight: has dtype \[\('a', '<f4'\), \('b', '<i4'\)\]"):
        Trace.open(record).load_checkpoint(model(), 2)
    ragged = hostile(lambda f: replace(f, "steps/epoch", shape=(8,), dtype=h5py.vlen_dtype(np.int64)))
    with pytest.raises(TraceError, match=r"steps/epoch: has dtype object"):
        Trace.open(ragged)
    names = hostile(lambda f: replace(f, "layers/names", data=np.arange(2.0)))
    with pytest.raises(
        TraceError, match=r"layers/names: has dtype float64 and shape \(2,\), expected a list of strings"
    ):
        Trace.open(names)


def test_numbers_in_another_byte_order_or_width_are_read(hostile, base):
    """Big-endian and narrower numbers are still numbers (found by the fuzzer: torch cannot take big-endian)."""

    def narrower(f: h5py.File) -> None:
        replace(f, "steps/lr", data=f["steps/lr"][()].astype(">f8"))
        replace(f, "segments/0000/kfac/net.0/S_sum", data=f["segments/0000/kfac/net.0/S_sum"][()].astype(">f4"))

    trace, reference = Trace.open(hostile(narrower)), Trace.open(base)
    np.testing.assert_array_equal(trace.steps().lr, reference.steps().lr)
    torch.testing.assert_close(
        trace.covariances(0, "net.0")[1], reference.covariances(0, "net.0")[1], rtol=1e-6, atol=0
    )


# ---------------------------------------------------------------------------- caches, scores
def test_an_attribution_cache_that_does_not_match_its_trace_is_not_used(hostile, base):
    """A cached fit is checked against the layers before it is read; one that does not match is warned about
    and refitted (the scores equal those of an intact cache), one that links out of the file is refused."""
    expected = attribute(Trace.open(base)).values
    mismatches = {
        r"net\.0/q_a is float64 \(5, 5\), expected float64 \(9, 9\)": lambda f: replace(
            f, f"{cache_key(f)}/net.0/q_a", data=np.eye(5)
        ),
        r"net\.2/q_s is float32 \(3, 3\), expected float64": lambda f: replace(  # found by the fuzzer
            f, f"{cache_key(f)}/net.2/q_s", data=f[f"{cache_key(f)}/net.2/q_s"][()].astype(np.float32)
        ),
        r"datasets missing \['net\.2/eigenvalues'\]": lambda f: f.__delitem__(f"{cache_key(f)}/net.2/eigenvalues"),
        r"unexpected \['net\.9/q_a'\]": lambda f: f.create_dataset(f"{cache_key(f)}/net.9/q_a", data=np.eye(2)),
        r"non-finite values": lambda f: f[f"{cache_key(f)}/net.2/eigenvalues"].__setitem__((0, 0), np.nan),
        r"q_s: is a virtual dataset": lambda f: virtual_copy(f, f"{cache_key(f)}/net.0/q_s"),
    }
    for message, edit in mismatches.items():
        trace = Trace.open(hostile(edit))
        with pytest.warns(UserWarning, match=r"does not fit the trace's layers \(.*" + message):
            scores = attribute(trace)
        torch.testing.assert_close(scores.values, expected)

    def linked(f: h5py.File) -> None:
        f[f"{cache_key(f)}/net.0/extra"] = h5py.ExternalLink("elsewhere.h5", "/x")

    with pytest.raises(TraceError, match=r"net\.0/extra: is an external link to another file, which is refused"):
        attribute(Trace(hostile(linked)))  # Trace.open itself refuses it; the cache reader does too


def virtual_copy(f: h5py.File, name: str) -> None:
    """Replace dataset ``name`` by a virtual dataset reading the same values from a copy in another file."""
    values = f[name][()]
    source = Path(f.filename).with_suffix(".source.h5")
    with h5py.File(source, "w") as other:
        other["x"] = values
    del f[name]
    layout = h5py.VirtualLayout(shape=values.shape, dtype=values.dtype)
    layout[...] = h5py.VirtualSource(str(source), "x", shape=values.shape)
    f.create_virtual_dataset(name, layout)


def test_malformed_scores_are_refused(hostile, base):
    (name,) = Scores.available(base)
    cases = {
        r"results/source/values: has shape \(3, 32\), expected \(2, 32\)": lambda f: replace(
            f, "results/source/values", data=np.zeros((3, 32), np.float32)
        ),
        r"results/source: Scores train_ids must be a 1-D list of training-set indices": lambda f: f[
            "results/source/train_ids"
        ].__setitem__(0, -3),
        r"results/source attribute 'kind': is 'other', expected one of 'pairwise', 'self'": lambda f: f[
            "results/source"
        ].attrs.__setitem__("kind", "other"),
        r"results/source/query_ids: is missing": lambda f: f["results/source"].__delitem__("query_ids"),
        r"results/source/values: declares shape \(2, 1000000000\)": lambda f: [
            replace(f, "results/source/values", **declared_only((2, HUGE), "f4")),
            replace(f, "results/source/train_ids", **declared_only((HUGE,), "i8")),
        ],
    }
    for message, edit in cases.items():
        with pytest.raises(TraceError, match=message):
            Scores.load(hostile(edit), name)

    def linked(f: h5py.File) -> None:
        del f["results/source"]
        f["results/source"] = h5py.ExternalLink("elsewhere.h5", "/results/source")

    path = hostile(linked)
    with pytest.raises(TraceError, match=r"results/source: is an external link"):
        Scores.load(path, name)
    with pytest.raises(TraceError, match=r"results/source: is an external link"):  # nor written through
        Scores.load(base, name).save(path)


def test_inspect_names_the_problem_in_one_line(hostile, capsys):
    path = hostile(lambda f: f["segments/0001"].attrs.update(start_step=3, num_steps=5))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-tda: error: ") and len(err.splitlines()) == 1
    assert "segments/0001: covers steps 4-8, expected it to start right after step 4" in err


def test_a_fifo_where_the_trace_or_its_lock_file_goes_does_not_block(base, tmp_path):
    """Opening a FIFO blocks until someone writes to it: neither the trace nor its lock file is opened as one."""
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    with pytest.raises(TraceError, match="is not an HDF5 file"):
        Trace.open(fifo)
    trace = tmp_path / "trace.h5"
    shutil.copy(base, trace)
    os.mkfifo(tmp_path / "trace.h5.lock")
    assert Trace.open(trace).num_steps == 8  # no writer can hold a lock there
    with pytest.raises(TraceError, match=r"Cannot take the writer lock .* is not a regular file"):
        Scores.load(base, "source").save(trace)


# ------------------------------------------------------------------ the HDF5 library itself
def heap_object_too_long(f: h5py.File) -> None:
    """Found by the fuzzer (one flipped bit): a string in the global heap that claims 2 KiB more than its
    collection holds. Reading any string attribute then makes HDF5 loop forever."""
    path = Path(f.filename)
    f.close()
    raw = bytearray(path.read_bytes())
    collection = raw.index(b"GCOL")
    position = collection + 16  # "GCOL", version, reserved, collection size
    for _ in range(9):  # skip to the 10th object: index (2 bytes), references (2), reserved (4), size (8), data
        size = int.from_bytes(raw[position + 8 : position + 16], "little")
        position += 16 + -(-size // 8) * 8
    raw[position + 9] |= 0x08  # its size + 2048
    path.write_bytes(bytes(raw))


def test_a_file_that_makes_hdf5_hang_is_refused_without_hanging(hostile, monkeypatch):
    monkeypatch.setattr(lightning_tda.trace.probe, "PARSE_SECONDS", 3)
    path = hostile(heap_object_too_long)
    with pytest.raises(
        TraceError, match=r"the HDF5 library hung \(stopped after 3 s\) parsing this file, in a separate"
    ):
        Trace.open(path)
    with pytest.raises(TraceError, match=r"the HDF5 library hung"):
        Scores.available(path)


def test_a_file_that_makes_hdf5_crash_is_refused_and_this_process_lives(hostile, monkeypatch):
    def crash(path: Path) -> None:  # what a segmentation fault in HDF5's parser does to the process parsing
        os.kill(os.getpid(), signal.SIGSEGV)

    monkeypatch.setattr(lightning_tda.trace.probe, "_touch_everything", crash)
    with pytest.raises(TraceError, match=rf"the HDF5 library crashed \(signal {int(signal.SIGSEGV)}\) parsing this"):
        Trace.open(hostile(lambda f: None))
