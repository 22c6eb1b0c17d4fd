//! Validated names: tenants, queues, topics and binding patterns.

use super::BrokerError;

/// Longest queue, tenant or plugin name.
pub const MAX_NAME: usize = 255;

/// Check a queue or plugin name: 1..=255 of `[A-Za-z0-9._-]`.
pub fn check_name(what: &'static str, name: &str) -> Result<(), BrokerError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(BrokerError::invalid(
            what,
            format!("`{name}` must be 1 to {MAX_NAME} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(BrokerError::invalid(
            what,
            format!("`{name}` contains `{c}` (allowed: letters, digits, `.`, `_`, `-`)"),
        ));
    }
    Ok(())
}

/// Check a tenant name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn check_tenant(name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && matches!(b, b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(BrokerError::invalid(
            "tenant",
            format!("`{name}` must match [a-z0-9][a-z0-9_-]{{0,62}}"),
        ))
    }
}

/// Check a topic: dot-separated non-empty tokens without wildcards.
pub fn check_topic(topic: &str) -> Result<(), BrokerError> {
    if topic.is_empty() || topic.len() > MAX_NAME {
        return Err(BrokerError::invalid(
            "topic",
            format!("must be 1 to {MAX_NAME} bytes"),
        ));
    }
    for token in topic.split('.') {
        if token.is_empty() {
            return Err(BrokerError::invalid(
                "topic",
                format!("`{topic}` has an empty token"),
            ));
        }
        if token.contains(['*', '>']) || token.chars().any(char::is_whitespace) {
            return Err(BrokerError::invalid(
                "topic",
                format!("`{topic}`: token `{token}` has a wildcard or space"),
            ));
        }
    }
    Ok(())
}

/// A parsed binding pattern token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// A literal token.
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more remaining tokens (last only).
    Rest,
}

/// Parse a NATS-style pattern.
pub fn parse_pattern(pattern: &str) -> Result<Vec<Token>, BrokerError> {
    if pattern.len() > MAX_NAME {
        return Err(BrokerError::invalid(
            "pattern",
            format!("longer than {MAX_NAME} bytes"),
        ));
    }
    let parts: Vec<&str> = pattern.split('.').collect();
    let last = parts.len() - 1;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| match p {
            "" => Err(BrokerError::invalid(
                "pattern",
                format!("`{pattern}` has an empty token"),
            )),
            "*" => Ok(Token::One),
            ">" if i == last => Ok(Token::Rest),
            ">" => Err(BrokerError::invalid(
                "pattern",
                format!("`{pattern}`: `>` must be the last token"),
            )),
            t if t.contains(['*', '>']) => Err(BrokerError::invalid(
                "pattern",
                format!("`{pattern}`: token `{t}` mixes a wildcard with other characters"),
            )),
            t => Ok(Token::Literal(t.to_string())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("queue", "orders.eu-1_x").is_ok());
        assert!(check_name("queue", "").is_err());
        assert!(check_name("queue", "a b").is_err());
        assert!(check_name("queue", &"a".repeat(256)).is_err());
        assert!(check_tenant("acme-1").is_ok());
        assert!(check_tenant("-acme").is_err());
        assert!(check_tenant("Acme").is_err());
        assert!(check_topic("a.b.c").is_ok());
        assert!(check_topic("a..c").is_err());
        assert!(check_topic("a.*").is_err());
        assert_eq!(
            parse_pattern("a.*.>").unwrap(),
            vec![Token::Literal("a".into()), Token::One, Token::Rest]
        );
        assert!(parse_pattern(">.a").is_err());
        assert!(parse_pattern("a*").is_err());
    }
}
