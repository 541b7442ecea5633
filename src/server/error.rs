//! The one table from internal errors to gRPC status codes.

use tonic::{Code, Status};

use crate::commerce::CommerceError;
use crate::domain::{RejectKind, Rejection};
use crate::node::NodeError;
use crate::payment::PaymentError;

/// Metadata naming the business rule that refused a request (e.g.
/// `OUT_OF_STOCK`), so clients can branch without parsing messages.
pub const REASON_HEADER: &str = "x-shopkv-reason";

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

/// Maps a business rejection: the status code of its kind, the rule's name in
/// [`REASON_HEADER`], and `not-applied` (a rejected command changed nothing).
pub fn rejection_status(r: Rejection) -> Status {
    let code = match r.code.kind() {
        RejectKind::InvalidArgument => Code::InvalidArgument,
        RejectKind::NotFound => Code::NotFound,
        RejectKind::FailedPrecondition => Code::FailedPrecondition,
        RejectKind::Aborted => Code::Aborted,
        RejectKind::Internal => Code::Internal,
    };
    let mut status = Status::new(code, r.message);
    let md = status.metadata_mut();
    md.insert(
        REASON_HEADER,
        tonic::metadata::MetadataValue::from_static(r.code.name()),
    );
    md.insert(
        OUTCOME_HEADER,
        tonic::metadata::MetadataValue::from_static("not-applied"),
    );
    status
}

/// Maps a commerce flow error.
pub fn commerce_status(e: CommerceError) -> Status {
    match e {
        CommerceError::Node(e) => to_status(e),
        CommerceError::Rejected(r) => rejection_status(r),
        CommerceError::Payment(PaymentError::InvalidCard(m)) => {
            to_status(NodeError::InvalidArgument(format!("invalid card: {m}")))
        }
        CommerceError::Payment(PaymentError::Declined(m)) => to_status(
            NodeError::FailedPrecondition(format!("payment declined: {m}")),
        ),
        // Nothing was recorded; the same attempt key is reused on retry.
        CommerceError::Payment(PaymentError::Unavailable(m)) => {
            to_status(NodeError::Unavailable(format!("payment provider: {m}")))
        }
    }
}

impl From<CommerceError> for Status {
    fn from(e: CommerceError) -> Self {
        commerce_status(e)
    }
}

impl From<Rejection> for Status {
    fn from(r: Rejection) -> Self {
        rejection_status(r)
    }
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
    fn rejections_carry_their_reason_and_code() {
        use crate::domain::RejectCode;
        let s = rejection_status(Rejection::new(RejectCode::OutOfStock, "sku-1: 3 requested"));
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            s.metadata()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("OUT_OF_STOCK")
        );
        assert_eq!(
            rejection_status(Rejection::new(RejectCode::UnknownSku, "x")).code(),
            Code::NotFound
        );
        assert_eq!(
            rejection_status(Rejection::new(RejectCode::Overflow, "x")).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            rejection_status(Rejection::new(RejectCode::CartChanged, "x")).code(),
            Code::Aborted
        );
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
