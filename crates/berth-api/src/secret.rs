//! Comparing secrets without leaking where they differ.
//!
//! Both sides are hashed (SHA-256) first and the digests compared with
//! [`subtle::ConstantTimeEq`]: the time taken depends neither on how many leading bytes match
//! nor on the presented secret's length matching the real one.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Whether `given` equals `want` (a secret: API key, token, bearer secret, signature).
pub fn secret_eq(given: &[u8], want: &[u8]) -> bool {
    let a = Sha256::digest(given);
    let b = Sha256::digest(want);
    a.as_slice().ct_eq(b.as_slice()).into()
}

/// Whether two equal-length digests or MACs are equal (false when the lengths differ, which
/// for fixed-length digests says nothing about the secret).
pub fn digest_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_secrets_match() {
        assert!(secret_eq(b"berth_abc", b"berth_abc"));
        assert!(secret_eq(b"", b""));
    }

    #[test]
    fn any_difference_refuses() {
        assert!(!secret_eq(b"berth_abc", b"berth_abd"));
        assert!(!secret_eq(b"berth_abc", b"berth_ab"));
        assert!(!secret_eq(b"berth_abc", b"berth_abcd"));
        assert!(!secret_eq(b"", b"x"));
        assert!(!secret_eq(b"Berth_abc", b"berth_abc"));
    }

    #[test]
    fn digests_compare_by_value_and_length() {
        assert!(digest_eq(&[1, 2, 3], &[1, 2, 3]));
        assert!(!digest_eq(&[1, 2, 3], &[1, 2, 4]));
        assert!(!digest_eq(&[1, 2, 3], &[1, 2]));
    }
}
