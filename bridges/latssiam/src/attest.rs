//! Attestations (PROFILE.md section 4, MAILBOX and VERIFY): a certificate for
//! the server's own key, issued and signed by a mailbox owner's identity.
//!
//! - [`server_csr`]: the server's request, for its TLS key, naming its host.
//! - [`attest`]: the owner signs that request with its identity.
//! - [`check`]: an attestation is issued by the owner, signed with the owner's
//!   key, and certifies the server's key (and, for the server, its host).

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{Identity, KeyKind};

/// Why an attestation was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// A certificate or request does not parse.
    #[error("attestation: {0} does not parse")]
    Malformed(&'static str),
    /// The attestation is not issued by the owner.
    #[error("attestation is not issued by the mailbox owner")]
    WrongIssuer,
    /// The attestation's signature does not verify with the owner's key.
    #[error("attestation is not signed with the owner's key")]
    BadSignature,
    /// The attestation certifies another key than the server's.
    #[error("attestation certifies another key than the server's")]
    WrongKey,
    /// The attestation does not name the server's host.
    #[error("attestation does not name the server's host")]
    WrongHost,
    /// The attestation is outside its validity period.
    #[error("attestation is expired or not yet valid")]
    NotValidNow,
    /// Signing failed.
    #[error("cannot make attestation: {0}")]
    Sign(String),
}

fn parse<'a>(der: &'a [u8], what: &'static str) -> Result<X509Certificate<'a>, AttestationError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(AttestationError::Malformed(what)),
    }
}

fn rcgen_key(identity: &Identity) -> Result<rcgen::KeyPair, AttestationError> {
    let alg = match identity.kind() {
        KeyKind::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyKind::Rsa => &rcgen::PKCS_RSA_SHA256,
    };
    let key: &PrivateKeyDer<'_> = identity.key_der();
    rcgen::KeyPair::from_der_and_sign_algo(key, alg).map_err(|e| AttestationError::Sign(e.to_string()))
}

/// The server's certificate signing request for its own key, subject and SAN
/// naming `host` (DER).
///
/// # Errors
/// [`AttestationError::Sign`] if the request cannot be made.
pub fn server_csr(server: &Identity, host: &str) -> Result<Vec<u8>, AttestationError> {
    let key = rcgen_key(server)?;
    let mut params =
        rcgen::CertificateParams::new(vec![host.to_owned()]).map_err(|e| AttestationError::Sign(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, host);
    let csr = params.serialize_request(&key).map_err(|e| AttestationError::Sign(e.to_string()))?;
    Ok(csr.der().to_vec())
}

/// The owner's attestation of a server's request (DER): a certificate for the
/// request's key and names, issued by and signed with `owner`.
///
/// # Errors
/// [`AttestationError::Malformed`] if the request does not parse or its
/// self-signature does not verify; [`AttestationError::Sign`] if signing fails.
pub fn attest(csr_der: &[u8], owner: &Identity) -> Result<Vec<u8>, AttestationError> {
    let csr = rustls_pki_types::CertificateSigningRequestDer::from(csr_der);
    let mut request = rcgen::CertificateSigningRequestParams::from_der(&csr)
        .map_err(|_| AttestationError::Malformed("certificate request"))?;
    let now = time::OffsetDateTime::now_utc();
    request.params.not_before = now - time::Duration::days(1);
    request.params.not_after = now + time::Duration::days(365 * 20);
    let key = rcgen_key(owner)?;
    let owner_cert: &CertificateDer<'_> = owner.cert_der();
    let issuer = rcgen::Issuer::from_ca_cert_der(owner_cert, key).map_err(|e| AttestationError::Sign(e.to_string()))?;
    let cert = request.signed_by(&issuer).map_err(|e| AttestationError::Sign(e.to_string()))?;
    Ok(cert.der().to_vec())
}

/// Verifies `tbs` signed with `signature` under `algorithm_oid` by the
/// subject public key of `signer`.
fn signed_by(signer: &X509Certificate<'_>, algorithm_oid: &str, tbs: &[u8], signature: &[u8]) -> bool {
    use aws_lc_rs::signature as sig;
    let alg: &dyn sig::VerificationAlgorithm = match algorithm_oid {
        "1.2.840.10045.4.3.2" => &sig::ECDSA_P256_SHA256_ASN1,
        "1.2.840.10045.4.3.3" => &sig::ECDSA_P256_SHA384_ASN1,
        "1.2.840.113549.1.1.11" => &sig::RSA_PKCS1_2048_8192_SHA256,
        "1.2.840.113549.1.1.12" => &sig::RSA_PKCS1_2048_8192_SHA384,
        "1.2.840.113549.1.1.13" => &sig::RSA_PKCS1_2048_8192_SHA512,
        "1.2.840.113549.1.1.10" => &sig::RSA_PSS_2048_8192_SHA256,
        _ => return false,
    };
    let key = &signer.public_key().subject_public_key.data;
    sig::UnparsedPublicKey::new(alg, key.as_ref()).verify(tbs, signature).is_ok()
}

/// Checks that `attestation` is issued by and signed with `owner`'s
/// certificate, certifies the key of `server_cert`, is valid now, and (when
/// `host` is given) names `host` in its SAN.
///
/// # Errors
/// The [`AttestationError`] naming the first check that fails.
pub fn check(
    attestation: &[u8],
    owner_cert: &[u8],
    server_cert: &[u8],
    host: Option<&str>,
) -> Result<(), AttestationError> {
    let att = parse(attestation, "attestation")?;
    let owner = parse(owner_cert, "owner certificate")?;
    let server = parse(server_cert, "server certificate")?;
    if att.issuer().to_string() != owner.subject().to_string() {
        return Err(AttestationError::WrongIssuer);
    }
    let tbs = att.tbs_certificate.as_ref();
    let alg = att.signature_algorithm.algorithm.to_id_string();
    if !signed_by(&owner, &alg, tbs, &att.signature_value.data) {
        return Err(AttestationError::BadSignature);
    }
    if att.public_key().raw != server.public_key().raw {
        return Err(AttestationError::WrongKey);
    }
    if !att.validity().is_valid() {
        return Err(AttestationError::NotValidNow);
    }
    if let Some(host) = host {
        let names = att.subject_alternative_name().ok().flatten();
        let named = names.is_some_and(|san| {
            san.value.general_names.iter().any(|n| matches!(n, GeneralName::DNSName(d) if d.eq_ignore_ascii_case(host)))
        });
        if !named {
            return Err(AttestationError::WrongHost);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Address;

    fn id(a: &str, rsa: bool) -> Identity {
        Identity::generate(&a.parse::<Address>().unwrap(), None, rsa).unwrap()
    }

    #[test]
    fn an_owner_attests_a_server_and_forgeries_fail() {
        let server = id("server@mail.example", false);
        for rsa in [false, true] {
            let owner = id("alice@mail.example", rsa);
            let csr = server_csr(&server, "mail.example").unwrap();
            let att = attest(&csr, &owner).unwrap();
            check(&att, owner.cert_der(), server.cert_der(), Some("mail.example")).unwrap();
            assert_eq!(
                check(&att, owner.cert_der(), server.cert_der(), Some("other.example")),
                Err(AttestationError::WrongHost)
            );
            let other_server = id("server@mail.example", false);
            assert_eq!(check(&att, owner.cert_der(), other_server.cert_der(), None), Err(AttestationError::WrongKey));
            // Mallory, with the same subject as Alice, cannot stand in for her.
            let mallory = id("alice@mail.example", false);
            let forged = attest(&csr, &mallory).unwrap();
            assert_eq!(check(&forged, owner.cert_der(), server.cert_der(), None), Err(AttestationError::BadSignature));
            let bob = id("bob@mail.example", false);
            let by_bob = attest(&csr, &bob).unwrap();
            assert_eq!(check(&by_bob, owner.cert_der(), server.cert_der(), None), Err(AttestationError::WrongIssuer));
        }
        assert!(matches!(attest(b"\x30\x00", &server), Err(AttestationError::Malformed(_))));
    }
}
