"""Two Mooncake TransferEngines in one process on 127.0.0.1 over TCP: register a large
MAP_NORESERVE region (does registration commit memory?), write into an untouched page of the
peer's region, read it back; then unregister and re-register a sub-range."""

import ctypes, mmap, os, resource, sys, time
from mooncake.engine import TransferEngine


def rss():
    with open("/proc/self/status") as f:
        for l in f:
            if l.startswith("VmRSS"):
                return l.strip()


SIZE = 8 << 30  # 8 GiB reservation
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
MAP_NORESERVE = 0x4000


def reserve(n):
    p = libc.mmap(
        None,
        n,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
        -1,
        0,
    )
    assert p not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    return p


proto = sys.argv[1] if len(sys.argv) > 1 else "tcp"
a, b = TransferEngine(), TransferEngine()
print("init a", a.initialize("127.0.0.1", "P2PHANDSHAKE", proto, ""))
print("init b", b.initialize("127.0.0.1", "P2PHANDSHAKE", proto, ""))
sa = f"127.0.0.1:{a.get_rpc_port()}"
sb = f"127.0.0.1:{b.get_rpc_port()}"
print("sessions", sa, sb)
ra, rb = reserve(SIZE), reserve(SIZE)
print("before register", rss())
print("register a", a.register_memory(ra, SIZE))
print("register b", b.register_memory(rb, SIZE))
print("after register 2x8GiB", rss())
# write 4 KiB from a (page 0 written locally) to b at offset 5 GiB (untouched)
ctypes.memset(ra, 0x5A, 4096)
off = 5 << 30
t0 = time.time()
print(
    "transfer_sync_write ->",
    a.transfer_sync_write(sb, ra, rb + off, 4096),
    f"{time.time() - t0:.3f}s",
)
print("peer byte", ctypes.c_ubyte.from_address(rb + off).value, "after write", rss())
# write beyond the registered range of b: expect an error
print("write outside peer registration ->", a.transfer_sync_write(sb, ra, rb + SIZE + 4096, 16))
# unregister b, then transfer must fail; register a 1 GiB sub-range at offset 5 GiB, retry
print("unregister b", b.unregister_memory(rb))
print("write after peer unregister ->", a.transfer_sync_write(sb, ra, rb + off, 4096))
print("register b sub-range", b.register_memory(rb + off, 1 << 30))
print("write into sub-range ->", a.transfer_sync_write(sb, ra, rb + off + 8192, 4096))
print("batch_register a 2 more ->", a.batch_register_memory([ra + (1 << 30)], [1 << 20]))
print("done", rss())
