"""Type stub for ``aioxen._native``, the cffi (API mode) extension built from
``aioxen/_native_build.py`` (declarations: its ``CDEF``) and ``aioxen/_native_impl.c``.

``ffi`` is the module's cffi ``FFI`` instance (only the methods aioxen uses are declared);
``lib`` holds the C functions.  ``_CData``, ``_FFI`` and ``_Lib`` exist for the type
checker only (import them under ``TYPE_CHECKING``).  C integer types map to ``int``,
``double`` to ``float``; pointer parameters take a cffi ``CData`` pointer
(``ffi.from_buffer``, ``ffi.new``, ``ffi.cast``) or a bytes-like object cffi pins for the
call.
"""

from types import TracebackType
from typing import Any, Final, final, overload

_Buffer = bytes | bytearray | memoryview

@final
class _CData:
    """A cffi C value: a pointer or an array (``ffi.from_buffer``, ``ffi.new``)."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...
    def __setitem__(self, index: int, value: Any) -> None: ...
    def __add__(self, offset: int) -> _CData: ...
    def __sub__(self, offset: int) -> _CData: ...
    def __bool__(self) -> bool: ...
    def __enter__(self) -> _CData: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

# a pointer argument: cffi pins a bytes-like object for the duration of the call
_Ptr = _CData | _Buffer
# a writable pointer argument
_WPtr = _CData | bytearray | memoryview

@final
class _FFI:
    NULL: Final[_CData]
    @overload
    def from_buffer(self, python_buffer: Any, /, require_writable: bool = ...) -> _CData: ...
    @overload
    def from_buffer(
        self, cdecl: str, python_buffer: Any, /, require_writable: bool = ...
    ) -> _CData: ...
    def release(self, cdata: _CData, /) -> None: ...
    def new(self, cdecl: str, init: Any = ..., /) -> _CData: ...
    def cast(self, cdecl: str, value: _CData | int, /) -> _CData: ...
    def buffer(self, cdata: _CData, size: int = ..., /) -> memoryview: ...
    def sizeof(self, cdecl: str | _CData, /) -> int: ...
    def string(self, cdata: _CData, maxlen: int = ..., /) -> bytes: ...

@final
class _Lib:
    # atomics and fences on shared memory
    def ax_load_u8(self, base: _Ptr, off: int, /) -> int: ...
    def ax_load_u16(self, base: _Ptr, off: int, /) -> int: ...
    def ax_load_u32(self, base: _Ptr, off: int, /) -> int: ...
    def ax_store_u8(self, base: _WPtr, off: int, v: int, /) -> None: ...
    def ax_store_u16(self, base: _WPtr, off: int, v: int, /) -> None: ...
    def ax_store_u32(self, base: _WPtr, off: int, v: int, /) -> None: ...
    def ax_fetch_or_u8(self, base: _WPtr, off: int, v: int, /) -> int: ...
    def ax_fetch_and_u8(self, base: _WPtr, off: int, v: int, /) -> int: ...
    def ax_exchange_u32(self, base: _WPtr, off: int, v: int, /) -> int: ...
    def ax_fence(self) -> None: ...
    # byte rings (console, xenstore ring, vchan)
    def ax_bring_used(self, idx: _Ptr, cons_off: int, prod_off: int, size: int, /) -> int: ...
    def ax_bring_write(
        self,
        idx: _WPtr,
        cons_off: int,
        prod_off: int,
        ring: _WPtr,
        size: int,
        src: _Ptr,
        n: int,
        /,
    ) -> int: ...
    def ax_bring_read(
        self,
        idx: _WPtr,
        cons_off: int,
        prod_off: int,
        ring: _Ptr,
        size: int,
        dst: _WPtr,
        n: int,
        /,
    ) -> int: ...
    def ax_ring_copy_in(self, ring: _WPtr, size: int, idx: int, src: _Ptr, n: int, /) -> None: ...
    def ax_ring_copy_out(self, ring: _Ptr, size: int, idx: int, dst: _WPtr, n: int, /) -> None: ...
    def ax_memcpy(self, dst: _WPtr, src: _Ptr, n: int, /) -> None: ...
    # system calls for the xen platform
    def ax_address(self, p: _Ptr, /) -> int: ...
    def ax_mmap_fixed(self, addr: int, len: int, prot: int, fd: int, offset: int, /) -> int: ...
    def ax_mprotect(self, addr: int, len: int, prot: int, /) -> int: ...
    def ax_ioctl(self, fd: int, request: int, arg: _WPtr, /) -> int: ...
    def ax_memcpy_repeat(self, dst: _WPtr, src: _Ptr, n: int, times: int, /) -> None: ...
    # io/ring.h rings (aioxen.rings.sring)
    def ax_ring_push(
        self, base: _WPtr, prod_off: int, event_off: int, old: int, nw: int, /
    ) -> int: ...
    def ax_store_fence(self, base: _WPtr, off: int, v: int, /) -> None: ...
    def ax_ring_push_checked(
        self, base: _WPtr, prod_off: int, event_off: int, old: int, nw: int, /
    ) -> int: ...
    def ax_ring_final_check(
        self, base: _WPtr, prod_off: int, event_off: int, cons: int, ahead: int, /
    ) -> int: ...
    # vchan byte rings with the notify-bit protocol (aioxen.vchan.wire)
    def ax_vchan_poll(
        self,
        ctrl: _Ptr,
        cons_off: int,
        prod_off: int,
        notify_off: int,
        eof_bit: int,
        size: int,
        /,
    ) -> int: ...
    def ax_vchan_consume(
        self, ctrl: _WPtr, cons_off: int, notify_off: int, cons: int, bit: int, /
    ) -> int: ...
    def ax_vchan_send(
        self,
        ctrl: _WPtr,
        cons_off: int,
        prod_off: int,
        notify_off: int,
        ring: _WPtr,
        size: int,
        src: _Ptr,
        n: int,
        /,
    ) -> int: ...
    def ax_vchan_recv(
        self,
        ctrl: _WPtr,
        cons_off: int,
        prod_off: int,
        notify_off: int,
        ring: _Ptr,
        size: int,
        dst: _WPtr,
        n: int,
        /,
    ) -> int: ...
    def ax_vchan_arm(
        self,
        ctrl: _WPtr,
        peer_notify_off: int,
        bit: int,
        cons_off: int,
        prod_off: int,
        size: int,
        /,
    ) -> int: ...
    def ax_vchan_poll_arm(
        self,
        ctrl: _WPtr,
        cons_off: int,
        prod_off: int,
        notify_off: int,
        eof_bit: int,
        live_off: int,
        peer_notify_off: int,
        arm_bit: int,
        size: int,
        /,
    ) -> int: ...
    def ax_vchan_step(self, ctrl: _WPtr, cfg: _CData, new_cons: int, arm_bit: int, /) -> int: ...
    # vchan bulk spin-wait (issue 18): -1 after max_ns, else ns until prod - cons != stuck
    # | ns of that off the CPU << 24
    def ax_vchan_spin(
        self, ctrl: _Ptr, cons_off: int, prod_off: int, stuck: int, max_ns: int, /
    ) -> int: ...
    # benchmark reference: a cross-process byte stream through a shared ring, all in C
    def ax_xring_produce(
        self,
        hdr: _WPtr,
        ring: _WPtr,
        size: int,
        src: _Ptr,
        chunk: int,
        total: int,
        timeout: float,
        /,
    ) -> int: ...
    def ax_xring_consume(
        self,
        hdr: _WPtr,
        ring: _Ptr,
        size: int,
        dst: _WPtr,
        room: int,
        total: int,
        timeout: float,
        /,
    ) -> int: ...

ffi: Final[_FFI]
lib: Final[_Lib]
