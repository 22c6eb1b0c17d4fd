//! NATS-style topic patterns: tokens are split by `.`, `*` matches exactly one
//! token and `>` (last token only) matches one or more remaining tokens.

use std::fmt;

/// A parsed topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    One,
    Rest,
}

/// Why a pattern is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// The pattern is empty or has an empty token (`a..b`, `.a`, `a.`).
    EmptyToken,
    /// `>` appears somewhere other than the last token.
    RestNotLast,
    /// A token mixes a wildcard with other characters (`a*`, `>b`).
    PartialWildcard(String),
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatternError::EmptyToken => write!(f, "pattern has an empty token"),
            PatternError::RestNotLast => write!(f, "`>` must be the last token"),
            PatternError::PartialWildcard(t) => {
                write!(f, "token `{t}` mixes a wildcard with other characters")
            }
        }
    }
}

impl std::error::Error for PatternError {}

impl Pattern {
    /// Parse `pattern`.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let parts: Vec<&str> = pattern.split('.').collect();
        let last = parts.len() - 1;
        let mut tokens = Vec::with_capacity(parts.len());
        for (i, part) in parts.into_iter().enumerate() {
            let token = match part {
                "" => return Err(PatternError::EmptyToken),
                "*" => Token::One,
                ">" if i == last => Token::Rest,
                ">" => return Err(PatternError::RestNotLast),
                t if t.contains('*') || t.contains('>') => {
                    return Err(PatternError::PartialWildcard(t.to_string()));
                }
                t => Token::Literal(t.to_string()),
            };
            tokens.push(token);
        }
        Ok(Self { tokens })
    }

    /// Whether `topic` matches. A topic with an empty token never matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('.');
        for token in &self.tokens {
            match (token, parts.next()) {
                (_, None) | (_, Some("")) => return false,
                (Token::Rest, Some(_)) => return parts.all(|p| !p.is_empty()),
                (Token::One, Some(_)) => {}
                (Token::Literal(l), Some(p)) if l == p => {}
                (Token::Literal(_), Some(_)) => return false,
            }
        }
        parts.next().is_none()
    }
}

/// Whether `topic` matches `pattern`; an invalid pattern matches nothing.
pub fn matches(pattern: &str, topic: &str) -> bool {
    Pattern::parse(pattern).is_ok_and(|p| p.matches(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_wildcards() {
        assert!(matches("orders.eu", "orders.eu"));
        assert!(!matches("orders.eu", "orders.us"));
        assert!(!matches("orders.eu", "orders.eu.created"));
        assert!(matches("orders.*", "orders.eu"));
        assert!(!matches("orders.*", "orders"));
        assert!(!matches("orders.*", "orders.eu.created"));
        assert!(matches("orders.>", "orders.eu"));
        assert!(matches("orders.>", "orders.eu.created"));
        assert!(!matches("orders.>", "orders"));
        assert!(matches("*.eu.>", "orders.eu.created.v1"));
        assert!(matches(">", "a"));
        assert!(!matches("a.*", "a."));
        assert!(!matches(">", "a..b"));
    }

    #[test]
    fn invalid_patterns() {
        assert_eq!(Pattern::parse(""), Err(PatternError::EmptyToken));
        assert_eq!(Pattern::parse("a..b"), Err(PatternError::EmptyToken));
        assert_eq!(Pattern::parse(">.a"), Err(PatternError::RestNotLast));
        assert_eq!(
            Pattern::parse("a*"),
            Err(PatternError::PartialWildcard("a*".into()))
        );
        assert!(!matches("a*", "a*"));
    }
}
