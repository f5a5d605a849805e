//! The structure of a stored message, read from its octets (never
//! re-encoded): where each MIME part's header and body lie, its type and
//! parameters, and the envelope fields, for IMAP's ENVELOPE, BODYSTRUCTURE
//! and `BODY[section]`. Header values are parsed by `mail-parser`; the
//! offsets are found here, so every section is an exact slice of the file.

use std::ops::Range;

use mail_parser::{Address, HeaderName, MessageParser, MimeHeaders};

/// Parts nest at most this deep; deeper ones are leaves.
pub const MAX_DEPTH: usize = 16;
/// At most this many parts in one message; the rest are not split out.
pub const MAX_PARTS: usize = 1000;

/// One address of an envelope field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addr {
    pub name: Option<String>,
    pub mailbox: Option<String>,
    pub host: Option<String>,
}

/// The envelope of a message (RFC 3501 7.4.2), raw values where IMAP wants them raw.
#[derive(Clone, Debug, Default)]
pub struct Envelope {
    pub date: Option<Vec<u8>>,
    pub subject: Option<Vec<u8>>,
    pub from: Vec<Addr>,
    pub sender: Vec<Addr>,
    pub reply_to: Vec<Addr>,
    pub to: Vec<Addr>,
    pub cc: Vec<Addr>,
    pub bcc: Vec<Addr>,
    pub in_reply_to: Option<Vec<u8>>,
    pub message_id: Option<Vec<u8>>,
}

/// One MIME part.
#[derive(Clone, Debug, Default)]
pub struct Part {
    /// The header block, with the empty line that ends it.
    pub header: Range<usize>,
    pub body: Range<usize>,
    /// Lower-case type and subtype.
    pub ctype: String,
    pub subtype: String,
    pub params: Vec<(String, String)>,
    pub id: Option<String>,
    pub description: Option<String>,
    pub encoding: String,
    pub disposition: Option<(String, Vec<(String, String)>)>,
    pub language: Vec<String>,
    pub location: Option<String>,
    /// Lines of the body (text/* and message/rfc822).
    pub lines: u32,
    /// The parts of a multipart.
    pub children: Vec<Part>,
    /// The message inside a message/rfc822 part.
    pub message: Option<Box<Part>>,
    /// Its envelope, for a message/rfc822 part's message (and the top).
    pub envelope: Option<Box<Envelope>>,
}

impl Part {
    pub fn is_multipart(&self) -> bool {
        self.ctype == "multipart"
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where a header block ends (after its empty line) and the body starts.
fn header_end(raw: &[u8], range: &Range<usize>) -> usize {
    let slice = &raw[range.clone()];
    if slice.starts_with(b"\r\n") {
        return range.start + 2;
    }
    if slice.starts_with(b"\n") {
        return range.start + 1;
    }
    let crlf = find(slice, b"\r\n\r\n").map(|i| i + 4);
    let lf = find(slice, b"\n\n").map(|i| i + 2);
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(slice.len()),
    };
    range.start + end
}

/// The length of a message's header block (with the empty line that ends it).
pub fn header_len(raw: &[u8]) -> usize {
    header_end(raw, &(0..raw.len()))
}

/// Parses a whole message.
pub fn parse(raw: &[u8]) -> Part {
    let mut budget = MAX_PARTS;
    parse_part(raw, 0..raw.len(), 0, false, true, &mut budget)
}

fn addrs(a: Option<&Address<'_>>) -> Vec<Addr> {
    let one = |x: &mail_parser::Addr<'_>| {
        let (mailbox, host) = match x.address.as_deref() {
            Some(s) => match s.rsplit_once('@') {
                Some((m, h)) => (Some(m.to_owned()), Some(h.to_owned())),
                None => (Some(s.to_owned()), None),
            },
            None => (None, None),
        };
        Addr { name: x.name.as_deref().map(str::to_owned), mailbox, host }
    };
    match a {
        None => Vec::new(),
        Some(Address::List(l)) => l.iter().map(one).collect(),
        Some(Address::Group(groups)) => groups
            .iter()
            .flat_map(|g| {
                // RFC 3501: a group is its name as a mailbox with no host, its
                // members, then an address with neither. (mail-parser puts the
                // addresses outside any group in a group without a name.)
                let named = g.name.is_some();
                let start = Addr { name: None, mailbox: g.name.as_deref().map(str::to_owned), host: None };
                std::iter::once(start)
                    .filter(move |_| named)
                    .chain(g.addresses.iter().map(one))
                    .chain(std::iter::once(Addr::default()).filter(move |_| named))
            })
            .collect(),
    }
}

/// The raw (unfolded, trimmed) value of the first header field `name`.
pub fn raw_field(header: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut lines = header.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        if !line[..colon].trim_ascii().eq_ignore_ascii_case(name.as_bytes())
            || line.first().is_some_and(u8::is_ascii_whitespace)
        {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        while let Some(next) = lines.peek() {
            if next.first().is_some_and(|&b| b == b' ' || b == b'\t') {
                value.extend_from_slice(next);
                lines.next();
            } else {
                break;
            }
        }
        value.retain(|&b| b != b'\r' && b != b'\n');
        return Some(value.trim_ascii().to_vec());
    }
    None
}

fn envelope(header: &[u8], msg: &mail_parser::Message<'_>) -> Envelope {
    let from = addrs(msg.from());
    let or_from = |v: Vec<Addr>| if v.is_empty() { from.clone() } else { v };
    Envelope {
        date: raw_field(header, "date"),
        subject: raw_field(header, "subject"),
        sender: or_from(addrs(msg.sender())),
        reply_to: or_from(addrs(msg.reply_to())),
        to: addrs(msg.to()),
        cc: addrs(msg.cc()),
        bcc: addrs(msg.bcc()),
        in_reply_to: raw_field(header, "in-reply-to"),
        message_id: raw_field(header, "message-id"),
        from,
    }
}

fn pairs(attrs: Option<&[mail_parser::Attribute<'_>]>) -> Vec<(String, String)> {
    attrs.unwrap_or_default().iter().map(|a| (a.name.to_ascii_lowercase(), a.value.to_string())).collect()
}

fn parse_part(
    raw: &[u8],
    range: Range<usize>,
    depth: usize,
    in_digest: bool,
    is_message: bool,
    budget: &mut usize,
) -> Part {
    *budget = budget.saturating_sub(1);
    let body_start = header_end(raw, &range);
    let header = range.start..body_start;
    let body = body_start..range.end;
    let mut part = Part { header: header.clone(), body: body.clone(), ..Part::default() };
    let parsed = MessageParser::new().parse_headers(&raw[header.clone()]);
    let root = parsed.as_ref().map(mail_parser::Message::root_part);
    let ct = root.and_then(MimeHeaders::content_type);
    match ct {
        Some(ct) if ct.c_subtype.is_some() => {
            part.ctype = ct.c_type.to_ascii_lowercase();
            part.subtype = ct.c_subtype.as_deref().unwrap_or_default().to_ascii_lowercase();
            part.params = pairs(ct.attributes.as_deref());
        }
        // Without a type: text/plain, or message/rfc822 in a digest (RFC 2046 5.1.5).
        _ if in_digest => (part.ctype, part.subtype) = ("message".into(), "rfc822".into()),
        _ => {
            (part.ctype, part.subtype) = ("text".into(), "plain".into());
            part.params = vec![("charset".into(), "us-ascii".into())];
        }
    }
    if let Some(root) = root {
        part.id = root.content_id().map(|s| format!("<{s}>"));
        part.description = root.content_description().map(str::to_owned);
        part.encoding = root.content_transfer_encoding().unwrap_or("7bit").to_ascii_lowercase();
        part.disposition =
            root.content_disposition().map(|d| (d.c_type.to_ascii_lowercase(), pairs(d.attributes.as_deref())));
        part.language = match root.content_language() {
            mail_parser::HeaderValue::Text(t) => vec![t.to_string()],
            mail_parser::HeaderValue::TextList(l) => l.iter().map(ToString::to_string).collect(),
            _ => Vec::new(),
        };
        part.location = root.content_location().map(str::to_owned);
    } else {
        part.encoding = "7bit".into();
    }
    if is_message {
        if let Some(m) = &parsed {
            part.envelope = Some(Box::new(envelope(&raw[header.clone()], m)));
        }
    }
    let body_bytes = &raw[body.clone()];
    part.lines = u32::try_from(body_bytes.iter().filter(|&&b| b == b'\n').count()).unwrap_or(u32::MAX);
    if depth >= MAX_DEPTH || *budget == 0 {
        return part;
    }
    if part.is_multipart() {
        let boundary = part.params.iter().find(|(k, _)| k == "boundary").map(|(_, v)| v.clone());
        if let Some(boundary) = boundary.filter(|b| !b.is_empty()) {
            let digest = part.subtype == "digest";
            for r in split(raw, &body, boundary.as_bytes(), *budget) {
                if *budget == 0 {
                    break;
                }
                part.children.push(parse_part(raw, r, depth + 1, digest, false, budget));
            }
        }
    } else if part.ctype == "message" && (part.subtype == "rfc822" || part.subtype == "global") {
        let inner = parse_part(raw, body, depth + 1, false, true, budget);
        part.message = Some(Box::new(inner));
    }
    part
}

/// The ranges of a multipart body's parts: between delimiter lines
/// `--boundary`, each without the line break before the next delimiter.
fn split(raw: &[u8], body: &Range<usize>, boundary: &[u8], most: usize) -> Vec<Range<usize>> {
    let mut delim = b"--".to_vec();
    delim.extend_from_slice(boundary);
    let mut parts = Vec::new();
    let mut pos = body.start;
    let mut open: Option<usize> = None;
    while pos < body.end {
        let line_end = raw[pos..body.end].iter().position(|&b| b == b'\n').map_or(body.end, |i| pos + i + 1);
        let line = &raw[pos..line_end];
        if line.starts_with(&delim) {
            let rest = &line[delim.len()..];
            let closing = rest.starts_with(b"--");
            let tail = if closing { &rest[2..] } else { rest };
            if tail.iter().all(u8::is_ascii_whitespace) {
                if let Some(start) = open.take() {
                    // The CRLF before the delimiter belongs to the delimiter.
                    let mut end = pos;
                    if end > start && raw[end - 1] == b'\n' {
                        end -= 1;
                        if end > start && raw[end - 1] == b'\r' {
                            end -= 1;
                        }
                    }
                    parts.push(start..end.max(start));
                    if parts.len() >= most {
                        return parts;
                    }
                }
                if closing {
                    return parts;
                }
                open = Some(line_end);
            }
        }
        pos = line_end;
    }
    if let Some(start) = open {
        parts.push(start..body.end);
    }
    parts
}

/// The part a section path names (`1.2.3`), as IMAP numbers them: the
/// parts of a multipart, and inside a message/rfc822 part its message's
/// parts (or, for a message that is not multipart, its body as part 1).
pub fn locate<'a>(root: &'a Part, path: &[u32]) -> Option<&'a Part> {
    let mut cur = root;
    for &n in path {
        let n = usize::try_from(n).ok()?.checked_sub(1)?;
        // Step into an embedded message first.
        let container = match &cur.message {
            Some(m) => m.as_ref(),
            None => cur,
        };
        cur = if container.is_multipart() {
            container.children.get(n)?
        } else if n == 0 {
            container
        } else {
            return None;
        };
    }
    Some(cur)
}

/// The header fields of `header` whose names are (or, with `not`, are not)
/// in `names`, each with its folded lines, then the empty line.
pub fn header_fields(header: &[u8], names: &[Vec<u8>], not: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut keep = false;
    for line in header.split_inclusive(|&b| b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if !line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            let name = line.iter().position(|&b| b == b':').map_or(&line[..0], |c| line[..c].trim_ascii());
            keep = names.iter().any(|n| n.eq_ignore_ascii_case(name)) != not;
        }
        if keep {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The text of every part, for SEARCH TEXT and BODY: text parts decoded
/// from their transfer encoding (lossy UTF-8), others as they are stored.
pub fn searchable_text(raw: &[u8]) -> String {
    let Some(msg) = MessageParser::new().parse(raw) else {
        return String::from_utf8_lossy(raw).into_owned();
    };
    let mut s = String::new();
    for i in 0..msg.text_body_count() {
        if let Some(t) = msg.body_text(i) {
            s.push_str(&t);
            s.push('\n');
        }
    }
    for i in 0..msg.html_body_count() {
        if let Some(t) = msg.body_html(i) {
            s.push_str(&t);
            s.push('\n');
        }
    }
    s
}

/// A header's decoded value for SEARCH (`HeaderName::Other` for any name).
pub fn decoded_header(raw_header: &[u8], name: &str) -> Option<String> {
    let msg = MessageParser::new().parse_headers(raw_header)?;
    let h = msg.header(HeaderName::parse(name)?)?;
    Some(match h {
        mail_parser::HeaderValue::Text(t) => t.to_string(),
        mail_parser::HeaderValue::TextList(l) => l.join(" "),
        mail_parser::HeaderValue::Address(a) => {
            let mut s = String::new();
            for x in a.iter() {
                if let Some(n) = &x.name {
                    s.push_str(n);
                    s.push(' ');
                }
                if let Some(e) = &x.address {
                    s.push_str(e);
                    s.push(' ');
                }
            }
            s
        }
        _ => String::from_utf8_lossy(&raw_field(raw_header, name).unwrap_or_default()).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXED: &[u8] = b"From: Alice <alice@example.org>\r\nTo: bob@example.net, Group: c@d.e;\r\n\
Subject: =?utf-8?q?caf=C3=A9?=\r\nMessage-ID: <m1@example.org>\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\nworld\r\n--b1\r\n\
Content-Type: message/rfc822\r\n\r\nSubject: inner\r\nFrom: c@d.e\r\n\r\ninner body\r\n--b1--\r\nepilogue\r\n";

    #[test]
    fn parts_are_exact_slices_and_envelopes_raw() {
        let root = parse(MIXED);
        assert_eq!(root.children.len(), 2);
        let text = locate(&root, &[1]).map(|p| &MIXED[p.body.clone()]);
        assert_eq!(text, Some(&b"hello\r\nworld"[..]));
        let inner = locate(&root, &[2]).and_then(|p| p.message.as_deref());
        assert_eq!(inner.map(|m| &MIXED[m.body.clone()]), Some(&b"inner body"[..]));
        assert_eq!(locate(&root, &[2, 1]).map(|p| &MIXED[p.body.clone()]), Some(&b"inner body"[..]));
        assert!(locate(&root, &[3]).is_none() && locate(&root, &[0]).is_none());
        let env = root.envelope.as_deref().cloned().unwrap_or_default();
        assert_eq!(env.subject.as_deref(), Some(&b"=?utf-8?q?caf=C3=A9?="[..]));
        assert_eq!(env.from[0].host.as_deref(), Some("example.org"));
        assert_eq!(env.sender, env.from);
        assert_eq!(env.to.len(), 4, "one address, a group start, its member, its end: {:?}", env.to);
        assert_eq!(
            header_fields(&MIXED[root.header.clone()], &[b"subject".to_vec()], false),
            b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n"
        );
    }

    #[test]
    fn hostile_structures_stay_bounded() {
        let mut deep = Vec::new();
        for i in 0..100 {
            deep.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n").as_bytes(),
            );
        }
        let root = parse(&deep);
        let mut d = 0;
        let mut p = &root;
        while let Some(c) = p.children.first() {
            p = c;
            d += 1;
        }
        assert!(d <= MAX_DEPTH);
        let mut wide = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n".to_vec();
        for _ in 0..5000 {
            wide.extend_from_slice(b"--x\r\n\r\na\r\n");
        }
        assert!(parse(&wide).children.len() < MAX_PARTS);
        let _ = parse(b"");
        let _ = parse(b"\r\n");
        let _ = parse(b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\n");
    }
}
