//! Text handling for IRC: decoding (UTF-8, else latin-1), removing mIRC
//! formatting, making text safe to send, and splitting it to fit a line.

/// Decodes a line as UTF-8, falling back to latin-1 (never drops it).
pub fn decode(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// Removes mIRC colour and formatting codes.
pub fn strip_formatting(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x02' | '\x0f' | '\x11' | '\x16' | '\x1d' | '\x1e' | '\x1f' => {}
            '\x03' => {
                // \x03[fg[,bg]] with one or two digits each.
                for _ in 0..2 {
                    if chars.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                    }
                }
                if chars.peek() == Some(&',') {
                    let mut look = chars.clone();
                    look.next();
                    if look.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                        for _ in 0..2 {
                            if chars.peek().is_some_and(char::is_ascii_digit) {
                                chars.next();
                            }
                        }
                    }
                }
            }
            '\x04' => {
                // \x04RRGGBB[,RRGGBB]
                for _ in 0..6 {
                    if chars.peek().is_some_and(char::is_ascii_hexdigit) {
                        chars.next();
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Makes text heard on IRC safe to relay elsewhere (into a mail header or
/// body): mIRC formatting removed, CR and LF (and NEL, LS, PS) become spaces,
/// every other control character (C0 but TAB, DEL, C1) is removed. The bot
/// passes every text, nick and channel of an [`Event`](crate::Event) through
/// it; it is idempotent.
pub fn clean_text(s: &str) -> String {
    strip_formatting(s)
        .chars()
        .filter_map(|c| match c {
            '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => Some(' '),
            '\t' => Some('\t'),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect()
}

/// Makes text safe as the trailing parameter of one IRC line: CR, LF and NUL
/// become spaces and CTCP's `\x01` is removed, so it can never start another
/// command or a CTCP request.
pub fn sanitize(s: &str) -> String {
    s.chars().filter(|&c| c != '\x01').map(|c| if matches!(c, '\r' | '\n' | '\0') { ' ' } else { c }).collect()
}

/// Splits `text` into pieces of at most `budget` octets, on UTF-8 character
/// boundaries, preferring the last space when there is one in the second half.
pub fn split_to_fit(text: &str, budget: usize) -> Vec<String> {
    let budget = budget.max(4);
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > budget {
        let mut cut = budget;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if let Some(space) = rest[..cut].rfind(' ').filter(|&i| i > cut / 2) {
            cut = space;
        }
        out.push(rest[..cut].to_owned());
        rest = rest[cut..].trim_start_matches(' ');
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

/// Inserts a zero-width space after the first character, so that a relayed
/// name does not highlight the person of that name on IRC.
pub fn defang(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => format!("{first}\u{200b}{}", chars.as_str()),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_is_never_dropped() {
        assert_eq!(decode("grüße".as_bytes()), "grüße");
        assert_eq!(decode(b"gr\xfc\xdfe"), "grüße");
    }

    #[test]
    fn formatting_is_removed() {
        assert_eq!(strip_formatting("\x02bold\x02 \x0304,12red\x03 \x1fu\x0f 1,2 \x03,x"), "bold red u 1,2 ,x");
        assert_eq!(strip_formatting("\x0312,5x \x04ff00ffy"), "x y");
    }

    #[test]
    fn nothing_can_inject() {
        assert_eq!(sanitize("hi\r\nQUIT :bye\0\x01ACTION x\x01"), "hi  QUIT :bye ACTION x");
    }

    #[test]
    fn relayed_text_has_no_controls() {
        let dirty = "a\rb\nc\0d\x01e\x07f\tg\x7fh\u{85}i\u{9b}j\u{2028}k \x0304red\x03 \x02b\x02";
        let clean = clean_text(dirty);
        assert_eq!(clean, "a b cdef\tgh ij k red b");
        assert!(!clean.chars().any(|c| c.is_control() && c != '\t'));
        assert_eq!(clean_text(&clean), clean, "idempotent");
        assert_eq!(clean_text("grüße ☺"), "grüße ☺");
    }

    #[test]
    fn splitting_respects_utf8_and_budget() {
        let s = "ä".repeat(10);
        let parts = split_to_fit(&s, 5);
        assert!(parts.iter().all(|p| p.len() <= 5));
        assert_eq!(parts.concat(), s);
        assert_eq!(split_to_fit("aaaa bbbb cccc", 10), ["aaaa bbbb", "cccc"]);
        assert_eq!(split_to_fit("", 10), [""]);
        assert_eq!(defang("alice"), "a\u{200b}lice");
    }
}
