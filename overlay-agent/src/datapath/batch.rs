//! Reading a whole BPF hash map in a few system calls (`BPF_MAP_LOOKUP_BATCH`, Linux
//! 5.6+). aya's iterator makes two per entry (next key, then lookup): for a connection
//! table of 100,000 entries, swept every ten seconds, that is 200,000 calls a sweep.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries asked for per call. A call returns whole hash buckets, so this must exceed
/// the fullest bucket (else ENOSPC, and we ask again with room for more).
pub const BATCH: usize = 4096;
const MAX_BATCH: usize = 1 << 20;

/// Every entry of `map`, as the kernel walks its buckets. Like an iteration, this is
/// no snapshot: the datapath may add and remove entries meanwhile.
pub fn entries<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> io::Result<Vec<(K, V)>> {
    entries_asking(map, BATCH)
}

/// [`entries`], asking for `batch` entries per call at first (tests make it small, to
/// take the path of a bucket that does not fit).
pub fn entries_asking<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    mut batch: usize,
) -> io::Result<Vec<(K, V)>> {
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    // The position between calls: for a hash map, the next bucket (a u32; room for more).
    let mut position: Option<[u64; 1]> = None;
    let mut next = [0u64; 1];
    loop {
        let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(batch);
        let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(batch);
        // SAFETY: bpf_attr is a union of integer structs: all zeroes is valid, and is
        // what the kernel asks of the fields this command does not use.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integers into the union's batch member.
        let b = unsafe { &mut attr.batch };
        b.in_batch = position.as_ref().map_or(0, |p| p.as_ptr() as u64);
        b.out_batch = next.as_mut_ptr() as u64;
        b.keys = keys.as_mut_ptr() as u64;
        b.values = values.as_mut_ptr() as u64;
        b.count = batch as u32;
        b.map_fd = fd as u32;
        // SAFETY: the attribute and every buffer it points to outlive the call; the
        // kernel writes at most `count` keys and values.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &mut attr as *mut bpf_attr,
                size_of::<bpf_attr>() as libc::c_uint,
            )
        };
        let last = if rc < 0 {
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                // A bucket holds more than we made room for: nothing was copied.
                Some(libc::ENOSPC) if batch < MAX_BATCH => {
                    batch *= 4;
                    continue;
                }
                // The walk reached the last bucket; this call's entries still count.
                Some(libc::ENOENT) => true,
                _ => return Err(error),
            }
        } else {
            false
        };
        // SAFETY: the kernel reports in `count` how many it wrote, also with ENOENT.
        let got = unsafe { attr.batch.count } as usize;
        let got = got.min(batch);
        // SAFETY: both vectors were allocated with room for `batch` elements, `got` is
        // at most that, and the elements are `MaybeUninit`, valid uninitialised.
        unsafe {
            keys.set_len(got);
            values.set_len(got);
        }
        out.extend(
            keys.into_iter()
                .zip(values)
                // SAFETY: the kernel initialised the first `got` of each.
                .map(|(k, v)| unsafe { (k.assume_init(), v.assume_init()) }),
        );
        if last {
            return Ok(out);
        }
        position = Some(next);
    }
}
