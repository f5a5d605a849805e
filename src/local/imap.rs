//! The IMAP side of `latssiam-bridge local`: IMAP4rev1 with IDLE, MOVE,
//! UIDPLUS, UNSELECT, SPECIAL-USE, LITERAL+, ENABLE, NAMESPACE and ID over
//! the store in `store.rs`. Commands are parsed and responses written by
//! `imap-next` (sans I/O) and `imap-codec`; this is the only module that
//! names them.
//!
//! Bounds: connections (`MAX_CONNECTIONS`), IDLE sessions (`MAX_IDLE`),
//! a command line (`MAX_COMMAND`), a literal (the message-size limit), what
//! a client may send before it logs in (`MAX_PREAUTH`), time to log in and
//! time idle; failed logins are slowed down for everyone.

use std::borrow::Cow;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine as _;
use imap_next::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_next::imap_types::body::{
    BasicFields, Body, BodyStructure, Disposition, Language, Location, MultiPartExtensionData, SinglePartExtensionData,
    SpecificFields,
};
use imap_next::imap_types::command::{Command, CommandBody};
use imap_next::imap_types::core::{Atom, IString, Literal, NString, QuotedChar, Tag, Text, Vec1};
use imap_next::imap_types::datetime::DateTime;
use imap_next::imap_types::envelope::{Address, Envelope};
use imap_next::imap_types::extensions::binary::LiteralOrLiteral8;
use imap_next::imap_types::extensions::namespace::Namespace;
use imap_next::imap_types::extensions::uidplus::{UidElement, UidSet};
use imap_next::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName, Section};
use imap_next::imap_types::flag::{Flag, FlagFetch, FlagNameAttribute, FlagPerm, StoreResponse, StoreType};
use imap_next::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_next::imap_types::response::{
    Bye, Capability, Code, CommandContinuationRequest, Data, Greeting, Status, StatusBody, StatusKind, Tagged,
};
use imap_next::imap_types::search::SearchKey;
use imap_next::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use imap_next::imap_types::status::{StatusDataItem, StatusDataItemName};
use imap_next::imap_types::ToStatic;
use imap_next::server::{Error as ServerError, Event, Options, Server};
use imap_next::{Interrupt, Io, State as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::mime;
use super::store::{canonical, flag, read_header_in, read_in, Entry, Flags, Store};
use super::{Access, Conn};

/// At most this many IMAP connections at once.
pub const MAX_CONNECTIONS: usize = 32;
/// At most this many sessions in IDLE at once.
pub const MAX_IDLE: usize = 16;
/// A command line (without literals) is at most this long.
pub const MAX_COMMAND: u32 = 64 * 1024;
/// What a client may send before it has logged in.
pub const MAX_PREAUTH: usize = 64 * 1024;
/// Time to log in.
const LOGIN_TIME: Duration = Duration::from_secs(60);
/// Time a logged-in client may be silent (RFC 3501 5.4: at least 30 minutes).
const IDLE_TIME: Duration = Duration::from_secs(31 * 60);
/// Time for one write to the client.
const WRITE_TIME: Duration = Duration::from_secs(60);
/// Failed logins one connection may make before it is closed.
const MAX_FAILURES: u32 = 3;
/// Malformed commands one connection may send before it is closed.
const MAX_BAD: u32 = 20;
/// Octets of messages one FETCH reads before what it has is written out: a
/// `FETCH 1:* BODY[]` over a large folder holds this much (and one
/// message), not the folder.
const FETCH_CHUNK: usize = 4 << 20;

/// What every IMAP session shares.
pub struct Shared {
    pub store: Arc<Store>,
    pub access: Arc<Access>,
    pub idle: Arc<tokio::sync::Semaphore>,
    /// The message-size limit (APPEND literals).
    pub max_message: u32,
    /// Whether this listener may take a password without TLS (loopback only).
    pub plaintext_ok: bool,
}

struct Selected {
    name: String,
    /// The folder's UIDVALIDITY when selected: another folder under the
    /// same name later (deleted and made again) is not this one.
    validity: u32,
    read_only: bool,
    /// UID and entry, by sequence number - 1.
    msgs: Vec<(u32, Entry)>,
}

enum Phase {
    NotAuthenticated,
    Authenticated,
    Selected(Selected),
}

enum After {
    Continue,
    StartTls,
    Logout,
}

struct Session {
    shared: Arc<Shared>,
    phase: Phase,
    secure: bool,
    /// Failed logins on this connection.
    failures: u32,
    bad: u32,
    preauth_read: usize,
    idle: Option<(Tag<'static>, tokio::sync::OwnedSemaphorePermit)>,
    /// A pending AUTHENTICATE's tag.
    authenticating: Option<Tag<'static>>,
    /// The selected folder is gone: BYE said, the session ends.
    gone: bool,
    out: Vec<Response>,
    /// A FETCH that goes on once what it produced so far is written.
    fetching: Option<Fetching>,
}

/// What one chunk of a FETCH came to.
enum Chunk {
    /// Messages are left.
    More,
    /// Every message is answered for.
    Done,
    /// The items ask for too many copies of a message.
    TooMuch,
}

/// What is left of a FETCH.
struct Fetching {
    tag: Tag<'static>,
    names: Vec<MessageDataItemName<'static>>,
    /// Positions in the selected folder still to answer for.
    targets: std::vec::IntoIter<usize>,
    needs_raw: bool,
    needs_all: bool,
    marks_seen: bool,
}

/// A response to send: data, a status, or a continuation.
enum Response {
    Data(Data<'static>),
    Status(Status<'static>),
}

fn text(s: impl Into<String>) -> Text<'static> {
    let s: String = s.into();
    Text::try_from(s).unwrap_or_else(|_| Text::unvalidated("..."))
}

fn tagged(tag: &Tag<'static>, kind: StatusKind, code: Option<Code<'static>>, msg: &str) -> Response {
    Response::Status(Status::Tagged(Tagged { tag: tag.clone(), body: StatusBody { kind, code, text: text(msg) } }))
}

fn untagged(kind: StatusKind, code: Option<Code<'static>>, msg: &str) -> Response {
    Response::Status(Status::Untagged(StatusBody { kind, code, text: text(msg) }))
}

fn other_code(code: &'static str) -> Code<'static> {
    Code::Other(imap_next::imap_types::response::CodeOther::unvalidated(code.as_bytes()))
}

/// `* N FETCH (...)` for the message at `index` (0-based), if there are items.
fn fetch_data(index: usize, items: Vec<MessageDataItem<'static>>) -> Option<Data<'static>> {
    let seq = nz(u32::try_from(index + 1).unwrap_or(u32::MAX));
    Vec1::try_from(items).ok().map(|items| Data::Fetch { seq, items })
}

/// The octets of a message's text an item carries.
fn copied_len(item: &MessageDataItem<'_>) -> usize {
    match item {
        MessageDataItem::Rfc822(s) | MessageDataItem::Rfc822Header(s) | MessageDataItem::Rfc822Text(s) => {
            s.0.as_ref().map_or(0, |i| i.as_ref().len())
        }
        MessageDataItem::BodyExt { data, .. } => data.0.as_ref().map_or(0, |i| i.as_ref().len()),
        _ => 0,
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// A string for the wire: quoted where it can be, a literal where not.
fn nstring(bytes: Option<&[u8]>) -> NString<'static> {
    match bytes {
        None => NString(None),
        Some(b) => NString(Some(istring(b))),
    }
}

fn istring(b: &[u8]) -> IString<'static> {
    IString::try_from(b.to_vec()).unwrap_or_else(|_| IString::Literal(Literal::unvalidated(b.to_vec())))
}

fn mailbox_name(m: &Mailbox<'_>) -> String {
    match m {
        Mailbox::Inbox => "INBOX".to_owned(),
        Mailbox::Other(o) => canonical(&String::from_utf8_lossy(o.inner().as_ref())),
    }
}

fn mailbox_wire(name: &str) -> Mailbox<'static> {
    Mailbox::try_from(name.to_owned()).unwrap_or(Mailbox::Inbox)
}

/// The imap-types flag of a store flag bit.
fn system_flags(f: &Flags) -> Vec<Flag<'static>> {
    let mut out = Vec::new();
    for (bit, fl) in [
        (flag::SEEN, Flag::Seen),
        (flag::ANSWERED, Flag::Answered),
        (flag::FLAGGED, Flag::Flagged),
        (flag::DELETED, Flag::Deleted),
        (flag::DRAFT, Flag::Draft),
    ] {
        if f.has(bit) {
            out.push(fl);
        }
    }
    for k in &f.keywords {
        if let Ok(a) = Atom::try_from(k.clone()) {
            out.push(Flag::Keyword(a));
        }
    }
    out
}

fn fetch_flags(f: &Flags) -> Vec<FlagFetch<'static>> {
    system_flags(f).into_iter().map(FlagFetch::Flag).collect()
}

/// Store flags from the wire's (bounded; `\Recent` and unknown system flags ignored).
fn from_wire(flags: &[Flag<'_>]) -> Flags {
    let mut f = Flags::default();
    for fl in flags {
        match fl {
            Flag::Seen => f.system |= flag::SEEN,
            Flag::Answered => f.system |= flag::ANSWERED,
            Flag::Flagged => f.system |= flag::FLAGGED,
            Flag::Deleted => f.system |= flag::DELETED,
            Flag::Draft => f.system |= flag::DRAFT,
            Flag::Keyword(k) => {
                let k = k.inner().to_owned();
                if k.len() <= 64 && f.keywords.len() < super::store::MAX_KEYWORDS && !f.keywords.contains(&k) {
                    f.keywords.push(k);
                }
            }
            Flag::Extension(_) => {}
        }
    }
    f
}

/// Whether `value` is in `set`, `*` being `largest`.
fn in_set(set: &SequenceSet, value: u32, largest: u32) -> bool {
    let v = |s: &SeqOrUid| match s {
        SeqOrUid::Value(n) => n.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|seq| match seq {
        Sequence::Single(s) => v(s) == value,
        Sequence::Range(a, b) => {
            let (a, b) = (v(a), v(b));
            (a.min(b)..=a.max(b)).contains(&value)
        }
    })
}

fn uid_set(uids: &[u32]) -> Option<UidSet> {
    let mut elems: Vec<UidElement> = Vec::new();
    let mut i = 0;
    while i < uids.len() {
        let mut j = i;
        while j + 1 < uids.len() && uids[j + 1] == uids[j] + 1 {
            j += 1;
        }
        elems.push(if i == j { UidElement::Single(nz(uids[i])) } else { UidElement::Range(nz(uids[i]), nz(uids[j])) });
        i = j + 1;
    }
    Vec1::try_from(elems).ok().map(UidSet)
}

fn date_time(secs: i64) -> Option<DateTime> {
    let utc = chrono::DateTime::from_timestamp(secs, 0)?;
    DateTime::try_from(utc.fixed_offset()).ok()
}

fn envelope(e: &mime::Envelope) -> Envelope<'static> {
    let addrs = |v: &[mime::Addr]| {
        v.iter()
            .map(|a| Address {
                name: nstring(a.name.as_deref().map(str::as_bytes)),
                adl: NString(None),
                mailbox: nstring(a.mailbox.as_deref().map(str::as_bytes)),
                host: nstring(a.host.as_deref().map(str::as_bytes)),
            })
            .collect()
    };
    Envelope {
        date: nstring(e.date.as_deref()),
        subject: nstring(e.subject.as_deref()),
        from: addrs(&e.from),
        sender: addrs(&e.sender),
        reply_to: addrs(&e.reply_to),
        to: addrs(&e.to),
        cc: addrs(&e.cc),
        bcc: addrs(&e.bcc),
        in_reply_to: nstring(e.in_reply_to.as_deref()),
        message_id: nstring(e.message_id.as_deref()),
    }
}

fn params(p: &[(String, String)]) -> Vec<(IString<'static>, IString<'static>)> {
    p.iter().map(|(k, v)| (istring(k.as_bytes()), istring(v.as_bytes()))).collect()
}

fn disposition(p: &mime::Part) -> Option<Disposition<'static>> {
    Some(Disposition {
        disposition: p.disposition.as_ref().map(|(d, ps)| (istring(d.as_bytes()), params(ps))),
        tail: Some(Language {
            language: p.language.iter().map(|l| istring(l.as_bytes())).collect(),
            tail: Some(Location {
                location: nstring(p.location.as_deref().map(str::as_bytes)),
                extensions: Vec::new(),
            }),
        }),
    })
}

/// BODYSTRUCTURE (with extension data) or BODY (without).
fn structure(p: &mime::Part, extended: bool) -> BodyStructure<'static> {
    if p.is_multipart() && !p.children.is_empty() {
        let bodies: Vec<BodyStructure<'static>> = p.children.iter().map(|c| structure(c, extended)).collect();
        if let Ok(bodies) = Vec1::try_from(bodies) {
            return BodyStructure::Multi {
                bodies,
                subtype: istring(p.subtype.as_bytes()),
                extension_data: extended
                    .then(|| MultiPartExtensionData { parameter_list: params(&p.params), tail: disposition(p) }),
            };
        }
    }
    let basic = BasicFields {
        parameter_list: params(&p.params),
        id: nstring(p.id.as_deref().map(str::as_bytes)),
        description: nstring(p.description.as_deref().map(str::as_bytes)),
        content_transfer_encoding: istring(p.encoding.as_bytes()),
        size: u32::try_from(p.body.len()).unwrap_or(u32::MAX),
    };
    let specific = match (&p.message, p.ctype.as_str()) {
        (Some(m), _) => SpecificFields::Message {
            envelope: Box::new(
                m.envelope.as_deref().map(envelope).unwrap_or_else(|| envelope(&mime::Envelope::default())),
            ),
            body_structure: Box::new(structure(m, extended)),
            number_of_lines: p.lines,
        },
        (None, "text") => SpecificFields::Text { subtype: istring(p.subtype.as_bytes()), number_of_lines: p.lines },
        // A multipart without parts, or a message past the depth limit,
        // cannot be written as what it says it is: opaque data.
        (None, "multipart" | "message") => {
            SpecificFields::Basic { r#type: istring(b"application"), subtype: istring(b"octet-stream") }
        }
        (None, _) => {
            SpecificFields::Basic { r#type: istring(p.ctype.as_bytes()), subtype: istring(p.subtype.as_bytes()) }
        }
    };
    BodyStructure::Single {
        body: Body { basic, specific },
        extension_data: extended.then(|| SinglePartExtensionData { md5: NString(None), tail: disposition(p) }),
    }
}

fn section_bytes(section: Option<&Section<'_>>, raw: &[u8], root: &mime::Part) -> Option<Vec<u8>> {
    let path = |p: &Option<imap_next::imap_types::fetch::Part>| -> Vec<u32> {
        p.as_ref().map(|p| p.0.as_ref().iter().map(|n| n.get()).collect()).unwrap_or_default()
    };
    // The message a HEADER or TEXT section is about: the top, or the
    // message inside a message/rfc822 part.
    let message_of = |path: &[u32]| -> Option<&mime::Part> {
        if path.is_empty() {
            Some(root)
        } else {
            mime::locate(root, path)?.message.as_deref()
        }
    };
    Some(match section {
        None => raw.to_vec(),
        Some(Section::Part(p)) => {
            let part = mime::locate(root, &path(&Some(p.clone())))?;
            raw[part.body.clone()].to_vec()
        }
        Some(Section::Mime(p)) => {
            let part = mime::locate(root, &path(&Some(p.clone())))?;
            raw[part.header.clone()].to_vec()
        }
        Some(Section::Header(p)) => raw[message_of(&path(p))?.header.clone()].to_vec(),
        Some(Section::Text(p)) => raw[message_of(&path(p))?.body.clone()].to_vec(),
        Some(Section::HeaderFields(p, names)) | Some(Section::HeaderFieldsNot(p, names)) => {
            let not = matches!(section, Some(Section::HeaderFieldsNot(..)));
            let names: Vec<Vec<u8>> = names.as_ref().iter().map(|n| n.as_ref().to_vec()).collect();
            mime::header_fields(&raw[message_of(&path(p))?.header.clone()], &names, not)
        }
    })
}

/// A lower-case substring test, over decoded text.
fn contains(hay: &str, needle: &[u8]) -> bool {
    let needle = String::from_utf8_lossy(needle).to_lowercase();
    hay.to_lowercase().contains(&needle)
}

fn naive(secs: i64) -> Option<chrono::NaiveDate> {
    Some(chrono::DateTime::from_timestamp(secs, 0)?.date_naive())
}

/// One message as a SEARCH sees it, its octets read only if a key needs them.
struct Candidate<'a> {
    seq: u32,
    uid: u32,
    entry: &'a Entry,
    raw: Option<Arc<[u8]>>,
}

/// Whether `hay` holds `needle`, ASCII letters in any case (no allocation).
fn find_ci(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else { return true };
    let first = first.to_ascii_lowercase();
    let last_start = match hay.len().checked_sub(needle.len()) {
        Some(n) => n,
        None => return false,
    };
    (0..=last_start)
        .any(|i| hay[i].to_ascii_lowercase() == first && hay[i + 1..i + needle.len()].eq_ignore_ascii_case(rest))
}

/// SEARCH BODY over a message: the stored octets first (most mail is 8bit
/// or 7bit text), the decoded text parts only where an ASCII needle could
/// be hidden by a transfer encoding, or for any other needle.
fn body_contains(whole: &[u8], needle: &[u8]) -> bool {
    let body = &whole[mime::header_len(whole)..];
    if needle.is_ascii() {
        if find_ci(body, needle) {
            return true;
        }
        if !find_ci(whole, b"quoted-printable") && !find_ci(whole, b"base64") {
            return false;
        }
    }
    contains(&mime::searchable_text(whole), needle)
}

/// SEARCH TEXT's header half: the raw fields, and the decoded ones where
/// encoded words could hide the needle.
fn header_contains(whole: &[u8], needle: &[u8]) -> bool {
    let header = &whole[..mime::header_len(whole)];
    if needle.is_ascii() && find_ci(header, needle) {
        return true;
    }
    if needle.is_ascii() && !find_ci(header, b"=?") {
        return false;
    }
    ["subject", "from", "to", "cc", "bcc", "reply-to", "sender"]
        .iter()
        .any(|f| mime::decoded_header(header, f).is_some_and(|v| contains(&v, needle)))
}

impl Session {
    fn new(shared: Arc<Shared>, secure: bool) -> Self {
        Session {
            shared,
            phase: Phase::NotAuthenticated,
            secure,
            failures: 0,
            bad: 0,
            preauth_read: 0,
            idle: None,
            authenticating: None,
            gone: false,
            out: Vec::new(),
            fetching: None,
        }
    }

    fn may_log_in(&self) -> bool {
        self.secure || self.shared.plaintext_ok
    }

    fn capabilities(&self) -> Vec1<Capability<'static>> {
        let mut caps = vec![Capability::Imap4Rev1];
        if matches!(self.phase, Phase::NotAuthenticated) {
            if !self.secure && self.shared.access.tls.is_some() {
                caps.push(Capability::StartTls);
            }
            if self.may_log_in() {
                caps.push(Capability::Auth(AuthMechanism::Plain));
                caps.push(Capability::SaslIr);
            } else {
                caps.push(Capability::LoginDisabled);
            }
        } else {
            for c in ["SPECIAL-USE"] {
                if let Ok(c) = Capability::try_from(c) {
                    caps.push(c);
                }
            }
            caps.extend([Capability::Idle, Capability::Move, Capability::UidPlus, Capability::Unselect]);
            caps.extend([Capability::Enable, Capability::Namespace]);
        }
        caps.extend([Capability::LiteralPlus, Capability::Id]);
        Vec1::try_from(caps).unwrap_or_else(|_| Vec1::from(Capability::Imap4Rev1))
    }

    fn push_data(&mut self, d: Data<'static>) {
        self.out.push(Response::Data(d));
    }

    /// Brings the selected folder's view up to date: EXPUNGE for messages
    /// gone, FETCH FLAGS for changed flags, EXISTS for new ones.
    fn refresh(&mut self) -> Result<()> {
        let Phase::Selected(sel) = &mut self.phase else { return Ok(()) };
        let same = self.shared.store.folder(&sel.name)?.is_some_and(|f| f.validity == sel.validity);
        let fresh = match self.shared.store.entries(&sel.name) {
            Ok(f) if same => f,
            _ => {
                // The folder was deleted (and perhaps made again) under us.
                if !self.gone {
                    let bye = Bye { code: None, text: text("the selected folder was deleted") };
                    self.out.push(Response::Status(Status::Bye(bye)));
                    self.gone = true;
                }
                return Ok(());
            }
        };
        // One pass (a mass expunge is not quadratic): each EXPUNGE names the
        // message's number after the ones before it went.
        let mut out = Vec::new();
        let mut kept = Vec::with_capacity(sel.msgs.len());
        for (i, m) in std::mem::take(&mut sel.msgs).into_iter().enumerate() {
            if fresh.binary_search_by_key(&m.0, |(u, _)| *u).is_ok() {
                kept.push(m);
            } else {
                let seq = i + 1 - out.len();
                out.push(Data::Expunge(nz(u32::try_from(seq).unwrap_or(u32::MAX))));
            }
        }
        sel.msgs = kept;
        let last = sel.msgs.last().map_or(0, |(u, _)| *u);
        let mut added = false;
        for (uid, e) in fresh {
            if uid > last {
                sel.msgs.push((uid, e));
                added = true;
            } else if let Ok(pos) = sel.msgs.binary_search_by_key(&uid, |(u, _)| *u) {
                if sel.msgs[pos].1.flags != e.flags {
                    let items = vec![MessageDataItem::Flags(fetch_flags(&e.flags)), MessageDataItem::Uid(nz(uid))];
                    out.extend(fetch_data(pos, items));
                    sel.msgs[pos].1 = e;
                }
            }
        }
        if added {
            out.push(Data::Exists(u32::try_from(sel.msgs.len()).unwrap_or(u32::MAX)));
        }
        for d in out {
            self.push_data(d);
        }
        Ok(())
    }

    fn select(&mut self, tag: &Tag<'static>, name: String, read_only: bool) -> Result<()> {
        self.phase = Phase::Authenticated;
        let store = Arc::clone(&self.shared.store);
        let Some(folder) = store.folder(&name)? else {
            self.out.push(tagged(tag, StatusKind::No, Some(Code::TryCreate), "no such folder"));
            return Ok(());
        };
        let msgs = store.entries(&name)?;
        let flags = vec![Flag::Answered, Flag::Flagged, Flag::Deleted, Flag::Seen, Flag::Draft];
        self.push_data(Data::Flags(flags.clone()));
        self.push_data(Data::Exists(u32::try_from(msgs.len()).unwrap_or(u32::MAX)));
        self.push_data(Data::Recent(0));
        if let Some(pos) = msgs.iter().position(|(_, e)| !e.flags.has(flag::SEEN)) {
            let seq = nz(u32::try_from(pos + 1).unwrap_or(u32::MAX));
            self.out.push(untagged(StatusKind::Ok, Some(Code::Unseen(seq)), "first unseen"));
        }
        let mut perm: Vec<FlagPerm<'static>> = flags.into_iter().map(FlagPerm::Flag).collect();
        perm.push(FlagPerm::Asterisk);
        self.out.push(untagged(StatusKind::Ok, Some(Code::PermanentFlags(perm)), "flags are kept"));
        self.out.push(untagged(StatusKind::Ok, Some(Code::UidValidity(nz(folder.validity))), "UIDs valid"));
        self.out.push(untagged(StatusKind::Ok, Some(Code::UidNext(nz(folder.next_uid))), "predicted next UID"));
        let code = if read_only { Code::ReadOnly } else { Code::ReadWrite };
        self.out.push(tagged(tag, StatusKind::Ok, Some(code), if read_only { "EXAMINE done" } else { "SELECT done" }));
        self.phase = Phase::Selected(Selected { name, validity: folder.validity, read_only, msgs });
        Ok(())
    }

    /// The (index, UID) pairs a sequence or UID set names in the selection.
    fn targets(sel: &Selected, set: &SequenceSet, uid: bool) -> Vec<usize> {
        let largest = if uid {
            sel.msgs.last().map_or(0, |(u, _)| *u)
        } else {
            u32::try_from(sel.msgs.len()).unwrap_or(u32::MAX)
        };
        sel.msgs
            .iter()
            .enumerate()
            .filter(|(i, (u, _))| {
                let v = if uid { *u } else { u32::try_from(i + 1).unwrap_or(u32::MAX) };
                in_set(set, v, largest)
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn fetch(
        &mut self,
        tag: &Tag<'static>,
        set: &SequenceSet,
        items: &MacroOrMessageDataItemNames<'_>,
        uid: bool,
    ) -> Result<()> {
        let Phase::Selected(sel) = &self.phase else {
            self.out.push(tagged(tag, StatusKind::Bad, None, "no folder is selected"));
            return Ok(());
        };
        let mut names: Vec<MessageDataItemName<'static>> = match items {
            MacroOrMessageDataItemNames::Macro(m) => m.expand().iter().map(ToStatic::to_static).collect(),
            MacroOrMessageDataItemNames::MessageDataItemNames(n) => n.iter().map(ToStatic::to_static).collect(),
        };
        if uid && !names.contains(&MessageDataItemName::Uid) {
            names.push(MessageDataItemName::Uid);
        }
        if names
            .iter()
            .any(|n| matches!(n, MessageDataItemName::Binary { .. } | MessageDataItemName::BinarySize { .. }))
        {
            self.out.push(tagged(tag, StatusKind::Bad, None, "BINARY is not offered"));
            return Ok(());
        }
        // What must be read: nothing, the header only, or the whole message.
        let header_only = |n: &MessageDataItemName<'_>| {
            matches!(
                n,
                MessageDataItemName::Envelope
                    | MessageDataItemName::Rfc822Header
                    | MessageDataItemName::BodyExt {
                        section: Some(
                            Section::Header(None) | Section::HeaderFields(None, _) | Section::HeaderFieldsNot(None, _)
                        ),
                        ..
                    }
            )
        };
        let metadata = |n: &MessageDataItemName<'_>| {
            matches!(
                n,
                MessageDataItemName::Flags
                    | MessageDataItemName::Uid
                    | MessageDataItemName::InternalDate
                    | MessageDataItemName::Rfc822Size
            )
        };
        let needs_raw = names.iter().any(|n| !metadata(n));
        let needs_all = names.iter().any(|n| !metadata(n) && !header_only(n));
        let marks_seen = !sel.read_only
            && names.iter().any(|n| {
                matches!(
                    n,
                    MessageDataItemName::BodyExt { peek: false, .. }
                        | MessageDataItemName::Rfc822
                        | MessageDataItemName::Rfc822Text
                )
            });
        let targets = Self::targets(sel, set, uid);
        self.fetching =
            Some(Fetching { tag: tag.clone(), names, targets: targets.into_iter(), needs_raw, needs_all, marks_seen });
        self.fetch_more();
        Ok(())
    }

    /// Answers the FETCH under way for about [`FETCH_CHUNK`] octets of
    /// messages (at least one message, and something to send unless it is
    /// done); its tagged answer once it is done.
    fn fetch_more(&mut self) {
        let Some(mut f) = self.fetching.take() else { return };
        let mut outcome = self.fetch_chunk(&mut f);
        while matches!(outcome, Ok(Chunk::More)) && self.out.is_empty() {
            outcome = self.fetch_chunk(&mut f);
        }
        match outcome {
            Ok(Chunk::Done) => self.out.push(tagged(&f.tag, StatusKind::Ok, None, "FETCH done")),
            Ok(Chunk::More) => self.fetching = Some(f),
            Ok(Chunk::TooMuch) => self.out.push(tagged(
                &f.tag,
                StatusKind::No,
                Some(other_code("LIMIT")),
                "that asks for the same messages too many times; ask for fewer parts at once",
            )),
            Err(e) => {
                tracing::warn!("IMAP FETCH failed: {e:#}");
                self.out.push(tagged(
                    &f.tag,
                    StatusKind::No,
                    Some(other_code("SERVERBUG")),
                    "the store failed; try again",
                ));
            }
        }
    }

    /// One chunk of a FETCH: the messages of about [`FETCH_CHUNK`] octets
    /// (by the index's sizes), marked `\Seen` first where the FETCH marks
    /// them, so that the FLAGS sent are the new ones and a message the
    /// client never got is not marked.
    fn fetch_chunk(&mut self, f: &mut Fetching) -> Result<Chunk> {
        let Phase::Selected(sel) = &self.phase else { return Ok(Chunk::Done) };
        let mut take = Vec::new();
        let mut spent = 0usize;
        while spent < FETCH_CHUNK {
            let Some(i) = f.targets.next() else { break };
            // A header is counted as 4 KiB, metadata as 64 octets.
            spent += match (f.needs_all, f.needs_raw) {
                (true, _) => usize::try_from(sel.msgs[i].1.size).unwrap_or(usize::MAX).max(64),
                (false, true) => 4096,
                (false, false) => 64,
            };
            take.push(i);
        }
        if f.marks_seen {
            let unseen: Vec<u32> =
                take.iter().map(|&i| &sel.msgs[i]).filter(|(_, e)| !e.flags.has(flag::SEEN)).map(|(u, _)| *u).collect();
            if !unseen.is_empty() {
                let changed = self.shared.store.set_flags(&sel.name, &unseen, |f| f.system |= flag::SEEN)?;
                if let Phase::Selected(sel) = &mut self.phase {
                    for (u, f) in changed {
                        if let Ok(pos) = sel.msgs.binary_search_by_key(&u, |(x, _)| *x) {
                            sel.msgs[pos].1.flags = f;
                        }
                    }
                }
            }
        }
        let Phase::Selected(sel) = &self.phase else { return Ok(Chunk::Done) };
        let (names, needs_raw, needs_all, marks_seen) = (&f.names, f.needs_raw, f.needs_all, f.marks_seen);
        let cur = self.shared.store.cur(&sel.name)?;
        let mut data = Vec::new();
        for i in take {
            let (u, entry) = &sel.msgs[i];
            let raw = if needs_raw {
                let read = if needs_all { read_in(&cur, entry) } else { read_header_in(&cur, entry) };
                match read {
                    Ok(r) => Some(r),
                    // Expunged by another session meanwhile: skipped.
                    Err(_) => continue,
                }
            } else {
                None
            };
            // The octets this message's items copy: at most twice the
            // message (and a megabyte), whatever the client lists.
            let mut copied = 0usize;
            let most = raw.as_ref().map_or(0, Vec::len).saturating_mul(2).saturating_add(1 << 20);
            let root = raw.as_deref().filter(|_| {
                names.iter().any(|n| {
                    matches!(
                        n,
                        MessageDataItemName::Body
                            | MessageDataItemName::BodyStructure
                            | MessageDataItemName::Envelope
                            | MessageDataItemName::BodyExt { section: Some(_), .. }
                    )
                })
            });
            let root = root.map(mime::parse);
            let raw = raw.as_deref().unwrap_or_default();
            let mut items = Vec::with_capacity(names.len() + 1);
            let mut flags_sent = false;
            for n in names {
                let item = match n {
                    MessageDataItemName::Flags => {
                        flags_sent = true;
                        MessageDataItem::Flags(fetch_flags(&entry.flags))
                    }
                    MessageDataItemName::Uid => MessageDataItem::Uid(nz(*u)),
                    MessageDataItemName::InternalDate => match date_time(entry.date) {
                        Some(d) => MessageDataItem::InternalDate(d),
                        None => continue,
                    },
                    MessageDataItemName::Rfc822Size => {
                        MessageDataItem::Rfc822Size(u32::try_from(entry.size).unwrap_or(u32::MAX))
                    }
                    MessageDataItemName::Envelope => {
                        let env = root.as_ref().and_then(|r| r.envelope.as_deref()).cloned().unwrap_or_default();
                        MessageDataItem::Envelope(envelope(&env))
                    }
                    MessageDataItemName::BodyStructure | MessageDataItemName::Body => {
                        let Some(root) = &root else { continue };
                        let extended = matches!(n, MessageDataItemName::BodyStructure);
                        let s = structure(root, extended);
                        if extended {
                            MessageDataItem::BodyStructure(s)
                        } else {
                            MessageDataItem::Body(s)
                        }
                    }
                    MessageDataItemName::Rfc822 => MessageDataItem::Rfc822(nstring(Some(raw))),
                    MessageDataItemName::Rfc822Header => {
                        let end = root.as_ref().map_or_else(|| mime::parse(raw).header.end, |r| r.header.end);
                        MessageDataItem::Rfc822Header(nstring(Some(&raw[..end])))
                    }
                    MessageDataItemName::Rfc822Text => {
                        let start = mime::parse(raw).body.start;
                        MessageDataItem::Rfc822Text(nstring(Some(&raw[start..])))
                    }
                    MessageDataItemName::BodyExt { section, partial, .. } => {
                        let bytes = match &root {
                            Some(r) => section_bytes(section.as_ref(), raw, r),
                            None => Some(raw.to_vec()),
                        };
                        // A part that does not exist is the empty string (as Dovecot does).
                        let bytes = bytes.unwrap_or_default();
                        let (origin, bytes) = match partial {
                            Some((start, len)) => {
                                let s = (*start as usize).min(bytes.len());
                                let e = s.saturating_add(len.get() as usize).min(bytes.len());
                                (Some(*start), bytes[s..e].to_vec())
                            }
                            None => (None, bytes),
                        };
                        MessageDataItem::BodyExt {
                            section: section.as_ref().map(ToStatic::to_static),
                            origin,
                            data: NString(Some(IString::Literal(Literal::unvalidated(bytes)))),
                        }
                    }
                    MessageDataItemName::Binary { .. } | MessageDataItemName::BinarySize { .. } => continue,
                };
                copied = copied.saturating_add(copied_len(&item));
                if copied > most {
                    for d in data {
                        self.push_data(d);
                    }
                    return Ok(Chunk::TooMuch);
                }
                items.push(item);
            }
            if marks_seen && !flags_sent {
                items.push(MessageDataItem::Flags(fetch_flags(&entry.flags)));
            }
            data.extend(fetch_data(i, items));
        }
        for d in data {
            self.push_data(d);
        }
        Ok(if f.targets.len() == 0 { Chunk::Done } else { Chunk::More })
    }

    fn matches(&self, c: &mut Candidate<'_>, key: &SearchKey<'_>, sel: &Selected, cur: &Path) -> bool {
        let mut raw = |c: &mut Candidate<'_>| -> Arc<[u8]> {
            if c.raw.is_none() {
                c.raw = Some(Arc::from(read_in(cur, c.entry).unwrap_or_default()));
            }
            c.raw.clone().unwrap_or_else(|| Arc::from(Vec::new()))
        };
        let header = |c: &mut Candidate<'_>, raw: &mut dyn FnMut(&mut Candidate<'_>) -> Arc<[u8]>| {
            let r = raw(c);
            r[..mime::header_len(&r)].to_vec()
        };
        let field =
            |c: &mut Candidate<'_>, name: &str, needle: &[u8], raw: &mut dyn FnMut(&mut Candidate<'_>) -> Arc<[u8]>| {
                let h = header(c, raw);
                match mime::decoded_header(&h, name) {
                    Some(v) => contains(&v, needle),
                    None => needle.is_empty() && mime::raw_field(&h, name).is_some(),
                }
            };
        let sent = |c: &mut Candidate<'_>, raw: &mut dyn FnMut(&mut Candidate<'_>) -> Arc<[u8]>| {
            let h = header(c, raw);
            let d =
                mail_parser::MessageParser::new().parse_headers(&h).and_then(|m| m.date().map(|d| d.to_timestamp()));
            d.and_then(naive)
        };
        let f = &c.entry.flags;
        match key {
            SearchKey::And(keys) => keys.as_ref().iter().all(|k| self.matches(c, k, sel, cur)),
            SearchKey::Or(a, b) => self.matches(c, a, sel, cur) || self.matches(c, b, sel, cur),
            SearchKey::Not(k) => !self.matches(c, k, sel, cur),
            SearchKey::SequenceSet(s) => in_set(s, c.seq, u32::try_from(sel.msgs.len()).unwrap_or(u32::MAX)),
            SearchKey::Uid(s) => in_set(s, c.uid, sel.msgs.last().map_or(0, |(u, _)| *u)),
            SearchKey::All | SearchKey::Old => true,
            SearchKey::New | SearchKey::Recent => false,
            SearchKey::Answered => f.has(flag::ANSWERED),
            SearchKey::Unanswered => !f.has(flag::ANSWERED),
            SearchKey::Deleted => f.has(flag::DELETED),
            SearchKey::Undeleted => !f.has(flag::DELETED),
            SearchKey::Draft => f.has(flag::DRAFT),
            SearchKey::Undraft => !f.has(flag::DRAFT),
            SearchKey::Flagged => f.has(flag::FLAGGED),
            SearchKey::Unflagged => !f.has(flag::FLAGGED),
            SearchKey::Seen => f.has(flag::SEEN),
            SearchKey::Unseen => !f.has(flag::SEEN),
            SearchKey::Keyword(k) => f.keywords.iter().any(|x| x.eq_ignore_ascii_case(k.inner())),
            SearchKey::Unkeyword(k) => !f.keywords.iter().any(|x| x.eq_ignore_ascii_case(k.inner())),
            SearchKey::Larger(n) => c.entry.size > u64::from(*n),
            SearchKey::Smaller(n) => c.entry.size < u64::from(*n),
            SearchKey::Before(d) => naive(c.entry.date).is_some_and(|x| x < *d.as_ref()),
            SearchKey::On(d) => naive(c.entry.date).is_some_and(|x| x == *d.as_ref()),
            SearchKey::Since(d) => naive(c.entry.date).is_some_and(|x| x >= *d.as_ref()),
            SearchKey::SentBefore(d) => sent(c, &mut raw).is_some_and(|x| x < *d.as_ref()),
            SearchKey::SentOn(d) => sent(c, &mut raw).is_some_and(|x| x == *d.as_ref()),
            SearchKey::SentSince(d) => sent(c, &mut raw).is_some_and(|x| x >= *d.as_ref()),
            SearchKey::From(s) => field(c, "From", s.as_ref(), &mut raw),
            SearchKey::To(s) => field(c, "To", s.as_ref(), &mut raw),
            SearchKey::Cc(s) => field(c, "Cc", s.as_ref(), &mut raw),
            SearchKey::Bcc(s) => field(c, "Bcc", s.as_ref(), &mut raw),
            SearchKey::Subject(s) => field(c, "Subject", s.as_ref(), &mut raw),
            SearchKey::Header(name, s) => {
                let name = String::from_utf8_lossy(name.as_ref()).into_owned();
                field(c, &name, s.as_ref(), &mut raw)
            }
            SearchKey::Body(s) => body_contains(&raw(c), s.as_ref()),
            SearchKey::Text(s) => {
                let r = raw(c);
                header_contains(&r, s.as_ref()) || body_contains(&r, s.as_ref())
            }
        }
    }

    fn search(&mut self, tag: &Tag<'static>, criteria: &Vec1<SearchKey<'_>>, uid: bool) {
        let Phase::Selected(sel) = &self.phase else {
            self.out.push(tagged(tag, StatusKind::Bad, None, "no folder is selected"));
            return;
        };
        let cur = match self.shared.store.cur(&sel.name) {
            Ok(c) => c,
            Err(_) => {
                self.out.push(tagged(tag, StatusKind::No, None, "the folder is gone"));
                return;
            }
        };
        let mut found = Vec::new();
        for (i, (u, entry)) in sel.msgs.iter().enumerate() {
            let seq = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let mut c = Candidate { seq, uid: *u, entry, raw: None };
            if criteria.as_ref().iter().all(|k| self.matches(&mut c, k, sel, &cur)) {
                found.push(nz(if uid { *u } else { seq }));
            }
        }
        self.push_data(Data::Search(found));
        self.out.push(tagged(tag, StatusKind::Ok, None, "SEARCH done"));
    }

    fn store_flags(
        &mut self,
        tag: &Tag<'static>,
        set: &SequenceSet,
        kind: StoreType,
        silent: bool,
        flags: &[Flag<'_>],
        uid: bool,
    ) -> Result<()> {
        let Phase::Selected(sel) = &self.phase else {
            self.out.push(tagged(tag, StatusKind::Bad, None, "no folder is selected"));
            return Ok(());
        };
        if sel.read_only {
            self.out.push(tagged(tag, StatusKind::No, None, "the folder is read-only"));
            return Ok(());
        }
        let given = from_wire(flags);
        let uids: Vec<u32> = Self::targets(sel, set, uid).into_iter().map(|i| sel.msgs[i].0).collect();
        let name = sel.name.clone();
        let changed = self.shared.store.set_flags(&name, &uids, |f| match kind {
            StoreType::Add => f.add(&given),
            StoreType::Remove => f.remove(&given),
            StoreType::Replace => *f = given.clone(),
        })?;
        let mut data = Vec::new();
        if let Phase::Selected(sel) = &mut self.phase {
            for (u, f) in changed {
                if let Ok(pos) = sel.msgs.binary_search_by_key(&u, |(x, _)| *x) {
                    sel.msgs[pos].1.flags = f.clone();
                    if !silent {
                        let mut items = vec![MessageDataItem::Flags(fetch_flags(&f))];
                        if uid {
                            items.push(MessageDataItem::Uid(nz(u)));
                        }
                        data.extend(fetch_data(pos, items));
                    }
                }
            }
        }
        for d in data {
            self.push_data(d);
        }
        self.out.push(tagged(tag, StatusKind::Ok, None, "STORE done"));
        Ok(())
    }

    fn copy_or_move(
        &mut self,
        tag: &Tag<'static>,
        set: &SequenceSet,
        to: &Mailbox<'_>,
        uid: bool,
        mv: bool,
    ) -> Result<()> {
        let Phase::Selected(sel) = &self.phase else {
            self.out.push(tagged(tag, StatusKind::Bad, None, "no folder is selected"));
            return Ok(());
        };
        if mv && sel.read_only {
            self.out.push(tagged(tag, StatusKind::No, None, "the folder is read-only"));
            return Ok(());
        }
        let to = mailbox_name(to);
        if self.shared.store.folder(&to)?.is_none() {
            self.out.push(tagged(tag, StatusKind::No, Some(Code::TryCreate), "no such folder"));
            return Ok(());
        }
        let uids: Vec<u32> = Self::targets(sel, set, uid).into_iter().map(|i| sel.msgs[i].0).collect();
        let name = sel.name.clone();
        let (validity, pairs) = self.shared.store.copy(&name, &uids, &to)?;
        let (src, dst): (Vec<u32>, Vec<u32>) = pairs.iter().copied().unzip();
        let code = match (uid_set(&src), uid_set(&dst)) {
            (Some(source), Some(destination)) => {
                Some(Code::CopyUid { uid_validity: nz(validity), source, destination })
            }
            _ => None,
        };
        if mv {
            if let Some(code) = code {
                self.out.push(untagged(StatusKind::Ok, Some(code), "moved"));
            }
            self.shared.store.expunge(&name, &src)?;
            self.refresh()?;
            self.out.push(tagged(tag, StatusKind::Ok, None, "MOVE done"));
        } else {
            self.out.push(tagged(tag, StatusKind::Ok, code, "COPY done"));
        }
        Ok(())
    }

    fn expunge(&mut self, only: Option<&SequenceSet>) -> Result<bool> {
        let Phase::Selected(sel) = &self.phase else { return Ok(false) };
        if sel.read_only {
            return Ok(false);
        }
        let largest = sel.msgs.last().map_or(0, |(u, _)| *u);
        let uids: Vec<u32> =
            sel.msgs.iter().map(|(u, _)| *u).filter(|u| only.is_none_or(|s| in_set(s, *u, largest))).collect();
        let name = sel.name.clone();
        // \Deleted as the index has it now: another client may have undeleted.
        self.shared.store.expunge_if(&name, &uids, |f| f.has(flag::DELETED))?;
        Ok(true)
    }

    fn list(&mut self, reference: &Mailbox<'_>, pattern: &ListMailbox<'_>, lsub: bool) -> Result<()> {
        let pattern: Vec<u8> = match pattern {
            ListMailbox::Token(t) => t.as_ref().to_vec(),
            ListMailbox::String(s) => s.as_ref().to_vec(),
        };
        let reference = match reference {
            Mailbox::Inbox => b"INBOX".to_vec(),
            Mailbox::Other(o) => o.inner().as_ref().to_vec(),
        };
        let delimiter = QuotedChar::try_from('/').ok();
        if pattern.is_empty() && !lsub {
            let items = vec![FlagNameAttribute::Noselect];
            if let Ok(root) = Mailbox::try_from("") {
                self.push_data(Data::List { items, delimiter, mailbox: root });
            }
            return Ok(());
        }
        let mut full = reference;
        full.extend_from_slice(&pattern);
        let folders = self.shared.store.folders()?;
        let mut data = Vec::new();
        for (name, f) in &folders {
            let cmp = if name == "INBOX" { b"INBOX".to_vec() } else { name.as_bytes().to_vec() };
            let pat = if full.len() >= 5 && full[..5].eq_ignore_ascii_case(b"INBOX") && name == "INBOX" {
                let mut p = b"INBOX".to_vec();
                p.extend_from_slice(&full[5..]);
                p
            } else {
                full.clone()
            };
            if !wildcard(&pat, &cmp) || (lsub && !f.subscribed) {
                continue;
            }
            let prefix = format!("{name}/");
            let children = folders.keys().any(|k| k.starts_with(&prefix));
            let mut items: Vec<FlagNameAttribute<'static>> = Vec::new();
            let mut names: Vec<&str> = vec![if children { "\\HasChildren" } else { "\\HasNoChildren" }];
            if let Some(s) = &f.special {
                names.push(s);
            }
            for n in names {
                if let Ok(a) = Atom::try_from(n.trim_start_matches('\\').to_owned()) {
                    items.push(FlagNameAttribute::from(a));
                }
            }
            let mailbox = mailbox_wire(name);
            data.push(if lsub {
                Data::Lsub { items, delimiter, mailbox }
            } else {
                Data::List { items, delimiter, mailbox }
            });
        }
        for d in data {
            self.push_data(d);
        }
        Ok(())
    }

    fn status(&mut self, tag: &Tag<'static>, name: &str, items: &[StatusDataItemName]) -> Result<()> {
        let Some(f) = self.shared.store.folder(name)? else {
            self.out.push(tagged(tag, StatusKind::No, Some(Code::TryCreate), "no such folder"));
            return Ok(());
        };
        let entries = self.shared.store.entries(name)?;
        let mut out = Vec::new();
        for i in items {
            out.push(match i {
                StatusDataItemName::Messages => {
                    StatusDataItem::Messages(u32::try_from(entries.len()).unwrap_or(u32::MAX))
                }
                StatusDataItemName::Recent => StatusDataItem::Recent(0),
                StatusDataItemName::UidNext => StatusDataItem::UidNext(nz(f.next_uid)),
                StatusDataItemName::UidValidity => StatusDataItem::UidValidity(nz(f.validity)),
                StatusDataItemName::Unseen => StatusDataItem::Unseen(
                    u32::try_from(entries.iter().filter(|(_, e)| !e.flags.has(flag::SEEN)).count()).unwrap_or(u32::MAX),
                ),
                StatusDataItemName::Deleted => StatusDataItem::Deleted(
                    u32::try_from(entries.iter().filter(|(_, e)| e.flags.has(flag::DELETED)).count())
                        .unwrap_or(u32::MAX),
                ),
                _ => continue,
            });
        }
        self.push_data(Data::Status { mailbox: mailbox_wire(&canonical(name)), items: Cow::Owned(out) });
        self.out.push(tagged(tag, StatusKind::Ok, None, "STATUS done"));
        Ok(())
    }

    /// Checks a login; slowed down after failures, for everyone.
    async fn check_login(&mut self, user: &[u8], password: &[u8]) -> bool {
        let ok = self.shared.access.check(user, password).await;
        if ok {
            self.phase = Phase::Authenticated;
        } else {
            self.failures += 1;
        }
        ok
    }

    /// Handles one command; the responses go to `self.out`.
    async fn command(&mut self, cmd: Command<'static>) -> Result<After> {
        let tag = cmd.tag.clone();
        let authed = !matches!(self.phase, Phase::NotAuthenticated);
        let selected = matches!(self.phase, Phase::Selected(_));
        let store = Arc::clone(&self.shared.store);
        // Commands that may report expunges first bring the view up to date
        // (RFC 3501 7.4.1: not during FETCH, STORE or SEARCH).
        if too_big(&cmd.body) {
            self.out.push(tagged(&tag, StatusKind::Bad, None, "too many ranges or too long a pattern"));
            return Ok(After::Continue);
        }
        let may_expunge = !matches!(
            cmd.body,
            CommandBody::Fetch { .. } | CommandBody::Store { .. } | CommandBody::Search { .. } | CommandBody::Logout
        );
        match cmd.body {
            CommandBody::Capability => {
                let caps = self.capabilities();
                self.push_data(Data::Capability(caps));
                self.out.push(tagged(&tag, StatusKind::Ok, None, "CAPABILITY done"));
            }
            CommandBody::Noop | CommandBody::Check => {
                self.out.push(tagged(&tag, StatusKind::Ok, None, "done"));
            }
            CommandBody::Logout => {
                self.out.push(Response::Status(Status::Bye(Bye { code: None, text: text("logging out") })));
                self.out.push(tagged(&tag, StatusKind::Ok, None, "LOGOUT done"));
                return Ok(After::Logout);
            }
            CommandBody::StartTLS => {
                if self.secure || self.shared.access.tls.is_none() || authed {
                    self.out.push(tagged(&tag, StatusKind::Bad, None, "STARTTLS is not possible now"));
                } else {
                    self.out.push(tagged(&tag, StatusKind::Ok, None, "begin TLS"));
                    return Ok(After::StartTls);
                }
            }
            CommandBody::Login { username, password } => {
                if authed {
                    self.out.push(tagged(&tag, StatusKind::Bad, None, "already logged in"));
                } else if !self.may_log_in() {
                    self.out.push(tagged(
                        &tag,
                        StatusKind::No,
                        Some(other_code("PRIVACYREQUIRED")),
                        "use STARTTLS first",
                    ));
                } else if self.check_login(username.as_ref(), password.declassify().as_ref()).await {
                    let caps = self.capabilities();
                    self.out.push(tagged(&tag, StatusKind::Ok, Some(Code::Capability(caps)), "logged in"));
                } else {
                    self.out.push(tagged(
                        &tag,
                        StatusKind::No,
                        Some(other_code("AUTHENTICATIONFAILED")),
                        "wrong user name or password",
                    ));
                }
            }
            _ if !authed => {
                self.out.push(tagged(&tag, StatusKind::Bad, None, "log in first"));
            }
            CommandBody::Enable { .. } => {
                self.push_data(Data::Enabled { capabilities: Vec::new() });
                self.out.push(tagged(&tag, StatusKind::Ok, None, "ENABLE done"));
            }
            CommandBody::Namespace => {
                let personal = vec![Namespace {
                    prefix: istring(b""),
                    delimiter: QuotedChar::try_from('/').ok(),
                    extensions: Vec::new(),
                }];
                self.push_data(Data::Namespace { personal, other: Vec::new(), shared: Vec::new() });
                self.out.push(tagged(&tag, StatusKind::Ok, None, "NAMESPACE done"));
            }
            CommandBody::Id { .. } => {
                let parameters = vec![
                    (istring(b"name"), nstring(Some(b"latssiam-bridge"))),
                    (istring(b"version"), nstring(Some(env!("CARGO_PKG_VERSION").as_bytes()))),
                ];
                self.push_data(Data::Id { parameters: Some(parameters) });
                self.out.push(tagged(&tag, StatusKind::Ok, None, "ID done"));
            }
            CommandBody::Select { mailbox, .. } => self.select(&tag, mailbox_name(&mailbox), false)?,
            CommandBody::Examine { mailbox, .. } => self.select(&tag, mailbox_name(&mailbox), true)?,
            CommandBody::Create { mailbox } => {
                let name = mailbox_name(&mailbox);
                match store.create(name.trim_end_matches('/')) {
                    Ok(()) => self.out.push(tagged(&tag, StatusKind::Ok, None, "CREATE done")),
                    Err(e) => self.out.push(tagged(&tag, StatusKind::No, None, &format!("{e}"))),
                }
            }
            CommandBody::Delete { mailbox } => {
                let name = mailbox_name(&mailbox);
                if matches!(&self.phase, Phase::Selected(s) if s.name == name) {
                    self.phase = Phase::Authenticated;
                }
                match store.delete(&name) {
                    Ok(()) => self.out.push(tagged(&tag, StatusKind::Ok, None, "DELETE done")),
                    Err(e) => self.out.push(tagged(&tag, StatusKind::No, None, &format!("{e}"))),
                }
            }
            CommandBody::Rename { from, to } => {
                let (from, to) = (mailbox_name(&from), mailbox_name(&to));
                match store.rename(&from, &to) {
                    Ok(()) => {
                        if let Phase::Selected(sel) = &mut self.phase {
                            if from != "INBOX" && (sel.name == from || sel.name.starts_with(&format!("{from}/"))) {
                                sel.name = format!("{to}{}", &sel.name[from.len()..]);
                            }
                        }
                        self.out.push(tagged(&tag, StatusKind::Ok, None, "RENAME done"));
                    }
                    Err(e) => self.out.push(tagged(&tag, StatusKind::No, None, &format!("{e}"))),
                }
            }
            CommandBody::Subscribe { mailbox } => match store.subscribe(&mailbox_name(&mailbox), true) {
                Ok(()) => self.out.push(tagged(&tag, StatusKind::Ok, None, "SUBSCRIBE done")),
                Err(e) => self.out.push(tagged(&tag, StatusKind::No, None, &format!("{e}"))),
            },
            CommandBody::Unsubscribe { mailbox } => {
                // Unsubscribing from a folder that is gone is allowed.
                let _ = store.subscribe(&mailbox_name(&mailbox), false);
                self.out.push(tagged(&tag, StatusKind::Ok, None, "UNSUBSCRIBE done"));
            }
            CommandBody::List { reference, mailbox_wildcard } => {
                self.list(&reference, &mailbox_wildcard, false)?;
                self.out.push(tagged(&tag, StatusKind::Ok, None, "LIST done"));
            }
            CommandBody::Lsub { reference, mailbox_wildcard } => {
                self.list(&reference, &mailbox_wildcard, true)?;
                self.out.push(tagged(&tag, StatusKind::Ok, None, "LSUB done"));
            }
            CommandBody::Status { mailbox, item_names } => self.status(&tag, &mailbox_name(&mailbox), &item_names)?,
            CommandBody::Append { mailbox, flags, date, message } => {
                let name = mailbox_name(&mailbox);
                let bytes: Cow<'_, [u8]> = match message {
                    LiteralOrLiteral8::Literal(l) => l.into_inner(),
                    LiteralOrLiteral8::Literal8(l) => l.data,
                };
                if store.folder(&name)?.is_none() {
                    self.out.push(tagged(&tag, StatusKind::No, Some(Code::TryCreate), "no such folder"));
                } else if bytes.len() > self.shared.max_message as usize {
                    self.out.push(tagged(&tag, StatusKind::No, Some(Code::TooBig), "the message is too large"));
                } else {
                    let date = date.map(|d| d.as_ref().timestamp());
                    let (validity, uid) = store.append(&name, &bytes, from_wire(&flags), date)?;
                    if selected {
                        self.refresh()?;
                    }
                    let code = Code::AppendUid { uid_validity: nz(validity), uid: nz(uid) };
                    self.out.push(tagged(&tag, StatusKind::Ok, Some(code), "APPEND done"));
                }
            }
            _ if !selected => {
                self.out.push(tagged(&tag, StatusKind::Bad, None, "select a folder first"));
            }
            CommandBody::Close => {
                self.expunge(None)?;
                self.phase = Phase::Authenticated;
                self.out.push(tagged(&tag, StatusKind::Ok, None, "CLOSE done"));
            }
            CommandBody::Unselect => {
                self.phase = Phase::Authenticated;
                self.out.push(tagged(&tag, StatusKind::Ok, None, "UNSELECT done"));
            }
            CommandBody::Expunge => {
                if self.expunge(None)? {
                    self.refresh()?;
                    self.out.push(tagged(&tag, StatusKind::Ok, None, "EXPUNGE done"));
                } else {
                    self.out.push(tagged(&tag, StatusKind::No, None, "the folder is read-only"));
                }
            }
            CommandBody::ExpungeUid { sequence_set } => {
                if self.expunge(Some(&sequence_set))? {
                    self.refresh()?;
                    self.out.push(tagged(&tag, StatusKind::Ok, None, "UID EXPUNGE done"));
                } else {
                    self.out.push(tagged(&tag, StatusKind::No, None, "the folder is read-only"));
                }
            }
            CommandBody::Search { charset, criteria, uid } => {
                let ok = charset.as_ref().is_none_or(|c| {
                    let c = c.as_ref().to_ascii_lowercase();
                    c == "utf-8" || c == "us-ascii"
                });
                if ok {
                    self.search(&tag, &criteria, uid);
                } else {
                    self.out.push(tagged(
                        &tag,
                        StatusKind::No,
                        Some(Code::BadCharset { allowed: Vec::new() }),
                        "use UTF-8",
                    ));
                }
            }
            CommandBody::Fetch { sequence_set, macro_or_item_names, uid, .. } => {
                self.fetch(&tag, &sequence_set, &macro_or_item_names, uid)?;
            }
            CommandBody::Store { sequence_set, kind, response, flags, uid, .. } => {
                let silent = matches!(response, StoreResponse::Silent);
                self.store_flags(&tag, &sequence_set, kind, silent, &flags, uid)?;
            }
            CommandBody::Copy { sequence_set, mailbox, uid } => {
                self.copy_or_move(&tag, &sequence_set, &mailbox, uid, false)?;
            }
            CommandBody::Move { sequence_set, mailbox, uid } => {
                self.copy_or_move(&tag, &sequence_set, &mailbox, uid, true)?;
            }
            _ => {
                self.out.push(tagged(&tag, StatusKind::Bad, None, "not offered"));
            }
        }
        // Changes made by others, before the tagged answer.
        if may_expunge && matches!(self.phase, Phase::Selected(_)) {
            if let Some(Response::Status(Status::Tagged(_))) = self.out.last() {
                if let Some(last) = self.out.pop() {
                    self.refresh()?;
                    self.out.push(last);
                }
            }
        }
        Ok(if self.gone { After::Logout } else { After::Continue })
    }
}

/// At most this many ranges in one sequence set, and octets in a LIST pattern.
const MAX_RANGES: usize = 1000;

/// Whether a command's sets or patterns are past the bounds (each set is
/// tested against every message, each pattern against every folder).
fn too_big(body: &CommandBody<'_>) -> bool {
    fn key(k: &SearchKey<'_>, budget: &mut usize) -> bool {
        *budget = budget.saturating_sub(1);
        *budget == 0
            || match k {
                SearchKey::SequenceSet(s) | SearchKey::Uid(s) => s.0.as_ref().len() > MAX_RANGES,
                SearchKey::And(ks) => ks.as_ref().iter().any(|k| key(k, budget)),
                SearchKey::Or(a, b) => key(a, budget) || key(b, budget),
                SearchKey::Not(a) => key(a, budget),
                _ => false,
            }
    }
    let set = |s: &SequenceSet| s.0.as_ref().len() > MAX_RANGES;
    match body {
        CommandBody::Fetch { sequence_set, .. }
        | CommandBody::Store { sequence_set, .. }
        | CommandBody::Copy { sequence_set, .. }
        | CommandBody::Move { sequence_set, .. }
        | CommandBody::ExpungeUid { sequence_set } => set(sequence_set),
        CommandBody::Search { criteria, .. } => {
            let mut budget = MAX_RANGES;
            criteria.as_ref().iter().any(|k| key(k, &mut budget))
        }
        CommandBody::List { mailbox_wildcard, .. } | CommandBody::Lsub { mailbox_wildcard, .. } => {
            let len = match mailbox_wildcard {
                ListMailbox::Token(t) => t.as_ref().len(),
                ListMailbox::String(s) => s.as_ref().len(),
            };
            len > MAX_RANGES
        }
        _ => false,
    }
}

/// IMAP LIST wildcards: `*` matches anything, `%` anything but `/`
/// (linear time: a table over pattern and name positions).
fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    let n = name.len();
    let mut row = vec![false; n + 1];
    row[0] = true;
    for &pc in pattern {
        let mut next = vec![false; n + 1];
        match pc {
            b'*' | b'%' => {
                let stop_at_slash = pc == b'%';
                let mut reach = false;
                for j in 0..=n {
                    reach = (reach && !(stop_at_slash && name[j - 1] == b'/')) || row[j];
                    next[j] = reach;
                }
            }
            c => {
                for j in 1..=n {
                    next[j] = row[j - 1] && name[j - 1] == c;
                }
            }
        }
        row = next;
    }
    row[n]
}

/// Extracts the tag of a command the codec refused, to answer it tagged.
fn tag_of(discarded: &[u8]) -> Option<Tag<'static>> {
    let end = discarded.iter().position(|&b| b == b' ' || b == b'\r' || b == b'\n')?;
    Tag::try_from(String::from_utf8(discarded[..end].to_vec()).ok()?).ok()
}

/// One session over any stream, for the fuzz target: as over TLS, and
/// already logged in if `logged_in` (so every command is reached without
/// the password). Ends at LOGOUT, STARTTLS, the end of input or a timeout.
///
/// # Errors
/// The stream fails.
pub async fn fuzz_session<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    shared: Arc<Shared>,
    logged_in: bool,
) -> Result<()> {
    let mut s = Session::new(shared, true);
    if logged_in {
        s.phase = Phase::Authenticated;
    }
    drive(io, s, true).await.map(|_| ())
}

/// Serves one connection until it ends.
pub async fn serve(conn: Conn, shared: Arc<Shared>) {
    if let Err(e) = run(conn, shared).await {
        tracing::debug!("IMAP connection ended: {e:#}");
    }
}

async fn run(mut conn: Conn, shared: Arc<Shared>) -> Result<()> {
    let mut greet = true;
    loop {
        let secure = conn.is_tls();
        let session = Session::new(Arc::clone(&shared), secure);
        match drive(&mut conn, session, greet).await? {
            After::StartTls => {
                let tls = shared.access.tls.clone().context("no TLS configured")?;
                conn = conn.start_tls(tls).await?;
                greet = false;
            }
            After::Logout | After::Continue => return Ok(()),
        }
    }
}

/// Octets of responses gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// Writes what was gathered, and gives a large buffer back.
async fn drain<IO: AsyncRead + AsyncWrite + Unpin>(conn: &mut IO, pending: &mut Vec<u8>) -> Result<()> {
    if !pending.is_empty() {
        write(conn, pending).await?;
        pending.clear();
        pending.shrink_to(WRITE_BATCH);
    }
    Ok(())
}

async fn write<IO: AsyncRead + AsyncWrite + Unpin>(conn: &mut IO, bytes: &[u8]) -> Result<()> {
    // TLS holds records back until flushed: flush every response, or the
    // client may wait for what sits in a buffer while this waits for it.
    let all = async {
        conn.write_all(bytes).await?;
        conn.flush().await
    };
    tokio::time::timeout(WRITE_TIME, all).await.context("the client does not read")??;
    Ok(())
}

/// One session over `conn`: until LOGOUT, STARTTLS, a closed connection or a timeout.
async fn drive<IO: AsyncRead + AsyncWrite + Unpin>(conn: &mut IO, mut s: Session, greet: bool) -> Result<After> {
    let options = {
        let mut o = Options::default();
        o.max_literal_size = s.shared.max_message;
        o.max_command_size = s.shared.max_message.saturating_add(MAX_COMMAND);
        o.crlf_relaxed = true;
        o
    };
    let greeting = if s.may_log_in() {
        Greeting::ok(None, "latssiam-bridge local ready")
    } else {
        Greeting::ok(None, "latssiam-bridge local ready; use STARTTLS")
    }
    .context("greeting")?;
    let mut server = Server::new(options, greeting);
    let mut greeted = false;
    // A client that has not logged in within LOGIN_TIME is cut off, however
    // it trickles its bytes.
    let login_by = Instant::now() + LOGIN_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut watch = s.shared.store.watch();
    let mut after = After::Continue;
    // The handle of the last response of a STARTTLS or LOGOUT: the session
    // ends once it is written.
    let mut ending: Option<imap_next::server::ResponseHandle> = None;
    // The last response of a FETCH's chunk, while more is to come.
    let mut fetch_last: Option<imap_next::server::ResponseHandle> = None;
    // Responses are written together: one write (and one TLS record) per
    // batch, not per line, and none held back while the client is awaited.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        match server.next() {
            Ok(Event::GreetingSent { .. }) => greeted = true,
            Ok(Event::ResponseSent { handle, .. }) => {
                if ending == Some(handle) {
                    drain(conn, &mut pending).await?;
                    return Ok(after);
                }
                if fetch_last == Some(handle) {
                    // The FETCH's last chunk is written: the next one. imap-next
                    // sends before it reads, so nothing the client pipelined
                    // runs before the FETCH is done. What is gathered goes out
                    // before the next chunk is read from disk.
                    drain(conn, &mut pending).await?;
                    crate::blocking(|| s.fetch_more());
                    fetch_last = flush(&mut server, &mut s).filter(|_| s.fetching.is_some());
                }
            }
            Ok(Event::CommandReceived { command }) => {
                let tag = command.tag.clone();
                // Store work (fsyncs, reading messages, SEARCH) blocks: on a
                // multi-threaded runtime the other sessions and the mail
                // coming in go on meanwhile.
                let result = if multi_threaded() {
                    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(s.command(command)))
                } else {
                    s.command(command).await
                };
                let a = match result {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("IMAP command failed: {e:#}");
                        s.out.retain(|r| !matches!(r, Response::Status(Status::Tagged(_))));
                        s.out.push(tagged(
                            &tag,
                            StatusKind::No,
                            Some(other_code("SERVERBUG")),
                            "the store failed; try again",
                        ));
                        After::Continue
                    }
                };
                let last = flush(&mut server, &mut s);
                if s.fetching.is_some() {
                    fetch_last = last;
                }
                if !matches!(a, After::Continue) {
                    after = a;
                    ending = last;
                }
            }
            Ok(Event::CommandAuthenticateReceived { command_authenticate }) => {
                let tag = command_authenticate.tag.clone();
                let refuse = |server: &mut Server, msg: &str| {
                    let _ = server.authenticate_finish(Status::Tagged(Tagged {
                        tag: tag.clone(),
                        body: StatusBody { kind: StatusKind::No, code: None, text: text(msg) },
                    }));
                };
                if !matches!(s.phase, Phase::NotAuthenticated) {
                    refuse(&mut server, "already logged in");
                } else if !s.may_log_in() {
                    refuse(&mut server, "use STARTTLS first");
                } else if command_authenticate.mechanism != AuthMechanism::Plain {
                    refuse(&mut server, "only PLAIN is offered");
                } else if let Some(ir) = command_authenticate.initial_response {
                    let ok = plain(&mut s, ir.declassify()).await;
                    finish_auth(&mut server, &mut s, &tag, ok);
                } else {
                    s.authenticating = Some(tag);
                    // An empty challenge ("+ "), as SASL PLAIN has none.
                    let _ = server.authenticate_continue(CommandContinuationRequest::base64(Vec::new()));
                }
            }
            Ok(Event::AuthenticateDataReceived { authenticate_data }) => {
                let Some(tag) = s.authenticating.take() else { continue };
                match authenticate_data {
                    AuthenticateData::Continue(data) => {
                        let ok = plain(&mut s, data.declassify()).await;
                        finish_auth(&mut server, &mut s, &tag, ok);
                    }
                    AuthenticateData::Cancel => {
                        let _ = server.authenticate_finish(Status::Tagged(Tagged {
                            tag,
                            body: StatusBody { kind: StatusKind::Bad, code: None, text: text("cancelled") },
                        }));
                    }
                }
            }
            Ok(Event::IdleCommandReceived { tag }) => {
                let permit = Arc::clone(&s.shared.idle).try_acquire_owned().ok();
                match (matches!(s.phase, Phase::NotAuthenticated), permit) {
                    (false, Some(permit)) => {
                        let _ = s.refresh();
                        flush(&mut server, &mut s);
                        if let Ok(cont) = CommandContinuationRequest::basic(None, "idling") {
                            let _ = server.idle_accept(cont);
                        }
                        s.idle = Some((tag, permit));
                        watch.mark_unchanged();
                    }
                    (authed, _) => {
                        let msg = if authed { "log in first" } else { "too many sessions in IDLE" };
                        let _ = server.idle_reject(Status::Tagged(Tagged {
                            tag,
                            body: StatusBody { kind: StatusKind::No, code: None, text: text(msg) },
                        }));
                    }
                }
            }
            Ok(Event::IdleDoneReceived) => {
                if let Some((tag, _permit)) = s.idle.take() {
                    s.out.push(tagged(&tag, StatusKind::Ok, None, "IDLE done"));
                    flush(&mut server, &mut s);
                }
            }
            Err(Interrupt::Io(Io::Output(bytes))) => {
                if greeted || greet {
                    // A large response (a message's literal) is written as it is, not copied.
                    if bytes.len() >= WRITE_BATCH {
                        drain(conn, &mut pending).await?;
                        write(conn, &bytes).await?;
                    } else {
                        pending.extend_from_slice(&bytes);
                        if pending.len() >= WRITE_BATCH {
                            drain(conn, &mut pending).await?;
                        }
                    }
                }
            }
            Err(Interrupt::Io(Io::NeedMoreInput)) => {
                // Everything answered so far goes out before waiting for the
                // client, and the buffer is given back while it waits.
                drain(conn, &mut pending).await?;
                pending = Vec::new();
                let authed = !matches!(s.phase, Phase::NotAuthenticated);
                let limit = if authed { IDLE_TIME } else { login_by.saturating_duration_since(Instant::now()) };
                let n = if s.idle.is_some() {
                    tokio::select! {
                        r = tokio::time::timeout(limit, conn.read(&mut buf)) => r.context("the client was idle too long")??,
                        changed = watch.changed() => {
                            if changed.is_ok() {
                                let _ = s.refresh();
                                let last = flush(&mut server, &mut s);
                                if s.gone && ending.is_none() {
                                    after = After::Logout;
                                    ending = last;
                                }
                            }
                            continue;
                        }
                    }
                } else {
                    tokio::time::timeout(limit, conn.read(&mut buf)).await.context("the client was idle too long")??
                };
                if n == 0 {
                    return Ok(After::Continue);
                }
                if !authed {
                    s.preauth_read += n;
                    if s.preauth_read > MAX_PREAUTH {
                        let _ = write(conn, b"* BYE too much before logging in\r\n").await;
                        return Ok(After::Continue);
                    }
                }
                server.enqueue_input(&buf[..n]);
            }
            Err(Interrupt::Error(e)) => {
                s.bad += 1;
                let (discarded, msg) = match &e {
                    ServerError::LiteralTooLong { .. } => {
                        // imap-next answered it already.
                        continue;
                    }
                    ServerError::CommandTooLong { discarded_bytes } => (discarded_bytes, "the command is too long"),
                    ServerError::MalformedMessage { discarded_bytes } => {
                        (discarded_bytes, "the command cannot be parsed")
                    }
                    ServerError::ExpectedCrlfGotLf { discarded_bytes } => (discarded_bytes, "lines end in CRLF"),
                };
                let r = match tag_of(discarded.declassify()) {
                    Some(tag) => tagged(&tag, StatusKind::Bad, None, msg),
                    None => untagged(StatusKind::Bad, None, msg),
                };
                s.out.push(r);
                flush(&mut server, &mut s);
                if s.bad > MAX_BAD || s.failures >= MAX_FAILURES {
                    drain(conn, &mut pending).await?;
                    return Ok(After::Continue);
                }
            }
        }
        if s.failures >= MAX_FAILURES && s.authenticating.is_none() && ending.is_none() {
            s.out.push(Response::Status(Status::Bye(Bye { code: None, text: text("too many failed logins") })));
            ending = flush(&mut server, &mut s);
            after = After::Logout;
        }
    }
}

fn multi_threaded() -> bool {
    tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
}

/// Queues `s.out` on the server; returns the handle of the last response.
fn flush(server: &mut Server, s: &mut Session) -> Option<imap_next::server::ResponseHandle> {
    let mut last = None;
    for r in s.out.drain(..) {
        last = Some(match r {
            Response::Data(d) => server.enqueue_data(d),
            Response::Status(st) => server.enqueue_status(st),
        });
    }
    last
}

async fn plain(s: &mut Session, data: &[u8]) -> bool {
    // authzid NUL authcid NUL password, or the same base64-encoded where a
    // client sent it encoded twice.
    let decoded;
    let data = if data.iter().filter(|&&b| b == 0).count() == 2 {
        data
    } else {
        decoded = base64::engine::general_purpose::STANDARD.decode(data).unwrap_or_default();
        &decoded
    };
    let mut it = data.split(|&b| b == 0);
    let (Some(authz), Some(user), Some(pass), None) = (it.next(), it.next(), it.next(), it.next()) else {
        s.failures += 1;
        return false;
    };
    if !authz.is_empty() && authz != user {
        s.failures += 1;
        return false;
    }
    s.check_login(user, pass).await
}

fn finish_auth(server: &mut Server, s: &mut Session, tag: &Tag<'static>, ok: bool) {
    let body = if ok {
        StatusBody { kind: StatusKind::Ok, code: Some(Code::Capability(s.capabilities())), text: text("logged in") }
    } else {
        StatusBody {
            kind: StatusKind::No,
            code: Some(other_code("AUTHENTICATIONFAILED")),
            text: text("wrong user name or password"),
        }
    };
    let _ = server.authenticate_finish(Status::Tagged(Tagged { tag: tag.clone(), body }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_wildcards_are_linear_and_right() {
        assert!(wildcard(b"*", b"a/b/c"));
        assert!(wildcard(b"%", b"abc") && !wildcard(b"%", b"a/b"));
        assert!(wildcard(b"a/%", b"a/b") && !wildcard(b"a/%", b"a/b/c"));
        assert!(wildcard(b"INBOX", b"INBOX") && !wildcard(b"INBOX", b"INBOXX"));
        let hostile = vec![b'*'; 5000];
        assert!(wildcard(&hostile, &[b'a'; 200]));
        let mut hostile = b"*a".repeat(2000);
        hostile.push(b'b');
        assert!(!wildcard(&hostile, &[b'a'; 200]));
    }

    #[test]
    fn sets_with_stars_and_reversed_ranges() -> Result<()> {
        let set = SequenceSet::try_from("3:1,7,9:*")?;
        assert!(in_set(&set, 2, 20) && in_set(&set, 7, 20) && in_set(&set, 15, 20) && !in_set(&set, 8, 20));
        let all = SequenceSet::try_from("1:4294967295")?;
        assert!(in_set(&all, 4_000_000_000, 1), "a huge range is a test, not a loop");
        assert_eq!(uid_set(&[1, 2, 3, 7]).map(|s| s.0.as_ref().len()), Some(2));
        Ok(())
    }

    #[test]
    fn text_search_finds_words_in_any_case_and_behind_transfer_encodings() {
        let plain = b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nThe Budget is here.\r\n";
        assert!(body_contains(plain, b"budget") && !body_contains(plain, b"forecast"));
        assert!(header_contains(plain, "grüße".as_bytes()) && !body_contains(plain, b"subject"));
        let qp = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nBud=\r\nget\r\n";
        assert!(body_contains(qp, b"budget"), "a soft line break is decoded");
        let b64 = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nYnVkZ2V0\r\n";
        assert!(body_contains(b64, b"BUDGET"));
        assert!(find_ci(b"abc", b"") && !find_ci(b"ab", b"abc") && find_ci(b"xAbC", b"abc"));
    }

    #[test]
    fn the_tag_of_a_refused_command_is_found() {
        assert_eq!(tag_of(b"a1 FETCH (\r\n").map(|t| t.inner().to_owned()), Some("a1".into()));
        assert!(tag_of(b"\r\n").is_none());
    }
}
