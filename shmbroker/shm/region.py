"""Named POSIX shared-memory regions: create, attach, close, unlink.

Rules (CPython's shared_memory.py, minus its resource tracker):

* **The creator unlinks, attachers only close.** ``Region.create`` returns a region with
  ``owner=True``; ``unlink()`` on a region that is not the owner is an AssertionError.
* Creation is ``O_CREAT | O_EXCL`` with mode 0600 (owner-only); a name that exists is
  RegionExistsError, never silently reused.
* A region is never registered with ``multiprocessing``'s resource tracker (posix_ipc does
  not know about it): the tracker unlinks segments other processes still use (gh-82300).
* Half-built objects are cleaned up: if mapping or initialising fails after the object was
  created, it is unlinked before the error propagates.
* Every region of ours starts with the same 24-byte prefix -- u64 magic, u32 layout version,
  u32 header bytes, u64 region bytes -- checked on attach (RegionHeaderError, naming the
  object) before any other field is trusted. The creator writes the magic last, so an attacher
  never accepts a half-initialised header.

Fork: a Region holds only an mmap and its name; after fork the child shares the mapping (the
same physical pages), which stays valid. A client that forks re-creates its own rings in the
child (see docs/design/shm.md, "Fork"); nothing here holds a lock or a thread.
"""
from __future__ import annotations

import mmap
import os
import struct

import posix_ipc

from .. import errors

_PREFIX = struct.Struct("<QIIQ")  # magic, layout_version, header_bytes, region_bytes
PREFIX_BYTES = _PREFIX.size
MAGIC_OFFSET = 0
REGION_MODE = 0o600


#: Where Linux keeps POSIX shared-memory objects (their names are file names there).
SHM_DIR = "/dev/shm"


def _posix(name: str) -> str:
    assert name and "/" not in name, name
    return "/" + name


class Region:
    """One mapped shared-memory object. Not thread-safe; owned by the process that made it."""

    def __init__(self, name: str, mm: mmap.mmap, owner: bool, readonly: bool, inode: int = -1):
        self.name = name
        self.owner = owner
        self.readonly = readonly
        self._mm: mmap.mmap | None = mm
        #: The object mapped (its inode in /dev/shm): a region of the same name made later (a
        #: restarted broker, a re-created topic) is another object (is_current).
        self.inode = inode

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, size: int) -> "Region":
        """Creates ``name`` (O_EXCL, 0600) of ``size`` zero bytes and maps it read-write."""
        assert size > PREFIX_BYTES, size
        try:
            shm = posix_ipc.SharedMemory(_posix(name), posix_ipc.O_CREX, mode=REGION_MODE,
                                         size=size)
        except posix_ipc.ExistentialError:
            raise errors.RegionExistsError(f"shared memory {name!r} already exists") from None
        try:
            os.fchmod(shm.fd, REGION_MODE)  # whatever the umask said
            inode = os.fstat(shm.fd).st_ino
            mm = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            shm.close_fd()
            _unlink_quietly(name)
            raise
        shm.close_fd()
        return cls(name, mm, owner=True, readonly=False, inode=inode)

    @classmethod
    def attach(cls, name: str, *, magic: int, layout_version: int, readonly: bool = False,
               what: str = "region") -> "Region":
        """Maps an existing ``name`` and checks its common header prefix.

        RegionNotFoundError when it does not exist; RegionHeaderError when it is too small,
        its magic or layout version differ, or its declared size is not the object's size.
        """
        try:
            shm = posix_ipc.SharedMemory(_posix(name), 0, read_only=readonly)
        except posix_ipc.ExistentialError:
            raise errors.RegionNotFoundError(f"no shared memory {name!r}") from None
        try:
            st = os.fstat(shm.fd)
            size = st.st_size
            if size == 0:  # shm_open'd, not yet ftruncate'd by its creator
                raise errors.RegionNotReadyError(f"{what} {name!r}: not sized yet (0 bytes)", 0)
            if size < PREFIX_BYTES:
                raise errors.RegionHeaderError(
                    f"{what} {name!r}: {size} bytes, smaller than a header")
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, prot)
        finally:
            shm.close_fd()
        region = cls(name, mm, owner=False, readonly=readonly, inode=st.st_ino)
        try:
            region.check_prefix(magic, layout_version, what)
        except BaseException:
            region.close()
            raise
        return region

    def check_prefix(self, magic: int, layout_version: int, what: str) -> None:
        found_magic, version, _header, declared = _PREFIX.unpack_from(self.buf, 0)
        if found_magic == 0:  # written last (write_prefix): its creator is not done
            raise errors.RegionNotReadyError(
                f"{what} {self.name!r}: not initialised yet (magic 0)", 0)
        if found_magic != magic:
            raise errors.RegionHeaderError(
                f"{what} {self.name!r}: bad magic 0x{found_magic:016x}, expected "
                f"0x{magic:016x}", 0)
        if version != layout_version:
            raise errors.RegionHeaderError(
                f"{what} {self.name!r}: layout version {version}, this build reads version "
                f"{layout_version} (processes from different builds?)", 8)
        if declared != self.size:
            raise errors.RegionHeaderError(
                f"{what} {self.name!r}: header says {declared} bytes, the object has "
                f"{self.size}", 16)

    def write_prefix(self, magic: int, layout_version: int, header_bytes: int) -> None:
        """Writes version, header size and region size, then the magic last (release)."""
        from ..native import _native

        _PREFIX.pack_into(self.buf, 0, 0, layout_version, header_bytes, self.size)
        _native.atomic_store_u64(self.buf, MAGIC_OFFSET, magic)

    def is_current(self) -> bool:
        """Whether ``name`` still names the object mapped here (one stat; False when the name
        is gone or now names another object: its creator stopped, or made it again)."""
        try:
            return os.stat(os.path.join(SHM_DIR, self.name)).st_ino == self.inode
        except FileNotFoundError:
            return False

    @property
    def buf(self) -> mmap.mmap:
        if self._mm is None:
            raise errors.SharedMemoryError(f"region {self.name!r} is closed")
        return self._mm

    @property
    def size(self) -> int:
        return len(self.buf)

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Unmaps (idempotent). The object itself stays until its owner unlinks it."""
        mm, self._mm = self._mm, None
        if mm is not None:
            mm.close()

    def unlink(self) -> None:
        """Removes the name (owner only; idempotent). Mappings elsewhere stay valid."""
        assert self.owner, f"only the creator unlinks {self.name!r}"
        _unlink_quietly(self.name)

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc) -> None:
        if self.owner:
            self.unlink()
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.size} bytes"
        return f"Region({self.name!r}, {state}, owner={self.owner})"


def _unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(_posix(name))
    except posix_ipc.ExistentialError:
        pass


def unlink(name: str) -> bool:
    """Removes ``name`` on behalf of a dead owner (stale cleanup). True if it existed."""
    try:
        posix_ipc.unlink_shared_memory(_posix(name))
        return True
    except posix_ipc.ExistentialError:
        return False


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))
