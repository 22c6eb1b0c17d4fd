//! Binding patterns matched with a token trie: matching a topic costs
//! O(tokens × wildcard branches), not a scan of every binding.

use std::collections::{BTreeSet, HashMap};

use super::names::Token;

/// The bindings of one tenant.
#[derive(Debug, Default)]
pub struct BindingTrie {
    root: Node,
    count: usize,
}

#[derive(Debug, Default)]
struct Node {
    literal: HashMap<String, Node>,
    one: Option<Box<Node>>,
    /// Queues bound with `>` at this position.
    rest: BTreeSet<String>,
    /// Queues whose pattern ends exactly here.
    end: BTreeSet<String>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.one.is_none() && self.rest.is_empty() && self.end.is_empty()
    }
}

impl BindingTrie {
    /// Add a binding; returns false if it already existed.
    pub fn insert(&mut self, pattern: &[Token], queue: &str) -> bool {
        let mut node = &mut self.root;
        for (i, t) in pattern.iter().enumerate() {
            match t {
                Token::Literal(l) => node = node.literal.entry(l.clone()).or_default(),
                Token::One => node = node.one.get_or_insert_with(Default::default),
                Token::Rest => {
                    debug_assert_eq!(i, pattern.len() - 1);
                    let added = node.rest.insert(queue.to_string());
                    self.count += usize::from(added);
                    return added;
                }
            }
        }
        let added = node.end.insert(queue.to_string());
        self.count += usize::from(added);
        added
    }

    /// Remove a binding; returns false if it did not exist.
    pub fn remove(&mut self, pattern: &[Token], queue: &str) -> bool {
        fn go(node: &mut Node, pattern: &[Token], queue: &str) -> bool {
            match pattern.split_first() {
                None => node.end.remove(queue),
                Some((Token::Rest, _)) => node.rest.remove(queue),
                Some((Token::One, rest)) => {
                    let Some(child) = node.one.as_mut() else {
                        return false;
                    };
                    let removed = go(child, rest, queue);
                    if child.is_empty() {
                        node.one = None;
                    }
                    removed
                }
                Some((Token::Literal(l), rest)) => {
                    let Some(child) = node.literal.get_mut(l) else {
                        return false;
                    };
                    let removed = go(child, rest, queue);
                    if child.is_empty() {
                        node.literal.remove(l);
                    }
                    removed
                }
            }
        }
        let removed = go(&mut self.root, pattern, queue);
        self.count -= usize::from(removed);
        removed
    }

    /// Remove every binding of `queue` (queue deleted).
    pub fn remove_queue(&mut self, queue: &str) {
        fn go(node: &mut Node, queue: &str) -> usize {
            let mut n = usize::from(node.end.remove(queue)) + usize::from(node.rest.remove(queue));
            node.literal.retain(|_, c| {
                n += go(c, queue);
                !c.is_empty()
            });
            if let Some(c) = node.one.as_mut() {
                n += go(c, queue);
                if c.is_empty() {
                    node.one = None;
                }
            }
            n
        }
        let n = go(&mut self.root, queue);
        self.count -= n;
    }

    /// Queues whose bindings match `topic`, sorted and deduplicated.
    pub fn matches(&self, topic: &str) -> Vec<String> {
        let tokens: Vec<&str> = topic.split('.').collect();
        let mut out = BTreeSet::new();
        let mut stack: Vec<(&Node, usize)> = vec![(&self.root, 0)];
        while let Some((node, i)) = stack.pop() {
            if i == tokens.len() {
                out.extend(node.end.iter().cloned());
                continue;
            }
            out.extend(node.rest.iter().cloned());
            if let Some(child) = node.literal.get(tokens[i]) {
                stack.push((child, i + 1));
            }
            if let Some(child) = &node.one {
                stack.push((child, i + 1));
            }
        }
        out.into_iter().collect()
    }

    /// Whether `queue` is bound with `pattern`.
    pub fn contains(&self, pattern: &[Token], queue: &str) -> bool {
        let mut node = &self.root;
        for t in pattern {
            node = match t {
                Token::Literal(l) => match node.literal.get(l) {
                    Some(n) => n,
                    None => return false,
                },
                Token::One => match &node.one {
                    Some(n) => n,
                    None => return false,
                },
                Token::Rest => return node.rest.contains(queue),
            };
        }
        node.end.contains(queue)
    }

    /// Number of bindings.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no bindings.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::super::names::parse_pattern;
    use super::*;

    fn trie(bindings: &[(&str, &str)]) -> BindingTrie {
        let mut t = BindingTrie::default();
        for (p, q) in bindings {
            t.insert(&parse_pattern(p).unwrap(), q);
        }
        t
    }

    #[test]
    fn matches_like_nats() {
        let t = trie(&[
            ("orders.*", "a"),
            ("orders.>", "b"),
            ("orders.eu", "c"),
            ("*.eu.>", "d"),
            (">", "e"),
        ]);
        assert_eq!(t.matches("orders.eu"), ["a", "b", "c", "e"]);
        assert_eq!(t.matches("orders.eu.new"), ["b", "d", "e"]);
        assert_eq!(t.matches("orders"), ["e"]);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn removal_prunes() {
        let mut t = trie(&[("a.b", "q"), ("a.*", "q"), ("a.>", "r")]);
        assert!(t.remove(&parse_pattern("a.b").unwrap(), "q"));
        assert!(!t.remove(&parse_pattern("a.b").unwrap(), "q"));
        assert_eq!(t.matches("a.b"), ["q", "r"]);
        t.remove_queue("q");
        assert_eq!(t.matches("a.b"), ["r"]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn ten_thousand_bindings() {
        let mut t = BindingTrie::default();
        for i in 0..10_000 {
            t.insert(
                &parse_pattern(&format!("svc{i}.*.events")).unwrap(),
                &format!("q{i}"),
            );
        }
        assert_eq!(t.matches("svc42.eu.events"), ["q42"]);
        assert!(t.matches("svc42.eu").is_empty());
    }
}
