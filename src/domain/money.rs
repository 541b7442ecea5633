//! Money: `i64` amounts in minor units of an ISO 4217 currency. Integer
//! arithmetic only, every operation checked (an overflow is a rejection,
//! never a wrap).

use serde::{Deserialize, Serialize};

use super::{RejectCode, Rejection};

/// Largest unit price accepted: 10^15 minor units (10 trillion in a
/// 2-decimal currency). Totals are still checked: qty × price can overflow.
pub const MAX_PRICE_MINOR: i64 = 1_000_000_000_000_000;

/// An ISO 4217 alphabetic code, upper case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses three ASCII letters (either case; stored upper case).
    pub fn parse(code: &str) -> Result<Currency, Rejection> {
        let bytes = code.as_bytes();
        if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_alphabetic) {
            return Err(Rejection::new(
                RejectCode::InvalidProduct,
                format!("currency must be a 3-letter ISO 4217 code, got {code:?}"),
            ));
        }
        Ok(Currency([
            bytes[0].to_ascii_uppercase(),
            bytes[1].to_ascii_uppercase(),
            bytes[2].to_ascii_uppercase(),
        ]))
    }

    /// The code, e.g. `"EUR"`.
    pub fn as_str(&self) -> &str {
        // Only ASCII letters are ever stored (see `parse`).
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Decimal places of the minor unit (ISO 4217; 2 unless listed).
    pub fn exponent(&self) -> u32 {
        match self.as_str() {
            "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF"
            | "UGX" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
            "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
            _ => 2,
        }
    }

    /// `amount_minor` in major units for people, e.g. `12.50 EUR`.
    pub fn format(&self, amount_minor: i64) -> String {
        let exp = self.exponent();
        if exp == 0 {
            return format!("{amount_minor} {}", self.as_str());
        }
        let scale = 10i64.pow(exp);
        let sign = if amount_minor < 0 { "-" } else { "" };
        let abs = amount_minor.unsigned_abs();
        let scale = scale.unsigned_abs();
        format!(
            "{sign}{}.{:0width$} {}",
            abs / scale,
            abs % scale,
            self.as_str(),
            width = exp as usize
        )
    }
}

impl std::fmt::Display for Currency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `unit_price_minor × qty`, checked.
pub fn line_total(unit_price_minor: i64, qty: u32) -> Result<i64, Rejection> {
    unit_price_minor
        .checked_mul(i64::from(qty))
        .ok_or_else(|| overflow(format!("{qty} × {unit_price_minor}")))
}

/// `a + b`, checked.
pub fn add(a: i64, b: i64) -> Result<i64, Rejection> {
    a.checked_add(b)
        .ok_or_else(|| overflow(format!("{a} + {b}")))
}

fn overflow(what: String) -> Rejection {
    Rejection::new(
        RejectCode::Overflow,
        format!("amount overflows 64 bits: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies_parse_and_format_by_exponent() {
        let eur = Currency::parse("eur").unwrap();
        assert_eq!(eur.as_str(), "EUR");
        assert_eq!(eur.format(1250), "12.50 EUR");
        assert_eq!(eur.format(-5), "-0.05 EUR");
        assert_eq!(Currency::parse("JPY").unwrap().format(500), "500 JPY");
        assert_eq!(Currency::parse("KWD").unwrap().format(1234), "1.234 KWD");
        assert!(Currency::parse("EU").is_err());
        assert!(Currency::parse("E1R").is_err());
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(line_total(250, 4).unwrap(), 1000);
        assert_eq!(
            line_total(MAX_PRICE_MINOR, 10_000).unwrap_err().code,
            RejectCode::Overflow
        );
        assert_eq!(add(i64::MAX, 1).unwrap_err().code, RejectCode::Overflow);
    }
}
