//! The toolkit commands, run as a user would run the built binary, with the
//! real `openssl` on the other side where it matters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_latssiam-bridge"))
}

fn run(args: &[&str], dir: &Path) -> Output {
    bin().args(args).current_dir(dir).stdin(Stdio::null()).output().unwrap()
}

fn ok(args: &[&str], dir: &Path) -> String {
    let out = run(args, dir);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `identity new --address ADDRESS --out DIR [extra]`; returns the printed fingerprint.
fn new_identity(dir: &Path, address: &str, out: &str, extra: &[&str]) -> String {
    let mut args = vec!["identity", "new", "--address", address, "--out", out];
    args.extend_from_slice(extra);
    ok(&args, dir).trim().to_owned()
}

/// Fails with exactly one line on stderr.
fn fails(args: &[&str], dir: &Path) -> String {
    let out = run(args, dir);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err}");
    assert!(err.starts_with("latssiam-bridge: error: "), "{err}");
    err
}

/// Runs the real `openssl` in `dir`, requires success, and returns its stdout.
fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn identity_new_and_show() {
    let d = tempfile::tempdir().unwrap();
    let fp =
        ok(&["identity", "new", "--address", "alice@example.org", "--name", "Alice A", "--out", "alice"], d.path());
    let fp = fp.trim();
    assert_eq!(fp.len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("alice/key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = openssl(d.path(), &["x509", "-in", "alice/cert.pem", "-noout", "-fingerprint", "-sha256"]);
    let openssl_fp = String::from_utf8_lossy(&out).split('=').nth(1).unwrap().trim().replace(':', "").to_lowercase();
    assert_eq!(openssl_fp, fp);

    let show = ok(&["identity", "show", "alice", "--qr"], d.path());
    assert!(show.contains("address:     alice@example.org"), "{show}");
    assert!(show.contains("name:        Alice A"), "{show}");
    assert!(show.contains(&format!("fingerprint: {fp}")), "{show}");
    assert!(show.contains(&format!("url:         latssiam:{fp}//example.org/")), "{show}");
    assert!(show.contains('\u{2588}') || show.contains('\u{2580}') || show.contains('\u{2584}'), "QR drawn: {show}");

    // An existing identity is never overwritten.
    fails(&["identity", "new", "--address", "alice@example.org", "--out", "alice"], d.path());
    assert!(ok(&["identity", "show", "alice"], d.path()).contains(fp), "the first identity is kept");
}

#[test]
fn seal_sign_armor_then_open() {
    let d = tempfile::tempdir().unwrap();
    new_identity(d.path(), "alice@example.org", "alice", &[]);
    new_identity(d.path(), "bob@example.org", "bob", &["--rsa"]);
    std::fs::write(d.path().join("msg.eml"), "Subject: Grüße\r\n\r\nHallo Bob\r\n").unwrap();
    ok(&["seal", "--to", "bob/cert.pem", "--sign", "alice", "--armor", "msg.eml", "-o", "msg.asc"], d.path());
    let armour = std::fs::read_to_string(d.path().join("msg.asc")).unwrap();
    assert!(armour.starts_with("-----BEGIN SIGNATURE-----\r\n"), "{armour}");
    assert!(armour.contains("-----BEGIN ENCRYPTED MESSAGE-----\r\n"));
    assert!(armour.lines().all(|l| l.len() <= 71));

    let out = run(&["open", "--identity", "bob", "msg.asc"], d.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, "Subject: Grüße\r\n\r\nHallo Bob\r\n".as_bytes());
    assert!(String::from_utf8_lossy(&out.stderr).contains("signed by alice <alice@example.org>"));

    // LF-only armour (a file that lost its CRs) still opens.
    std::fs::write(d.path().join("lf.asc"), armour.replace("\r\n", "\n")).unwrap();
    ok(&["open", "--identity", "bob", "lf.asc"], d.path());

    // Alice cannot open Bob's message.
    let err = fails(&["open", "--identity", "alice", "msg.asc"], d.path());
    assert!(err.contains("not encrypted to this identity"), "{err}");
}

#[test]
fn seal_der_is_opened_by_openssl_and_signature_verified_by_openssl() {
    let d = tempfile::tempdir().unwrap();
    new_identity(d.path(), "alice@example.org", "alice", &[]);
    new_identity(d.path(), "bob@example.org", "bob", &[]);
    std::fs::write(d.path().join("msg"), vec![b'x'; 4096]).unwrap();
    ok(&["seal", "--to", "bob/cert.pem", "--sign", "alice", "msg", "-o", "msg.der"], d.path());
    let dec = openssl(
        d.path(),
        &[
            "cms",
            "-decrypt",
            "-binary",
            "-inform",
            "DER",
            "-in",
            "msg.der",
            "-recip",
            "bob/cert.pem",
            "-inkey",
            "bob/key.pem",
        ],
    );
    assert_eq!(dec, vec![b'x'; 4096]);
    openssl(
        d.path(),
        &[
            "cms",
            "-verify",
            "-binary",
            "-noverify",
            "-inform",
            "DER",
            "-in",
            "msg.der.sig",
            "-content",
            "msg.der",
            "-out",
            "/dev/null",
        ],
    );
}

#[test]
fn sign_and_verify() {
    let d = tempfile::tempdir().unwrap();
    let fp = new_identity(d.path(), "alice@example.org", "alice", &[]);
    std::fs::write(d.path().join("doc"), "content").unwrap();
    std::fs::write(d.path().join("other"), "contend").unwrap();
    ok(&["sign", "--identity", "alice", "doc", "-o", "doc.sig"], d.path());
    let out = ok(&["verify", "--signature", "doc.sig", "doc"], d.path());
    assert!(out.contains("address:     alice@example.org"), "{out}");
    assert!(out.contains(&format!("fingerprint: {}", fp.trim())), "{out}");
    let err = fails(&["verify", "--signature", "doc.sig", "other"], d.path());
    assert!(err.contains("does not verify"), "{err}");
}

#[test]
fn bad_input_gets_one_clear_line() {
    let d = tempfile::tempdir().unwrap();
    fails(&["identity", "new", "--address", "not-an-address", "--out", "x"], d.path());
    fails(&["identity", "show", "missing"], d.path());
    fails(&["open", "--identity", "missing", "nothing"], d.path());
    new_identity(d.path(), "bob@example.org", "bob", &[]);
    std::fs::write(d.path().join("junk"), b"\x30\x03\x02\x01\x00").unwrap();
    fails(&["open", "--identity", "bob", "junk"], d.path());
    fails(&["seal", "--to", "junk", "junk"], d.path());
    std::fs::write(
        d.path().join("bad.asc"),
        "-----BEGIN ENCRYPTED MESSAGE-----\r\n!!!!\r\n-----END ENCRYPTED MESSAGE-----\r\n",
    )
    .unwrap();
    let err = fails(&["open", "--identity", "bob", "bad.asc"], d.path());
    assert!(err.contains("base64"), "{err}");
}
