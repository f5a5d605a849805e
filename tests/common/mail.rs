//! Mail as organisations send it, for the large-mail tests.
#![allow(dead_code, clippy::unwrap_used)]

use base64::Engine as _;

/// Base64 in 76-column lines, as MIME writes it.
fn b64_lines(data: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = String::with_capacity(text.len() + text.len() / 38);
    for chunk in text.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push_str("\r\n");
    }
    out
}

/// Deterministic noise (a PDF or a picture does not compress either).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A mail of about `size` octets as organisations send it: text and HTML
/// alternatives, then a PDF-like binary, a UTF-8 text with long lines and an
/// image, each attachment base64 but the text (8bit, lines of 5,000 octets).
pub fn real_mail(from: &str, to: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: {from}\r\nTo: {to}\r\nSubject: Quarterly report, with attachments\r\n\
Date: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <report-{size}@remote.example>\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\nThis is a multi-part message in MIME format.\r\n\
--outer\r\nContent-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n\
--alt\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
Hello, please find the report attached. Grüße!\r\n\
--alt\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
<html><body><p>Hello, please find the <b>report</b> attached. Grüße!</p></body></html>\r\n\
--alt--\r\n"
    );
    let third = size / 3;
    m.push_str("--outer\r\nContent-Type: application/pdf; name=\"report.pdf\"\r\n");
    m.push_str("Content-Disposition: attachment; filename=\"report.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n");
    let mut pdf = b"%PDF-1.7\n".to_vec();
    pdf.extend(noise(third * 3 / 4, 7));
    m.push_str(&b64_lines(&pdf));
    m.push_str("--outer\r\nContent-Type: text/plain; charset=utf-8; name=\"notes.txt\"\r\n");
    m.push_str("Content-Disposition: attachment; filename=\"notes.txt\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
    let line = "Überblick über die Zahlen; ".repeat(200);
    for _ in 0..(third / line.len()).max(1) {
        m.push_str(&line);
        m.push_str("\r\n");
    }
    m.push_str("--outer\r\nContent-Type: image/png; name=\"chart.png\"\r\n");
    m.push_str("Content-Disposition: attachment; filename=\"chart.png\"\r\nContent-Transfer-Encoding: base64\r\n\r\n");
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(noise(third * 3 / 4, 11));
    m.push_str(&b64_lines(&png));
    m.push_str("--outer--\r\n");
    m.into_bytes()
}

/// `real_mail` with its long text lines cut to lines SMTP can carry as they are.
pub fn relayable(mail: &[u8]) -> Vec<u8> {
    let line = "Überblick über die Zahlen; ";
    String::from_utf8(mail.to_vec()).unwrap().replace(&line.repeat(200), &line.repeat(30)).into_bytes()
}
