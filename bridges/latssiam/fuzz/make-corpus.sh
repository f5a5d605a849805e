#!/usr/bin/env bash
# Regenerates the seed corpora corpus/open and corpus/decode from real tools:
# `openssl cms` and the project's own CLI (target/debug/latssiam-bridge).
#
#   bridges/latssiam/fuzz/make-corpus.sh [path/to/latssiam-bridge]
#
# The `open` target decrypts with the fixed identities in keys/ (compiled in
# with include_bytes!), so every AuthEnvelopedData here that names them really
# decrypts and the fuzzer starts from inputs that reach the content. Signatures
# are over the 7 octets "content", which is what the target verifies against.
# The keys are test keys, public on purpose: never use them for anything else.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
bin=${1:-$root/target/debug/latssiam-bridge}
[ -x "$bin" ] || { echo "no $bin: build the CLI first (cargo build)" >&2; exit 1; }
keys=$here/keys
P=$keys/p256 R=$keys/rsa
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
open_dir=$here/corpus/open decode_dir=$here/corpus/decode
rm -rf "$open_dir" "$decode_dir"
mkdir -p "$open_dir" "$decode_dir"

# --- material --------------------------------------------------------------
"$bin" identity new --address mallory@other.example --out "$work/other" >/dev/null
"$bin" identity new --address bob@example.net --name 'Bob Example' --rsa --out "$work/bob" >/dev/null
O=$work/other
# A second certificate for the fixed P-256 key, with a subjectKeyIdentifier
# (the project's certificates have none), for -keyid recipients and signers.
openssl req -new -x509 -key "$P/key.pem" -subj "/CN=fuzz/UID=fuzz" -days 3650 \
    -addext "subjectKeyIdentifier=hash" -out "$work/p256-ski.pem" 2>/dev/null

crlf() { sed 's/$/\r/'; }
mail() { # mail FROM TO SUBJECT BODY
    printf 'From: %s\r\nTo: %s\r\nDate: Tue, 24 Nov 2026 12:00:00 +0000\r\nMessage-ID: <%s@example.org>\r\nSubject: %s\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n%s\r\n' \
        "$1" "$2" "$RANDOM$RANDOM" "$3" "$4"
}
mail 'Alice <alice@example.org>' 'fuzz@example.org' 'Hello' 'Hi there, this is a short LATSSIAM message.' >"$work/m1"
mail 'fuzz@example.org' 'bob@example.net, "Carol C." <carol@corp.example>' 'Grüße =?utf-8?q?aus_K=C3=B6ln?=' \
    "$(printf 'Zeile eins\r\n.\r\nzeile drei mit ümlauten\r\n')" >"$work/m2"
{ mail 'a@example.org' 'fuzz@example.org' 'big' 'x'; for i in $(seq 1 120); do printf 'line %03d of a longer body, enough to need several AES blocks.\r\n' "$i"; done; } >"$work/big"
: >"$work/empty"
printf 'content' >"$work/content"
printf 'contenu' >"$work/other-content"

enc() { # enc NAME INPUT openssl-args...
    local name=$1 in=$2; shift 2
    if openssl cms -encrypt -binary -in "$in" -outform DER -out "$open_dir/$name" "$@" 2>"$work/err"; then :; else
        echo "skipped $name: $(head -1 "$work/err")" >&2; rm -f "$open_dir/$name"; fi
}
sgn() { # sgn NAME INPUT openssl-args...
    local name=$1 in=$2; shift 2
    if openssl cms -sign -binary -in "$in" -outform DER -out "$open_dir/$name" "$@" 2>"$work/err"; then :; else
        echo "skipped $name: $(head -1 "$work/err")" >&2; rm -f "$open_dir/$name"; fi
}

# --- open: OpenSSL AuthEnvelopedData / EnvelopedData ------------------------
gcm=(-aes-256-gcm)
enc ossl-aed-p256-sha256kdf "$work/m1" "${gcm[@]}" -recip "$P/cert.pem" -keyopt ecdh_kdf_md:sha256
enc ossl-aed-p256-sha256kdf-empty "$work/empty" "${gcm[@]}" -recip "$P/cert.pem" -keyopt ecdh_kdf_md:sha256
enc ossl-aed-p256-sha256kdf-big "$work/big" "${gcm[@]}" -recip "$P/cert.pem" -keyopt ecdh_kdf_md:sha256
enc ossl-aed-p256-sha1kdf "$work/m2" "${gcm[@]}" -recip "$P/cert.pem"
enc ossl-aed-p256-sha384kdf "$work/m1" "${gcm[@]}" -recip "$P/cert.pem" -keyopt ecdh_kdf_md:sha384
enc ossl-aed-p256-keyid "$work/m1" "${gcm[@]}" -keyid -recip "$work/p256-ski.pem" -keyopt ecdh_kdf_md:sha256
enc ossl-aed-rsa-pkcs1 "$work/m1" "${gcm[@]}" -recip "$R/cert.pem"
enc ossl-aed-rsa-oaep-sha256 "$work/m2" "${gcm[@]}" -recip "$R/cert.pem" \
    -keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256 -keyopt rsa_mgf1_md:sha256
enc ossl-aed-rsa-oaep-sha1 "$work/m1" "${gcm[@]}" -recip "$R/cert.pem" -keyopt rsa_padding_mode:oaep
enc ossl-aed-rsa-oaep-label "$work/m1" "${gcm[@]}" -recip "$R/cert.pem" \
    -keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256 -keyopt rsa_oaep_label:6c6162656c
enc ossl-aed-three-recipients "$work/m2" "${gcm[@]}" -recip "$O/cert.pem" -keyopt ecdh_kdf_md:sha256 \
    -recip "$work/bob/cert.pem" -recip "$R/cert.pem" -recip "$P/cert.pem" -keyopt ecdh_kdf_md:sha256
enc ossl-aed-not-for-us "$work/m1" "${gcm[@]}" -recip "$O/cert.pem" -keyopt ecdh_kdf_md:sha256
enc ossl-aed-aes128gcm "$work/m1" -aes-128-gcm -recip "$P/cert.pem" -keyopt ecdh_kdf_md:sha256
enc ossl-aed-p256-stream-ber "$work/m1" "${gcm[@]}" -stream -recip "$P/cert.pem" -keyopt ecdh_kdf_md:sha256
enc ossl-env-cbc-pwri "$work/m1" -aes-256-cbc -pwri_password hunter2
enc ossl-aed-kek "$work/m1" "${gcm[@]}" -secretkey 000102030405060708090a0b0c0d0e0f -secretkeyid 0a0b
enc ossl-env-cbc-p256 "$work/m1" -aes-256-cbc -recip "$P/cert.pem" -keyopt ecdh_kdf_md:sha256
enc ossl-env-cbc-rsa "$work/m2" -aes-256-cbc -recip "$R/cert.pem"
enc ossl-env-cbc-rsa-oaep "$work/m1" -aes-256-cbc -recip "$R/cert.pem" -keyopt rsa_padding_mode:oaep
openssl cms -EncryptedData_encrypt -binary -in "$work/m1" -aes-256-cbc -secretkey \
    000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f -outform DER -out "$open_dir/ossl-encrypteddata"
openssl cms -data_create -binary -in "$work/m1" -outform DER -out "$open_dir/ossl-data"
openssl cms -digest_create -binary -in "$work/m1" -outform DER -out "$open_dir/ossl-digested"

# --- open: OpenSSL SignedData (detached over "content", unless noted) -------
c=$work/content
sgn ossl-sig-p256 "$c" -signer "$P/cert.pem" -inkey "$P/key.pem" -md sha256
sgn ossl-sig-rsa "$c" -signer "$R/cert.pem" -inkey "$R/key.pem" -md sha256
sgn ossl-sig-rsa-pss "$c" -signer "$R/cert.pem" -inkey "$R/key.pem" -md sha256 -keyopt rsa_padding_mode:pss # saltLength max: does not verify today
sgn ossl-sig-rsa-pss-salt32 "$c" -signer "$R/cert.pem" -inkey "$R/key.pem" -md sha256 -keyopt rsa_padding_mode:pss \
    -keyopt rsa_pss_saltlen:32
sgn ossl-sig-p256-noattr "$c" -signer "$P/cert.pem" -inkey "$P/key.pem" -md sha256 -noattr
sgn ossl-sig-rsa-noattr "$c" -signer "$R/cert.pem" -inkey "$R/key.pem" -md sha256 -noattr
sgn ossl-sig-p256-nosmimecap "$c" -signer "$P/cert.pem" -inkey "$P/key.pem" -md sha256 -nosmimecap
sgn ossl-sig-p256-keyid "$c" -signer "$work/p256-ski.pem" -inkey "$P/key.pem" -md sha256 -keyid
sgn ossl-sig-p256-sha1 "$c" -signer "$P/cert.pem" -inkey "$P/key.pem" -md sha1
sgn ossl-sig-p256-nocerts "$c" -signer "$P/cert.pem" -inkey "$P/key.pem" -md sha256 -nocerts
sgn ossl-sig-p256-nodetach "$c" -signer "$P/cert.pem" -inkey "$P/key.pem" -md sha256 -nodetach
sgn ossl-sig-two-signers "$c" -signer "$P/cert.pem" -inkey "$P/key.pem" -signer "$R/cert.pem" -inkey "$R/key.pem" -md sha256
sgn ossl-sig-certfile "$c" -signer "$P/cert.pem" -inkey "$P/key.pem" -md sha256 -certfile "$work/bob/cert.pem"
sgn ossl-sig-other-content "$work/other-content" -signer "$R/cert.pem" -inkey "$R/key.pem" -md sha256
sgn ossl-sig-stream-ber "$c" -signer "$P/cert.pem" -inkey "$P/key.pem" -md sha256 -stream
sgn ossl-sig-other-signer "$c" -signer "$O/cert.pem" -inkey "$O/key.pem" -md sha256

# --- open: the project's CLI ---------------------------------------------
"$bin" seal --to "$P/cert.pem" -o "$open_dir/cli-seal-p256" "$work/m1"
"$bin" seal --to "$R/cert.pem" -o "$open_dir/cli-seal-rsa" "$work/m2"
"$bin" seal --to "$P/cert.pem" -o "$open_dir/cli-seal-p256-empty" "$work/empty"
"$bin" seal --to "$R/cert.pem" -o "$open_dir/cli-seal-rsa-big" "$work/big"
"$bin" seal --to "$O/cert.pem" -o "$open_dir/cli-seal-not-for-us" "$work/m1"
"$bin" seal --to "$P/cert.pem" --sign "$R" -o "$open_dir/cli-seal-p256-signed" "$work/m2"
mv "$open_dir/cli-seal-p256-signed.sig" "$open_dir/cli-seal-p256-signed-sig"
"$bin" seal --to "$R/cert.pem" --sign "$P" -o "$open_dir/cli-seal-rsa-signed" "$work/m1"
mv "$open_dir/cli-seal-rsa-signed.sig" "$open_dir/cli-seal-rsa-signed-sig"
"$bin" sign --identity "$P" -o "$open_dir/cli-sig-p256" "$c"
"$bin" sign --identity "$R" -o "$open_dir/cli-sig-rsa" "$c"
"$bin" sign --identity "$work/bob" -o "$open_dir/cli-sig-bob-rsa" "$c"

# --- decode: LATSSIAM transcripts (PROFILE.md sections 2-5) -----------------
fp() { openssl x509 -in "$1" -outform DER | sha256sum | cut -d' ' -f1; }
armour() { # armour LABEL DER-FILE
    printf -- '-----BEGIN %s-----\r\n' "$1"; base64 -w64 <"$2" | crlf; printf -- '-----END %s-----\r\n' "$1"
}
der() { openssl x509 -in "$1" -outform DER -out "$2"; }
l() { printf '%s\r\n' "$@"; }
FP=$(fp "$P/cert.pem") FR=$(fp "$R/cert.pem") FO=$(fp "$O/cert.pem") FB=$(fp "$work/bob/cert.pem")
der "$P/cert.pem" "$work/p.der"; der "$R/cert.pem" "$work/r.der"; der "$work/bob/cert.pem" "$work/b.der"
"$bin" seal --to "$P/cert.pem" -o "$work/em1" "$work/m1"
"$bin" seal --to "$R/cert.pem" --sign "$work/bob" -o "$work/em2" "$work/m2"
"$bin" seal --to "$P/cert.pem" -o "$work/em-big" "$work/big"
# The server's CSR (for its TLS key) and the client's attestation of it.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/srv.key" \
    -subj "/CN=latssiam.example.org" -addext "subjectAltName=DNS:latssiam.example.org" \
    -outform DER -out "$work/csr.der" 2>/dev/null
openssl x509 -req -inform DER -in "$work/csr.der" -CA "$P/cert.pem" -CAkey "$P/key.pem" -days 365 \
    -copy_extensions copyall -set_serial 7 -outform DER -out "$work/att.der" 2>/dev/null
em=ENCRYPTED\ MESSAGE
d=$decode_dir
{ l "SEND $FP" "30 Recipient recognised; proceed"; armour "$em" "$work/em1"; l "31 Message accepted" QUIT; } >"$d/send"
{ l "SEND $FR" "30 Recipient recognised; proceed"; armour SIGNATURE "$work/em2.sig"; armour "$em" "$work/em2"
  l "31 Message accepted"; } >"$d/send-signed"
{ l "SEND $FR" "32 Signature required"; armour SIGNATURE "$work/em2.sig"; armour "$em" "$work/em2"
  l "52 Message refused"; } >"$d/send-signature-required"
{ l "SEND $FP" "30 Recipient recognised; proceed"; armour "$em" "$work/em1"; l "31 Message accepted"
  l "SEND $FP" "30 Recipient recognised; proceed"; armour "$em" "$work/em-big"; l "31 Message accepted" QUIT; } >"$d/send-twice"
{ l "SEND $FO" "34 Mailbox does not exist" "SEND $FB" "35 Mailbox moved latssiam.example.net" \
    "SEND $FR" "36 Mailbox full" "SEND $FR" "37 Slow down" "SEND $FP" "38 Mailbox gone" \
    "SEND $FP" "21 Certificate unauthorised" "SEND $FP" "53 Internal server error"; } >"$d/send-refusals"
{ l "SEND $FP" "20 Certificate required" QUIT; } >"$d/send-no-certificate"
{ l "ACCEPT 900" "40 Message follows"; armour SIGNATURE "$work/em2.sig"; armour "$em" "$work/em2"
  l "31 Message accepted" "ACCEPT 900" "33 No more messages available"; } >"$d/accept"
{ l "ACCEPT 0" "33 No more messages available" "ACCEPT 30" "37 Slow down" "ACCEPT 900" "34 Mailbox does not exist" \
    "ACCEPT 18446744073709551615"; } >"$d/accept-nothing"
{ l "ACCEPT 60" "40 Message follows"; armour "$em" "$work/em1"; l "32 Signature required" "ACCEPT 60" "40 Message follows"
  armour SIGNATURE "$work/em2.sig"; armour "$em" "$work/em2"; l "52 Message refused" QUIT; } >"$d/accept-refused"
{ l "MAILBOX REGISTER correct horse battery staple" "13 Attestation requested"; armour "CERTIFICATE REQUEST" "$work/csr.der"
  l "14 Attestation follows"; armour CERTIFICATE "$work/att.der"; l "10 Registration complete" QUIT; } >"$d/register"
{ l "MAILBOX REGISTER wrong" "11 Registration refused" "MAILBOX REGISTER ~!@#\$%^&*()_+{}|:\"<>?\`-=[]\\;',./ x" \
    "12 Registration pending" "MAILBOX REGISTER 123456789012345678901234567890123456789012345678901234" \
    "15 Registration not available for that domain"; } >"$d/register-refused"
{ l "MAILBOX DEREGISTER" "10 Registration complete" "SEND $FP" "38 Mailbox gone" QUIT; } >"$d/deregister"
{ l "VERIFY $FP" "14 Attestation follows"; armour CERTIFICATE "$work/att.der"; armour CERTIFICATE "$work/p.der"
  l "VERIFY $FR" "14 Attestation follows"; armour CERTIFICATE "$work/att.der"; armour CERTIFICATE "$work/r.der"; } >"$d/verify"
{ l "VERIFY $FO" "34 Mailbox does not exist" "VERIFY $FB" "35 Mailbox moved other.example" "VERIFY $FR" "38 Mailbox gone"; } >"$d/verify-errors"
{ l "50 Syntax error" "51 Sequencing error" "53 Internal server error" "54 Timeout"; } >"$d/errors"
for n in 10 11 12 13 14 15 20 21 30 31 32 33 34 35 36 37 38 39 40 50 51 52 53 54; do l "$n "; done >"$d/all-codes-empty-text"
{ l "31 $(printf 'x%.0s' $(seq 1 68))" "52 signature does not verify: signer is not the TLS client" "40 "; } >"$d/status-texts"
armour CERTIFICATE "$work/b.der" >"$d/certificate-rsa"
# Error seeds: each stops the decoder at a different rule.
{ l "SEND $FP" "30 Recipient recognised; proceed"; printf -- '-----BEGIN %s-----\r\n' "$em"
  for i in $(seq 1 401); do printf '%s\r\n' "$(printf 'A%.0s' $(seq 1 64))"; done; } >"$d/err-block-too-long"
printf 'SEND %s\nQUIT\r\n' "$FP" >"$d/err-bare-lf"
printf 'QUIT\r\nSEND %s000000\r\n' "$FP" >"$d/err-line-too-long"
{ l QUIT "-----BEGIN PGP MESSAGE-----" "AAAA" "-----END PGP MESSAGE-----"; } >"$d/err-unknown-label"
{ armour CERTIFICATE "$work/p.der" | sed '$d'; l "-----END SIGNATURE-----"; } >"$d/err-label-mismatch"
{ l "send $FP" ; } >"$d/err-lower-case-verb"
{ l "-----BEGIN SIGNATURE-----" "MAMCAQA=" "-----END SIGNATURE-----" "-----BEGIN SIGNATURE-----" "MIIBAAAA" "-----END SIGNATURE-----"; } >"$d/err-bad-der"
armour "$em" "$work/em1" >"$work/em1.arm"; head -5 "$work/em1.arm" >"$d/err-eof-in-block"
printf 'QUIT\r\n31 Message accept\xe9\r\n' >"$d/err-latin1"
printf 'QUIT\r\nACCEPT 9\x0099\r\n' >"$d/err-nul"

echo "open: $(ls "$open_dir" | wc -l) files, $(du -sb "$open_dir" | cut -f1) octets"
echo "decode: $(ls "$decode_dir" | wc -l) files, $(du -sb "$decode_dir" | cut -f1) octets"
