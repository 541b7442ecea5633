//! The one table from internal errors to gRPC status codes.

use tonic::{Code, Status};

use crate::node::NodeError;

/// Metadata on every error status: `unknown` when a write was proposed but
/// its outcome is not known, `not-applied` when the request certainly changed
/// nothing. Errors without it (transport failures) must be treated as unknown.
pub const OUTCOME_HEADER: &str = "x-shopkv-outcome";

/// Maps a request-path error to its gRPC status.
pub fn to_status(e: NodeError) -> Status {
    let (code, msg) = match &e {
        NodeError::InvalidArgument(m) => (Code::InvalidArgument, m.clone()),
        NodeError::NotFound(m) => (Code::NotFound, m.clone()),
        NodeError::FailedPrecondition(m) => (Code::FailedPrecondition, m.clone()),
        NodeError::Unavailable(m) => (Code::Unavailable, m.clone()),
        NodeError::OutcomeUnknown(_) => (Code::Unavailable, e.to_string()),
        NodeError::Internal(m) => (Code::Internal, m.clone()),
    };
    let outcome = match e {
        NodeError::OutcomeUnknown(_) | NodeError::Internal(_) => "unknown",
        // Rejected before anything was proposed: a retry cannot apply it twice.
        NodeError::InvalidArgument(_)
        | NodeError::NotFound(_)
        | NodeError::FailedPrecondition(_)
        | NodeError::Unavailable(_) => "not-applied",
    };
    let mut status = Status::new(code, msg);
    status.metadata_mut().insert(
        OUTCOME_HEADER,
        tonic::metadata::MetadataValue::from_static(outcome),
    );
    status
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        to_status(e)
    }
}

/// Shorthand for an INVALID_ARGUMENT status.
pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(e: NodeError) -> String {
        let s = to_status(e);
        s.metadata()
            .get(OUTCOME_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn only_certain_rejections_say_not_applied() {
        assert_eq!(outcome(NodeError::Unavailable("x".into())), "not-applied");
        assert_eq!(
            outcome(NodeError::InvalidArgument("x".into())),
            "not-applied"
        );
        assert_eq!(outcome(NodeError::OutcomeUnknown("x".into())), "unknown");
        assert_eq!(outcome(NodeError::Internal("x".into())), "unknown");
        let s = to_status(NodeError::OutcomeUnknown("deadline".into()));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("outcome unknown"));
    }
}
