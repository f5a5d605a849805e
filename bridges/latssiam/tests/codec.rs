//! The wire rules of PROFILE.md sections 2-4, one test per rule, and a
//! property test that encode/decode round-trips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use latssiam::wire::{
    decode_all, encode_frame, Block, Code, Command, Frame, FrameCodec, Label, Password, Status, WireError,
    MAX_BLOCK_DER,
};
use latssiam::Fingerprint;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

const FP: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

fn one(input: &[u8]) -> Result<Frame, WireError> {
    let (mut frames, err) = decode_all(input);
    match err {
        Some(e) => Err(e),
        None => {
            assert_eq!(frames.len(), 1, "expected one frame from {:?}", String::from_utf8_lossy(input));
            Ok(frames.remove(0))
        }
    }
}

fn code_of(input: &[u8]) -> Code {
    let err = one(input).unwrap_err();
    assert!(err.hang_up(), "{err} must end the session");
    err.code().unwrap_or_else(|| panic!("{err} carries no code"))
}

/// A status line of exactly `n` octets including CRLF.
fn status_line(n: usize) -> Vec<u8> {
    let mut line = b"31 ".to_vec();
    line.resize(n - 2, b'x');
    line.extend_from_slice(b"\r\n");
    line
}

#[test]
fn line_lengths_72_and_73_pass_74_fails() {
    for n in [72, 73] {
        let f = one(&status_line(n)).unwrap();
        assert!(matches!(f, Frame::Status(s) if s.code() == Code::MessageAccepted && s.text().len() == n - 5));
    }
    assert!(matches!(one(&status_line(74)), Err(WireError::LineTooLong)));
    assert_eq!(code_of(&status_line(74)), Code::SyntaxError);
}

#[test]
fn bare_lf_bare_cr_nul_and_non_ascii_are_violations() {
    assert!(matches!(one(b"QUIT\n"), Err(WireError::BareLf)));
    assert!(matches!(one(b"QU\rIT\r\n"), Err(WireError::BareCr)));
    assert!(matches!(one(b"QUIT\r\r\n"), Err(WireError::BareCr)));
    assert!(matches!(one(b"QU\0IT\r\n"), Err(WireError::Nul)));
    assert!(matches!(one("31 Grüße\r\n".as_bytes()), Err(WireError::NonPrintable(0xc3))));
    assert!(matches!(one(b"31 tab\there\r\n"), Err(WireError::NonPrintable(b'\t'))));
    for bad in [&b"QUIT\n"[..], b"QU\rIT\r\n", b"QU\0IT\r\n"] {
        assert_eq!(code_of(bad), Code::SyntaxError);
    }
}

#[test]
fn faults_are_found_before_the_line_ends() {
    // A NUL is refused as soon as it arrives, without waiting for CRLF.
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::from(&b"SEND \0"[..]);
    assert!(matches!(codec.decode(&mut buf), Err(WireError::Nul)));
    // A CR at the end may still be followed by LF: not yet an error.
    let mut buf = BytesMut::from(&b"QUIT\r"[..]);
    assert!(matches!(FrameCodec::new().decode(&mut buf), Ok(None)));
}

#[test]
fn ten_megabytes_without_crlf_cost_one_line() {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    let chunk = [b'A'; 8192];
    let mut fed = 0;
    let err = loop {
        buf.extend_from_slice(&chunk);
        fed += chunk.len();
        match codec.decode(&mut buf) {
            Ok(None) => assert!(buf.len() < 73, "the decoder held {} octets", buf.len()),
            Ok(Some(f)) => panic!("decoded {f:?}"),
            Err(e) => break e,
        }
        assert!(fed < 10 << 20);
    };
    assert!(matches!(err, WireError::LineTooLong));
    assert_eq!(fed, 8192, "refused at the first read");
}

#[test]
fn eof_cases() {
    assert!(matches!(decode_all(b""), (f, None) if f.is_empty()));
    assert!(matches!(decode_all(b"QUIT"), (_, Some(WireError::EofInLine))));
    assert!(matches!(
        decode_all(b"-----BEGIN SIGNATURE-----\r\nMAA=\r\n"),
        (_, Some(WireError::EofInBlock(Label::Signature)))
    ));
    assert_eq!(WireError::EofInLine.code(), None);
}

#[test]
fn verbs_with_typed_arguments() {
    let fp: Fingerprint = FP.parse().unwrap();
    assert_eq!(one(format!("SEND {FP}\r\n").as_bytes()).unwrap(), Frame::Command(Command::Send(fp)));
    assert_eq!(one(format!("VERIFY {FP}\r\n").as_bytes()).unwrap(), Frame::Command(Command::Verify(fp)));
    assert_eq!(one(b"ACCEPT 30\r\n").unwrap(), Frame::Command(Command::Accept(Duration::from_secs(30))));
    assert_eq!(one(b"ACCEPT 0\r\n").unwrap(), Frame::Command(Command::Accept(Duration::ZERO)));
    assert_eq!(
        one(b"MAILBOX REGISTER open sesame\r\n").unwrap(),
        Frame::Command(Command::Register(Password::new("open sesame").unwrap()))
    );
    assert_eq!(one(b"MAILBOX DEREGISTER\r\n").unwrap(), Frame::Command(Command::Deregister));
    assert_eq!(one(b"QUIT\r\n").unwrap(), Frame::Command(Command::Quit));
}

#[test]
fn unknown_and_lower_case_verbs_are_syntax_errors() {
    for line in [&b"HELO x\r\n"[..], b"quit\r\n", b"Send x\r\n", b"\r\n", b"MAILBOX\r\n"] {
        let err = one(line).unwrap_err();
        assert!(matches!(err, WireError::UnknownVerb | WireError::BadArgument(_)), "{err}");
        assert_eq!(err.code(), Some(Code::SyntaxError));
    }
    assert!(matches!(one(b"quit\r\n"), Err(WireError::UnknownVerb)));
}

#[test]
fn two_spaces_before_an_argument_are_refused() {
    for line in [
        format!("SEND  {FP}\r\n"),
        format!("VERIFY  {FP}\r\n"),
        "ACCEPT  5\r\n".to_owned(),
        "MAILBOX  REGISTER pw\r\n".to_owned(),
        "MAILBOX REGISTER  pw\r\n".to_owned(),
        "MAILBOX  DEREGISTER\r\n".to_owned(),
        format!("SEND {FP} \r\n"),
        "QUIT \r\n".to_owned(),
    ] {
        // `VERIFY  <fp>` is also one octet too long; either way it is a 50.
        let err = one(line.as_bytes()).unwrap_err();
        assert!(matches!(err, WireError::BadArgument(_) | WireError::LineTooLong), "{line:?}: {err}");
        assert_eq!(code_of(line.as_bytes()), Code::SyntaxError);
    }
}

#[test]
fn fingerprints_must_be_64_lower_case_hex() {
    assert!(matches!(one(format!("SEND {}\r\n", &FP[..63]).as_bytes()), Err(WireError::BadArgument(_))));
    assert!(matches!(one(format!("SEND {}\r\n", FP.to_uppercase()).as_bytes()), Err(WireError::BadArgument(_))));
    assert!(matches!(one(format!("SEND {FP}0\r\n").as_bytes()), Err(WireError::BadArgument(_))));
    assert!(matches!(one(format!("SEND {}g\r\n", &FP[..63]).as_bytes()), Err(WireError::BadArgument(_))));
}

#[test]
fn deadlines_and_passwords() {
    assert!(matches!(one(b"ACCEPT -1\r\n"), Err(WireError::BadArgument(_))));
    assert!(matches!(one(b"ACCEPT 99999999999999999999999\r\n"), Err(WireError::BadArgument(_))));
    let longest = "p".repeat(54);
    assert!(one(format!("MAILBOX REGISTER {longest}\r\n").as_bytes()).is_ok());
    assert!(Password::new("p".repeat(55)).is_err());
    assert!(Password::new("").is_err());
    assert!(Password::new(" leading").is_err());
    assert!(Password::new("caf\u{e9}").is_err());
    assert_eq!(format!("{:?}", Password::new("secret").unwrap()), "Password(..)");
}

#[test]
fn status_lines() {
    assert_eq!(one(b"33 \r\n").unwrap(), Frame::Status(Status::new(Code::NoMoreMessages, "").unwrap()));
    assert!(matches!(one(b"31\r\n"), Err(WireError::BadStatus)));
    assert!(matches!(one(b"3 x\r\n"), Err(WireError::BadStatus)));
    assert!(matches!(one(b"31x\r\n"), Err(WireError::BadStatus)));
    assert!(matches!(one(b"99 what\r\n"), Err(WireError::UnknownCode(99))));
    let Frame::Status(moved) = one(b"35 Mailbox moved new.example.org\r\n").unwrap() else { panic!() };
    assert_eq!(moved.moved_to(), Some("new.example.org"));
    assert_eq!(Status::moved("h.example").unwrap().to_string(), "35 Mailbox moved h.example");
    for code in Code::ALL {
        let line = format!("{} {}\r\n", code, code.text());
        assert_eq!(one(line.as_bytes()).unwrap(), Frame::Status(Status::of(code)));
    }
}

fn armour(label: &str, end: &str, lines: &[String]) -> Vec<u8> {
    let mut out = format!("-----BEGIN {label}-----\r\n");
    for l in lines {
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str(&format!("-----END {end}-----\r\n"));
    out.into_bytes()
}

/// A DER SEQUENCE of `len` octets in all.
fn der_of_len(len: usize) -> Vec<u8> {
    assert!(len > 260);
    let body = len - 4;
    let mut der = vec![0x30, 0x82, (body >> 8) as u8, body as u8];
    der.extend((0..body).map(|i| i as u8));
    der
}

fn b64_lines(der: &[u8], width: usize) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    b64.as_bytes().chunks(width).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect()
}

#[test]
fn blocks_of_400_lines_pass_401_fail() {
    let der = der_of_len(MAX_BLOCK_DER);
    let lines = b64_lines(&der, 64);
    assert_eq!(lines.len(), 400);
    let f = one(&armour("ENCRYPTED MESSAGE", "ENCRYPTED MESSAGE", &lines)).unwrap();
    assert_eq!(f, Frame::Block(Block::new(Label::EncryptedMessage, der.clone())));

    let mut more = lines.clone();
    more.insert(0, "MAAA".to_owned());
    assert!(matches!(
        one(&armour("ENCRYPTED MESSAGE", "ENCRYPTED MESSAGE", &more)),
        Err(WireError::BlockTooLong(Label::EncryptedMessage))
    ));
    assert_eq!(code_of(&armour("ENCRYPTED MESSAGE", "ENCRYPTED MESSAGE", &more)), Code::MessageTooLong);
    assert_eq!(code_of(&armour("SIGNATURE", "SIGNATURE", &more)), Code::SyntaxError);
    // Too big to encode, too.
    assert!(matches!(
        encode_frame(&Frame::Block(Block::new(Label::EncryptedMessage, der_of_len(MAX_BLOCK_DER + 3)))),
        Err(WireError::BlockTooLong(_))
    ));
}

#[test]
fn a_65_character_base64_line_is_refused() {
    let lines = b64_lines(&der_of_len(600), 65);
    assert!(matches!(one(&armour("CERTIFICATE", "CERTIFICATE", &lines)), Err(WireError::Base64LineTooLong)));
    // Shorter lines are fine (64 is a maximum, not a width).
    let lines = b64_lines(&der_of_len(600), 60);
    assert!(one(&armour("CERTIFICATE", "CERTIFICATE", &lines)).is_ok());
}

#[test]
fn mismatched_unknown_labels_and_bad_base64() {
    let lines = b64_lines(&der_of_len(300), 64);
    assert!(matches!(
        one(&armour("SIGNATURE", "CERTIFICATE", &lines)),
        Err(WireError::LabelMismatch(Label::Signature))
    ));
    assert!(matches!(one(&armour("PGP MESSAGE", "PGP MESSAGE", &lines)), Err(WireError::UnknownLabel)));
    assert!(matches!(one(b"-----BEGIN SIGNATURE----\r\n"), Err(WireError::UnknownLabel)));
    let mut bad = lines.clone();
    bad[1].replace_range(3..4, "*");
    assert!(matches!(one(&armour("SIGNATURE", "SIGNATURE", &bad)), Err(WireError::BadBase64)));
    let mut padded_early = lines.clone();
    padded_early[0].replace_range(62..64, "==");
    assert!(matches!(one(&armour("SIGNATURE", "SIGNATURE", &padded_early)), Err(WireError::BadBase64)));
    assert!(matches!(one(&armour("SIGNATURE", "SIGNATURE", &["".to_owned()])), Err(WireError::BadBase64)));
    for e in [WireError::BadBase64, WireError::UnknownLabel, WireError::LabelMismatch(Label::Signature)] {
        assert_eq!(e.code(), Some(Code::SyntaxError));
    }
}

#[test]
fn block_content_must_be_one_der_sequence() {
    let not_der = |bytes: &[u8]| armour("CERTIFICATE", "CERTIFICATE", &b64_lines(bytes, 64));
    assert!(matches!(one(&not_der(b"hello world")), Err(WireError::BadDer)));
    assert!(matches!(one(&not_der(&[0x30, 0x05, 1, 2])), Err(WireError::BadDer)), "short");
    assert!(matches!(one(&not_der(&[0x30, 0x01, 1, 2])), Err(WireError::BadDer)), "trailing data");
    assert!(matches!(one(&not_der(&[0x30, 0x81, 0x01, 1])), Err(WireError::BadDer)), "non-minimal length");
    assert!(matches!(one(&not_der(&[0x30, 0x80, 0, 0])), Err(WireError::BadDer)), "indefinite length");
    assert!(one(&not_der(&[0x30, 0x01, 0x05])).is_ok());
}

#[test]
fn a_conversation_decodes_in_order_from_one_buffer() {
    let der = der_of_len(1000);
    let mut input = format!("SEND {FP}\r\n30 Recipient recognised; proceed\r\n").into_bytes();
    input.extend(armour("ENCRYPTED MESSAGE", "ENCRYPTED MESSAGE", &b64_lines(&der, 64)));
    input.extend_from_slice(b"31 Message accepted\r\nQUIT\r\n");
    let (frames, err) = decode_all(&input);
    assert!(err.is_none());
    assert_eq!(frames.len(), 5);
    assert_eq!(frames[2], Frame::Block(Block::new(Label::EncryptedMessage, der)));
    // Fed one octet at a time, the same frames come out.
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    let mut trickled = Vec::new();
    for &b in &input {
        buf.extend_from_slice(&[b]);
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            trickled.push(f);
        }
    }
    assert_eq!(trickled, frames);
}

fn arb_fingerprint() -> impl Strategy<Value = Fingerprint> {
    any::<[u8; 32]>().prop_map(Fingerprint::from_bytes)
}

fn arb_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        arb_fingerprint().prop_map(Command::Send),
        arb_fingerprint().prop_map(Command::Verify),
        any::<u64>().prop_map(|s| Command::Accept(Duration::from_secs(s))),
        "[!-~][ -~]{0,53}".prop_map(|p| Command::Register(Password::new(p).unwrap())),
        Just(Command::Deregister),
        Just(Command::Quit),
    ]
}

fn arb_status() -> impl Strategy<Value = Status> {
    (proptest::sample::select(Code::ALL.to_vec()), "[ -~]{0,68}").prop_map(|(c, t)| Status::new(c, t).unwrap())
}

fn arb_block() -> impl Strategy<Value = Block> {
    let label = proptest::sample::select(vec![
        Label::EncryptedMessage,
        Label::Signature,
        Label::Certificate,
        Label::CertificateRequest,
    ]);
    (label, proptest::collection::vec(any::<u8>(), 0..3000)).prop_map(|(label, body)| {
        let mut der = vec![0x30];
        match body.len() {
            n @ 0..=0x7f => der.push(n as u8),
            n @ 0x80..=0xff => der.extend([0x81, n as u8]),
            n => der.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        der.extend(body);
        Block::new(label, der)
    })
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        arb_command().prop_map(Frame::Command),
        arb_status().prop_map(Frame::Status),
        arb_block().prop_map(Frame::Block)
    ]
}

/// Feeds `wire` to one decoder in pieces cut at `cuts` (then at its end),
/// as a connection would; returns the frames, the first error (as text) and
/// the octets consumed.
fn decode_cut(wire: &[u8], cuts: &[proptest::sample::Index]) -> (Vec<Frame>, String, usize) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
    points.push(wire.len());
    points.sort_unstable();
    let (mut codec, mut buf, mut got, mut error, mut from) = (FrameCodec::new(), BytesMut::new(), Vec::new(), None, 0);
    'feed: for to in points {
        buf.extend_from_slice(&wire[from..to]);
        from = to;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => got.push(f),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
    }
    while error.is_none() {
        match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => got.push(f),
            Ok(None) => break,
            Err(e) => error = Some(e),
        }
    }
    (got, format!("{error:?}"), from - buf.len())
}

/// A line too long whose 72nd octet is a fault: the error is the fault,
/// whether the decoder saw 72 octets first or the whole line (it said
/// `LineTooLong` for the whole line before).
#[test]
fn a_fault_in_the_72nd_octet_of_a_line_too_long_is_the_same_error_however_cut() {
    for fault in [0u8, 0x7f] {
        let mut wire = vec![b'a'; 71];
        wire.extend_from_slice(&[fault, b'x', b'y']);
        let (_, whole) = decode_all(&wire);
        let mut first_72 = BytesMut::from(&wire[..72]);
        let cut = FrameCodec::new().decode(&mut first_72).err();
        assert!(whole.is_some(), "octet {fault:#x}");
        assert_eq!(format!("{cut:?}"), format!("{whole:?}"), "octet {fault:#x}");
    }
}

proptest! {
    #[test]
    fn frames_round_trip(frames in proptest::collection::vec(arb_frame(), 1..8)) {
        let mut wire = Vec::new();
        for f in &frames {
            let bytes = encode_frame(f).unwrap();
            for line in bytes[..].split(|&b| b == b'\n') {
                prop_assert!(line.len() < 73, "line of {} octets with its LF", line.len() + 1);
            }
            wire.extend_from_slice(&bytes);
        }
        let (decoded, err) = decode_all(&wire);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(decoded, frames);
    }

    /// Frames, the first error and what was consumed are the same however
    /// the input arrives: whole, or cut anywhere (the decoder looks at
    /// partial lines to fail early, and must not answer differently for
    /// them). The input is valid frames with one octet possibly changed.
    #[test]
    fn frames_and_errors_do_not_depend_on_where_the_input_is_cut(
        frames in proptest::collection::vec(arb_frame(), 1..6),
        changed in proptest::option::of((any::<proptest::sample::Index>(), any::<u8>())),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&encode_frame(f).unwrap());
        }
        if let Some((at, octet)) = changed {
            let at = at.index(wire.len());
            wire[at] = octet;
        }
        let whole = decode_cut(&wire, &[]);
        prop_assert_eq!(decode_cut(&wire, &cuts), whole);
    }

    /// The same for lines of any length and octets near the edges of what
    /// a line may hold (CR, LF, NUL, DEL, spaces), long lines included.
    #[test]
    fn raw_lines_decode_alike_however_cut(
        wire in proptest::collection::vec(
            prop_oneof![40 => 0x20u8..0x7f, 1 => Just(b'\r'), 1 => Just(b'\n'), 1 => Just(0u8), 1 => Just(0x7fu8)],
            0..400,
        ),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
    ) {
        let whole = decode_cut(&wire, &[]);
        prop_assert_eq!(decode_cut(&wire, &cuts), whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = decode_all(&input);
    }
}
