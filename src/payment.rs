//! The payment provider port: authorize, capture and refund, each with an
//! idempotency key (`order_id:attempt`), so a retried call never charges
//! twice. Calls happen outside Raft apply (they are I/O); their outcomes are
//! proposed as `RecordPayment` / `RecordRefund` commands.
//!
//! [`SimulatedProvider`] is the built-in provider: deterministic outcomes by
//! test card number (Stripe's numbers), references derived from the key so
//! that every node answers a retried key the same way.

use std::collections::HashMap;
use std::sync::Mutex;

use xxhash_rust::xxh3::xxh3_64;

/// Card that is always approved.
pub const CARD_APPROVE: &str = "4242424242424242";
/// Card that is always declined.
pub const CARD_DECLINE: &str = "4000000000000002";
/// Card whose charge always fails with a provider error.
pub const CARD_ERROR: &str = "4000000000000119";
/// Card that is approved, but the authorization's answer takes
/// [`SLOW_CARD_DELAY`]: a slow provider, for tests of callers that leave
/// while their payment is under way.
pub const CARD_SLOW: &str = "4000000000000077";
/// How long [`CARD_SLOW`]'s authorization takes to answer.
pub const SLOW_CARD_DELAY: std::time::Duration = std::time::Duration::from_millis(1000);

/// Why a provider call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The card or account refused; the order stays unpaid.
    #[error("declined: {0}")]
    Declined(String),
    /// The card number is malformed (never sent to the provider).
    #[error("invalid card: {0}")]
    InvalidCard(String),
    /// The provider failed or was unreachable; retry with the same key.
    #[error("payment provider error: {0}")]
    Unavailable(String),
}

/// An authorization hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// Provider's reference of the hold.
    pub auth_ref: String,
    /// Last four digits of the card.
    pub card_last4: String,
}

/// A payment service provider.
#[tonic::async_trait]
pub trait PaymentProvider: Send + Sync {
    /// Places a hold of `amount_minor` on the card. The same key returns the
    /// same authorization and holds once.
    async fn authorize(
        &self,
        idempotency_key: &str,
        amount_minor: i64,
        currency: &str,
        card_number: &str,
    ) -> Result<Authorization, PaymentError>;

    /// Captures an authorization; the same key captures once. Returns the
    /// capture's reference.
    async fn capture(
        &self,
        idempotency_key: &str,
        auth_ref: &str,
        amount_minor: i64,
    ) -> Result<String, PaymentError>;

    /// Refunds `amount_minor` of a capture; the same key refunds once.
    async fn refund(
        &self,
        idempotency_key: &str,
        capture_ref: &str,
        amount_minor: i64,
    ) -> Result<String, PaymentError>;
}

/// The built-in simulated provider (see the module docs).
#[derive(Debug, Default)]
pub struct SimulatedProvider {
    /// Amount of each (operation, idempotency key) done: a repeated key
    /// finds its entry and does nothing more.
    ledger: Mutex<HashMap<(&'static str, String), i64>>,
}

impl SimulatedProvider {
    /// A provider with an empty ledger.
    pub fn new() -> SimulatedProvider {
        SimulatedProvider::default()
    }

    /// Total captured by this provider instance (for tests: retries must not
    /// add to it).
    pub fn captured_total(&self) -> i64 {
        self.ledger
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|((op, _), _)| *op == "capture")
                    .map(|(_, amount)| amount)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Records `op` of `amount_minor` under `key` once; returns its reference.
    fn once(&self, op: &'static str, key: &str, amount_minor: i64) -> Result<String, PaymentError> {
        let mut ledger = self
            .ledger
            .lock()
            .map_err(|_| PaymentError::Unavailable("ledger poisoned".into()))?;
        ledger.entry((op, key.to_string())).or_insert(amount_minor);
        Ok(reference(op, key))
    }
}

/// A reference the same on every node for the same key.
fn reference(kind: &str, key: &str) -> String {
    format!("sim_{kind}_{:016x}", xxh3_64(key.as_bytes()))
}

/// 12..=19 digits passing the Luhn check.
fn check_card(card: &str) -> Result<(), PaymentError> {
    let digits: Vec<u32> = card.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.len() != card.len() || !(12..=19).contains(&digits.len()) {
        return Err(PaymentError::InvalidCard(
            "card number must be 12-19 digits".into(),
        ));
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                *d
            }
        })
        .sum();
    if !sum.is_multiple_of(10) {
        return Err(PaymentError::InvalidCard(
            "card number fails the Luhn check".into(),
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl PaymentProvider for SimulatedProvider {
    async fn authorize(
        &self,
        idempotency_key: &str,
        amount_minor: i64,
        _currency: &str,
        card_number: &str,
    ) -> Result<Authorization, PaymentError> {
        check_card(card_number)?;
        if amount_minor < 0 {
            return Err(PaymentError::InvalidCard("negative amount".into()));
        }
        match card_number {
            CARD_DECLINE => return Err(PaymentError::Declined("card_declined".into())),
            CARD_ERROR => return Err(PaymentError::Unavailable("processing_error".into())),
            CARD_SLOW => tokio::time::sleep(SLOW_CARD_DELAY).await,
            _ => {}
        }
        Ok(Authorization {
            auth_ref: reference("auth", idempotency_key),
            card_last4: card_number[card_number.len() - 4..].to_string(),
        })
    }

    async fn capture(
        &self,
        idempotency_key: &str,
        _auth_ref: &str,
        amount_minor: i64,
    ) -> Result<String, PaymentError> {
        self.once("capture", idempotency_key, amount_minor)
    }

    async fn refund(
        &self,
        idempotency_key: &str,
        _capture_ref: &str,
        amount_minor: i64,
    ) -> Result<String, PaymentError> {
        self.once("refund", idempotency_key, amount_minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outcomes_follow_the_test_cards_and_keys_are_idempotent() {
        let p = SimulatedProvider::new();
        let a = p.authorize("o1:1", 500, "EUR", CARD_APPROVE).await.unwrap();
        assert_eq!(a.card_last4, "4242");
        let c1 = p.capture("o1:1", &a.auth_ref, 500).await.unwrap();
        let c2 = p.capture("o1:1", &a.auth_ref, 500).await.unwrap();
        assert_eq!(c1, c2);
        assert_eq!(p.captured_total(), 500, "a retried key captures once");
        assert!(matches!(
            p.authorize("o2:1", 5, "EUR", CARD_DECLINE).await,
            Err(PaymentError::Declined(_))
        ));
        assert!(matches!(
            p.authorize("o3:1", 5, "EUR", CARD_ERROR).await,
            Err(PaymentError::Unavailable(_))
        ));
        assert!(matches!(
            p.authorize("o4:1", 5, "EUR", "4242424242424241").await,
            Err(PaymentError::InvalidCard(_))
        ));
        assert!(matches!(
            p.authorize("o4:1", 5, "EUR", "42x").await,
            Err(PaymentError::InvalidCard(_))
        ));
        // Another node's provider derives the same reference for the same key.
        assert_eq!(
            SimulatedProvider::new()
                .capture("o1:1", "x", 500)
                .await
                .unwrap(),
            c1
        );
    }
}
