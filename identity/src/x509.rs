//! Internal helpers over `x509-parser`: strict parsing and one pass over the
//! extensions this crate cares about, rejecting duplicates and malformed values.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, ParsedExtension,
    SubjectAlternativeName,
};
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS,
    OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
    OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};

/// Parses exactly one DER certificate (trailing bytes are an error).
pub(crate) fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(format!(
            "{} unexpected bytes after the certificate",
            rest.len()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// A problem with a certificate's extensions as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExtensionProblem {
    /// The same extension OID appears twice (forbidden by RFC 5280 §4.2).
    Duplicate(String),
    /// An extension this crate reads could not be decoded.
    Malformed(String),
}

/// One decoded extension value and its criticality.
#[derive(Clone, Copy)]
pub(crate) struct Ext<T> {
    pub critical: bool,
    pub value: T,
}

/// The extensions this crate reads, each at most once.
#[derive(Default)]
pub(crate) struct KnownExtensions<'c, 'a> {
    pub basic_constraints: Option<Ext<&'c BasicConstraints>>,
    pub key_usage: Option<Ext<&'c KeyUsage>>,
    pub extended_key_usage: Option<Ext<&'c ExtendedKeyUsage<'a>>>,
    pub subject_alt_name: Option<Ext<&'c SubjectAlternativeName<'a>>>,
    /// The subjectKeyIdentifier value, when present.
    pub subject_key_identifier: Option<&'c [u8]>,
    pub authority_key_identifier: Option<&'c AuthorityKeyIdentifier<'a>>,
}

/// Collects the known extensions of `cert`, rejecting any duplicated extension
/// and any known extension whose value does not decode.
pub(crate) fn known_extensions<'c, 'a>(
    cert: &'c X509Certificate<'a>,
) -> Result<KnownExtensions<'c, 'a>, ExtensionProblem> {
    let extensions = cert.extensions();
    for (i, ext) in extensions.iter().enumerate() {
        if extensions[..i].iter().any(|earlier| earlier.oid == ext.oid) {
            return Err(ExtensionProblem::Duplicate(extension_name(&ext.oid)));
        }
    }
    let mut known = KnownExtensions::default();
    for ext in extensions {
        let critical = ext.critical;
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(v) => {
                known.basic_constraints = Some(Ext { critical, value: v });
            }
            ParsedExtension::KeyUsage(v) => {
                known.key_usage = Some(Ext { critical, value: v });
            }
            ParsedExtension::ExtendedKeyUsage(v) => {
                known.extended_key_usage = Some(Ext { critical, value: v });
            }
            ParsedExtension::SubjectAlternativeName(v) => {
                known.subject_alt_name = Some(Ext { critical, value: v });
            }
            ParsedExtension::SubjectKeyIdentifier(v) => {
                known.subject_key_identifier = Some(v.0);
            }
            ParsedExtension::AuthorityKeyIdentifier(v) => {
                known.authority_key_identifier = Some(v);
            }
            ParsedExtension::ParseError { .. } if is_known(&ext.oid) => {
                return Err(ExtensionProblem::Malformed(extension_name(&ext.oid)));
            }
            _ => {}
        }
    }
    Ok(known)
}

/// Whether this crate reads the extension with this OID.
fn is_known(oid: &x509_parser::der_parser::oid::Oid<'_>) -> bool {
    [
        &OID_X509_EXT_BASIC_CONSTRAINTS,
        &OID_X509_EXT_KEY_USAGE,
        &OID_X509_EXT_EXTENDED_KEY_USAGE,
        &OID_X509_EXT_SUBJECT_ALT_NAME,
        &OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
        &OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
    ]
    .contains(&oid)
}

/// A readable name for an extension OID (its dotted form when unknown).
fn extension_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    let name = if *oid == OID_X509_EXT_BASIC_CONSTRAINTS {
        "basicConstraints"
    } else if *oid == OID_X509_EXT_KEY_USAGE {
        "keyUsage"
    } else if *oid == OID_X509_EXT_EXTENDED_KEY_USAGE {
        "extKeyUsage"
    } else if *oid == OID_X509_EXT_SUBJECT_ALT_NAME {
        "subjectAltName"
    } else if *oid == OID_X509_EXT_SUBJECT_KEY_IDENTIFIER {
        "subjectKeyIdentifier"
    } else if *oid == OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER {
        "authorityKeyIdentifier"
    } else {
        return oid.to_id_string();
    };
    name.to_owned()
}
