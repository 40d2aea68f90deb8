"""TFRecord framing, CRC-32C, the hand-written Example codec, and damaged shards."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from cnntrain.data import tfrecord
from cnntrain.data.tfrecord import (
    TFRecordWriter,
    crc32c,
    decode_example,
    encode_example,
    example_image_label,
    iter_records,
    masked_crc,
    read_record_at,
    tfrecord_dataset,
)
from cnntrain.errors import DataError


def test_crc32c_matches_the_standard_check_values(monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 3720 / iSCSI check values; the same from the C extension and from the pure-Python table.
    for fast in (tfrecord._fast_crc, None):
        monkeypatch.setattr(tfrecord, "_fast_crc", fast)
        assert crc32c(b"123456789") == 0xE3069283
        assert crc32c(bytes(32)) == 0x8A9136AA
        assert crc32c(b"") == 0
    assert masked_crc(b"") == 0xA282EAD8  # mask of CRC 0 is the bare offset


def test_example_round_trip() -> None:
    features = {"image/encoded": [b"\xff\xd8jpeg", b""], "image/class/label": [1, 300, -2],
                "image/score": [0.5, -1.25]}
    assert decode_example(encode_example(features)) == features
    assert encode_example(features) == encode_example(dict(reversed(features.items())))  # deterministic


def test_example_is_what_protobuf_parses() -> None:
    """Our bytes parse with the real protobuf runtime under tf.train.Example's schema, and back."""
    descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
    from google.protobuf import descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="example_test.proto", package="tfx", syntax="proto3")
    t = descriptor_pb2.FieldDescriptorProto

    def message(name, fields, nested=()):
        m = f.message_type.add(name=name)
        for number, (fname, ftype, label, type_name) in enumerate(fields, 1):
            m.field.add(name=fname, number=number, type=ftype, label=label, type_name=type_name)
        return m

    rep, opt = t.LABEL_REPEATED, t.LABEL_OPTIONAL
    message("BytesList", [("value", t.TYPE_BYTES, rep, None)])
    message("FloatList", [("value", t.TYPE_FLOAT, rep, None)])
    message("Int64List", [("value", t.TYPE_INT64, rep, None)])
    message("Feature", [("bytes_list", t.TYPE_MESSAGE, opt, ".tfx.BytesList"),
                        ("float_list", t.TYPE_MESSAGE, opt, ".tfx.FloatList"),
                        ("int64_list", t.TYPE_MESSAGE, opt, ".tfx.Int64List")])
    entry = message("Features", [("feature", t.TYPE_MESSAGE, rep, ".tfx.Features.FeatureEntry")])
    e = entry.nested_type.add(name="FeatureEntry")
    e.options.map_entry = True
    e.field.add(name="key", number=1, type=t.TYPE_STRING, label=opt)
    e.field.add(name="value", number=2, type=t.TYPE_MESSAGE, label=opt, type_name=".tfx.Feature")
    message("Example", [("features", t.TYPE_MESSAGE, opt, ".tfx.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    example_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("tfx.Example"))

    ours = encode_example({"image/encoded": [b"abc"], "image/class/label": [7, -1], "x": [0.25]})
    parsed = example_cls.FromString(ours)
    assert list(parsed.features.feature["image/encoded"].bytes_list.value) == [b"abc"]
    assert list(parsed.features.feature["image/class/label"].int64_list.value) == [7, -1]
    assert list(parsed.features.feature["x"].float_list.value) == [0.25]
    # And protobuf's own (packed) encoding decodes with ours.
    assert decode_example(parsed.SerializeToString())["image/class/label"] == [7, -1]


def _write(path: Path, n: int = 5) -> list[bytes]:
    records = [encode_example({"image/encoded": [bytes([i]) * (10 + i)], "image/class/label": [i % 3 + 1]})
               for i in range(n)]
    with TFRecordWriter(path) as writer:
        for r in records:
            writer.write(r)
    return records


def test_write_read_round_trip_and_framing(tmp_path: Path) -> None:
    path = tmp_path / "train-00000-of-00001"
    records = _write(path)
    assert [data for _, data in iter_records(path)] == records
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length == len(records[0]) and struct.unpack("<I", raw[8:12])[0] == masked_crc(raw[:8])
    assert not list(tmp_path.glob(".*tmp"))  # written under a temp name, then renamed


@pytest.mark.parametrize("where", ["length", "data", "crc"])
def test_flipped_byte_names_shard_and_record(tmp_path: Path, where: str) -> None:
    path = tmp_path / "train-00000-of-00001"
    records = _write(path)
    second = 16 + len(records[0])  # byte offset of record 1
    flip = {"length": second + 3, "data": second + 12 + 5, "crc": second + 12 + len(records[1]) + 1}[where]
    raw = bytearray(path.read_bytes())
    raw[flip] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"train-00000-of-00001: record 1 \(byte offset {second}\).*CRC"):
        list(iter_records(path))


def test_truncated_shard_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "train-00000-of-00001"
    _write(path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="record 4.*truncated"):
        list(iter_records(path))


@pytest.mark.parametrize("claim, message", [
    (1 << 40, "claims 1,099,511,627,776 bytes, more than the 67,108,864 a record may hold"),
    (65 << 20, "claims 68,157,440 bytes, more than the 67,108,864"),
    (1 << 20, r"is truncated \(\d+ of 1048580 bytes\)"),  # under the cap, past the end of the shard
])
def test_a_record_length_beyond_the_cap_or_the_shard_is_refused_before_reading(tmp_path: Path, claim: int,
                                                                               message: str) -> None:
    """The length has a valid CRC, so only the size tells a hostile or broken header."""
    path = tmp_path / "train-00000-of-00001"
    records = _write(path, 2)
    length = struct.pack("<Q", claim)
    raw = bytearray(path.read_bytes())
    second = 16 + len(records[0])
    raw[second: second + 12] = length + struct.pack("<I", masked_crc(length))
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"train-00000-of-00001: record 1 \(byte offset {second}\).*{message}"):
        list(iter_records(path))
    with open(path, "rb") as f, pytest.raises(DataError, match=r"record 0 .*claims \d+ bytes, more than the 10 "):
        read_record_at(f, 0, path, 0, max_bytes=10)  # the cap is a parameter; record 0 itself is intact


def test_labels_outside_the_classes_name_the_shard_and_record(tmp_path: Path) -> None:
    with TFRecordWriter(tmp_path / "train-00000-of-00001") as w:
        w.write(encode_example({"image/encoded": [b"a"], "image/class/label": [1]}))
        zero_at = w.write(encode_example({"image/encoded": [b"b"], "image/class/label": [0]}))  # 1-based: 0 is bad
    with pytest.raises(DataError, match=rf"train-00000-of-00001: record at byte {zero_at}: image/class/label 0 is "
                                        r"outside 1 or more \(labels are 1-based\)"):
        tfrecord_dataset(tmp_path, "train", 32)
    with TFRecordWriter(tmp_path / "train-00000-of-00001") as w:
        w.write(encode_example({"image/encoded": [b"a"], "image/class/label": [1]}))
        big_at = w.write(encode_example({"image/encoded": [b"b"], "image/class/label": [3]}))
    (tmp_path / "index.json").write_text(json.dumps({"classes": ["cat", "dog"]}))
    with pytest.raises(DataError, match=rf"record at byte {big_at}: image/class/label 3 is outside 1..2"):
        tfrecord_dataset(tmp_path, "train", 32)
    (tmp_path / "index.json").unlink()
    with TFRecordWriter(tmp_path / "train-00000-of-00001") as w:
        w.write(encode_example({"image/encoded": [b"a"], "image/class/label": [10**9]}))
    with pytest.raises(DataError, match=r"largest label 1000000000 would make 1,000,000,000 classes"):
        tfrecord_dataset(tmp_path, "train", 32)  # no class list: the names would be made up from the label


def test_dataset_without_index_scans_shards_and_uses_zero_based_labels(tmp_path: Path) -> None:
    _write(tmp_path / "train-00000-of-00002", 4)
    _write(tmp_path / "train-00001-of-00002", 2)
    data = tfrecord_dataset(tmp_path, "train", 32)
    assert len(data) == 6 and data.labels.tolist() == [0, 1, 2, 0, 0, 1] and data.classes == ["1", "2", "3"]
    assert data.read(1) == bytes([1]) * 11
    with pytest.raises(DataError, match="no TFRecord shards"):
        tfrecord_dataset(tmp_path, "validation", 32)
    with pytest.raises(DataError, match="not an image Example"):
        example_image_label(encode_example({"other": [1]}), "x")
