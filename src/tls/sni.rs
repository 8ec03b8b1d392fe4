//! Choosing a certificate by the name a client asked for (SNI): pure, no OpenSSL.
//!
//! Each certificate answers for its DNS names (subjectAltName dNSName entries; its subject CN
//! only when it has none). A name matches exactly, or a wildcard `*.a.b` matches one label in
//! its place (`x.a.b`, never `a.b` nor `y.x.a.b`), both without regard to case. Exact names win
//! over wildcards; between certificates, the first listed wins. No match, or no SNI at all: the
//! first certificate.

use std::collections::HashMap;

/// The names of a certificate set, indexed for lookup.
#[derive(Debug, Default, Clone)]
pub struct SniIndex {
    exact: HashMap<String, usize>,
    /// `*.a.b` stored as `a.b`.
    wildcard: HashMap<String, usize>,
}

impl SniIndex {
    /// `names[i]`: the DNS names of certificate `i`.
    pub fn new(names: &[Vec<String>]) -> SniIndex {
        let mut index = SniIndex::default();
        for (i, list) in names.iter().enumerate() {
            for n in list {
                let n = n.trim_end_matches('.').to_ascii_lowercase();
                match n.strip_prefix("*.") {
                    Some(rest) if !rest.is_empty() => {
                        index.wildcard.entry(rest.to_string()).or_insert(i);
                    }
                    _ => {
                        index.exact.entry(n).or_insert(i);
                    }
                }
            }
        }
        index
    }

    /// The certificate for `server_name`; `None`: the default (the first).
    pub fn lookup(&self, server_name: &str) -> Option<usize> {
        let name = server_name.trim_end_matches('.');
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(&i) = self.exact.get(name) {
            return Some(i);
        }
        let (first, rest) = name.split_once('.')?;
        if first.is_empty() {
            return None;
        }
        self.wildcard.get(rest).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> SniIndex {
        SniIndex::new(&[
            vec!["site.test".into(), "www.site.test".into()],
            vec!["other.test".into(), "*.other.test".into()],
            vec!["*.site.test".into(), "Exact.Third.test".into()],
        ])
    }

    #[test]
    fn exact_names_any_case() {
        let i = index();
        assert_eq!(i.lookup("site.test"), Some(0));
        assert_eq!(i.lookup("WWW.Site.Test"), Some(0));
        assert_eq!(i.lookup("other.test"), Some(1));
        assert_eq!(i.lookup("exact.third.test"), Some(2));
        assert_eq!(
            i.lookup("site.test."),
            Some(0),
            "a trailing dot is the same name"
        );
    }

    #[test]
    fn a_wildcard_matches_exactly_one_label() {
        let i = index();
        assert_eq!(i.lookup("a.other.test"), Some(1));
        assert_eq!(i.lookup("A.OTHER.TEST"), Some(1));
        assert_eq!(i.lookup("b.a.other.test"), None, "two labels");
        assert_eq!(i.lookup(".other.test"), None, "an empty label");
        // An exact name on an earlier certificate wins over a later wildcard.
        assert_eq!(i.lookup("www.site.test"), Some(0));
        assert_eq!(i.lookup("img.site.test"), Some(2));
    }

    #[test]
    fn unknown_names_get_none() {
        let i = index();
        assert_eq!(i.lookup("unknown.test"), None);
        assert_eq!(i.lookup("test"), None);
        assert_eq!(i.lookup(""), None);
    }
}
