//! Internet checksum arithmetic (RFC 1071, RFC 1624).

/// Ones'-complement sum of big-endian 16-bit words; `bytes` has even length.
#[inline(always)]
pub(crate) fn sum(bytes: &[u8]) -> u32 {
    let mut acc = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    acc
}

/// Folds a 32-bit sum to 16 bits and complements it: the value to put on the wire.
#[inline(always)]
pub(crate) fn finish(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// Checksum field after a 16-bit word of the covered data changes from `old` to `new`
/// (RFC 1624, eqn. 3): keeps an incoming error visible instead of recomputing over it.
#[inline(always)]
pub(crate) fn replace(check: u16, old: u16, new: u16) -> u16 {
    finish(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// [`replace`] for a 32-bit field (an address), given as wire-order bytes.
#[inline(always)]
pub(crate) fn replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let check = replace(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    replace(
        check,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}
