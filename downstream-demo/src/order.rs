//! The `order.created` body as upstream-demo publishes it, and the points rule.

use serde::Deserialize;

/// `{"order_id": "...", "customer": "...", "amount_cents": 1234}`; unknown
/// fields are ignored so the producer can add some without breaking us.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer: String,
    pub amount_cents: i64,
}

impl Order {
    /// Parses a body; the error text ends up in the `rejected` CONFIRM's detail.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let order: Self = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if order.order_id.is_empty() {
            return Err("empty order_id".into());
        }
        if order.amount_cents < 0 {
            return Err(format!("negative amount_cents {}", order.amount_cents));
        }
        Ok(order)
    }

    /// One point per whole currency unit spent.
    pub fn points(&self) -> i64 {
        self.amount_cents / 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_upstream_body() {
        let body = br#"{"order_id":"o-1","customer":"ada","amount_cents":1299,"note":"extra"}"#;
        let order = Order::parse(body).unwrap();
        assert_eq!(order, Order { order_id: "o-1".into(), customer: "ada".into(), amount_cents: 1299 });
        assert_eq!(order.points(), 12);
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"not json",
            br#"{"order_id":"o-1","customer":"ada"}"#,
            br#"{"order_id":"o-1","customer":"ada","amount_cents":"12"}"#,
            br#"{"order_id":"","customer":"ada","amount_cents":100}"#,
            br#"{"order_id":"o-1","customer":"ada","amount_cents":-100}"#,
        ] {
            assert!(Order::parse(body).is_err(), "{:?} parsed", String::from_utf8_lossy(body));
        }
    }
}
