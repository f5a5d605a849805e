//! PROFILE section 8: an Internet Message larger than one block travels as
//! RFC 2046 `message/partial` fragments, each its own sealed and signed
//! LATSSIAM message, and is joined by the receiver.
//!
//! - [`Fragmenter`] cuts a message's octets into fragments whose sealed form
//!   fits one block for a given recipient certificate. The room is measured
//!   by sealing to that certificate, not guessed: AES-GCM adds no padding and
//!   every DER length between 256 and 65,535 octets takes the same three
//!   octets, so the overhead measured on a 1 KiB plaintext holds up to the
//!   block ceiling. The cut depends only on the message, the set id and the
//!   certificate, so a sender that retries after a crash sends the same
//!   fragments again and the receiver keeps them once.
//! - [`parse`] reads a fragment's header (`None` for a message that is no
//!   fragment).
//! - [`Joiner`] keeps partial sets durably in a sled tree, keyed by signer
//!   fingerprint and set id, applies every refusal rule of section 8, and
//!   hands back the original message once every slice is there.
//!
//! Joiner key layout (one tree):
//! - `m` ++ signer (32) ++ id → the set's record: total, slices held, octets
//!   held, first arrival (ms since the epoch), and `From`/`Subject` of the
//!   original once slice 1 arrived (for the expiry notice).
//! - `f` ++ signer (32) ++ len(id) (1) ++ id ++ number (u32 BE) → the slice.
//! - `i` ++ id → the signer whose set holds that id: a fragment of an open
//!   set from any other signer is refused.
//! - `t` ++ signer (32) ++ id → total (u32 BE) and when the set was joined:
//!   a fragment of a joined set that comes again is acknowledged and
//!   dropped, for [`SET_LIFETIME`].
//!
//! Invariant: a slice is written in the same atomic batch as the record that
//! counts it; [`Joiner::finish`] removes a set's record and slices, and
//! writes its tombstone, in one batch.
//!
//! Bounds: a joined message is at most the limit; one signer's incomplete
//! sets at most [`SETS_PER_SIGNER`] times it and [`MAX_OPEN_SETS`] sets; all
//! signers' together at most [`SETS_IN_ALL`] times it (certificates cost
//! nothing, so this last share is what a flood of signers can take).

use std::time::Duration;

use crate::crypto::{self, CryptoError};
use crate::fingerprint::Fingerprint;
use crate::wire::MAX_BLOCK_DER;

/// The default limit on a joined message: Postfix's `message_size_limit`.
pub const MAX_JOINED: usize = 10_240_000;

/// Room a receiver leaves above the limit for the trace fields a gateway
/// adds (`Received:`, `Authentication-Results:`) before it cuts a message.
pub const TRACE_ROOM: usize = 64 * 1024;

/// Most fragments in one set (a slice of one octet still costs a fragment).
pub const MAX_TOTAL: u32 = 4096;

/// Longest set id accepted (the profile's id is 32 hex digits, `@` and a host).
pub const MAX_ID: usize = 200;

/// Most partial sets one signer may have open at once.
pub const MAX_OPEN_SETS: usize = 64;

/// One signer's incomplete sets hold at most this many times the joined limit.
pub const SETS_PER_SIGNER: u64 = 4;

/// All signers' incomplete sets hold at most this many times the joined limit.
pub const SETS_IN_ALL: u64 = 16;

/// How long an incomplete set is kept (PROFILE section 8: 24 hours).
pub const SET_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Octets of plaintext used to measure the sealing overhead.
const PROBE: usize = 1024;

/// Why a message cannot be cut.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FragmentError {
    /// The recipient certificate cannot be sealed to.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// More fragments than [`MAX_TOTAL`] would be needed.
    #[error("{0} octets need more than {MAX_TOTAL} fragments")]
    TooLarge(usize),
    /// The set id or an address is not fit for a header.
    #[error("bad fragment header value: {0}")]
    BadHeader(&'static str),
}

/// A fresh set id: 128 random bits in hex, `@`, the sender's host.
///
/// # Errors
/// [`CryptoError::Internal`] if the system's random source fails.
pub fn new_id(host: &str) -> Result<String, CryptoError> {
    let mut bits = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bits).map_err(|_| CryptoError::Internal("random"))?;
    let hex: String = bits.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{hex}@{host}"))
}

/// The octets sealing adds to a plaintext for `recipient` (DER certificate).
///
/// # Errors
/// [`CryptoError`] if it cannot be sealed to.
pub fn sealing_overhead(recipient: &[u8]) -> Result<usize, CryptoError> {
    let sealed = crypto::seal(&[0u8; PROBE], recipient)?;
    Ok(sealed.len().saturating_sub(PROBE))
}

/// Whether a plaintext of `len` octets, sealed to a recipient with this
/// overhead, fits one block (then it is never fragmented).
pub const fn fits_one_block(len: usize, overhead: usize) -> bool {
    len + overhead <= MAX_BLOCK_DER
}

/// Cuts one message into fragments for one recipient; an iterator of
/// fragment plaintexts (header and slice), 1 to [`Fragmenter::total`].
#[derive(Debug)]
pub struct Fragmenter<'a> {
    message: &'a [u8],
    fixed: String,
    id: String,
    slice: usize,
    total: u32,
    next: u32,
}

fn header_safe(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl<'a> Fragmenter<'a> {
    /// Plans the cut of `message` for a recipient whose sealing adds
    /// `overhead` octets (see [`sealing_overhead`]). `from`, `to` and `date`
    /// are the fragments' header values, `id` the set id ([`new_id`]).
    ///
    /// # Errors
    /// [`FragmentError::BadHeader`] for a value with control characters or
    /// quotes, [`FragmentError::TooLarge`] beyond [`MAX_TOTAL`] fragments.
    pub fn new(
        message: &'a [u8],
        overhead: usize,
        id: &str,
        from: &str,
        to: &str,
        date: &str,
    ) -> Result<Self, FragmentError> {
        if !header_safe(id) || id.len() > MAX_ID || !id.contains('@') {
            return Err(FragmentError::BadHeader("id"));
        }
        for (value, what) in [(from, "From"), (to, "To"), (date, "Date")] {
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) || value.len() > 900 {
                return Err(FragmentError::BadHeader(what));
            }
        }
        let fixed = format!("From: {from}\r\nTo: {to}\r\nDate: {date}\r\nMIME-Version: 1.0\r\n");
        let room = MAX_BLOCK_DER.saturating_sub(overhead);
        // The header grows with the digits of `total`; plan with the widest
        // header that total can have, until the count no longer changes.
        let mut digits = 1;
        loop {
            let widest = fixed.len() + Self::varying_len(id, digits, digits);
            let slice = room.saturating_sub(widest);
            if slice == 0 {
                return Err(FragmentError::TooLarge(message.len()));
            }
            let total = message.len().div_ceil(slice).max(1);
            if total > MAX_TOTAL as usize {
                return Err(FragmentError::TooLarge(message.len()));
            }
            let needed = total.to_string().len();
            if needed <= digits {
                let total = u32::try_from(total).map_err(|_| FragmentError::TooLarge(message.len()))?;
                return Ok(Self { message, fixed, id: id.to_owned(), slice, total, next: 1 });
            }
            digits = needed;
        }
    }

    fn varying(id: &str, number: u32, total: u32) -> String {
        format!(
            "Message-ID: <{number}.{id}>\r\nContent-Type: message/partial; id=\"{id}\"; number={number}; total={total}\r\n\r\n"
        )
    }

    fn varying_len(id: &str, number_digits: usize, total_digits: usize) -> usize {
        Self::varying(id, 1, 1).len() + 2 * (number_digits - 1) + (total_digits - 1)
    }

    /// How many fragments the message makes.
    pub const fn total(&self) -> u32 {
        self.total
    }

    /// The set id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Fragment `number` (1-based), or `None` outside 1..=total.
    pub fn fragment(&self, number: u32) -> Option<Vec<u8>> {
        if number == 0 || number > self.total {
            return None;
        }
        let start = (number as usize - 1) * self.slice;
        let end = (start + self.slice).min(self.message.len());
        let slice = self.message.get(start..end)?;
        let varying = Self::varying(&self.id, number, self.total);
        let mut out = Vec::with_capacity(self.fixed.len() + varying.len() + slice.len());
        out.extend_from_slice(self.fixed.as_bytes());
        out.extend_from_slice(varying.as_bytes());
        out.extend_from_slice(slice);
        Some(out)
    }
}

impl Iterator for Fragmenter<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        let out = self.fragment(self.next)?;
        self.next += 1;
        Some(out)
    }
}

/// One fragment, read from its plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment<'a> {
    /// The set id.
    pub id: String,
    /// Its number, 1..=total.
    pub number: u32,
    /// How many fragments the set has.
    pub total: u32,
    /// Its slice of the original message.
    pub slice: &'a [u8],
}

/// Why a fragment is refused (PROFILE section 8: `52` on `ACCEPT`; a
/// gateway drops it with a log line). Never joined to anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// A `message/partial` whose parameters are missing or malformed.
    #[error("malformed message/partial: {0}")]
    Malformed(&'static str),
    /// `number` is 0 or above `total`, or `total` is above [`MAX_TOTAL`].
    #[error("fragment number {number} of {total} is out of range")]
    OutOfRange {
        /// The fragment's number.
        number: u32,
        /// The set's total.
        total: u32,
    },
    /// `total` differs from what earlier fragments of the set said.
    #[error("total changed from {was} to {now}")]
    TotalChanged {
        /// What earlier fragments said.
        was: u32,
        /// What this one says.
        now: u32,
    },
    /// A second fragment with this number but other octets.
    #[error("fragment {0} seen before with other octets")]
    Conflict(u32),
    /// The joined message would be larger than the limit.
    #[error("the joined message would exceed {0} octets")]
    TooLarge(usize),
    /// Another signer has an open set with this id.
    #[error("another signer has an open set with this id")]
    OtherSigner,
    /// The signer already has [`MAX_OPEN_SETS`] incomplete sets, or its
    /// share of the store (or the store) is full.
    #[error("too many incomplete sets from this signer, or the store is full")]
    TooManySets,
}

/// The header section of `message` and where its body starts.
fn split_header(message: &[u8]) -> (&[u8], usize) {
    let mut pos = 0;
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            return (&message[..pos], pos + line.len());
        }
        pos += line.len();
    }
    (message, message.len())
}

/// The unfolded values of the header fields named `name` (case-insensitive).
pub fn header_values(header: &[u8], name: &str) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    for line in header.split_inclusive(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            if let Some(c) = current.as_mut() {
                c.extend_from_slice(text);
            }
            continue;
        }
        out.extend(current.take());
        if let Some(colon) = text.iter().position(|&b| b == b':') {
            let field = text[..colon].trim_ascii_end();
            if field.eq_ignore_ascii_case(name.as_bytes()) {
                current = Some(text[colon + 1..].to_vec());
            }
        }
    }
    out.extend(current);
    out
}

/// Splits a Content-Type value into its type and its parameters (names lower
/// case, quoted strings unquoted). `None` if it does not parse.
fn content_type(value: &[u8]) -> Option<(String, Vec<(String, String)>)> {
    let value = std::str::from_utf8(value).ok()?;
    let (kind, mut rest) = value.split_once(';').unwrap_or((value, ""));
    let kind = kind.trim().to_ascii_lowercase();
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let (name, after) = rest.split_once('=')?;
        let name = name.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (val, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut val = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => val.push(chars.next()?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => val.push(c),
                }
            }
            let tail = &quoted[end?..];
            let tail = tail.trim_start();
            match tail.strip_prefix(';') {
                Some(t) => (val, t),
                None if tail.is_empty() => (val, ""),
                None => return None,
            }
        } else {
            let (v, t) = after.split_once(';').unwrap_or((after, ""));
            (v.trim().to_owned(), t)
        };
        params.push((name, val));
        rest = next;
    }
    Some((kind, params))
}

/// Reads a fragment: `Ok(None)` for a message that is no `message/partial`.
///
/// # Errors
/// [`Refused::Malformed`] or [`Refused::OutOfRange`] for a `message/partial`
/// that breaks section 8.
pub fn parse(message: &[u8]) -> Result<Option<Fragment<'_>>, Refused> {
    let (header, body) = split_header(message);
    let types = header_values(header, "content-type");
    // The type alone decides whether this is a fragment, so that a fragment
    // whose parameters do not parse is refused, not passed on as a message.
    let partial = |v: &Vec<u8>| {
        let kind = v.split(|&b| b == b';').next().unwrap_or_default();
        kind.trim_ascii().eq_ignore_ascii_case(b"message/partial")
    };
    if !types.iter().any(partial) {
        return Ok(None);
    }
    if types.len() != 1 {
        return Err(Refused::Malformed("more than one Content-Type"));
    }
    let Some((_, params)) = types.first().and_then(|v| content_type(v)) else {
        return Err(Refused::Malformed("Content-Type"));
    };
    let one = |name: &str| -> Result<&str, Refused> {
        let mut found = params.iter().filter(|(n, _)| n == name);
        match (found.next(), found.next()) {
            (Some((_, v)), None) => Ok(v.as_str()),
            (None, _) => Err(Refused::Malformed("a parameter is missing")),
            _ => Err(Refused::Malformed("a parameter is repeated")),
        }
    };
    let id = one("id")?;
    if id.is_empty() || id.len() > MAX_ID || !id.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(Refused::Malformed("id"));
    }
    let number_of = |s: &str| -> Result<u32, Refused> {
        if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Refused::Malformed("number or total"));
        }
        s.parse().map_err(|_| Refused::Malformed("number or total"))
    };
    let number = number_of(one("number")?)?;
    let total = number_of(one("total")?)?;
    if number == 0 || number > total || total > MAX_TOTAL {
        return Err(Refused::OutOfRange { number, total });
    }
    Ok(Some(Fragment { id: id.to_owned(), number, total, slice: &message[body..] }))
}

/// What [`Joiner::offer`] did with a fragment.
#[derive(Debug)]
pub enum Offer {
    /// Kept; the set is not complete yet.
    Stored {
        /// Slices held now.
        have: u32,
        /// Slices in the set.
        total: u32,
    },
    /// Seen before with the same octets: nothing changed.
    Duplicate,
    /// Every slice is there: the original message. It stays stored until
    /// [`Joiner::finish`] (call it once the message is kept elsewhere).
    Complete(Vec<u8>),
}

/// A set discarded by [`Joiner::expire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Who sent it.
    pub signer: Fingerprint,
    /// Its id.
    pub id: String,
    /// The original's `From` and `Subject`, if fragment 1 arrived.
    pub first: Option<(String, String)>,
    /// Slices that arrived.
    pub have: u32,
    /// Slices in the set.
    pub total: u32,
}

/// A failure of the joiner's store (the fragment stays unacknowledged).
pub type StoreError = sled::Error;

/// Why [`Joiner::offer`] did not keep a fragment.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// Refused for good (section 8).
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The store failed: try again later.
    #[error("partial-set store: {0}")]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SetRecord {
    total: u32,
    have: u32,
    octets: u64,
    first_ms: u64,
    first: Option<(String, String)>,
}

impl SetRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        out.extend_from_slice(&self.total.to_be_bytes());
        out.extend_from_slice(&self.have.to_be_bytes());
        out.extend_from_slice(&self.octets.to_be_bytes());
        out.extend_from_slice(&self.first_ms.to_be_bytes());
        if let Some((from, subject)) = &self.first {
            for s in [from, subject] {
                let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
                out.extend_from_slice(&(b.len() as u16).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let u32_at = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let u64_at = |i: usize| Some(u64::from_be_bytes(b.get(i..i + 8)?.try_into().ok()?));
        let mut rec =
            Self { total: u32_at(0)?, have: u32_at(4)?, octets: u64_at(8)?, first_ms: u64_at(16)?, first: None };
        let mut rest = b.get(24..)?;
        if !rest.is_empty() {
            let mut take = || -> Option<String> {
                let n = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
                let s = String::from_utf8_lossy(rest.get(2..2 + n)?).into_owned();
                rest = &rest[2 + n..];
                Some(s)
            };
            rec.first = Some((take()?, take()?));
        }
        Some(rec)
    }
}

fn set_key(signer: &Fingerprint, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(33 + id.len());
    k.push(b'm');
    k.extend_from_slice(signer.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn owner_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(b'i');
    k.extend_from_slice(id.as_bytes());
    k
}

fn slices_prefix(signer: &Fingerprint, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(34 + id.len() + 4);
    k.push(b'f');
    k.extend_from_slice(signer.as_bytes());
    // Ids are at most MAX_ID (200) octets, so the length fits one octet.
    k.push(id.len().min(255) as u8);
    k.extend_from_slice(id.as_bytes());
    k
}

fn slice_key(signer: &Fingerprint, id: &str, number: u32) -> Vec<u8> {
    let mut k = slices_prefix(signer, id);
    k.extend_from_slice(&number.to_be_bytes());
    k
}

/// `From` and `Subject` of the original, read from slice 1, bounded.
fn first_fields(slice: &[u8]) -> (String, String) {
    let (header, _) = split_header(&slice[..slice.len().min(64 * 1024)]);
    let get = |name| {
        header_values(header, name)
            .into_iter()
            .next()
            .map(|v| String::from_utf8_lossy(&v).trim().chars().filter(|c| !c.is_control()).take(200).collect())
            .unwrap_or_default()
    };
    (get("from"), get("subject"))
}

/// Durable partial sets (see the module docs for the key layout).
#[derive(Debug)]
pub struct Joiner {
    tree: sled::Tree,
    limit: usize,
    per_signer: u64,
    total: u64,
    lock: std::sync::Mutex<()>,
}

fn tombstone_key(signer: &Fingerprint, id: &str) -> Vec<u8> {
    let mut k = set_key(signer, id);
    k[0] = b't';
    k
}

impl Joiner {
    /// Partial sets in `tree`, joined messages at most `limit` octets; one
    /// signer's incomplete sets hold at most [`SETS_PER_SIGNER`] times that,
    /// all signers' together at most [`SETS_IN_ALL`] times.
    pub fn new(tree: sled::Tree, limit: usize) -> Self {
        let limit64 = limit as u64;
        Self {
            tree,
            limit,
            per_signer: limit64.saturating_mul(SETS_PER_SIGNER),
            total: limit64.saturating_mul(SETS_IN_ALL),
            lock: std::sync::Mutex::new(()),
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Octets held in incomplete sets: (this signer's, everyone's), and this signer's open sets.
    fn held(&self, signer: &Fingerprint) -> Result<(u64, u64, usize), StoreError> {
        let (mut mine, mut all, mut open) = (0u64, 0u64, 0usize);
        for entry in self.tree.scan_prefix(b"m") {
            let (key, value) = entry?;
            let Some(record) = SetRecord::decode(&value) else { continue };
            all = all.saturating_add(record.octets);
            if key.get(1..33) == Some(signer.as_bytes().as_slice()) {
                mine = mine.saturating_add(record.octets);
                open += 1;
            }
        }
        Ok((mine, all, open))
    }

    /// Keeps `fragment` from `signer` (not yet flushed: flush the tree's
    /// database before acknowledging it) and says what became of it.
    ///
    /// # Errors
    /// [`JoinError::Refused`] for a fragment section 8 refuses (nothing is
    /// stored), [`JoinError::Store`] if the tree cannot be read or written.
    pub fn offer(&self, signer: &Fingerprint, fragment: &Fragment<'_>, now_ms: u64) -> Result<Offer, JoinError> {
        let _guard = self.guard();
        let key = set_key(signer, &fragment.id);
        let record = self.tree.get(&key)?.and_then(|v| SetRecord::decode(&v));
        let mut record = match record {
            Some(r) => {
                if r.total != fragment.total {
                    return Err(Refused::TotalChanged { was: r.total, now: fragment.total }.into());
                }
                let skey = slice_key(signer, &fragment.id, fragment.number);
                if let Some(held) = self.tree.get(&skey)? {
                    if held.as_ref() != fragment.slice {
                        return Err(Refused::Conflict(fragment.number).into());
                    }
                    if r.have == r.total {
                        return Ok(Offer::Complete(self.join(signer, &fragment.id, &r)?));
                    }
                    return Ok(Offer::Duplicate);
                }
                r
            }
            None => {
                // A set already joined: what comes again is kept once (acknowledged, dropped).
                if let Some(done) = self.tree.get(tombstone_key(signer, &fragment.id))? {
                    let total = done.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
                    if total == Some(fragment.total) {
                        return Ok(Offer::Duplicate);
                    }
                    return Err(Refused::TotalChanged { was: total.unwrap_or(0), now: fragment.total }.into());
                }
                if let Some(owner) = self.tree.get(owner_key(&fragment.id))? {
                    if owner.as_ref() != signer.as_bytes() {
                        return Err(Refused::OtherSigner.into());
                    }
                }
                SetRecord { total: fragment.total, have: 0, octets: 0, first_ms: now_ms, first: None }
            }
        };
        let octets = record.octets.saturating_add(fragment.slice.len() as u64);
        if octets > self.limit as u64 {
            return Err(Refused::TooLarge(self.limit).into());
        }
        let (mine, all, open) = self.held(signer)?;
        let more = fragment.slice.len() as u64;
        if (record.have == 0 && open >= MAX_OPEN_SETS)
            || mine.saturating_add(more) > self.per_signer
            || all.saturating_add(more) > self.total
        {
            return Err(Refused::TooManySets.into());
        }
        record.octets = octets;
        record.have += 1;
        if fragment.number == 1 {
            record.first = Some(first_fields(fragment.slice));
        }
        let mut batch = sled::Batch::default();
        batch.insert(slice_key(signer, &fragment.id, fragment.number), fragment.slice);
        if record.have == 1 {
            batch.insert(owner_key(&fragment.id), signer.as_bytes());
        }
        batch.insert(key, record.encode());
        self.tree.apply_batch(batch)?;
        if record.have == record.total {
            return Ok(Offer::Complete(self.join(signer, &fragment.id, &record)?));
        }
        Ok(Offer::Stored { have: record.have, total: record.total })
    }

    fn join(&self, signer: &Fingerprint, id: &str, record: &SetRecord) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(usize::try_from(record.octets).unwrap_or(0).min(self.limit));
        for entry in self.tree.scan_prefix(slices_prefix(signer, id)) {
            let (_, slice) = entry?;
            out.extend_from_slice(&slice);
        }
        Ok(out)
    }

    /// Forgets a joined set (call it once the joined message is kept),
    /// leaving a tombstone so that a fragment of it that comes again is
    /// acknowledged and dropped, not the start of a new set; not flushed.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn finish(&self, signer: &Fingerprint, id: &str, now_ms: u64) -> Result<(), StoreError> {
        let _guard = self.guard();
        self.remove(signer, id, Some(now_ms))
    }

    fn remove(&self, signer: &Fingerprint, id: &str, tombstone: Option<u64>) -> Result<(), StoreError> {
        let key = set_key(signer, id);
        let mut batch = sled::Batch::default();
        if let (Some(now), Some(record)) = (tombstone, self.tree.get(&key)?.and_then(|v| SetRecord::decode(&v))) {
            let mut t = record.total.to_be_bytes().to_vec();
            t.extend_from_slice(&now.to_be_bytes());
            batch.insert(tombstone_key(signer, id), t);
        }
        batch.remove(key);
        if self.tree.get(owner_key(id))?.is_some_and(|o| o.as_ref() == signer.as_bytes()) {
            batch.remove(owner_key(id));
        }
        for entry in self.tree.scan_prefix(slices_prefix(signer, id)) {
            batch.remove(entry?.0);
        }
        self.tree.apply_batch(batch)
    }

    /// Discards the sets that arrived more than `lifetime` before `now_ms`
    /// and returns the incomplete ones (one notice each; a complete one was
    /// left by a crash after its message was kept), and forgets tombstones
    /// as old; not flushed.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn expire(&self, now_ms: u64, lifetime: Duration) -> Result<Vec<Expired>, StoreError> {
        let _guard = self.guard();
        let cutoff = now_ms.saturating_sub(u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX));
        let mut old = Vec::new();
        let mut done = Vec::new();
        for entry in self.tree.scan_prefix(b"m") {
            let (key, value) = entry?;
            let (Some(record), Some(fp)) = (SetRecord::decode(&value), key.get(1..33)) else {
                continue;
            };
            if record.first_ms > cutoff {
                continue;
            }
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(fp);
            let (signer, id) = (Fingerprint::from_bytes(bytes), String::from_utf8_lossy(&key[33..]).into_owned());
            if record.have < record.total {
                old.push(Expired { signer, id, first: record.first, have: record.have, total: record.total });
            } else {
                done.push((signer, id));
            }
        }
        for e in &old {
            self.remove(&e.signer, &e.id, None)?;
        }
        for (signer, id) in &done {
            self.remove(signer, id, Some(now_ms))?;
        }
        let mut batch = sled::Batch::default();
        for entry in self.tree.scan_prefix(b"t") {
            let (key, value) = entry?;
            let at = value.get(4..12).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
            if at <= cutoff {
                batch.remove(key);
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(old)
    }

    /// Sets held (complete ones not yet finished included).
    pub fn open_sets(&self) -> usize {
        self.tree.scan_prefix(b"m").count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const OVERHEAD: usize = 400;

    fn joiner() -> Joiner {
        let db = sled::Config::new().temporary(true).open().unwrap();
        Joiner::new(db.open_tree("partials").unwrap(), MAX_JOINED)
    }

    fn cut(message: &[u8], id: &str) -> Vec<Vec<u8>> {
        Fragmenter::new(message, OVERHEAD, id, "<a@x.example>", "<b@y.example>", "Sun, 6 Dec 2026 10:00:00 +0000")
            .unwrap()
            .collect()
    }

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::from_bytes([n; 32])
    }

    #[test]
    fn every_fragment_fits_and_is_a_partial() {
        let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let frags = cut(&message, "0123@x.example");
        assert!(frags.len() > 10);
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() + OVERHEAD <= MAX_BLOCK_DER, "{}", f.len());
            let p = parse(f).unwrap().unwrap();
            assert_eq!((p.number, p.total, p.id.as_str()), (i as u32 + 1, frags.len() as u32, "0123@x.example"));
        }
    }

    #[test]
    fn headers_are_parsed_strictly() {
        let ok = b"Content-Type: Message/Partial;\r\n id=\"a\\\"b@c\"; NUMBER=2; total=3\r\n\r\nbody";
        let f = parse(ok).unwrap().unwrap();
        assert_eq!((f.id.as_str(), f.number, f.total, f.slice), ("a\"b@c", 2, 3, &b"body"[..]));
        assert_eq!(parse(b"Content-Type: text/plain\r\n\r\nx").unwrap(), None);
        for bad in [
            &b"Content-Type: message/partial; id=a; number=0; total=3\r\n\r\n"[..],
            b"Content-Type: message/partial; id=a; number=4; total=3\r\n\r\n",
            b"Content-Type: message/partial; id=a; number=1\r\n\r\n",
            b"Content-Type: message/partial; id=a; id=b; number=1; total=1\r\n\r\n",
            b"Content-Type: message/partial; id=\"a; number=1; total=1\r\n\r\n",
            b"Content-Type: message/partial; id=a; number=-1; total=1\r\n\r\n",
            b"Content-Type: message/partial; id=a; number=1; total=99999\r\n\r\n",
            b"Content-Type: message/partial; id=a; number=1; total=1\r\nContent-Type: text/plain\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn refusals_of_section_8() {
        let j = joiner();
        let frags = cut(&vec![b'x'; 50_000], "s@x.example");
        let p = |f: &[u8]| parse(f).unwrap().unwrap().slice.to_vec();
        let first = parse(&frags[0]).unwrap().unwrap();
        assert!(matches!(j.offer(&fp(1), &first, 0).unwrap(), Offer::Stored { have: 1, .. }));
        assert!(matches!(j.offer(&fp(1), &first, 0).unwrap(), Offer::Duplicate));
        // Same number, other octets.
        let other = Fragment { slice: b"other", ..first.clone() };
        assert!(matches!(j.offer(&fp(1), &other, 0), Err(JoinError::Refused(Refused::Conflict(1)))));
        // A total that changes.
        let changed = Fragment { total: first.total + 1, number: 2, ..first.clone() };
        assert!(matches!(j.offer(&fp(1), &changed, 0), Err(JoinError::Refused(Refused::TotalChanged { .. }))));
        // Too large for the limit.
        let small = Joiner::new(sled::Config::new().temporary(true).open().unwrap().open_tree("p").unwrap(), 100);
        assert!(matches!(small.offer(&fp(1), &first, 0), Err(JoinError::Refused(Refused::TooLarge(100)))));
        // Another signer's fragments of the same id are refused, never joined.
        for f in &frags[1..] {
            let mut forged = p(f);
            forged[0] = b'!';
            let g = Fragment { slice: &forged, ..parse(f).unwrap().unwrap() };
            assert!(matches!(j.offer(&fp(2), &g, 0), Err(JoinError::Refused(Refused::OtherSigner))));
        }
        let mut last = None;
        for f in &frags[1..] {
            last = Some(j.offer(&fp(1), &parse(f).unwrap().unwrap(), 0).unwrap());
        }
        let Some(Offer::Complete(m)) = last else { panic!("not complete") };
        assert_eq!(m, vec![b'x'; 50_000]);
        j.finish(&fp(1), "s@x.example", 5).unwrap();
        assert_eq!(j.open_sets(), 0);
        // A fragment of the joined set that comes again is kept once: dropped.
        assert!(matches!(j.offer(&fp(1), &first, 10).unwrap(), Offer::Duplicate));
        assert_eq!(j.open_sets(), 0);
        assert_eq!(j.tree.len(), 1, "only the tombstone");
        assert!(j.expire(10 + 86_400_000, SET_LIFETIME).unwrap().is_empty());
        assert_eq!(j.tree.len(), 0, "the tombstone goes after the lifetime");
    }

    #[test]
    fn open_sets_per_signer_are_bounded_and_expire_with_their_first_fields() {
        let j = joiner();
        let message = b"From: Alice <a@x.example>\r\nSubject: big\r\n\r\n".repeat(2000);
        for n in 0..MAX_OPEN_SETS {
            let frags = cut(&message, &format!("{n}@x.example"));
            j.offer(&fp(1), &parse(&frags[0]).unwrap().unwrap(), 1000).unwrap();
        }
        let frags = cut(&message, "late@x.example");
        let f = parse(&frags[0]).unwrap().unwrap();
        assert!(matches!(j.offer(&fp(1), &f, 1000), Err(JoinError::Refused(Refused::TooManySets))));
        let other = Fragment { id: "other@x.example".into(), ..f.clone() };
        assert!(j.offer(&fp(2), &other, 1000).is_ok(), "another signer has its own share");
        assert!(j.expire(1000 + 1000, Duration::from_secs(3600)).unwrap().is_empty());
        let gone = j.expire(1000 + 3_600_000, Duration::from_secs(3600)).unwrap();
        assert_eq!(gone.len(), MAX_OPEN_SETS + 1);
        assert_eq!(gone[0].first, Some(("Alice <a@x.example>".into(), "big".into())));
        assert_eq!(j.open_sets(), 0);
        assert_eq!(j.tree.len(), 0, "slices go with their set");
    }

    #[test]
    fn one_block_boundary() {
        assert!(fits_one_block(MAX_BLOCK_DER - OVERHEAD, OVERHEAD));
        assert!(!fits_one_block(MAX_BLOCK_DER - OVERHEAD + 1, OVERHEAD));
        let frags = cut(b"tiny", "t@x.example");
        assert_eq!(frags.len(), 1);
    }

    #[test]
    fn measured_room_is_used_and_never_exceeded() {
        use crate::identity::{Address, Identity};
        for rsa in [false, true] {
            let id = Identity::generate(&Address::new("bob", "long.host.example").unwrap(), Some("Bob"), rsa).unwrap();
            let overhead = sealing_overhead(id.cert_der()).unwrap();
            // The largest message that fits one block seals within it.
            let whole = vec![b'w'; MAX_BLOCK_DER - overhead];
            assert!(fits_one_block(whole.len(), overhead));
            assert!(crypto::seal(&whole, id.cert_der()).unwrap().len() <= MAX_BLOCK_DER);
            let message = vec![b'm'; 3 * MAX_BLOCK_DER];
            let cut =
                Fragmenter::new(&message, overhead, "z@x.example", "<g@x.example>", "<bob@long.host.example>", "d")
                    .unwrap();
            assert_eq!(cut.total(), 4, "rsa={rsa}");
            let sealed: Vec<usize> = cut.map(|f| crypto::seal(&f, id.cert_der()).unwrap().len()).collect();
            assert!(sealed.iter().all(|&n| n <= MAX_BLOCK_DER), "rsa={rsa}: {sealed:?}");
            assert!(sealed[0] > MAX_BLOCK_DER - 16, "the room is used, not guessed: {sealed:?}");
        }
    }

    mod prop {
        #![allow(clippy::unwrap_used)]

        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

            /// Any message survives cut and join octet for octet, whatever the
            /// order, however many duplicates, mixed with another signer's
            /// fragments of the same id that never make a wrong message (and
            /// are refused while the first signer's set is open).
            #[test]
            fn cut_shuffle_duplicate_join(
                len in 1usize..120_000,
                seed in any::<u64>(),
                order in proptest::collection::vec(any::<u32>(), 1..64),
            ) {
                let message: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(seed | 1).to_le_bytes()[3]).collect();
                let frags = cut(&message, "p@x.example");
                let j = joiner();
                let mut offers: Vec<(Fingerprint, Vec<u8>)> = Vec::new();
                for (i, f) in frags.iter().enumerate() {
                    offers.push((fp(1), f.clone()));
                    if order.get(i).is_some_and(|o| o % 3 == 0) {
                        offers.push((fp(1), f.clone()));
                    }
                    if order.get(i).is_some_and(|o| o % 4 == 1) {
                        let mut evil = f.clone();
                        if let Some(last) = evil.last_mut() { *last ^= 0xff; }
                        offers.push((fp(9), evil));
                    }
                }
                // Shuffle deterministically by the order vector.
                for i in (1..offers.len()).rev() {
                    let k = order[i % order.len()] as usize % (i + 1);
                    offers.swap(i, k);
                }
                let mut joined = None;
                for (signer, f) in &offers {
                    match j.offer(signer, &parse(f).unwrap().unwrap(), 0) {
                        Ok(Offer::Complete(m)) if *signer == fp(1) => {
                            prop_assert_eq!(&m, &message);
                            joined = Some(m);
                        }
                        // The other signer's own set (the first's was done): never the first's message.
                        Ok(Offer::Complete(m)) => prop_assert_ne!(&m, &message),
                        Ok(_) => {}
                        // Whoever opened the id first holds it; the other is refused whole.
                        Err(JoinError::Refused(Refused::OtherSigner)) => {}
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                if offers.first().is_some_and(|(s, _)| *s == fp(1)) {
                    prop_assert!(joined.is_some());
                }
            }
        }
    }
}
