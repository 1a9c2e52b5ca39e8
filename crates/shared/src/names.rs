//! Plain names: the one character set for names that end up in URL path
//! segments, broker names and shell scripts (queues, exchanges, schedules,
//! artifacts, task types in the API document). One predicate, so the
//! document's patterns and the checks cannot drift apart.

/// What [`is_plain`] allows, in words for error messages.
pub const PLAIN_CHARS: &str = "letters, digits, '.', '_' and '-'";

/// An ASCII letter or digit, `.`, `_` or `-`.
pub fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The first character of `name` that is not plain.
pub fn first_not_plain(name: &str) -> Option<char> {
    name.chars().find(|c| !is_plain(*c))
}

/// 1 to `max` bytes, every one plain.
pub fn is_plain_name(name: &str, max: usize) -> bool {
    !name.is_empty() && name.len() <= max && first_not_plain(name).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_short_ascii_words() {
        for good in ["a", "sleep", "labels.render", "A-b_c.9", &"x".repeat(100)] {
            assert!(is_plain_name(good, 100), "{good}");
        }
        let long = "x".repeat(101);
        for bad in ["", "a b", "a/b", "é", "a%2F", "a\0", &long] {
            assert!(!is_plain_name(bad, 100), "{bad:?}");
        }
        assert_eq!(first_not_plain("queue:1"), Some(':'));
    }
}
