//! Secrets shown once and kept only as their SHA-256: API keys, device
//! tokens, dashboard sessions.

use sha2::{Digest, Sha256};

/// `n` random bytes from the operating system's CSPRNG, hex-encoded.
pub fn random_hex(n: usize) -> Result<String, String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a secret: {e}"))?;
    Ok(hex(&bytes))
}

/// The stored form of a secret.
pub fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// SHA-256 of bytes, hex-encoded.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Whether `secret` hashes to `stored`, comparing in constant time.
pub fn verify(secret: &str, stored: &str) -> bool {
    constant_time_eq(hash(secret).as_bytes(), stored.as_bytes())
}

/// Compares without stopping at the first difference, so the time taken does
/// not tell an attacker how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The prefix of every API key: `bk_{id}_{secret}`.
pub const KEY_PREFIX: &str = "bk_";

/// A new API key: its id (public, 16 hex digits) and the whole key to show once.
pub fn new_api_key() -> Result<(String, String), String> {
    let id = random_hex(8)?;
    let secret = random_hex(32)?;
    let key = format!("{KEY_PREFIX}{id}_{secret}");
    Ok((id, key))
}

/// The id an API key names, when it has the shape of one.
pub fn api_key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hexish = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexish(id) && id.len() <= 32 && hexish(secret) && secret.len() <= 128).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_verify_only_against_their_hash() {
        let a = random_hex(32).unwrap();
        let b = random_hex(32).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let h = hash(&a);
        assert!(verify(&a, &h));
        assert!(!verify(&b, &h));
        assert!(!verify("", &h));
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn api_keys_carry_their_id() {
        let (id, key) = new_api_key().unwrap();
        assert_eq!(api_key_id(&key), Some(id.as_str()));
        assert_eq!(api_key_id("bk_zz_11"), None);
        assert_eq!(api_key_id("Bearer x"), None);
        assert_eq!(api_key_id("bk_ab"), None);
    }
}
