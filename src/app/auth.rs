//! Publisher keys: configured as SHA-256 digests, never in plain text, and
//! compared in constant time so a timing side channel reveals nothing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    digests: Vec<[u8; 32]>,
}

impl KeyRing {
    pub fn new(digests: Vec<[u8; 32]>) -> Self {
        Self { digests }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `key` hashes to one of the configured digests. Every digest
    /// is compared, whichever matches, so the time taken does not depend on
    /// which one (if any) did.
    pub fn verify(&self, key: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut matched = subtle::Choice::from(0);
        for candidate in &self.digests {
            matched |= candidate.ct_eq(&digest);
        }
        matched.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_against_digests() {
        // sha256("test")
        let digest: [u8; 32] = Sha256::digest(b"test").into();
        let ring = KeyRing::new(vec![[0; 32], digest]);
        assert!(ring.verify("test"));
        assert!(!ring.verify("Test"));
        assert!(!ring.verify(""));
        assert!(!KeyRing::default().verify("test"));
    }
}
