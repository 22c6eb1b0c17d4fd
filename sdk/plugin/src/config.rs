//! Plugin configuration given at load time (`--config K=V`).

use std::str::FromStr;

/// The configuration a plugin receives in `init`: `key=value` entries in the
/// order the operator gave them. Keys may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    entries: Vec<(String, String)>,
}

impl Config {
    /// Wrap raw entries.
    pub fn new(entries: Vec<(String, String)>) -> Self {
        Self { entries }
    }

    /// The last value given for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value given for `key`, in order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value for `key`, or an error naming the missing key.
    pub fn require(&self, key: &str) -> Result<&str, String> {
        self.get(key)
            .ok_or_else(|| format!("missing required config key `{key}`"))
    }

    /// Parse the value for `key`, using `default` when it is absent. The
    /// error names the key and the bad value.
    pub fn parse_or<T: FromStr>(&self, key: &str, default: T) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e| format!("config key `{key}`: cannot parse `{v}`: {e}")),
        }
    }

    /// All entries, in order.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// Entries whose key starts with `prefix`, with the prefix removed.
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.entries
            .iter()
            .filter_map(move |(k, v)| k.strip_prefix(prefix).map(|rest| (rest, v.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        Config::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn last_value_wins_and_all_values_are_kept() {
        let c = cfg(&[("a", "1"), ("b", "x"), ("a", "2")]);
        assert_eq!(c.get("a"), Some("2"));
        assert_eq!(c.get_all("a").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(c.get("missing"), None);
    }

    #[test]
    fn parse_errors_name_the_key() {
        let c = cfg(&[("n", "ten")]);
        let err = c.parse_or::<u32>("n", 1).unwrap_err();
        assert!(err.contains("`n`") && err.contains("ten"), "{err}");
        assert_eq!(c.parse_or::<u32>("other", 7), Ok(7));
        assert!(c.require("x").unwrap_err().contains("`x`"));
    }

    #[test]
    fn prefix_strips() {
        let c = cfg(&[("route.eu", "q1"), ("other", "z"), ("route.us", "q2")]);
        assert_eq!(
            c.with_prefix("route.").collect::<Vec<_>>(),
            [("eu", "q1"), ("us", "q2")]
        );
    }
}
