//! Internet Message work: `Received:` headers, loop detection, recipients,
//! `Bcc` removal, attachment stripping, RFC 3464 bounces and notices.

use mail_parser::{Message, MessageParser, MimeHeaders};
use time::format_description::well_known::Rfc2822;
use time::OffsetDateTime;

/// The largest Internet Message the gateway accepts for LATSSIAM: what still
/// fits in 19,200 octets of CMS DER once sealed to any recipient. Sealing adds
/// about 330 octets for a P-256 recipient and 560 for RSA-4096 (measured in
/// `sink::tests::sealing_overhead_fits`), plus our `Received:` header; 1,200 octets
/// are kept for both.
pub const MAX_PLAINTEXT: usize = latssiam::wire::MAX_BLOCK_DER - 1200;

/// More `Received:` headers than this is a mail loop (RFC 5321 6.3).
pub const MAX_RECEIVED: usize = 30;

/// The current date, as in a `Date:` header.
pub fn date_now() -> String {
    OffsetDateTime::now_utc().format(&Rfc2822).unwrap_or_else(|_| "Thu, 01 Jan 1970 00:00:00 +0000".into())
}

/// The most of a message's header section a bounce or notice quotes: room
/// for a real header (`Received` chains, DKIM and ARC signatures, then the
/// `From`, `Subject` and `Message-ID` a sender looks for), not for an
/// attacker's payload sent back to a forged sender.
pub const MAX_QUOTED_HEADER: usize = 8 * 1024;

/// The header section as a report quotes it: its header fields up to the
/// first line that is not one (a message without a blank line is not all
/// header), at most [`MAX_QUOTED_HEADER`] octets, cut at a line end.
fn quoted_header(data: &[u8]) -> std::borrow::Cow<'_, str> {
    let mut end = 0;
    for line in header_section(data).split_inclusive(|&b| b == b'\n') {
        let field = line.first().is_some_and(|b| *b == b' ' || *b == b'\t')
            || line
                .iter()
                .position(|&b| b == b':')
                .is_some_and(|colon| colon > 0 && line[..colon].iter().all(|b| b.is_ascii_graphic()));
        if !field || end + line.len() > MAX_QUOTED_HEADER {
            break;
        }
        end += line.len();
    }
    String::from_utf8_lossy(&data[..end])
}

/// The header section (up to the first empty line), without it.
pub fn header_section(data: &[u8]) -> &[u8] {
    let mut pos = 0;
    for line in data.split_inclusive(|&b| b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            return &data[..pos];
        }
        pos += line.len();
    }
    data
}

/// How many `Received:` headers the message has.
pub fn count_received(data: &[u8]) -> usize {
    header_section(data)
        .split(|&b| b == b'\n')
        .filter(|l| l.len() >= 9 && l[..9].eq_ignore_ascii_case(b"received:"))
        .count()
}

/// A `Received:` header line (with CRLF), folded.
pub fn received(from: &str, by: &str, with: &str, id: &str, for_rcpt: Option<&str>) -> String {
    let from = clean(from);
    let rcpt = for_rcpt.map(|r| format!("\r\n\tfor <{}>", clean(r))).unwrap_or_default();
    format!("Received: from {from}\r\n\tby {by} with {with} id {id}{rcpt};\r\n\t{}\r\n", date_now())
}

fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// Prepends a header line to a message.
pub fn prepend(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len() + data.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// The addresses in `To`, `Cc` and `Bcc`, lower-cased and deduplicated, in order.
pub fn recipients(message: &Message<'_>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for list in [message.to(), message.cc(), message.bcc()].into_iter().flatten() {
        for addr in list.iter() {
            if let Some(a) = addr.address() {
                let a = a.trim().to_lowercase();
                if !a.is_empty() && !out.contains(&a) {
                    out.push(a);
                }
            }
        }
    }
    out
}

pub use latssiam::fragment::header_values;

/// The message without the header fields for which `drop(name, value)` is
/// true (continuation lines included; `value` unfolded).
pub fn without_fields_where(data: &[u8], drop: impl Fn(&str, &[u8]) -> bool) -> Vec<u8> {
    let header = header_section(data);
    let mut out = Vec::with_capacity(data.len());
    let lines: Vec<&[u8]> = header.split_inclusive(|&b| b == b'\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let mut end = i + 1;
        while end < lines.len() && lines[end].first().is_some_and(|&b| b == b' ' || b == b'\t') {
            end += 1;
        }
        let field: Vec<u8> = lines[i..end].concat();
        let dropped = field.iter().position(|&b| b == b':').is_some_and(|colon| {
            let name = String::from_utf8_lossy(&field[..colon]);
            let value: Vec<u8> = field[colon + 1..].iter().copied().filter(|&b| b != b'\r' && b != b'\n').collect();
            drop(name.trim_end_matches([' ', '\t']), &value)
        });
        if !dropped {
            out.extend_from_slice(&field);
        }
        i = end;
    }
    out.extend_from_slice(&data[header.len()..]);
    out
}

/// Replaces the message's header section (without its blank line) by what
/// `f` makes of it, in place: the body is not copied.
pub fn rewrite_header(data: &mut Vec<u8>, f: impl FnOnce(&[u8]) -> Vec<u8>) {
    let len = header_section(data).len();
    let new = f(&data[..len]);
    if new != data[..len] {
        data.splice(0..len, new);
    }
}

/// The message without its `Bcc:` header fields (continuation lines included).
pub fn remove_bcc(data: &[u8]) -> Vec<u8> {
    without_fields(data, &["bcc"])
}

/// The message without the header fields with these (lower-case) names,
/// continuation lines included.
pub fn without_fields(data: &[u8], names: &[&str]) -> Vec<u8> {
    let header_len = header_section(data).len();
    let mut out = header_fields_without(data, |line| {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        let name = String::from_utf8_lossy(name);
        line.contains(&b':') && names.iter().any(|n| name.trim_end_matches([' ', '\t']).eq_ignore_ascii_case(n))
    });
    out.extend_from_slice(&data[header_len..]);
    out
}

/// The header section's lines, without the fields whose first line `drop`
/// picks (their continuation lines go with them).
fn header_fields_without(data: &[u8], drop: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut skipping = false;
    for line in header_section(data).split_inclusive(|&b| b == b'\n') {
        let continuation = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if !continuation {
            skipping = drop(line);
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out
}

/// The message with its attachments replaced by a text part naming them:
/// the original header fields except the MIME ones, then a `text/plain`
/// body made of the text parts and the list. `None` if it does not parse
/// or has no attachments.
pub fn strip_attachments(data: &[u8]) -> Option<Vec<u8>> {
    let message = MessageParser::default().parse(data)?;
    let removed: Vec<String> = message
        .attachments()
        .map(|a| format!("  {} ({} octets)", a.attachment_name().unwrap_or("unnamed"), a.len()))
        .collect();
    if removed.is_empty() {
        return None;
    }
    let mut text = String::new();
    for i in 0..message.text_body.len() {
        if let Some(t) = message.body_text(i) {
            text.push_str(&t);
            text.push('\n');
        }
    }
    text.push_str("\n[latssiam-bridge removed these attachments: the message was too large for LATSSIAM]\n");
    text.push_str(&removed.join("\n"));
    text.push('\n');
    let mut out = header_fields_without(data, |line| {
        let lower = line.to_ascii_lowercase();
        lower.starts_with(b"content-") || lower.starts_with(b"mime-version:")
    });
    out.extend_from_slice(b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n");
    out.extend_from_slice(b"Content-Transfer-Encoding: 8bit\r\n\r\n");
    for line in text.lines() {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    Some(out)
}

/// The longest line RFC 5322 allows, CRLF not counted.
pub const MAX_LINE_OUT: usize = 998;

fn has_long_line(data: &[u8]) -> bool {
    data.split(|&b| b == b'\n').any(|l| l.strip_suffix(b"\r").unwrap_or(l).len() > MAX_LINE_OUT)
}

/// The message with every body part that has a line over [`MAX_LINE_OUT`]
/// octets re-encoded as base64 (its other header fields, and every other
/// part, octet for octet); `None` when no body line is that long, or the
/// message does not parse. A header line that long is left as it is.
pub fn reencode_long_lines(data: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    if !has_long_line(data) {
        return None;
    }
    let message = MessageParser::default().parse(data)?;
    let mut out = Vec::with_capacity(data.len() + data.len() / 3);
    let mut copied = 0;
    for part in &message.parts {
        if matches!(part.body, mail_parser::PartType::Multipart(_) | mail_parser::PartType::Message(_)) {
            continue;
        }
        let (head, body, end) = (part.offset_header as usize, part.offset_body as usize, part.offset_end as usize);
        let Some(content) = data.get(body..end).filter(|c| has_long_line(c)) else { continue };
        if head < copied || body < head {
            continue;
        }
        let encoding = part.content_transfer_encoding().map(str::to_ascii_lowercase);
        // The octets the part stands for: as they are for 7bit, 8bit and
        // binary; a base64 part with overlong lines is decoded to be wrapped
        // again. Quoted-printable (whose lines cannot be that long when it is
        // valid) is left as it is.
        let decoded;
        let content = match encoding.as_deref() {
            None | Some("7bit" | "8bit" | "binary") => content,
            Some("base64") => {
                let clean: Vec<u8> = content.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
                match base64::engine::general_purpose::STANDARD.decode(&clean) {
                    Ok(d) => {
                        decoded = d;
                        &decoded
                    }
                    Err(_) => continue,
                }
            }
            Some(_) => continue,
        };
        out.extend_from_slice(&data[copied..head]);
        let header = without_fields_where(&data[head..body], |name, _| {
            name.trim().eq_ignore_ascii_case("content-transfer-encoding")
        });
        let header = header.strip_suffix(b"\r\n\r\n").map(|h| [h, b"\r\n"].concat()).unwrap_or(header);
        out.extend_from_slice(&header);
        // A message that was not MIME becomes MIME for its new encoding.
        if head == 0 && header_values(&header, "mime-version").is_empty() {
            out.extend_from_slice(b"MIME-Version: 1.0\r\n");
        }
        out.extend_from_slice(b"Content-Transfer-Encoding: base64\r\n\r\n");
        // The CRLF before a boundary belongs to the boundary.
        let before_boundary = data[end..].starts_with(b"--");
        let raw = !matches!(encoding.as_deref(), Some("base64"));
        let (content, tail) = match content.strip_suffix(b"\r\n") {
            Some(c) if before_boundary && raw => (c, &b"\r\n"[..]),
            _ if before_boundary => (content, &b"\r\n"[..]),
            _ => (content, &b""[..]),
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(content);
        for (i, line) in encoded.as_bytes().chunks(76).enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(line);
        }
        out.extend_from_slice(tail);
        copied = end;
    }
    out.extend_from_slice(&data[copied..]);
    Some(out)
}

/// One failed recipient in a bounce.
pub struct Failure<'a> {
    /// The address that failed.
    pub recipient: &'a str,
    /// The enhanced status code, e.g. `5.1.1`.
    pub status: &'a str,
    /// What the far end said (a LATSSIAM status line or an SMTP reply).
    pub diagnostic: &'a str,
}

/// An RFC 3464 delivery status notification to `to` about `original`.
pub fn dsn(hostname: &str, to: &str, arrived: &str, failure: &Failure<'_>, original: &[u8]) -> Vec<u8> {
    let boundary =
        format!("=_latssiam-bridge-{}", latssiam::Fingerprint::of(original).to_string().get(..16).unwrap_or("0"));
    let headers = quoted_header(original);
    let diagnostic_type = if failure.diagnostic.starts_with(|c: char| c.is_ascii_digit())
        && failure.diagnostic.len() > 3
        && failure.diagnostic.as_bytes().get(2) == Some(&b' ')
    {
        "x-latssiam"
    } else {
        "smtp"
    };
    let mut m = String::new();
    m.push_str(&format!("From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"));
    m.push_str(&format!("To: <{to}>\r\n"));
    m.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    m.push_str(&format!("Date: {}\r\n", date_now()));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a MIME-encapsulated message.\r\n\r\n");
    m.push_str(&format!("--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"));
    m.push_str(&format!(
        "This is the mail system at host {hostname}.\r\n\r\nYour message could not be delivered to\r\n<{}>:\r\n\r\n    {}\r\n\r\n",
        failure.recipient, failure.diagnostic
    ));
    m.push_str(&format!("--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"));
    m.push_str(&format!("Reporting-MTA: dns; {hostname}\r\nArrival-Date: {arrived}\r\n\r\n"));
    m.push_str(&format!(
        "Final-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\nDiagnostic-Code: {diagnostic_type}; {}\r\n\r\n",
        failure.recipient, failure.status, failure.diagnostic
    ));
    m.push_str(&format!("--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"));
    m.push_str(&headers);
    if !headers.ends_with('\n') {
        m.push_str("\r\n");
    }
    m.push_str(&format!("\r\n--{boundary}--\r\n"));
    m.into_bytes()
}

/// The header field that carries a LATSSIAM person's URL on mail the
/// gateway relays for them: `LATSSIAM-URL: latssiam:<fp>//host/path`. One the
/// sender wrote is replaced by the gateway's.
pub const LATSSIAM_URL_FIELD: &str = "LATSSIAM-URL";

/// A plain notice from the gateway to a LATSSIAM person (a failed relay).
pub fn notice(hostname: &str, to: &str, subject: &str, text: &str, original: &[u8]) -> Vec<u8> {
    let headers = quoted_header(original);
    let mut m = String::new();
    m.push_str(&format!("From: latssiam-bridge <postmaster@{hostname}>\r\nTo: <{to}>\r\n"));
    m.push_str(&format!("Subject: {subject}\r\nDate: {}\r\nAuto-Submitted: auto-replied\r\n", date_now()));
    m.push_str(
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    );
    m.push_str(text);
    m.push_str("\r\n\r\nThe message's header fields:\r\n\r\n");
    m.push_str(&headers);
    m.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(data: &[u8]) -> Message<'_> {
        MessageParser::default().parse(data).unwrap()
    }

    const MSG: &[u8] = b"Received: a\r\nReceived: b\r\nTo: A <a@x.example>, b@y.example\r\nCc: c@z.example\r\nBcc: hidden@q.example,\r\n other@q.example\r\nSubject: hi\r\n\r\nReceived: not a header\r\n";

    #[test]
    fn headers_are_counted_and_bcc_removed() {
        assert_eq!(count_received(MSG), 2);
        assert_eq!(
            recipients(&parse(MSG)),
            ["a@x.example", "b@y.example", "c@z.example", "hidden@q.example", "other@q.example"]
        );
        let stripped = remove_bcc(MSG);
        let s = String::from_utf8(stripped).unwrap();
        assert!(!s.contains("hidden") && !s.contains("other@"), "{s}");
        assert!(s.contains("Subject: hi\r\n\r\nReceived: not a header"));
    }

    #[test]
    fn attachments_are_listed_in_their_place() {
        let m = b"From: a@x.example\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=big.bin\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAAAAAA\r\n--b--\r\n";
        let out = String::from_utf8(strip_attachments(m).unwrap()).unwrap();
        assert!(out.contains("Subject: s\r\n"));
        assert!(out.contains("hello"));
        assert!(out.contains("big.bin (6 octets)"), "{out}");
        assert!(!out.contains("AAAA"));
        assert!(strip_attachments(b"Subject: x\r\n\r\nplain\r\n").is_none());
    }

    #[test]
    fn long_lines_are_reencoded_not_cut() {
        use base64::Engine as _;
        let long = "ü".repeat(3000);
        let m = format!("From: a@x.example\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nshort\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{long}\r\nnext\r\n--b--\r\n");
        let out = reencode_long_lines(m.as_bytes()).unwrap();
        assert!(!has_long_line(&out));
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("From: a@x.example\r\nSubject: s\r\n"), "{text}");
        assert!(text.contains("--b\r\nContent-Type: text/plain\r\n\r\nshort\r\n--b\r\n"), "{text}");
        assert!(!text.contains("8bit"), "{text}");
        let parsed = parse(&out);
        assert_eq!(parsed.body_text(1).unwrap(), format!("{long}\r\nnext"));
        assert_eq!(parsed.body_text(0).unwrap(), "short");
        // A single-part message, and one that needs nothing.
        let single = format!("Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{long}\r\n");
        let out = reencode_long_lines(single.as_bytes()).unwrap();
        assert_eq!(parse(&out).body_text(0).unwrap(), format!("{long}\r\n"));
        assert!(reencode_long_lines(MSG).is_none());
        // A base64 part in one overlong line is wrapped again, not encoded twice.
        let b64 = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 3000]);
        let m = format!("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b--\r\n");
        let out = reencode_long_lines(m.as_bytes()).unwrap();
        assert!(!has_long_line(&out));
        let parsed = parse(&out);
        assert_eq!(parsed.attachment(0).map(|a| a.contents().to_vec()), Some(vec![7u8; 3000]));
        // Not MIME before: MIME after.
        let plain = format!("Subject: s\r\n\r\n{}\r\n", "y".repeat(1200));
        let out = String::from_utf8(reencode_long_lines(plain.as_bytes()).unwrap()).unwrap();
        assert!(
            out.starts_with("Subject: s\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\n"),
            "{out}"
        );
    }

    #[test]
    fn dsn_has_the_three_parts() {
        let f = Failure { recipient: "bob@example.org", status: "5.1.1", diagnostic: "38 Mailbox gone" };
        let raw = dsn("gw.example", "alice@else.example", "now", &f, MSG);
        let d = String::from_utf8(raw.clone()).unwrap();
        assert!(d.contains("report-type=delivery-status"));
        assert!(d.contains("Final-Recipient: rfc822; bob@example.org"));
        assert!(d.contains("Status: 5.1.1"));
        assert!(d.contains("Diagnostic-Code: x-latssiam; 38 Mailbox gone"));
        assert!(d.contains("text/rfc822-headers\r\n\r\nReceived: a"));
        assert_eq!(recipients(&parse(&raw)), ["alice@else.example"]);
    }

    #[test]
    fn a_bounce_quotes_only_header_fields_and_a_bounded_number_of_them() {
        let f = Failure { recipient: "bob@example.org", status: "5.4.7", diagnostic: "x" };
        // No blank line: the header ends at the first line that is not a field.
        let text = |raw: Vec<u8>| String::from_utf8(raw).unwrap();
        let body = "Subject: hi\r\n folded\r\nFrom: v@x\r\nBUY NOW at evil.example\r\nX: after\r\n";
        let d = text(dsn("gw.example", "v@x", "now", &f, body.as_bytes()));
        assert!(d.contains("Subject: hi\r\n folded\r\nFrom: v@x\r\n"), "{d}");
        assert!(!d.contains("BUY NOW") && !d.contains("X: after"), "{d}");
        // The review's 2,000 lines of "X: spam" and no blank line: at most 8 KiB of them.
        let flood = "X: spam\r\n".repeat(2000);
        let d = text(dsn("gw.example", "v@x", "now", &f, flood.as_bytes()));
        let quoted = d.matches("X: spam").count();
        assert!(quoted * 9 <= MAX_QUOTED_HEADER && quoted > 100, "{quoted}");
    }
}
