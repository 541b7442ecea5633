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
    let mut status = Status::new(code, msg);
    if matches!(e, NodeError::OutcomeUnknown(_)) {
        status.metadata_mut().insert(
            OUTCOME_HEADER,
            tonic::metadata::MetadataValue::from_static("unknown"),
        );
    }
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
