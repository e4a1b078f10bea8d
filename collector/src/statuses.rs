//! What tonic refuses before a handler runs, answered with the status gRPC
//! clients expect for it: a request over the size limit is
//! `RESOURCE_EXHAUSTED` (tonic says `OUT_OF_RANGE`), and one that does not
//! decode is `INVALID_ARGUMENT`, the caller's fault (tonic says `INTERNAL`,
//! which tells the caller to look for a bug in the server). Agent streams
//! are mapped the same way in `ingest` (their errors arrive mid-stream).

use tonic::codegen::http::{HeaderValue, Response};

/// `tower::util::MapResponseLayer` function: rewrites the status of a
/// trailers-only answer (tonic's form for a refusal before the handler).
pub fn conventional<B>(mut res: Response<B>) -> Response<B> {
    let headers = res.headers_mut();
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .replace("%20", " ");
    let better = match code.map(tonic::Code::from) {
        Some(tonic::Code::OutOfRange) if message.contains("too large") => {
            Some(tonic::Code::ResourceExhausted)
        }
        Some(tonic::Code::Internal) if message.contains("decode") => {
            Some(tonic::Code::InvalidArgument)
        }
        _ => None,
    };
    if let Some(c) = better {
        headers.insert("grpc-status", HeaderValue::from(c as i32));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: tonic::Code, message: &str) -> Response<()> {
        let mut r = Response::new(());
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from(code as i32));
        r.headers_mut().insert(
            "grpc-message",
            HeaderValue::from_str(&message.replace(' ', "%20")).unwrap(),
        );
        r
    }

    fn code_of(r: &Response<()>) -> &str {
        r.headers()["grpc-status"].to_str().unwrap()
    }

    #[test]
    fn only_the_transport_refusals_are_rewritten() {
        let r = conventional(answer(
            tonic::Code::OutOfRange,
            "Error, decoded message length too large: found 5242880 bytes",
        ));
        assert_eq!(code_of(&r), "8");
        let r = conventional(answer(
            tonic::Code::Internal,
            "failed to decode Protobuf message: invalid wire type",
        ));
        assert_eq!(code_of(&r), "3");
        // A handler's own statuses stay as they are.
        let r = conventional(answer(tonic::Code::OutOfRange, "page past the end"));
        assert_eq!(code_of(&r), "11");
        let r = conventional(answer(tonic::Code::Internal, "store failed"));
        assert_eq!(code_of(&r), "13");
        assert!(conventional(Response::new(()))
            .headers()
            .get("grpc-status")
            .is_none());
    }
}
