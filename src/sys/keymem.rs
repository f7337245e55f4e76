//! Where plaintext keys live: one arena of key slots, mapped and locked once at start, each
//! slot cleared when its key is dropped; and the process allocator, which clears every heap
//! block before it is freed or moved, so buffers that carried key material on their way
//! through HTTP, TLS and JSON leave nothing behind.
//!
//! The arena is either locked anonymous memory (`mlock`, never swapped, the default) or,
//! with `--key-memory=secret`, a `memfd_secret(2)` mapping: locked too, and removed from the
//! kernel's direct map, so not even the kernel (nor `/proc/PID/mem`) can read it. Locking the
//! pages once, rather than per key, keeps the locked set small and fixed and a key's drop
//! cheap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use nix::errno::Errno;

use super::SysError;

/// The bytes of one slot: the largest key sealvol holds (a 64-byte fscrypt master key).
pub(crate) const SLOT_BYTES: usize = 64;
/// Slots in the arena: far more keys than can be in flight at once (one or two per call).
const SLOTS: usize = 256;
const ARENA_BYTES: usize = SLOT_BYTES * SLOTS;

/// Which memory holds the key arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMemory {
    /// Anonymous memory locked with `mlock`.
    Locked,
    /// A `memfd_secret` mapping (Linux 5.14+, when the kernel enables it).
    Secret,
}

struct Arena {
    base: NonNull<u8>,
    kind: KeyMemory,
    free: Mutex<Vec<u16>>,
}

// SAFETY: the arena's memory is only reached through slots, each handed to one owner at a
// time under the free-list mutex; the pointer itself never changes.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

static ARENA: OnceLock<Result<Arena, String>> = OnceLock::new();

/// Maps and locks the key arena; call once at start, before any key is made. Without this
/// call the first key maps a `Locked` arena.
pub(crate) fn init_key_memory(kind: KeyMemory) -> Result<KeyMemory, SysError> {
    match ARENA.get_or_init(|| Arena::map(kind)) {
        Ok(a) if a.kind == kind => Ok(kind),
        Ok(a) => Err(SysError::KeyMemory(format!(
            "the arena is already mapped as {:?}",
            a.kind
        ))),
        Err(e) => Err(SysError::KeyMemory(e.clone())),
    }
}

fn arena() -> Result<&'static Arena, SysError> {
    ARENA
        .get_or_init(|| Arena::map(KeyMemory::Locked))
        .as_ref()
        .map_err(|e| SysError::KeyMemory(e.clone()))
}

impl Arena {
    fn map(kind: KeyMemory) -> Result<Arena, String> {
        let base = match kind {
            KeyMemory::Locked => map_locked()?,
            KeyMemory::Secret => map_secret()?,
        };
        Ok(Arena {
            base,
            kind,
            free: Mutex::new((0..SLOTS as u16).rev().collect()),
        })
    }
}

fn map_locked() -> Result<NonNull<u8>, String> {
    use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};
    let len = std::num::NonZeroUsize::new(ARENA_BYTES).ok_or("the arena has no size")?;
    // SAFETY: a fresh private anonymous mapping, aliasing nothing; it is never unmapped (the
    // arena lives as long as the process).
    let ptr = unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE,
        )
    }
    .map_err(|e| format!("mmap: {e}"))?;
    // SAFETY: the range is the mapping just made. mlock also faults the pages in.
    unsafe { nix::sys::mman::mlock(ptr, ARENA_BYTES) }.map_err(|e| {
        format!("mlock of {ARENA_BYTES} bytes: {e}; raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK")
    })?;
    // SAFETY: advice on the mapping just made; a failure only means it would be dumped, and
    // the process is non-dumpable anyway.
    let _ = unsafe {
        nix::sys::mman::madvise(ptr, ARENA_BYTES, nix::sys::mman::MmapAdvise::MADV_DONTDUMP)
    };
    Ok(ptr.cast())
}

fn map_secret() -> Result<NonNull<u8>, String> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: memfd_secret(2) takes one flags argument and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC as libc::c_long) };
    if fd < 0 {
        return Err(format!(
            "memfd_secret: {}: this kernel offers no secret memory (Linux 5.14+ with secretmem enabled); use --key-memory=locked",
            Errno::last()
        ));
    }
    // SAFETY: `fd` is a new descriptor this process owns and nothing else refers to.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    nix::unistd::ftruncate(&fd, ARENA_BYTES as i64)
        .map_err(|e| format!("ftruncate of memfd_secret: {e}"))?;
    let len = std::num::NonZeroUsize::new(ARENA_BYTES).ok_or("the arena has no size")?;
    // SAFETY: a new shared mapping of the secret fd, aliasing nothing in this process; the
    // mapping keeps the memory after the fd is closed, and is never unmapped.
    let ptr = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &fd,
            0,
        )
    }
    .map_err(|e| format!("mmap of memfd_secret: {e}"))?;
    Ok(ptr.cast())
}

/// Key bytes in a slot of the arena: cleared and given back when dropped. No `Debug`, no
/// `Clone`.
pub(crate) struct KeyBytes {
    arena: &'static Arena,
    slot: u16,
    len: usize,
}

impl KeyBytes {
    /// `len` zero bytes in a free slot. Fails when the arena cannot be mapped or every slot
    /// is taken (that many keys in flight at once means something is stuck).
    pub(crate) fn zeroed(len: usize) -> Result<KeyBytes, SysError> {
        if len > SLOT_BYTES {
            return Err(SysError::KeyMemory(format!(
                "a key of {len} bytes does not fit a {SLOT_BYTES}-byte slot"
            )));
        }
        let arena = arena()?;
        let slot = arena
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .ok_or_else(|| SysError::KeyMemory(format!("all {SLOTS} key slots are in use")))?;
        Ok(KeyBytes { arena, slot, len })
    }

    /// A copy of `bytes` in a slot.
    pub(crate) fn copy_of(bytes: &[u8]) -> Result<KeyBytes, SysError> {
        let mut key = KeyBytes::zeroed(bytes.len())?;
        key.as_mut_slice().copy_from_slice(bytes);
        Ok(key)
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: `slot < SLOTS`, so the offset stays inside the arena's mapping.
        unsafe {
            self.arena
                .base
                .as_ptr()
                .add(self.slot as usize * SLOT_BYTES)
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the slot is this value's alone until it is dropped, mapped for the process's
        // life, and `len <= SLOT_BYTES`.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        clear(self.ptr(), SLOT_BYTES);
        self.arena
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.slot);
    }
}

/// Zeroes `len` bytes at `ptr` in a way the compiler may not remove as a dead store.
fn clear(ptr: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: callers pass a live allocation or slot of at least `len` bytes that they own;
    // explicit_bzero only writes zeros into it.
    unsafe { libc::explicit_bzero(ptr.cast(), len) };
}

/// The process allocator: the system allocator, with every block cleared before it is freed
/// and before `realloc` moves it. Costs one `memset` per free; sealvol's heap traffic is
/// control-plane only (the data path is the kernel's), so this is small (see the bench).
pub struct ZeroOnFree;

// SAFETY: every method forwards to `System` with the same layout contract; the only additions
// are writes of zeros into blocks the caller still owns.
unsafe impl GlobalAlloc for ZeroOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        clear(ptr, layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // `System.realloc` may move the block and free the old one uncleared: move it here.
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, does not
        // overflow, which is `Layout`'s condition.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` has a non-zero size (the caller's guarantee).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live, distinct, and at least this long.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: `ptr` was allocated with `layout` by this allocator.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_cleared_and_reused() {
        let mut a = KeyBytes::zeroed(32).expect("slot");
        a.as_mut_slice().fill(0xa5);
        let where_ = a.ptr();
        drop(a);
        // SAFETY: the arena is mapped for the process's life; reading a free slot is only a
        // read of zeros-or-key bytes, which is what this test checks.
        let after = unsafe { std::slice::from_raw_parts(where_, SLOT_BYTES) };
        assert!(after.iter().all(|&b| b == 0));
        let b = KeyBytes::copy_of(&[1, 2, 3]).expect("slot");
        assert_eq!(b.as_slice(), &[1, 2, 3]);
        assert!(KeyBytes::zeroed(SLOT_BYTES + 1).is_err());
    }

    #[test]
    fn the_arena_runs_out_instead_of_growing() {
        let held: Vec<KeyBytes> = std::iter::from_fn(|| KeyBytes::zeroed(64).ok()).collect();
        assert!(
            held.len() <= SLOTS && held.len() > SLOTS / 2,
            "{}",
            held.len()
        );
        assert!(KeyBytes::zeroed(1).is_err());
        drop(held);
        assert!(KeyBytes::zeroed(1).is_ok());
    }

    #[test]
    fn secret_memory_maps_where_the_kernel_has_it() {
        match map_secret() {
            Ok(ptr) => {
                // SAFETY: a fresh mapping of ARENA_BYTES.
                let s = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), ARENA_BYTES) };
                s[0] = 1;
                assert_eq!(s[0], 1);
            }
            Err(e) => assert!(e.to_string().contains("--key-memory=locked"), "{e}"),
        }
    }

    #[test]
    fn the_allocator_moves_blocks_intact() {
        let a = ZeroOnFree;
        let layout = Layout::from_size_align(48, 8).expect("layout");
        // SAFETY: a valid non-zero layout; the block is written within bounds, moved by
        // realloc, and freed once with the layout it has.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0x5a, 48);
            let q = a.realloc(p, layout, 4096);
            assert!(!q.is_null());
            assert_eq!(*q.add(47), 0x5a);
            a.dealloc(q, Layout::from_size_align(4096, 8).expect("layout"));
        }
    }
}
