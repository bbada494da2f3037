//! Where a packet goes next, asked of the kernel's FIB, and how it is sent there.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_UNSPEC, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use core::mem::MaybeUninit;

use crate::parse::ptr_at;

const AF_INET: u8 = 2;

pub(crate) enum Path {
    /// Next hop known: leave through `ifindex` with these MAC addresses.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Route known, neighbour not resolved yet: the kernel must resolve `nexthop`.
    Unresolved { ifindex: u32, nexthop: [u8; 4] },
    /// The route's MTU is smaller than the packet.
    FragNeeded { mtu: u16 },
    /// The destination is local to this host.
    Local,
    /// No usable route.
    NoRoute,
}

/// Looks up `dst` as if forwarding a packet that arrived on `ifindex`. A non-zero
/// `tot_len` makes the kernel check it against the route's MTU.
#[inline(always)]
pub(crate) fn lookup(
    ctx: &TcContext,
    ifindex: u32,
    src: [u8; 4],
    dst: [u8; 4],
    tot_len: u16,
) -> Path {
    let mut params = MaybeUninit::<Params>::uninit();
    let p = zeroed(&mut params);
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `p` is a zeroed `bpf_fib_lookup` of the size passed, which the helper reads
    // and writes only within.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), p, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc < 0 {
        return Path::NoRoute;
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Path::Resolved {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        },
        // On NO_NEIGH the kernel has already replaced the destination with the gateway.
        BPF_FIB_LKUP_RET_NO_NEIGH => Path::Unresolved {
            ifindex: p.ifindex,
            // SAFETY: a union of integers, all bytes initialised (zeroed, then written by
            // the helper).
            nexthop: unsafe { p.__bindgen_anon_4.ipv4_dst }.to_ne_bytes(),
        },
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Path::FragNeeded {
            // SAFETY: as above.
            mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        },
        BPF_FIB_LKUP_RET_NOT_FWDED => Path::Local,
        _ => Path::NoRoute,
    }
}

/// The lookup's parameters, 8-byte aligned so that they can be zeroed a word at a time.
#[repr(C, align(8))]
struct Params(bpf_fib_lookup);

/// Zeroes the parameters in place, with eight stores: `mem::zeroed` compiled to a call
/// into a `memset` subprogram on every packet. Volatile, so
/// that the stores are not merged back into that call; in place, so that the stack
/// holds one copy.
#[inline(always)]
fn zeroed(params: &mut MaybeUninit<Params>) -> &mut bpf_fib_lookup {
    const WORDS: usize = size_of::<Params>() / 8;
    let words = params.as_mut_ptr().cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: within the (8-byte aligned) value; every byte is written.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: all bytes zeroed, a valid bpf_fib_lookup (integers and unions of them).
    unsafe { &mut params.assume_init_mut().0 }
}

/// Writes the MAC addresses; false if the frame has no Ethernet header.
#[inline(always)]
pub(crate) fn set_macs(ctx: &TcContext, smac: [u8; 6], dmac: [u8; 6]) -> bool {
    match ptr_at::<[u8; 12]>(ctx, 0) {
        Some(p) => {
            // Straight into the packet: a local array zeroed first became a memset call.
            let p = p.cast::<[u8; 6]>();
            // SAFETY: `ptr_at` checked that the 12 bytes lie within the linear data; the
            // writes are unaligned ones.
            unsafe {
                p.write_unaligned(dmac);
                p.add(1).write_unaligned(smac);
            }
            true
        }
        None => false,
    }
}

/// Sends the packet out of `ifindex`; from `current` (an egress hook's own device) the
/// packet simply continues, which avoids running the egress hook a second time (and
/// lets the filters after ours on that hook see it, as [`crate::verdict::pass`] does).
#[inline(always)]
pub(crate) fn out(ifindex: u32, current: Option<u32>) -> i32 {
    if current == Some(ifindex) {
        TC_ACT_UNSPEC
    } else {
        // SAFETY: the helper takes plain integers; an unknown ifindex makes it return
        // TC_ACT_SHOT, a counted drop.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }
}

/// Sends the packet out of `ifindex` after the kernel resolves `nexthop`'s MAC address.
#[inline(always)]
pub(crate) fn out_resolving(ifindex: u32, nexthop: [u8; 4]) -> i32 {
    // SAFETY: integers and a union of integers: all zeroes is a valid value.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = u32::from(AF_INET);
    nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(nexthop);
    // SAFETY: `nh` is a `bpf_redir_neigh` of the size passed, which the helper only reads.
    unsafe { bpf_redirect_neigh(ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0) as i32 }
}
