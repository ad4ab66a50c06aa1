"""Mooncake TCP: is the LOCAL source of a write required to lie in a registered buffer?
And batch_register of adjacent (non-overlapping) segments, batch_unregister of some."""

import ctypes, mmap
from mooncake.engine import TransferEngine

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]


def reserve(n):
    return libc.mmap(None, n, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000, -1, 0)


a, b = TransferEngine(), TransferEngine()
a.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
b.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
sb = f"127.0.0.1:{b.get_rpc_port()}"
SEG = 2 << 20
ra, rb = reserve(64 * SEG), reserve(64 * SEG)
ctypes.memset(ra, 7, 4096)
print(
    "register b segs 0..3 (adjacent) ->",
    b.batch_register_memory([rb + i * SEG for i in range(4)], [SEG] * 4),
)
print("write from UNREGISTERED local src ->", a.transfer_sync_write(sb, ra, rb + 10, 100))
print("a registers seg 0 ->", a.register_memory(ra, SEG))
print("write from registered local src ->", a.transfer_sync_write(sb, ra, rb + 10, 100))
print("write spanning peer segs 0|1 ->", a.transfer_sync_write(sb, ra, rb + SEG - 50, 100))
print("batch_unregister b segs 2,3 ->", b.batch_unregister_memory([rb + 2 * SEG, rb + 3 * SEG]))
print("write into peer seg 2 (unregistered) ->", a.transfer_sync_write(sb, ra, rb + 2 * SEG + 8, 8))
print("write into peer seg 1 (still registered) ->", a.transfer_sync_write(sb, ra, rb + SEG + 8, 8))
print("re-register b seg 2 ->", b.register_memory(rb + 2 * SEG, SEG))
print("write into peer seg 2 again ->", a.transfer_sync_write(sb, ra, rb + 2 * SEG + 8, 8))
