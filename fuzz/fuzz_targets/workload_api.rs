//! SPIFFE Workload API requests: the security header check on arbitrary
//! metadata values (as tonic hands them over) and the decoding of each request
//! message of the service.
#![no_main]

use citadel_agent::workload_api::{SECURITY_HEADER, check_security_header};
use citadel_proto::spiffe_workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::metadata::{MetadataMap, MetadataValue};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let (header, body) = rest.split_at(at);
    // The header value as a peer sends it; tonic only admits valid values.
    let mut metadata = MetadataMap::new();
    if let Ok(value) = MetadataValue::try_from(header) {
        metadata.insert(SECURITY_HEADER, value);
    }
    let request = tonic::Request::from_parts(metadata, Default::default(), X509svidRequest {});
    let checked = check_security_header(&request);
    if header == b"true" {
        assert!(checked.is_ok(), "the exact value `true` is accepted");
    } else {
        assert!(checked.is_err(), "only `true` is accepted: {header:?}");
    }
    let _ = X509svidRequest::decode(body);
    let _ = X509BundlesRequest::decode(body);
    let _ = JwtsvidRequest::decode(body);
    let _ = JwtBundlesRequest::decode(body);
    let _ = ValidateJwtsvidRequest::decode(body);
});
