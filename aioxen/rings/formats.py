"""Ring entry formats: how one request or response is laid out in an ``io/ring.h`` slot.

Theory of operation
-------------------
An ``io/ring.h`` ring slot is a C ``union`` of the request and the response type, so its
size is the larger of the two rounded up to the stricter alignment.  The ring core
([`aioxen.rings.sring`][]) only needs three things from a format: its ``size``, its
``align``, and a way to pack a value into / unpack a value from a byte buffer.  The async
layer ([`aioxen.rings.aio`][]) additionally needs the ``id`` field, which the front end
allocates and the back end echoes in the response: [`EntryFormat.get_id`][] and
[`EntryFormat.with_id`][].

Values are ``NamedTuple`` records.  Decoding always works on a private copy of the slot
(the ring core copies the bytes out of shared memory once), so a value never changes
under its user.  Decoders never raise on odd field values (e.g. a ``nr_segments`` above
11): validating request semantics is the device's job, and a device answers a bad request
with an error response instead of tearing down the ring.

This module is the machinery only, like ``io/ring.h``: [`StructFormat`][] over a
[`struct`][] layout and a ``NamedTuple`` class, and [`RawFormat`][] (values are the
slot's ``bytes``, for protocols that decide a slot's type from its neighbours, like netif
extra-info slots).  Each device package owns its layouts, as ``netif.h``/``blkif.h`` do:
[`aioxen.net.netif`][] (``NETIF_TX_REQUEST`` ...) and [`aioxen.blk.blkif`][]
(``BLKIF_REQUEST`` ..., both ABIs).  All Xen ABIs are little-endian.
"""

from __future__ import annotations

import functools
import itertools
import operator
import struct
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
R = TypeVar("R", bound=tuple[Any, ...])

WritableBuffer = memoryview | bytearray
ReadableBuffer = memoryview | bytearray | bytes


class EntryFormat(Protocol[T]):
    """What the ring core and the async layer need to know about one entry type."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int:
        """``sizeof`` of the C struct (including its tail padding)."""
        ...

    @property
    def align(self) -> int:
        """``_Alignof`` of the C struct."""
        ...

    @property
    def id_bits(self) -> int:
        """Width of the ``id`` field in bits (0 if the format has no id)."""
        ...

    def pack_into(self, buf: WritableBuffer, offset: int, value: T) -> None:
        """Write ``value`` at ``offset``; exactly [`size`][] bytes are written."""
        ...

    def unpack_from(self, buf: ReadableBuffer, offset: int = 0) -> T:
        """Decode the [`size`][] bytes at ``offset``."""
        ...

    def get_id(self, value: T) -> int: ...

    def with_id(self, value: T, ident: int) -> T: ...


def slot_size(req: EntryFormat[Any], rsp: EntryFormat[Any]) -> int:
    """``sizeof(union { req; rsp; })``: the larger size rounded up to the larger alignment."""
    align = max(req.align, rsp.align)
    size = max(req.size, rsp.size)
    return (size + align - 1) // align * align


class BatchCodec(Protocol[T]):
    """Whole-batch encoding of entries into consecutive ring slots of ``slot`` bytes.

    The ring core uses it to move a batch with a couple of C-level calls instead of one
    Python call per entry; [`batch_codec`][] returns a generic (per-entry) codec for
    formats that do not provide a faster one.
    """

    def pack(self, values: Sequence[T]) -> bytes:
        """``len(values) * slot`` bytes: each value packed and padded to the slot."""
        ...

    def unpack(self, data: bytes) -> list[T]:
        """Decode ``len(data) // slot`` consecutive slots."""
        ...

    def with_ids(self, values: Sequence[T], ids: Sequence[int]) -> list[T]: ...

    def pack_with_ids(self, values: Sequence[T], ids: Sequence[int]) -> bytes:
        """``pack(with_ids(values, ids))``, without building the new records."""
        ...

    def ids(self, values: Sequence[T]) -> list[int]: ...


class GenericCodec(Generic[T]):
    """The per-entry [`BatchCodec`][]: one ``fmt`` call per entry.

    Specialised codecs subclass it and override the methods they can do faster.
    """

    def __init__(self, fmt: EntryFormat[T], slot: int) -> None:
        self._fmt = fmt
        self._slot = slot

    def pack(self, values: Sequence[T]) -> bytes:
        slot, fmt = self._slot, self._fmt
        buf = bytearray(slot * len(values))
        for i, v in enumerate(values):
            fmt.pack_into(buf, i * slot, v)
        return bytes(buf)

    def unpack(self, data: bytes) -> list[T]:
        slot, fmt = self._slot, self._fmt
        return [fmt.unpack_from(data, off) for off in range(0, len(data), slot)]

    def with_ids(self, values: Sequence[T], ids: Sequence[int]) -> list[T]:
        w = self._fmt.with_id
        return [w(v, i) for v, i in zip(values, ids, strict=True)]

    def pack_with_ids(self, values: Sequence[T], ids: Sequence[int]) -> bytes:
        return self.pack(self.with_ids(values, ids))

    def ids(self, values: Sequence[T]) -> list[int]:
        g = self._fmt.get_id
        return [g(v) for v in values]


def batch_codec(fmt: EntryFormat[T], slot: int) -> BatchCodec[T]:
    """``fmt``'s own batch codec for ``slot``-byte slots if it has one, else a generic one."""
    if slot < fmt.size:
        raise ValueError(f"{fmt.name}: slot of {slot} bytes cannot hold {fmt.size}")
    make = getattr(fmt, "batch_codec", None)
    if make is not None:
        codec: BatchCodec[T] = make(slot)
        return codec
    return GenericCodec(fmt, slot)


def _no_id(name: str) -> TypeError:
    return TypeError(f"format {name} has no id field")


class FixedFormat:
    """The attributes every format here shares: ``name``, ``size``, ``align``, ``id_bits``."""

    def __init__(self, name: str, size: int, align: int, id_bits: int) -> None:
        self._name = name
        self._size = size
        self._align = align
        self._id_bits = id_bits

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def align(self) -> int:
        return self._align

    @property
    def id_bits(self) -> int:
        return self._id_bits


_SMALL_BATCH = 8
"""Up to this many entries `pack_with_ids` rebuilds the rows with their ids; above, it
patches the ids into the packed bytes (fewer Python-level steps per entry)."""


class _StructCodec(Generic[R]):
    """C-speed batches: ``starmap`` of one padded `struct.Struct` to pack,
    ``iter_unpack`` to decode, ``tuple.__new__`` to build the records."""

    def __init__(self, fmt: StructFormat[R], slot: int) -> None:
        pad = slot - fmt.layout_size
        self._struct = struct.Struct(fmt.layout + (f"{pad}x" if pad else ""))
        record = fmt.record
        if isinstance(record, type) and issubclass(record, tuple):
            make: Any = functools.partial(tuple.__new__, record)
        else:
            make = lambda t: record(*t)  # noqa: E731
        self._make: Callable[[Any], R] = make
        self._id_index = fmt.id_index
        self._fmt = fmt
        self._slot = slot
        self._get_id = operator.itemgetter(fmt.id_index) if fmt.id_index >= 0 else None
        self._id_patch: tuple[str, int, int] | None = None
        if fmt.id_index >= 0:
            order = fmt.layout[0] if fmt.layout[0] in "<>=!@" else "@"
            codes = _field_codes(fmt.layout)
            code = codes[fmt.id_index]
            if code in "bBhHiIlLqQ":
                offset = _field_offset(fmt.layout, fmt.id_index)
                self._id_patch = (order + "{n}" + code, offset, struct.calcsize(order + code))

    def pack(self, values: Sequence[R]) -> bytes:
        return b"".join(itertools.starmap(self._struct.pack, values))

    def unpack(self, data: bytes) -> list[R]:
        return list(map(self._make, self._struct.iter_unpack(data)))

    def with_ids(self, values: Sequence[R], ids: Sequence[int]) -> list[R]:
        i, make = self._id_index, self._make
        if i < 0:
            raise _no_id(self._fmt.name)
        return [make((*v[:i], ident, *v[i + 1 :])) for v, ident in zip(values, ids, strict=True)]

    def pack_with_ids(self, values: Sequence[R], ids: Sequence[int]) -> bytes:
        i = self._id_index
        if i < 0:
            raise _no_id(self._fmt.name)
        if len(values) != len(ids):
            raise ValueError(f"{len(values)} values but {len(ids)} ids")
        patch = self._id_patch
        if patch is None or len(ids) <= _SMALL_BATCH:  # rebuilding a few rows is cheaper
            rows = [(*v[:i], ident, *v[i + 1 :]) for v, ident in zip(values, ids)]  # noqa: B905
            return b"".join(itertools.starmap(self._struct.pack, rows))
        # Pack the values as they are, then overwrite every slot's id field with strided
        # slice assignments (one per byte of the id): all C-level work.
        fmt, offset, width = patch
        data = bytearray(b"".join(itertools.starmap(self._struct.pack, values)))
        raw = struct.pack(fmt.format(n=len(ids)), *ids)
        slot = self._slot
        for j in range(width):
            data[offset + j :: slot] = raw[j::width]
        return bytes(data)

    def ids(self, values: Sequence[R]) -> list[int]:
        get = self._get_id
        if get is None:
            raise _no_id(self._fmt.name)
        return list(map(get, values))


class StructFormat(FixedFormat, Generic[R]):
    """A flat C struct described by a [`struct`][] layout and a ``NamedTuple`` class.

    ``layout`` uses explicit byte order and explicit padding (``x``), e.g. ``"<IHHHH"`` for
    ``netif_tx_request``; ``size`` may exceed the layout's size to express C tail padding.
    ``id_field`` names the field the async layer uses to match responses to requests.
    """

    def __init__(
        self,
        name: str,
        layout: str,
        record: Callable[..., R],
        *,
        id_field: str | None = "id",
        fields: Sequence[str] | None = None,
        size: int | None = None,
        align: int = 4,
    ) -> None:
        self._struct = struct.Struct(layout)
        self._record = record
        names: Sequence[str] = fields if fields is not None else record._fields  # type: ignore[attr-defined]
        self._fields = tuple(names)
        full = size if size is not None else self._struct.size
        if full < self._struct.size:
            raise ValueError(f"{name}: size {full} < layout size {self._struct.size}")
        if align & (align - 1) or align <= 0:
            raise ValueError(f"{name}: alignment {align} is not a power of two")
        self._pad = bytes(full - self._struct.size)
        if id_field is None:
            self._id_index = -1
            id_bits = 0
        else:
            self._id_index = self._fields.index(id_field)
            code = _field_codes(layout)[self._id_index]
            id_bits = struct.calcsize("<" + code) * 8
        super().__init__(name, full, align, id_bits)

    @property
    def fields(self) -> tuple[str, ...]:
        return self._fields

    @property
    def layout(self) -> str:
        return self._struct.format

    @property
    def layout_size(self) -> int:
        return self._struct.size

    @property
    def record(self) -> Callable[..., R]:
        return self._record

    @property
    def id_index(self) -> int:
        """Position of the id among the record's fields (-1: none)."""
        return self._id_index

    def batch_codec(self, slot: int) -> BatchCodec[R]:
        return _StructCodec(self, slot)

    def pack_into(self, buf: WritableBuffer, offset: int, value: R) -> None:
        self._struct.pack_into(buf, offset, *value)
        if self._pad:
            end = offset + self._struct.size
            buf[end : end + len(self._pad)] = self._pad

    def pack(self, value: R) -> bytes:
        return self._struct.pack(*value) + self._pad

    def unpack_from(self, buf: ReadableBuffer, offset: int = 0) -> R:
        return self._record(*self._struct.unpack_from(buf, offset))

    def get_id(self, value: R) -> int:
        if self._id_index < 0:
            raise _no_id(self._name)
        return int(value[self._id_index])

    def with_id(self, value: R, ident: int) -> R:
        if self._id_index < 0:
            raise _no_id(self._name)
        items = list(value)
        items[self._id_index] = ident
        return self._record(*items)

    def __repr__(self) -> str:
        return f"<StructFormat {self._name} size={self._size}>"


def _layout_items(layout: str) -> tuple[str, list[str]]:
    """Split a [`struct`][] layout into its byte order prefix and its items: ``"2x"`` for
    padding, ``"6s"``/``"6p"`` for a string, one code per repeated value (``"2H"`` gives
    ``"H", "H"``)."""
    order = layout[0] if layout[:1] in ("<", ">", "=", "!", "@") else ""
    items: list[str] = []
    count = ""
    for ch in layout[len(order) :]:
        if ch.isdigit():
            count += ch
            continue
        n = int(count) if count else 1
        count = ""
        if ch in "xsp":
            items.append(f"{n}{ch}")
        else:
            items.extend([ch] * n)
    return order, items


def _field_offset(layout: str, index: int) -> int:
    """Byte offset of the ``index``-th value-carrying field of ``layout``."""
    order, items = _layout_items(layout)
    seen = 0
    for i, code in enumerate(items):
        if code.endswith("x"):
            continue
        if seen == index:
            full = struct.calcsize(order + "".join(items[: i + 1]))
            return full - struct.calcsize(order + code)
        seen += 1
    raise IndexError(f"layout {layout!r} has no field {index}")


def _field_codes(layout: str) -> list[str]:
    """The struct codes of the *value-carrying* fields of ``layout`` (pads skipped)."""
    return [code for code in _layout_items(layout)[1] if not code.endswith("x")]


class RawFormat(FixedFormat):
    """Opaque entries: values are ``bytes`` of exactly ``size``; ``id`` is a little-endian
    integer of ``id_bits`` at ``id_offset`` (default: none)."""

    def __init__(
        self,
        size: int,
        *,
        name: str = "raw",
        align: int = 4,
        id_offset: int = 0,
        id_bits: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError("entry size must be positive")
        super().__init__(name, size, align, id_bits)
        self._id_offset = id_offset

    @property
    def id_offset(self) -> int:
        return self._id_offset

    def pack_into(self, buf: WritableBuffer, offset: int, value: bytes) -> None:
        if len(value) != self._size:
            raise ValueError(f"{self._name}: entry must be {self._size} bytes, got {len(value)}")
        buf[offset : offset + self._size] = value

    def unpack_from(self, buf: ReadableBuffer, offset: int = 0) -> bytes:
        return bytes(buf[offset : offset + self._size])

    def get_id(self, value: bytes) -> int:
        if not self._id_bits:
            raise _no_id(self._name)
        width = self._id_bits // 8
        return int.from_bytes(value[self._id_offset : self._id_offset + width], "little")

    def with_id(self, value: bytes, ident: int) -> bytes:
        if not self._id_bits:
            raise _no_id(self._name)
        width = self._id_bits // 8
        o = self._id_offset
        return value[:o] + ident.to_bytes(width, "little") + value[o + width :]


__all__ = [
    "BatchCodec",
    "EntryFormat",
    "FixedFormat",
    "GenericCodec",
    "RawFormat",
    "StructFormat",
    "batch_codec",
    "slot_size",
]
