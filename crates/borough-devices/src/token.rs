//! Device credentials: a random token shown once, stored as its SHA-256 —
//! the same kind of secret as an API key (`borough_access::secret`).

use borough_access::secret;

/// A new token: 32 bytes from the operating system's CSPRNG, hex-encoded.
pub fn generate() -> Result<String, String> {
    secret::random_hex(32)
}

/// The stored form of a token.
pub fn hash(token: &str) -> String {
    secret::hash(token)
}

/// Whether `token` hashes to `stored`, comparing in constant time.
pub fn verify(token: &str, stored: &str) -> bool {
    secret::verify(token, stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_verify_only_against_their_hash() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let h = hash(&a);
        assert!(verify(&a, &h));
        assert!(!verify(&b, &h));
        assert!(!verify("", &h));
    }
}
