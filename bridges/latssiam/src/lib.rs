//! LATSSIAM: the protocol of PROFILE.md, as a library.
//!
//! - [`wire`]: lines, verbs, status codes and armoured blocks, with no I/O.
//! - [`fingerprint`]: certificate fingerprints.
//! - [`identity`]: X.509 identities, addresses and LATSSIAM URLs.
//! - [`crypto`]: CMS sealing, opening, signing and verifying, interoperable
//!   with `openssl cms`.
//! - [`fragment`]: messages larger than one block, cut and joined (section 8).
//! - [`files`]: private directories and atomic file writes.
//! - [`group_commit`]: one fsync for many concurrent sled writers.
//! - [`limits`]: connections per client address and site, and throttled refusal logs.
//! - [`tls`]: rustls configurations with Trust On First Use in both directions.
//! - [`attest`]: attestations of a server's key by mailbox owners.
//! - [`gemini`]: the Gemini capsule serving certificates at LATSSIAM URLs, and
//!   its client.
//! - [`conn`]: frames over a stream; [`server`] and `client` sit on it.

pub mod attest;
pub mod client;
pub mod conn;
pub mod crypto;
pub mod files;
pub mod fingerprint;
pub mod fragment;
pub mod gemini;
pub mod group_commit;
pub mod identity;
pub mod limits;
pub mod server;
pub mod tls;
pub mod wire;

pub use fingerprint::Fingerprint;
pub use identity::{Address, Identity};
