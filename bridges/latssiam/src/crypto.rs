//! CMS for LATSSIAM messages (PROFILE.md section 7): [`seal`] and [`open`]
//! an `ENCRYPTED MESSAGE`, [`sign`] and [`verify`] a detached `SIGNATURE`.
//!
//! The `cms` crate supplies the RFC 5652 types; what it lacks is declared here
//! with `der` derives (RFC 5083 `AuthEnvelopedData`, RFC 5753
//! `ECC-CMS-SharedInfo`, GCM and OAEP parameters) and the cryptography is
//! aws-lc-rs. Output matches `openssl cms` byte layout (checked by the
//! OpenSSL interop tests):
//! - P-256 recipient: AuthEnvelopedData, KeyAgreeRecipientInfo, ephemeral
//!   originator key with absent curve parameters, dhSinglePass-stdDH-sha256kdf
//!   with id-aes256-wrap, AES-256-GCM with a 12-octet nonce and 16-octet tag.
//!   Opening also takes the SHA-1 KDF OpenSSL writes by default.
//! - RSA recipient: KeyTransRecipientInfo with RSAES-OAEP (SHA-256, MGF1
//!   SHA-256). Opening also takes OAEP with SHA-1 and PKCS#1 v1.5.
//! - Signature: SignedData, detached, SHA-256, signed attributes
//!   (contentType, signingTime, messageDigest), the signer's certificate
//!   included; ECDSA with SHA-256 or RSA PKCS#1 v1.5 (PSS accepted when verifying).

use std::time::SystemTime;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::agreement::{self, UnparsedPublicKey, ECDH_P256};
use aws_lc_rs::digest::{self, SHA1_FOR_LEGACY_USE_ONLY, SHA256};
use aws_lc_rs::key_wrap::{KeyEncryptionKey, KeyWrap, AES_256};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{
    OaepAlgorithm, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, Pkcs1PrivateDecryptingKey, PublicEncryptingKey,
    OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature;
use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::enveloped_data::{
    EncryptedContentInfo, KekRecipientInfo, KeyTransRecipientInfo, OriginatorIdentifierOrKey, OriginatorInfo,
    OriginatorPublicKey, OtherRecipientInfo, PasswordRecipientInfo, RecipientIdentifier, RecipientKeyIdentifier,
};
use cms::signed_data::{EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos};
use const_oid::ObjectIdentifier;
use der::asn1::{AnyRef, BitString, Null, OctetString, OctetStringRef, SetOfVec, UtcTime};
use der::{Any, Decode, Encode, Sequence, Tagged};
use spki::AlgorithmIdentifierOwned;
use x509_cert::attr::{Attribute, Attributes};
use x509_cert::Certificate;

use crate::identity::{Identity, Keys};

mod oid {
    use const_oid::ObjectIdentifier as O;
    pub const DATA: O = O::new_unwrap("1.2.840.113549.1.7.1");
    pub const SIGNED_DATA: O = O::new_unwrap("1.2.840.113549.1.7.2");
    pub const AUTH_ENVELOPED_DATA: O = O::new_unwrap("1.2.840.113549.1.9.16.1.23");
    pub const EC_PUBLIC_KEY: O = O::new_unwrap("1.2.840.10045.2.1");
    pub const PRIME256V1: O = O::new_unwrap("1.2.840.10045.3.1.7");
    pub const RSA_ENCRYPTION: O = O::new_unwrap("1.2.840.113549.1.1.1");
    pub const RSAES_OAEP: O = O::new_unwrap("1.2.840.113549.1.1.7");
    pub const MGF1: O = O::new_unwrap("1.2.840.113549.1.1.8");
    pub const RSASSA_PSS: O = O::new_unwrap("1.2.840.113549.1.1.10");
    pub const SHA256_WITH_RSA: O = O::new_unwrap("1.2.840.113549.1.1.11");
    pub const SHA1: O = O::new_unwrap("1.3.14.3.2.26");
    pub const SHA256: O = O::new_unwrap("2.16.840.1.101.3.4.2.1");
    pub const ECDSA_WITH_SHA256: O = O::new_unwrap("1.2.840.10045.4.3.2");
    pub const ECDH_SHA256_KDF: O = O::new_unwrap("1.3.132.1.11.1");
    pub const ECDH_SHA1_KDF: O = O::new_unwrap("1.3.133.16.840.63.0.2");
    pub const AES256_WRAP: O = O::new_unwrap("2.16.840.1.101.3.4.1.45");
    pub const AES256_GCM: O = O::new_unwrap("2.16.840.1.101.3.4.1.46");
    pub const CONTENT_TYPE: O = O::new_unwrap("1.2.840.113549.1.9.3");
    pub const MESSAGE_DIGEST: O = O::new_unwrap("1.2.840.113549.1.9.4");
    pub const SIGNING_TIME: O = O::new_unwrap("1.2.840.113549.1.9.5");
    pub const SUBJECT_KEY_ID: O = O::new_unwrap("2.5.29.14");
}

/// Why a CMS operation failed. Every malformed input ends here, never in a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The DER does not parse as the expected CMS structure.
    #[error("malformed CMS: {0}")]
    Malformed(String),
    /// Well-formed, but uses an algorithm or form this profile does not take.
    #[error("unsupported CMS: {0}")]
    Unsupported(String),
    /// No recipient info in the message names this identity.
    #[error("the message is not encrypted to this identity")]
    NotForRecipient,
    /// Key unwrap or AEAD authentication failed: tampered, or the wrong key.
    #[error("decryption failed: the message was altered or is not for this key")]
    Decrypt,
    /// The signature or its message digest does not match the content.
    #[error("the signature does not verify over this message")]
    BadSignature,
    /// The signer's certificate is not in the SignedData.
    #[error("the signer's certificate is not included in the signature")]
    SignerNotFound,
    /// The certificate is not a usable P-256 or RSA recipient or signer.
    #[error("unusable certificate: {0}")]
    BadCertificate(String),
    /// The system random generator or a primitive failed.
    #[error("cryptographic operation failed: {0}")]
    Internal(&'static str),
}

fn malformed(e: der::Error) -> CryptoError {
    CryptoError::Malformed(e.to_string())
}

/// RFC 5652 RecipientInfo. Declared here because `cms` 0.2.3 tags
/// `rKeyId [0] IMPLICIT RecipientKeyIdentifier` as primitive, so it cannot read
/// what `openssl cms -encrypt -keyid` writes; the other variants are its types.
#[derive(Clone, Debug, Eq, PartialEq, der::Choice)]
#[allow(clippy::large_enum_variant)]
enum RecipientInfo {
    Ktri(KeyTransRecipientInfo),
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", constructed = "true")]
    Kari(KeyAgreeRecipientInfo),
    #[asn1(context_specific = "2", tag_mode = "IMPLICIT", constructed = "true")]
    Kekri(KekRecipientInfo),
    #[asn1(context_specific = "3", tag_mode = "IMPLICIT", constructed = "true")]
    Pwri(PasswordRecipientInfo),
    #[asn1(context_specific = "4", tag_mode = "IMPLICIT", constructed = "true")]
    Ori(OtherRecipientInfo),
}

impl der::ValueOrd for RecipientInfo {
    fn value_cmp(&self, other: &Self) -> der::Result<std::cmp::Ordering> {
        use der::DerOrd;
        self.to_der()?.der_cmp(&other.to_der()?)
    }
}

/// RFC 5652 KeyAgreeRecipientInfo.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct KeyAgreeRecipientInfo {
    version: CmsVersion,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    originator: OriginatorIdentifierOrKey,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    ukm: Option<OctetString>,
    key_enc_alg: AlgorithmIdentifierOwned,
    recipient_enc_keys: Vec<RecipientEncryptedKey>,
}

#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct RecipientEncryptedKey {
    rid: KeyAgreeRecipientIdentifier,
    enc_key: OctetString,
}

#[derive(Clone, Debug, Eq, PartialEq, der::Choice)]
enum KeyAgreeRecipientIdentifier {
    IssuerAndSerialNumber(IssuerAndSerialNumber),
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", constructed = "true")]
    RKeyId(RecipientKeyIdentifier),
}

/// RFC 5083 AuthEnvelopedData.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct AuthEnvelopedData {
    version: CmsVersion,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", constructed = "true", optional = "true")]
    originator_info: Option<OriginatorInfo>,
    recip_infos: SetOfVec<RecipientInfo>,
    auth_encrypted_content: EncryptedContentInfo,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", constructed = "true", optional = "true")]
    auth_attrs: Option<Attributes>,
    mac: OctetString,
    #[asn1(context_specific = "2", tag_mode = "IMPLICIT", constructed = "true", optional = "true")]
    unauth_attrs: Option<Attributes>,
}

/// RFC 5652 ContentInfo with its content borrowed: reading a message or a
/// signature this way copies none of it (`cms::ContentInfo` owns a copy).
#[derive(Sequence)]
struct ContentInfoRef<'a> {
    content_type: ObjectIdentifier,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    content: AnyRef<'a>,
}

/// [`AuthEnvelopedData`] as [`check_message_structure`] reads it: the same
/// grammar, field for field, with the ciphertext and the tag borrowed, so
/// that checking what a peer sent copies none of its content.
#[derive(Sequence)]
struct AuthEnvelopedDataShape<'a> {
    version: CmsVersion,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", constructed = "true", optional = "true")]
    originator_info: Option<OriginatorInfo>,
    recip_infos: SetOfVec<RecipientInfo>,
    auth_encrypted_content: EncryptedContentInfoShape<'a>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", constructed = "true", optional = "true")]
    auth_attrs: Option<Attributes>,
    mac: OctetStringRef<'a>,
    #[asn1(context_specific = "2", tag_mode = "IMPLICIT", constructed = "true", optional = "true")]
    unauth_attrs: Option<Attributes>,
}

/// `cms::EncryptedContentInfo`'s grammar with the ciphertext borrowed.
#[derive(Sequence)]
struct EncryptedContentInfoShape<'a> {
    content_type: ObjectIdentifier,
    content_enc_alg: AlgorithmIdentifierOwned,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    encrypted_content: Option<OctetStringRef<'a>>,
}

/// RFC 5084 GCMParameters.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct GcmParameters {
    nonce: OctetString,
    #[asn1(default = "default_icv_len")]
    icv_len: u8,
}

fn default_icv_len() -> u8 {
    12
}

/// RFC 5753 ECC-CMS-SharedInfo.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct EccCmsSharedInfo {
    key_info: AlgorithmIdentifierOwned,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    entity_u_info: Option<OctetString>,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT")]
    supp_pub_info: OctetString,
}

/// RFC 4055 RSAES-OAEP-params (pSourceAlgorithm must be absent: empty label).
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct OaepParams {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    hash: Option<AlgorithmIdentifierOwned>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    mask_gen: Option<AlgorithmIdentifierOwned>,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT", optional = "true")]
    p_source: Option<AlgorithmIdentifierOwned>,
}

fn alg(oid: ObjectIdentifier) -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned { oid, parameters: None }
}

fn alg_with<T: der::EncodeValue + Tagged>(
    oid: ObjectIdentifier,
    params: &T,
) -> Result<AlgorithmIdentifierOwned, CryptoError> {
    Ok(AlgorithmIdentifierOwned { oid, parameters: Some(Any::encode_from(params).map_err(malformed)?) })
}

fn random<const N: usize>(rng: &SystemRandom) -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    rng.fill(&mut out).map_err(|_| CryptoError::Internal("random generator"))?;
    Ok(out)
}

/// A parsed certificate: what sealing to it or naming it needs. Borrowed
/// where it was decoded as part of something else (a signature's
/// certificates), so that checking a signature copies none of them.
struct Cert<'a> {
    x509: std::borrow::Cow<'a, Certificate>,
}

impl Cert<'_> {
    fn parse(der: &[u8]) -> Result<Self, CryptoError> {
        let x509 = Certificate::from_der(der).map_err(|e| CryptoError::BadCertificate(e.to_string()))?;
        Ok(Self { x509: std::borrow::Cow::Owned(x509) })
    }

    fn of(x509: &Certificate) -> Cert<'_> {
        Cert { x509: std::borrow::Cow::Borrowed(x509) }
    }

    fn issuer_and_serial(&self) -> IssuerAndSerialNumber {
        IssuerAndSerialNumber {
            issuer: self.x509.tbs_certificate.issuer.clone(),
            serial_number: self.x509.tbs_certificate.serial_number.clone(),
        }
    }

    fn subject_key_id(&self) -> Option<OctetString> {
        let ext = self.x509.tbs_certificate.extensions.as_ref()?.iter().find(|e| e.extn_id == oid::SUBJECT_KEY_ID)?;
        OctetString::from_der(ext.extn_value.as_bytes()).ok()
    }

    fn spki(&self) -> &spki::SubjectPublicKeyInfoOwned {
        &self.x509.tbs_certificate.subject_public_key_info
    }

    fn public_key_bits(&self) -> Result<&[u8], CryptoError> {
        self.spki().subject_public_key.as_bytes().ok_or_else(|| CryptoError::BadCertificate("public key".into()))
    }

    fn kind(&self) -> Result<KeyType, CryptoError> {
        let alg = &self.spki().algorithm;
        if alg.oid == oid::RSA_ENCRYPTION {
            return Ok(KeyType::Rsa);
        }
        let curve = alg.parameters.as_ref().and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        if alg.oid == oid::EC_PUBLIC_KEY && curve == Some(oid::PRIME256V1) {
            return Ok(KeyType::P256);
        }
        Err(CryptoError::BadCertificate("the key is neither P-256 nor RSA".into()))
    }

    fn names(&self, rid_iasn: Option<&IssuerAndSerialNumber>, rid_ski: Option<&OctetString>) -> bool {
        match (rid_iasn, rid_ski) {
            (Some(i), _) => {
                let tbs = &self.x509.tbs_certificate;
                i.issuer == tbs.issuer && i.serial_number == tbs.serial_number
            }
            (_, Some(k)) => self.subject_key_id().as_ref() == Some(k),
            _ => false,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyType {
    P256,
    Rsa,
}

/// X9.63 KDF (SEC 1 section 3.6.1) producing a 32-octet key.
fn x963_kdf(md: &'static digest::Algorithm, z: &[u8], shared_info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut filled = 0;
    let mut counter: u32 = 1;
    while filled < out.len() {
        let mut ctx = digest::Context::new(md);
        ctx.update(z);
        ctx.update(&counter.to_be_bytes());
        ctx.update(shared_info);
        let block = ctx.finish();
        let n = (out.len() - filled).min(block.as_ref().len());
        out[filled..filled + n].copy_from_slice(&block.as_ref()[..n]);
        filled += n;
        counter += 1;
    }
    out
}

fn shared_info(wrap_alg: &AlgorithmIdentifierOwned, ukm: Option<&OctetString>) -> Result<Vec<u8>, CryptoError> {
    EccCmsSharedInfo {
        key_info: wrap_alg.clone(),
        entity_u_info: ukm.cloned(),
        supp_pub_info: OctetString::new(256u32.to_be_bytes().to_vec()).map_err(malformed)?,
    }
    .to_der()
    .map_err(malformed)
}

/// Encrypts `plaintext` to the certificate `recipient` (DER), as an
/// AuthEnvelopedData ContentInfo (DER).
///
/// # Errors
/// [`CryptoError::BadCertificate`] if the certificate is not a P-256 or RSA one.
pub fn seal(plaintext: &[u8], recipient: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let rng = SystemRandom::new();
    let parsed = parse_certificate(recipient)?;
    let cert = Cert::of(&parsed.cert);
    let cek: [u8; 32] = random(&rng)?;
    let recipient_info = match cert.kind()? {
        KeyType::P256 => kari_for(&cert, &cek)?,
        KeyType::Rsa => ktri_for(&cert, &cek)?,
    };
    let nonce: [u8; 12] = random(&rng)?;
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &cek).map_err(|_| CryptoError::Internal("AES key"))?);
    let mut ciphertext = plaintext.to_vec();
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut ciphertext)
        .map_err(|_| CryptoError::Internal("AES-GCM seal"))?;
    let gcm = GcmParameters { nonce: OctetString::new(nonce.to_vec()).map_err(malformed)?, icv_len: 16 };
    let aed = AuthEnvelopedData {
        version: CmsVersion::V0,
        originator_info: None,
        recip_infos: SetOfVec::try_from(vec![recipient_info]).map_err(malformed)?,
        auth_encrypted_content: EncryptedContentInfo {
            content_type: oid::DATA,
            content_enc_alg: alg_with(oid::AES256_GCM, &gcm)?,
            encrypted_content: Some(OctetString::new(ciphertext).map_err(malformed)?),
        },
        auth_attrs: None,
        mac: OctetString::new(tag.as_ref().to_vec()).map_err(malformed)?,
        unauth_attrs: None,
    };
    ContentInfo { content_type: oid::AUTH_ENVELOPED_DATA, content: Any::encode_from(&aed).map_err(malformed)? }
        .to_der()
        .map_err(malformed)
}

fn kari_for(cert: &Cert<'_>, cek: &[u8; 32]) -> Result<RecipientInfo, CryptoError> {
    let ephemeral = agreement::PrivateKey::generate(&ECDH_P256).map_err(|_| CryptoError::Internal("ephemeral key"))?;
    let ephemeral_public = ephemeral.compute_public_key().map_err(|_| CryptoError::Internal("ephemeral public key"))?;
    let wrap_alg = alg(oid::AES256_WRAP);
    let info = shared_info(&wrap_alg, None)?;
    let peer = UnparsedPublicKey::new(&ECDH_P256, cert.public_key_bits()?);
    let kek = agreement::agree(&ephemeral, peer, CryptoError::BadCertificate("P-256 point".into()), |z| {
        Ok(x963_kdf(&SHA256, z, &info))
    })?;
    let mut wrapped = [0u8; 40];
    KeyEncryptionKey::new(&AES_256, &kek)
        .and_then(|k| k.wrap(cek, &mut wrapped).map(|_| ()))
        .map_err(|_| CryptoError::Internal("AES key wrap"))?;
    Ok(RecipientInfo::Kari(KeyAgreeRecipientInfo {
        version: CmsVersion::V3,
        originator: OriginatorIdentifierOrKey::OriginatorKey(OriginatorPublicKey {
            algorithm: alg(oid::EC_PUBLIC_KEY),
            public_key: BitString::from_bytes(ephemeral_public.as_ref()).map_err(malformed)?,
        }),
        ukm: None,
        key_enc_alg: alg_with(oid::ECDH_SHA256_KDF, &wrap_alg)?,
        recipient_enc_keys: vec![RecipientEncryptedKey {
            rid: KeyAgreeRecipientIdentifier::IssuerAndSerialNumber(cert.issuer_and_serial()),
            enc_key: OctetString::new(wrapped.to_vec()).map_err(malformed)?,
        }],
    }))
}

fn ktri_for(cert: &Cert<'_>, cek: &[u8; 32]) -> Result<RecipientInfo, CryptoError> {
    let spki_der = cert.spki().to_der().map_err(malformed)?;
    let public =
        PublicEncryptingKey::from_der(&spki_der).map_err(|_| CryptoError::BadCertificate("RSA public key".into()))?;
    let public =
        OaepPublicEncryptingKey::new(public).map_err(|_| CryptoError::BadCertificate("RSA public key".into()))?;
    let mut out = vec![0u8; public.ciphertext_size()];
    let n = public
        .encrypt(&OAEP_SHA256_MGF1SHA256, cek, &mut out, None)
        .map_err(|_| CryptoError::Internal("RSA-OAEP"))?
        .len();
    out.truncate(n);
    let params = OaepParams {
        hash: Some(alg(oid::SHA256)),
        mask_gen: Some(alg_with(oid::MGF1, &alg(oid::SHA256))?),
        p_source: None,
    };
    Ok(RecipientInfo::Ktri(KeyTransRecipientInfo {
        version: CmsVersion::V0,
        rid: RecipientIdentifier::IssuerAndSerialNumber(cert.issuer_and_serial()),
        key_enc_alg: alg_with(oid::RSAES_OAEP, &params)?,
        enc_key: OctetString::new(out).map_err(malformed)?,
    }))
}

/// Checks that `der` is a ContentInfo holding an AuthEnvelopedData, without
/// decrypting it: what a server can know of an `ENCRYPTED MESSAGE`.
///
/// # Errors
/// [`CryptoError::Malformed`] or [`CryptoError::Unsupported`].
pub fn check_message_structure(der: &[u8]) -> Result<(), CryptoError> {
    let ci = ContentInfoRef::from_der(der).map_err(malformed)?;
    if ci.content_type != oid::AUTH_ENVELOPED_DATA {
        return Err(CryptoError::Unsupported(format!("content type {} (want AuthEnvelopedData)", ci.content_type)));
    }
    ci.content.decode_as::<AuthEnvelopedDataShape<'_>>().map_err(malformed)?;
    Ok(())
}

/// Decrypts an AuthEnvelopedData ContentInfo (DER) addressed to `identity`.
///
/// # Errors
/// [`CryptoError::Malformed`] for anything that does not parse,
/// [`CryptoError::Unsupported`] for other algorithms,
/// [`CryptoError::NotForRecipient`] when no recipient info names the identity,
/// [`CryptoError::Decrypt`] when the key or the content fails authentication.
pub fn open(der: &[u8], identity: &Identity) -> Result<Vec<u8>, CryptoError> {
    let ci = ContentInfoRef::from_der(der).map_err(malformed)?;
    if ci.content_type != oid::AUTH_ENVELOPED_DATA {
        return Err(CryptoError::Unsupported(format!("content type {} (want AuthEnvelopedData)", ci.content_type)));
    }
    let aed: AuthEnvelopedData = ci.content.decode_as().map_err(malformed)?;
    let me = Cert::parse(identity.cert_der())?;
    let mut cek = None;
    for ri in aed.recip_infos.iter() {
        let found = match (ri, identity.keys()) {
            (RecipientInfo::Kari(kari), Keys::P256 { agree, .. }) => kari_unwrap(kari, &me, agree)?,
            (RecipientInfo::Ktri(ktri), Keys::Rsa { oaep, pkcs1, .. }) => ktri_unwrap(ktri, &me, oaep, pkcs1)?,
            _ => None,
        };
        if found.is_some() {
            cek = found;
            break;
        }
    }
    let cek = cek.ok_or(CryptoError::NotForRecipient)?;

    let eci = &aed.auth_encrypted_content;
    if eci.content_enc_alg.oid != oid::AES256_GCM {
        return Err(CryptoError::Unsupported(format!("content encryption {}", eci.content_enc_alg.oid)));
    }
    let gcm: GcmParameters = eci
        .content_enc_alg
        .parameters
        .as_ref()
        .ok_or_else(|| CryptoError::Malformed("GCM parameters missing".into()))?
        .decode_as()
        .map_err(malformed)?;
    let nonce = Nonce::try_assume_unique_for_key(gcm.nonce.as_bytes())
        .map_err(|_| CryptoError::Unsupported("GCM nonce not 12 octets".into()))?;
    if gcm.icv_len != 16 || aed.mac.as_bytes().len() != 16 {
        return Err(CryptoError::Unsupported("GCM tag not 16 octets".into()));
    }
    let aad = match &aed.auth_attrs {
        // RFC 5083 section 2.1: the AAD is the DER of authAttrs with a SET OF tag.
        Some(attrs) => attrs.to_der().map_err(malformed)?,
        None => Vec::new(),
    };
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &cek).map_err(|_| CryptoError::Decrypt)?);
    let ciphertext = eci.encrypted_content.as_ref().map(OctetString::as_bytes).unwrap_or_default();
    let mut buf = Vec::with_capacity(ciphertext.len() + 16);
    buf.extend_from_slice(ciphertext);
    buf.extend_from_slice(aed.mac.as_bytes());
    let plain_len = key.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| CryptoError::Decrypt)?.len();
    buf.truncate(plain_len);
    Ok(buf)
}

fn kari_unwrap(
    kari: &KeyAgreeRecipientInfo,
    me: &Cert<'_>,
    key: &agreement::PrivateKey,
) -> Result<Option<[u8; 32]>, CryptoError> {
    let Some(rek) = kari.recipient_enc_keys.iter().find(|rek| match &rek.rid {
        KeyAgreeRecipientIdentifier::IssuerAndSerialNumber(i) => me.names(Some(i), None),
        KeyAgreeRecipientIdentifier::RKeyId(k) => me.names(None, Some(&k.subject_key_identifier.0)),
    }) else {
        return Ok(None);
    };
    let OriginatorIdentifierOrKey::OriginatorKey(originator) = &kari.originator else {
        return Err(CryptoError::Unsupported("static originator keys".into()));
    };
    if originator.algorithm.oid != oid::EC_PUBLIC_KEY {
        return Err(CryptoError::Unsupported(format!("originator key {}", originator.algorithm.oid)));
    }
    let kdf_md = match kari.key_enc_alg.oid {
        o if o == oid::ECDH_SHA256_KDF => &SHA256,
        o if o == oid::ECDH_SHA1_KDF => &SHA1_FOR_LEGACY_USE_ONLY,
        o => return Err(CryptoError::Unsupported(format!("key agreement {o}"))),
    };
    let wrap_alg: AlgorithmIdentifierOwned = kari
        .key_enc_alg
        .parameters
        .as_ref()
        .ok_or_else(|| CryptoError::Malformed("key wrap algorithm missing".into()))?
        .decode_as()
        .map_err(malformed)?;
    if wrap_alg.oid != oid::AES256_WRAP {
        return Err(CryptoError::Unsupported(format!("key wrap {}", wrap_alg.oid)));
    }
    let info = shared_info(&wrap_alg, kari.ukm.as_ref())?;
    let point =
        originator.public_key.as_bytes().ok_or_else(|| CryptoError::Malformed("originator key bit string".into()))?;
    let kek = agreement::agree(key, UnparsedPublicKey::new(&ECDH_P256, point), CryptoError::Decrypt, |z| {
        Ok(x963_kdf(kdf_md, z, &info))
    })?;
    let wrapped = rek.enc_key.as_bytes();
    if wrapped.len() != 40 {
        return Err(CryptoError::Decrypt);
    }
    let mut cek = [0u8; 32];
    KeyEncryptionKey::new(&AES_256, &kek)
        .and_then(|k| k.unwrap(wrapped, &mut cek).map(|_| ()))
        .map_err(|_| CryptoError::Decrypt)?;
    Ok(Some(cek))
}

fn ktri_unwrap(
    ktri: &KeyTransRecipientInfo,
    me: &Cert<'_>,
    oaep: &OaepPrivateDecryptingKey,
    pkcs1: &Pkcs1PrivateDecryptingKey,
) -> Result<Option<[u8; 32]>, CryptoError> {
    let named = match &ktri.rid {
        RecipientIdentifier::IssuerAndSerialNumber(i) => me.names(Some(i), None),
        RecipientIdentifier::SubjectKeyIdentifier(k) => me.names(None, Some(&k.0)),
    };
    if !named {
        return Ok(None);
    }
    let mut out = vec![0u8; oaep.key_size_bytes()];
    let cek = match ktri.key_enc_alg.oid {
        o if o == oid::RSA_ENCRYPTION => pkcs1.decrypt(ktri.enc_key.as_bytes(), &mut out).map(|p| p.to_vec()),
        o if o == oid::RSAES_OAEP => {
            let alg = oaep_algorithm(ktri.key_enc_alg.parameters.as_ref())?;
            oaep.decrypt(alg, ktri.enc_key.as_bytes(), &mut out, None).map(|p| p.to_vec())
        }
        o => return Err(CryptoError::Unsupported(format!("key transport {o}"))),
    }
    .map_err(|_| CryptoError::Decrypt)?;
    <[u8; 32]>::try_from(cek.as_slice()).map(Some).map_err(|_| CryptoError::Decrypt)
}

fn oaep_algorithm(params: Option<&Any>) -> Result<&'static OaepAlgorithm, CryptoError> {
    let params: OaepParams = match params {
        Some(p) if p.tag() != der::Tag::Null => p.decode_as().map_err(malformed)?,
        _ => OaepParams { hash: None, mask_gen: None, p_source: None },
    };
    if params.p_source.is_some() {
        return Err(CryptoError::Unsupported("OAEP with a label".into()));
    }
    let hash = params.hash.map_or(oid::SHA1, |h| h.oid);
    let mgf_hash = match params.mask_gen {
        None => oid::SHA1,
        Some(m) if m.oid == oid::MGF1 => {
            m.parameters
                .ok_or_else(|| CryptoError::Malformed("MGF1 hash missing".into()))?
                .decode_as::<AlgorithmIdentifierOwned>()
                .map_err(malformed)?
                .oid
        }
        Some(m) => return Err(CryptoError::Unsupported(format!("mask generation {}", m.oid))),
    };
    match (hash, mgf_hash) {
        (h, m) if h == oid::SHA256 && m == oid::SHA256 => Ok(&OAEP_SHA256_MGF1SHA256),
        (h, m) if h == oid::SHA1 && m == oid::SHA1 => Ok(&OAEP_SHA1_MGF1SHA1),
        (h, m) => Err(CryptoError::Unsupported(format!("OAEP with {h} and MGF1 {m}"))),
    }
}

fn attribute(oid: ObjectIdentifier, value: Any) -> Result<Attribute, CryptoError> {
    Ok(Attribute { oid, values: SetOfVec::try_from(vec![value]).map_err(malformed)? })
}

/// Signs `content` with `identity`: a detached SignedData ContentInfo (DER)
/// with the signer's certificate included.
///
/// # Errors
/// [`CryptoError::Internal`] if the signing primitive fails.
pub fn sign(content: &[u8], identity: &Identity) -> Result<Vec<u8>, CryptoError> {
    let rng = SystemRandom::new();
    let me = parse_certificate(identity.cert_der())?;
    let message_digest = digest::digest(&SHA256, content);
    let signing_time = UtcTime::from_system_time(SystemTime::now()).map_err(malformed)?;
    let attrs: Attributes = SetOfVec::try_from(vec![
        attribute(oid::CONTENT_TYPE, Any::encode_from(&oid::DATA).map_err(malformed)?)?,
        attribute(oid::SIGNING_TIME, Any::encode_from(&signing_time).map_err(malformed)?)?,
        attribute(
            oid::MESSAGE_DIGEST,
            Any::encode_from(&OctetString::new(message_digest.as_ref().to_vec()).map_err(malformed)?)
                .map_err(malformed)?,
        )?,
    ])
    .map_err(malformed)?;
    let to_sign = attrs.to_der().map_err(malformed)?;
    let (signature, signature_algorithm) = match identity.keys() {
        Keys::P256 { sign, .. } => (
            sign.sign(&rng, &to_sign).map_err(|_| CryptoError::Internal("ECDSA"))?.as_ref().to_vec(),
            alg(oid::ECDSA_WITH_SHA256),
        ),
        Keys::Rsa { sign, .. } => {
            let mut sig = vec![0u8; sign.public_modulus_len()];
            sign.sign(&signature::RSA_PKCS1_SHA256, &rng, &to_sign, &mut sig)
                .map_err(|_| CryptoError::Internal("RSA signature"))?;
            (sig, alg_with(oid::RSA_ENCRYPTION, &Null)?)
        }
    };
    let signer = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(Cert::of(&me.cert).issuer_and_serial()),
        digest_alg: alg(oid::SHA256),
        signed_attrs: Some(attrs),
        signature_algorithm,
        signature: OctetString::new(signature).map_err(malformed)?,
        unsigned_attrs: None,
    };
    // `SignedData`'s grammar with the certificate as the octets it encodes
    // to, so that it is not copied into owned types for every message.
    let sd = SignedDataRef {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![alg(oid::SHA256)]).map_err(malformed)?,
        encap_content_info: EncapsulatedContentInfo { econtent_type: oid::DATA, econtent: None },
        certificates: Some(SetOfVec::try_from(vec![AnyRef::from_der(&me.der).map_err(malformed)?]).map_err(malformed)?),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::try_from(vec![signer]).map_err(malformed)?),
    };
    ContentInfo { content_type: oid::SIGNED_DATA, content: Any::encode_from(&sd).map_err(malformed)? }
        .to_der()
        .map_err(malformed)
}

/// Verifies a detached SignedData ContentInfo (DER) over `content`, and
/// returns the signer's certificate (DER). The certificate is not checked
/// against any trust anchor: in LATSSIAM, who the signer is (its fingerprint)
/// is the caller's question.
///
/// # Errors
/// [`CryptoError::Malformed`] for anything that does not parse or is not
/// detached with exactly one signer, [`CryptoError::SignerNotFound`] when the
/// signer's certificate is not included, [`CryptoError::Unsupported`] for
/// other algorithms, [`CryptoError::BadSignature`] when it does not verify.
pub fn verify(signature_der: &[u8], content: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let ci = ContentInfoRef::from_der(signature_der).map_err(malformed)?;
    if ci.content_type != oid::SIGNED_DATA {
        return Err(CryptoError::Malformed(format!("content type {} (want SignedData)", ci.content_type)));
    }
    match verify_one_certificate(ci.content, content) {
        Some(verified) => verified,
        None => verify_owned(ci.content, content),
    }
}

/// `verify` through the owned types: every input the fast path does not
/// take.
fn verify_owned(signed_data: AnyRef<'_>, content: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let sd: SignedData = signed_data.decode_as().map_err(malformed)?;
    if sd.encap_content_info.econtent.is_some() {
        return Err(CryptoError::Malformed("the signature is not detached".into()));
    }
    let [signer] = sd.signer_infos.0.as_slice() else {
        return Err(CryptoError::Malformed("a signature must have exactly one signer".into()));
    };
    let cert = sd
        .certificates
        .iter()
        .flat_map(|set| set.0.iter())
        .filter_map(|c| match c {
            CertificateChoices::Certificate(c) => Some(c),
            CertificateChoices::Other(_) => None,
        })
        .find(|c| signer_is(signer, &Cert::of(c)))
        .ok_or(CryptoError::SignerNotFound)?;
    check_signer(signer, &sd.encap_content_info, &Cert::of(cert), content)?;
    cert.to_der().map_err(malformed)
}

/// [`SignedData`]'s grammar, field for field, with the certificates left as
/// their DER: what [`verify_one_certificate`] reads.
#[derive(Sequence)]
struct SignedDataRef<'a> {
    version: CmsVersion,
    digest_algorithms: SetOfVec<AlgorithmIdentifierOwned>,
    encap_content_info: EncapsulatedContentInfo,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    certificates: Option<SetOfVec<AnyRef<'a>>>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    crls: Option<cms::revocation::RevocationInfoChoices>,
    signer_infos: SignerInfos,
}

/// The certificates this process has parsed, by their DER: a server sees the
/// same few signers again and again, and a gateway signs with one
/// certificate and seals to the same contacts'. At most
/// [`CERTIFICATES_CACHED`] of at most [`CERTIFICATE_CACHED_OCTETS`] octets of
/// content each, whatever peers send; full, it starts again empty. Only
/// certificates that parsed are kept; a larger one is parsed every time. The
/// parsed form of a certificate made of many tiny fields (each OID and value
/// boxed apart) can take about ten times its octets, so the bound is some 10
/// MB at worst, and a few hundred KB for real certificates.
static CERTIFICATES: std::sync::Mutex<Option<std::collections::HashMap<Vec<u8>, std::sync::Arc<Parsed>>>> =
    std::sync::Mutex::new(None);
const CERTIFICATES_CACHED: usize = 256;
const CERTIFICATE_CACHED_OCTETS: usize = 2048;

/// A certificate parsed, and encoded again from what was parsed: what
/// `verify` has always returned and `sign` has always sent (a certificate
/// with a field in a form DER does not allow, such as a version written out
/// though it is the default, comes back in DER's form, as its owned decoding
/// gives it).
struct Parsed {
    cert: Certificate,
    der: Vec<u8>,
}

impl Parsed {
    /// `der` parsed as [`Cert::parse`] parses it (with its errors), and
    /// encoded again.
    fn parse(der: &[u8]) -> Result<Self, CryptoError> {
        let cert = Cert::parse(der)?.x509.into_owned();
        Ok(Self { der: cert.to_der().map_err(malformed)?, cert })
    }
}

/// `raw` (a SEQUENCE: the caller has checked the tag) parsed as a
/// certificate: [`CryptoError::BadCertificate`] with the parser's words if
/// it does not parse, as [`Cert::parse`] says it ([`CryptoError::Malformed`]
/// if what parsed cannot be encoded again, which DER's strict decoding
/// leaves no way to reach).
fn parsed_certificate(raw: AnyRef<'_>) -> Result<std::sync::Arc<Parsed>, CryptoError> {
    // Keyed by the SEQUENCE's contents, so that a hit copies nothing: DER
    // allows one header for given contents, so the contents name the input.
    let key = raw.value();
    let lock = || CERTIFICATES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cert) = lock().as_ref().and_then(|m| m.get(key)) {
        return Ok(std::sync::Arc::clone(cert));
    }
    let cert = std::sync::Arc::new(Parsed::parse(&raw.to_der().map_err(malformed)?)?);
    if !cacheable(key) {
        return Ok(cert);
    }
    let mut certificates = lock();
    let map = certificates.get_or_insert_with(Default::default);
    // Full, it starts again empty; the old entries are freed after the lock.
    let old = (map.len() >= CERTIFICATES_CACHED).then(|| std::mem::take(map));
    map.insert(key.to_vec(), std::sync::Arc::clone(&cert));
    drop(certificates);
    drop(old);
    Ok(cert)
}

/// Whether a certificate with these content octets may be kept.
fn cacheable(key: &[u8]) -> bool {
    key.len() <= CERTIFICATE_CACHED_OCTETS
}

/// The certificate `der` parsed, as [`Cert::parse`] would parse it (and with
/// its errors), from [`CERTIFICATES`] when it was parsed before.
fn parse_certificate(der: &[u8]) -> Result<std::sync::Arc<Parsed>, CryptoError> {
    match AnyRef::from_der(der) {
        Ok(raw) if raw.tag() == der::Tag::Sequence => parsed_certificate(raw),
        // Not a SEQUENCE with a DER header: the owned parse says why.
        _ => Parsed::parse(der).map(std::sync::Arc::new),
    }
}

/// `verify` for what every signer sends (`openssl cms -sign` included):
/// exactly one certificate, an X.509 one, that names the one signer. It
/// decodes the same grammar as the owned types but keeps the certificate as
/// its octets and parses and encodes it once per process
/// ([`parsed_certificate`]). `None` for anything else, which [`verify_owned`]
/// then answers: where this path answers, the owned one would have read the
/// same values and answered alike.
fn verify_one_certificate(signed_data: AnyRef<'_>, content: &[u8]) -> Option<Result<Vec<u8>, CryptoError>> {
    let sd: SignedDataRef<'_> = signed_data.decode_as().ok()?;
    let [raw] = sd.certificates.as_ref()?.as_slice() else {
        return None;
    };
    let [signer] = sd.signer_infos.0.as_slice() else {
        return None;
    };
    if raw.tag() != der::Tag::Sequence || sd.encap_content_info.econtent.is_some() {
        return None;
    }
    let signer_cert = parsed_certificate(*raw).ok()?;
    let cert = Cert::of(&signer_cert.cert);
    if !signer_is(signer, &cert) {
        return None;
    }
    Some(check_signer(signer, &sd.encap_content_info, &cert, content).map(|()| signer_cert.der.clone()))
}

fn signer_is(signer: &SignerInfo, cert: &Cert<'_>) -> bool {
    match &signer.sid {
        SignerIdentifier::IssuerAndSerialNumber(i) => cert.names(Some(i), None),
        SignerIdentifier::SubjectKeyIdentifier(k) => cert.names(None, Some(&k.0)),
    }
}

/// Checks `signer`'s signature, made with `cert`, over `content`.
fn check_signer(
    signer: &SignerInfo,
    encap: &EncapsulatedContentInfo,
    cert: &Cert<'_>,
    content: &[u8],
) -> Result<(), CryptoError> {
    if signer.digest_alg.oid != oid::SHA256 {
        return Err(CryptoError::Unsupported(format!("digest {}", signer.digest_alg.oid)));
    }
    let content_digest = digest::digest(&SHA256, content);
    let signed_bytes = match &signer.signed_attrs {
        Some(attrs) => {
            let single = |o: ObjectIdentifier| -> Result<&Any, CryptoError> {
                let mut found = attrs.iter().filter(|a| a.oid == o);
                match (found.next(), found.next()) {
                    (Some(a), None) if a.values.len() == 1 => a.values.get(0).ok_or(CryptoError::BadSignature),
                    _ => Err(CryptoError::Malformed(format!("signed attribute {o} missing or repeated"))),
                }
            };
            let ct: ObjectIdentifier = single(oid::CONTENT_TYPE)?.decode_as().map_err(malformed)?;
            let md: OctetString = single(oid::MESSAGE_DIGEST)?.decode_as().map_err(malformed)?;
            if ct != encap.econtent_type || md.as_bytes() != content_digest.as_ref() {
                return Err(CryptoError::BadSignature);
            }
            attrs.to_der().map_err(malformed)?
        }
        None => content.to_vec(),
    };
    let public = cert.public_key_bits()?;
    let sig_alg = signer.signature_algorithm.oid;
    let algorithm: &dyn signature::VerificationAlgorithm = match cert.kind()? {
        KeyType::P256 if sig_alg == oid::ECDSA_WITH_SHA256 || sig_alg == oid::EC_PUBLIC_KEY => {
            &signature::ECDSA_P256_SHA256_ASN1
        }
        KeyType::Rsa if sig_alg == oid::RSA_ENCRYPTION || sig_alg == oid::SHA256_WITH_RSA => {
            &signature::RSA_PKCS1_2048_8192_SHA256
        }
        KeyType::Rsa if sig_alg == oid::RSASSA_PSS => &signature::RSA_PSS_2048_8192_SHA256,
        _ => return Err(CryptoError::Unsupported(format!("signature algorithm {sig_alg}"))),
    };
    signature::UnparsedPublicKey::new(algorithm, public)
        .verify(&signed_bytes, signer.signature.as_bytes())
        .map_err(|_| CryptoError::BadSignature)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// What `check_message_structure` accepted before it borrowed: the owned
    /// types, which `open` still decodes.
    fn owned_decode(der: &[u8]) -> bool {
        ContentInfo::from_der(der).is_ok_and(|ci| {
            ci.content_type == oid::AUTH_ENVELOPED_DATA && ci.content.decode_as::<AuthEnvelopedData>().is_ok()
        })
    }

    fn sealed() -> &'static [Vec<u8>; 2] {
        static SEALED: std::sync::OnceLock<[Vec<u8>; 2]> = std::sync::OnceLock::new();
        SEALED.get_or_init(|| {
            let key = |rsa| Identity::generate(&"bob@example.org".parse().unwrap(), None, rsa).unwrap();
            [false, true].map(|rsa| seal(b"Subject: hi\r\n\r\nhello", key(rsa).cert_der()).unwrap())
        })
    }

    #[test]
    fn the_borrowed_shape_accepts_real_messages_and_refuses_a_signature() {
        for der in sealed() {
            assert!(check_message_structure(der).is_ok());
            assert!(owned_decode(der));
        }
        let me = Identity::generate(&"al@example.org".parse().unwrap(), None, false).unwrap();
        assert!(check_message_structure(&sign(b"x", &me).unwrap()).is_err());
    }

    fn signatures() -> &'static [(Vec<u8>, Vec<u8>); 2] {
        static SIGNED: std::sync::OnceLock<[(Vec<u8>, Vec<u8>); 2]> = std::sync::OnceLock::new();
        SIGNED.get_or_init(|| {
            [false, true].map(|rsa| {
                let me = Identity::generate(&"al@example.org".parse().unwrap(), None, rsa).unwrap();
                (sign(b"the content", &me).unwrap(), me.cert_der().to_vec())
            })
        })
    }

    fn owned(signature: &[u8], content: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let ci = ContentInfoRef::from_der(signature).map_err(malformed)?;
        if ci.content_type != oid::SIGNED_DATA {
            return Err(CryptoError::Malformed("not SignedData".into()));
        }
        verify_owned(ci.content, content)
    }

    #[test]
    fn a_signature_verifies_on_the_fast_path_twice_and_names_its_certificate() {
        for (signature, cert) in signatures() {
            let ci = ContentInfoRef::from_der(signature).unwrap();
            for _ in 0..2 {
                let fast = verify_one_certificate(ci.content, b"the content").expect("the fast path takes it");
                assert_eq!(fast.unwrap(), *cert);
            }
            assert_eq!(verify(signature, b"the content").unwrap(), *cert);
            assert_eq!(owned(signature, b"the content").unwrap(), *cert);
            assert!(matches!(verify(signature, b"other content"), Err(CryptoError::BadSignature)));
        }
    }

    /// `sign` writes `SignedData` through a grammar that keeps the
    /// certificate as octets: what it writes is what the owned types encode
    /// for the same values, with the identity's certificate in it.
    #[test]
    fn a_signature_is_what_the_owned_types_encode() {
        for (signature, cert) in signatures() {
            let ci = ContentInfo::from_der(signature).unwrap();
            let sd: SignedData = ci.content.decode_as().unwrap();
            assert_eq!(
                ContentInfo { content_type: oid::SIGNED_DATA, content: Any::encode_from(&sd).unwrap() }
                    .to_der()
                    .unwrap(),
                *signature
            );
            let certs: Vec<_> = sd.certificates.iter().flat_map(|set| set.0.iter()).collect();
            let [CertificateChoices::Certificate(c)] = certs.as_slice() else { panic!("one certificate") };
            assert_eq!(c.to_der().unwrap(), *cert);
        }
    }

    /// A certificate parsed through the cache gives what the owned parse
    /// gives, to the error, for every octet of a P-256 and an RSA
    /// certificate changed and every cut.
    #[test]
    fn the_cached_parse_and_the_owned_parse_agree_on_every_change() {
        let _alone = cache_test();
        // Twice: the first parse may miss the cache, the second finds it.
        let both = |der: &[u8]| {
            let owned = Cert::parse(der).and_then(|c| c.x509.to_der().map_err(malformed));
            for _ in 0..2 {
                let cached = parse_certificate(der).map(|p| p.der.clone());
                assert_eq!(format!("{cached:?}"), format!("{owned:?}"), "{der:02x?}");
            }
        };
        for rsa in [false, true] {
            let cert = Identity::generate(&"c@example.org".parse().unwrap(), None, rsa).unwrap().cert_der().to_vec();
            both(&cert);
            for at in 0..cert.len() {
                both(&cert[..at]);
                for x in [0x01, 0x80, 0xff] {
                    let mut changed = cert.clone();
                    changed[at] ^= x;
                    both(&changed);
                }
            }
        }
    }

    /// Tests that fill the cache (and so empty it) run one at a time, so
    /// that one's emptying cannot hide what another checks is (not) kept.
    fn cache_test() -> std::sync::MutexGuard<'static, ()> {
        static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        ALONE.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn certificates_held() -> usize {
        CERTIFICATES.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |m| m.len())
    }

    /// A peer choosing its signing certificate (or a contact its sealing
    /// one) cannot grow the cache: past its bound it starts again empty, and
    /// a certificate larger than a cached one may be is parsed and used but
    /// never kept.
    #[test]
    fn the_certificate_cache_stays_within_its_bound_whatever_certificates_come() {
        let _alone = cache_test();
        for i in 0..CERTIFICATES_CACHED + 8 {
            // A contact first (seal), then a signer (sign and verify): each
            // new certificate is parsed and kept by the first to meet it.
            let contact = Identity::generate(&format!("c{i}@example.org").parse().unwrap(), None, false).unwrap();
            seal(b"x", contact.cert_der()).unwrap();
            assert!(certificates_held() <= CERTIFICATES_CACHED, "{} held", certificates_held());
            let me = Identity::generate(&format!("p{i}@example.org").parse().unwrap(), None, false).unwrap();
            assert_eq!(verify(&sign(b"x", &me).unwrap(), b"x").unwrap(), me.cert_der().to_vec());
            assert!(certificates_held() <= CERTIFICATES_CACHED, "{} held", certificates_held());
        }
        let names: Vec<String> = (0..60).map(|i| format!("name-{i:03}.a-rather-long-domain.example.org")).collect();
        let large = rcgen::generate_simple_self_signed(names).unwrap().cert.der().to_vec();
        let raw = AnyRef::from_der(&large).unwrap();
        assert!(raw.value().len() > CERTIFICATE_CACHED_OCTETS, "{} octets", raw.value().len());
        assert!(!cacheable(raw.value()));
        assert_eq!(parsed_certificate(raw).unwrap().der, large);
        assert_eq!(parse_certificate(&large).unwrap().der, large);
        let kept = CERTIFICATES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|m| m.contains_key(raw.value()));
        assert!(!kept, "a certificate over the size bound was kept");
    }

    /// Every octet of a P-256 and an RSA signature changed (each bit, and all
    /// of them), and every cut: `verify` (the fast path where it applies)
    /// and the owned decoding answer each input alike, to the error.
    #[test]
    fn the_fast_path_and_the_owned_types_agree_on_every_change() {
        let _alone = cache_test();
        let same = |bad: &[u8]| {
            let (a, b) = (verify(bad, b"the content"), owned(bad, b"the content"));
            match (&a, &b) {
                (Ok(x), Ok(y)) => x == y,
                (Err(CryptoError::Malformed(_)), Err(CryptoError::Malformed(_))) => true,
                (Err(x), Err(y)) => format!("{x:?}") == format!("{y:?}"),
                _ => false,
            }
        };
        for (signature, _) in signatures() {
            for i in 0..signature.len() {
                assert!(same(&signature[..i]), "cut at {i}");
                let mut bad = signature.clone();
                for xor in [1u8, 2, 4, 8, 16, 32, 64, 128, 255] {
                    bad[i] = signature[i] ^ xor;
                    assert!(
                        same(&bad),
                        "octet {i} ^ {xor:#04x}: {:?} / {:?}",
                        verify(&bad, b"the content"),
                        owned(&bad, b"the content")
                    );
                }
            }
        }
    }

    /// Every octet changed in every way, and every cut: the borrowed check and
    /// the owned decode agree on each input, so the check refuses nothing
    /// `open` could read and lets through nothing it could not.
    #[test]
    fn the_borrowed_shape_and_the_owned_types_agree_on_every_change() {
        for der in sealed() {
            for i in 0..der.len() {
                let agree = |bad: &[u8]| check_message_structure(bad).is_ok() == owned_decode(bad);
                assert!(agree(&der[..i]), "cut at {i}");
                let mut bad = der.clone();
                for xor in 1..=255u8 {
                    bad[i] = der[i] ^ xor;
                    assert!(agree(&bad), "octet {i} ^ {xor:#04x}");
                }
            }
        }
    }
}
