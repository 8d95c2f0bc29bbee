//! Words for people: plurals in messages and summaries.

/// `n` and the noun, singular or plural: "1 delivery", "3 deliveries".
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
