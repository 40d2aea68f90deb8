"""The wire format of the ps's links: a message, its frame, and the checks on what a frame says.

A message is an op code, up to 16 plain numbers and up to 8 flat tensors; nothing else crosses the
wire (no pickles, no strings). A frame is a fixed header of ``HEADER`` little-endian float64 values
(magic, op, #numbers, #tensors, the numbers, then a (dtype, length) pair per tensor) followed by the
tensors' raw bytes (the host's byte order: every machine torch supports today is little-endian).

Nothing here touches a socket: ``decode_header`` turns a header's bytes into the op, the numbers and
the (dtype, length) of each tensor that follows, allocating nothing more, so a receiver can refuse a
message before reading its tensors. ``transport`` moves frames over connections.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from cnntrain.errors import DistributedError
from cnntrain.parallel.ps import protocol as P

MAGIC = 20270301.0  # first header slot: a message from this protocol version (TCP frames, HELLO proof)
MAX_NUMBERS = 16
MAX_TENSORS = 8
HEADER = 4 + MAX_NUMBERS + 2 * MAX_TENSORS
HEADER_BYTES = 8 * HEADER
_HEADER_FORMAT = f"<{HEADER}d"
DTYPES = (torch.float32, torch.float64, torch.int64)
MAX_NUMEL = 2**53  # the largest length a float64 header slot holds exactly


@dataclass
class Message:
    op: int
    numbers: tuple[float, ...] = ()
    tensors: tuple[torch.Tensor, ...] = ()


class LinkError(DistributedError):
    """The other end of a link died, closed it, or did not answer within the timeout."""


class BadMessage(LinkError):
    """A message that breaks the protocol's rules; ``problem`` is one of ``protocol.PROBLEMS``."""

    def __init__(self, problem: int, text: str) -> None:
        super().__init__(text)
        self.problem = problem


Spec = tuple[torch.dtype, int]


def whole(value: float, lo: int, hi: int, what: str) -> int:
    """``value`` as an int if it is a whole number in ``[lo, hi]``, else ``BadMessage`` naming ``what``."""
    if not (math.isfinite(value) and value == int(value) and lo <= value <= hi):
        raise BadMessage(P.BAD_NUMBERS, f"{what} {value!r} is not a whole number in {lo}..{hi}")
    return int(value)


def check_values(t: torch.Tensor, limit: float, what: str) -> None:
    """``BadMessage`` unless every value of ``t`` is finite and at most ``limit`` in magnitude."""
    if not t.numel():
        return
    largest = t.abs().max().item()  # NaN if any value is NaN
    if not math.isfinite(largest):
        raise BadMessage(P.NOT_FINITE, f"NaN or infinite values in {what}")
    if largest > limit:
        raise BadMessage(P.NOT_FINITE, f"a value of magnitude {largest:.3g} in {what}, beyond {limit:g}")


def show_specs(specs) -> str:
    """Tensor specs for a message: 'float32[61706], float64[0 or 12]' (lengths: an int or a set)."""
    if not specs:
        return "no tensors"
    parts = []
    for dtype, lengths in specs:
        lengths = sorted(lengths) if isinstance(lengths, set) else [lengths]
        parts.append(f"{str(dtype).removeprefix('torch.')}[{' or '.join(map(str, lengths))}]")
    return ", ".join(parts)


def encode_header(msg: Message) -> bytes:
    if len(msg.numbers) > MAX_NUMBERS or len(msg.tensors) > MAX_TENSORS:
        raise ValueError(f"message {msg.op}: at most {MAX_NUMBERS} numbers and {MAX_TENSORS} tensors")
    values = [0.0] * HEADER
    values[:4] = [MAGIC, msg.op, len(msg.numbers), len(msg.tensors)]
    values[4:4 + len(msg.numbers)] = [float(n) for n in msg.numbers]
    for i, t in enumerate(msg.tensors):
        values[4 + MAX_NUMBERS + 2 * i] = DTYPES.index(t.dtype)
        values[5 + MAX_NUMBERS + 2 * i] = t.numel()
    return struct.pack(_HEADER_FORMAT, *values)


def _count(value: float, limit: int, what: str) -> int:
    if not (math.isfinite(value) and value == int(value) and 0 <= value <= limit):
        raise BadMessage(P.MALFORMED, f"{what} {value!r} in the header")
    return int(value)


def decode_header(data: bytes) -> tuple[int, tuple[float, ...], list[Spec]]:
    """(op, numbers, [(dtype, length)] of the tensors that follow); ``BadMessage`` if it is not a
    header of this version (nothing here allocates more than the header itself)."""
    values = struct.unpack(_HEADER_FORMAT, data)
    if values[0] != MAGIC:
        raise BadMessage(P.MALFORMED, "a message that is not from this version of cnntrain arrived; are all roles "
                                      "running the same cnntrain?")
    op = _count(values[1], 2**31, "op")
    n_numbers = _count(values[2], MAX_NUMBERS, "number count")
    n_tensors = _count(values[3], MAX_TENSORS, "tensor count")
    numbers = values[4:4 + n_numbers]
    if not all(math.isfinite(n) for n in numbers):
        raise BadMessage(P.NOT_FINITE, "a number that is NaN or infinite")
    specs = [(DTYPES[_count(values[4 + MAX_NUMBERS + 2 * i], len(DTYPES) - 1, "dtype")],
              _count(values[5 + MAX_NUMBERS + 2 * i], MAX_NUMEL, "tensor length")) for i in range(n_tensors)]
    return op, tuple(numbers), specs
