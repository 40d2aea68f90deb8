"""TFRecord shards of ``tf.train.Example`` protos, read and written without TensorFlow.

A record on disk is ``uint64 length | uint32 masked_crc32c(length) | data | uint32
masked_crc32c(data)`` (little-endian). Both checksums are verified on every read; a mismatch is a
:class:`DataError` naming the shard, the record number and its byte offset. A length of more than
:data:`MAX_RECORD_BYTES` (64 MiB) or than the rest of the shard is refused before anything is
allocated for it, even when its CRC matches.

The Example proto is encoded by hand (it is a tiny part of the protobuf wire format)::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }   # entries: { string key = 1; Feature value = 2; }
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }

    >>> with TFRecordWriter("train-00000-of-00001") as w:                       # doctest: +SKIP
    ...     w.write(encode_example({"image/encoded": [jpeg], "image/class/label": [1]}))
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from cnntrain.data.stream_dataset import Box, StreamDataset, class_names
from cnntrain.errors import DataError

try:  # C implementation: ~1000x faster than the table loop below on full-size JPEGs
    import google_crc32c as _fast_crc
except ImportError:  # pragma: no cover - the pure-Python fallback keeps the package installable anywhere
    _fast_crc = None

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
MAX_RECORD_BYTES = 64 << 20  # one Example; a full-size ImageNet JPEG is under 20 MB


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (the checksum TFRecord uses; not zlib's CRC-32)."""
    if _fast_crc is not None:
        return _fast_crc.value(bytes(data))
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC: rotating and offsetting makes the CRC of data holding CRCs robust."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------- protobuf wire

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: dict[str, list[bytes] | list[int] | list[float]]) -> bytes:
    """Serialise ``{name: [bytes...] | [int...] | [float...]}`` as a tf.train.Example."""
    entries = b""
    for key in sorted(features):  # sorted: the same bytes for the same content, run after run
        values = list(features[key])
        if all(isinstance(v, (bytes, bytearray)) for v in values):
            kind = _field(1, b"".join(_field(1, bytes(v)) for v in values))
        elif all(isinstance(v, int) for v in values):
            kind = _field(3, _field(1, b"".join(_varint(v) for v in values)))
        elif all(isinstance(v, (int, float)) for v in values):
            kind = _field(2, _field(1, struct.pack(f"<{len(values)}f", *values)))
        else:
            raise TypeError(f"feature {key!r}: values must be all bytes, all int or all float")
        entries += _field(1, _field(1, key.encode()) + _field(2, kind))
    return _field(1, entries)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of a message; unknown wire types are skipped."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _decode_feature(buf: bytes) -> list:
    out: list = []
    for kind, _, payload in _fields(buf):
        for number, wire, value in _fields(payload):
            if number != 1:
                continue
            if kind == 1:
                out.append(bytes(value))
            elif kind == 3:
                if wire == 0:  # unpacked int64
                    out.append(value - (1 << 64) if value >= 1 << 63 else value)
                else:
                    pos = 0
                    while pos < len(value):
                        v, pos = _read_varint(value, pos)
                        out.append(v - (1 << 64) if v >= 1 << 63 else v)
            elif kind == 2:
                out.extend(struct.unpack(f"<{len(value) // 4}f", value) if wire == 2 else
                           struct.unpack("<f", value))
    return out


def decode_example(data: bytes) -> dict[str, list]:
    """Parse a serialised tf.train.Example into ``{name: [values]}``. Raises ValueError if malformed."""
    features: dict[str, list] = {}
    for number, _, payload in _fields(data):
        if number != 1:
            continue
        for entry_number, _, entry in _fields(payload):
            if entry_number != 1:
                continue
            key, value = "", b""
            for n, _, v in _fields(entry):
                if n == 1:
                    key = bytes(v).decode()
                elif n == 2:
                    value = v
            features[key] = _decode_feature(value)
    return features


# ------------------------------------------------------------------------------- record files

class TFRecordWriter:
    """Append records to a new shard, written to a temp name and renamed on close (atomic)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        self.offsets: list[int] = []

    def write(self, data: bytes) -> int:
        """Write one record; returns its byte offset in the shard."""
        offset = self._file.tell()
        length = struct.pack("<Q", len(data))
        self._file.write(length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data)))
        self.offsets.append(offset)
        return offset

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._tmp.replace(self.path)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:  # a failed write leaves no half shard behind
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            return
        self.close()


def read_record_at(file, offset: int, shard: str | os.PathLike = "?", index: int | str = "?",
                   max_bytes: int = MAX_RECORD_BYTES) -> bytes:
    """Read and CRC-check the record starting at ``offset`` of the open binary ``file``. A length
    over ``max_bytes`` or past the end of the file is refused before it is read."""
    file.seek(offset)
    header = file.read(12)
    where = f"{shard}: record {index} (byte offset {offset})"
    if len(header) < 12:
        raise DataError(f"{where} is truncated (shard ends inside the record header)")
    length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:])
    if masked_crc(length_bytes) != length_crc:
        raise DataError(f"{where}: length CRC mismatch, the shard is corrupt; "
                        "re-create it with `cnntrain data prepare`")
    (length,) = struct.unpack("<Q", length_bytes)
    if length > max_bytes:
        raise DataError(f"{where}: its header claims {length:,} bytes, more than the {max_bytes:,} a record may "
                        "hold; the shard is corrupt or was not written as TFRecord")
    remaining = _remaining(file, offset + 12)
    if remaining is not None and remaining < length + 4:
        raise DataError(f"{where} is truncated ({remaining} of {length + 4} bytes)")
    body = file.read(length + 4)
    if len(body) < length + 4:
        raise DataError(f"{where} is truncated ({len(body)} of {length + 4} bytes)")
    data, (data_crc,) = body[:length], struct.unpack("<I", body[length:])
    if masked_crc(data) != data_crc:
        raise DataError(f"{where}: data CRC mismatch, the shard is corrupt; "
                        "re-create it with `cnntrain data prepare`")
    return data


def _remaining(file, position: int) -> int | None:
    """Bytes of ``file`` after ``position``, or None for a stream without a size."""
    try:
        return os.fstat(file.fileno()).st_size - position
    except (AttributeError, OSError, ValueError):  # e.g. io.BytesIO has no file number
        return None


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of every record of a shard, in order, each CRC-checked."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        offset, index = 0, 0
        while offset < size:
            data = read_record_at(f, offset, path, index)
            yield offset, data
            offset += 16 + len(data)
            index += 1


def example_image_label(data: bytes, where: str) -> tuple[bytes, int]:
    """(encoded image, 0-based label) of an ImageNet-style Example (``image/class/label`` is 1-based)."""
    image, label, _ = example_fields(data, where)
    return image, label


BOX_KEYS = ("image/object/bbox/ymin", "image/object/bbox/xmin", "image/object/bbox/ymax", "image/object/bbox/xmax")


def example_fields(data: bytes, where: str) -> tuple[bytes, int, list[Box]]:
    """(encoded image, 0-based label, object boxes) of an ImageNet-style Example. Boxes are
    (ymin, xmin, ymax, xmax) in [0, 1], as ImageNet's TFRecords store them; none when absent."""
    try:
        features = decode_example(data)
        image = features["image/encoded"][0]
        label = int(features["image/class/label"][0]) - 1
    except (ValueError, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not an image Example with image/encoded and image/class/label ({exc})") from None
    columns = [features.get(key, []) for key in BOX_KEYS]
    if len({len(c) for c in columns}) != 1:
        raise DataError(f"{where}: object boxes with {', '.join(str(len(c)) for c in columns)} values in "
                        f"{', '.join(k.rsplit('/', 1)[1] for k in BOX_KEYS)}: they must be equal")
    boxes = []
    for ymin, xmin, ymax, xmax in zip(*columns):
        ymin, xmin, ymax, xmax = (min(max(float(v), 0.0), 1.0) for v in (ymin, xmin, ymax, xmax))
        if ymax > ymin and xmax > xmin:  # empty or inverted boxes say nothing: left out
            boxes.append((ymin, xmin, ymax, xmax))
    return image, label, boxes


def shard_paths(root: str | os.PathLike, prefix: str) -> list[Path]:
    """The shards ``root/<prefix>-*`` in name order (temp and index files left out)."""
    return sorted(p for p in Path(root).glob(f"{prefix}-*") if p.is_file() and p.suffix not in (".json", ".tmp"))


def read_example(data: StreamDataset, item: tuple[str, int]) -> tuple[bytes, list[Box]]:
    """The reader of TFRecord samples: ``item`` is (shard, byte offset of the record)."""
    shard, offset = item
    record = read_record_at(data.handle(shard), offset, shard, f"at byte {offset}")
    image, _, boxes = example_fields(record, f"{shard}: record at byte {offset}")
    return image, boxes


def tfrecord_dataset(root: str | os.PathLike, prefix: str, image_size: int, classes: list[str] | None = None,
                     min_scale: float = 0.08) -> StreamDataset:
    """A :class:`~cnntrain.data.stream_dataset.StreamDataset` over the shards ``root/<prefix>-*``.

    The record offsets and labels come from ``root/index.json`` (written by ``cnntrain data
    prepare``) when it lists these shards; otherwise every shard is read once, CRC-checked, to find
    them. Class names come from the index, else ``classes``, else "1".."K" (the 1-based labels).
    A label outside the classes is a :class:`DataError` naming the shard and the record.
    """
    shards = shard_paths(root, prefix)
    if not shards:
        raise DataError(f"no TFRecord shards {Path(root) / prefix}-* (make them with `cnntrain data prepare`)")
    index_path = Path(root) / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    known = index.get("classes") or classes
    items, labels = [], []
    for shard in shards:
        entry = index.get("shards", {}).get(shard.name)
        if entry is not None and entry.get("bytes") == shard.stat().st_size:
            pairs = zip(entry["offsets"], entry["labels"])
        else:
            pairs = [(offset, example_image_label(data, f"{shard}: record at byte {offset}")[1])
                     for offset, data in iter_records(shard)]
        for offset, label in pairs:
            label = int(label)
            if label < 0 or (known and label >= len(known)):
                allowed = f"1..{len(known)}" if known else "1 or more"
                raise DataError(f"{shard}: record at byte {offset}: image/class/label {label + 1} is outside "
                                f"{allowed} (labels are 1-based)")
            items.append((str(shard), int(offset)))
            labels.append(label)
    if not items:
        raise DataError(f"TFRecord shards {Path(root) / prefix}-* hold no records")
    source = f"{Path(root) / prefix}-*"
    return StreamDataset(items, torch.tensor(labels, dtype=torch.int64), class_names(labels, known, source, first=1),
                         image_size, source, min_scale=min_scale, reader=read_example)
