//! Certificate fingerprints: SHA-256 of the DER certificate, written as 64
//! lower-case hex digits (PROFILE.md section 4). The type can hold nothing else.

use std::fmt;
use std::str::FromStr;

/// The SHA-256 fingerprint of a DER-encoded certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

/// A string that is not 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a fingerprint is 64 lower-case hex digits")]
pub struct BadFingerprint;

impl Fingerprint {
    /// Fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses exactly 64 lower-case hex digits from raw bytes.
    ///
    /// # Errors
    /// [`BadFingerprint`] for any other length or character (upper case included).
    pub fn parse_bytes(s: &[u8]) -> Result<Self, BadFingerprint> {
        if s.len() != 64 {
            return Err(BadFingerprint);
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            out[i] = (lower_hex(pair[0])? << 4) | lower_hex(pair[1])?;
        }
        Ok(Self(out))
    }
}

fn lower_hex(c: u8) -> Result<u8, BadFingerprint> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(BadFingerprint),
    }
}

impl FromStr for Fingerprint {
    type Err = BadFingerprint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_bytes(s.as_bytes())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_forms() {
        let fp = Fingerprint::of(b"x");
        let s = fp.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<Fingerprint>(), Ok(fp));
        assert!(s[..63].parse::<Fingerprint>().is_err());
        assert!(format!("{s}0").parse::<Fingerprint>().is_err());
        assert!(s.to_uppercase().parse::<Fingerprint>().is_err());
        assert!(s.replacen(|c: char| c.is_ascii_hexdigit(), "g", 1).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn matches_openssl_style_sha256() {
        // SHA-256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            Fingerprint::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
