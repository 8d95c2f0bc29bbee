//! The ids admins type. A message has an id (42) and a uid (msg_..., its
//! `webhook-id`); a delivery (one message to one endpoint) has an id that
//! `list` prints as d58, so it cannot be taken for a message id. `show`
//! takes any of the three; `requeue` takes delivery ids, with or without
//! the d.

use std::fmt;
use std::str::FromStr;

/// A delivery id as typed: `58` or `d58`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryId(pub i64);

impl FromStr for DeliveryId {
    type Err = String;

    fn from_str(text: &str) -> Result<DeliveryId, String> {
        let digits = text.strip_prefix(['d', 'D']).unwrap_or(text);
        digits
            .parse::<i64>()
            .ok()
            .filter(|&id| id > 0)
            .map(DeliveryId)
            .ok_or_else(|| format!("{text:?} is not a delivery id (like 58 or d58)"))
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "d{}", self.0)
    }
}

/// What `show` is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageRef {
    /// A message id: `42`.
    Message(i64),
    /// A message uid: `msg_...`.
    Uid(String),
    /// A delivery id: `d58` (its message is shown).
    Delivery(i64),
}

impl FromStr for MessageRef {
    type Err = String;

    fn from_str(text: &str) -> Result<MessageRef, String> {
        if let Ok(id) = text.parse::<i64>()
            && id > 0
        {
            return Ok(MessageRef::Message(id));
        }
        if text.starts_with(['d', 'D'])
            && let Ok(delivery) = text.parse::<DeliveryId>()
        {
            return Ok(MessageRef::Delivery(delivery.0));
        }
        if !text.is_empty()
            && text.len() <= 128
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Ok(MessageRef::Uid(text.to_string()));
        }
        Err(format!(
            "{text:?} is not a message id (42), a uid (msg_...) or a delivery id (d58)"
        ))
    }
}

impl fmt::Display for MessageRef {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            MessageRef::Message(id) => write!(f, "message {id}"),
            MessageRef::Uid(uid) => write!(f, "message {uid}"),
            MessageRef::Delivery(id) => write!(f, "delivery d{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_as_admins_type_them() {
        assert_eq!("58".parse(), Ok(DeliveryId(58)));
        assert_eq!("d58".parse(), Ok(DeliveryId(58)));
        assert!("x58".parse::<DeliveryId>().is_err());
        assert!("0".parse::<DeliveryId>().is_err());
        assert_eq!("42".parse(), Ok(MessageRef::Message(42)));
        assert_eq!("d58".parse(), Ok(MessageRef::Delivery(58)));
        assert_eq!(
            "msg_2f3a".parse(),
            Ok(MessageRef::Uid("msg_2f3a".to_string()))
        );
        assert_eq!("dx".parse(), Ok(MessageRef::Uid("dx".to_string())));
        assert!("a b".parse::<MessageRef>().is_err());
    }
}
