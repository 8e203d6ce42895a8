use std::collections::{BTreeMap, HashMap};
use std::fmt;

use secrecy::SecretBox;
use zeroize::Zeroize;

/// String pairs that may hold secrets (a CSI request's `secrets`, a volume context carrying
/// service-account tokens). Values are wiped on drop; `Debug` shows keys only.
#[derive(Default, Clone)]
pub struct SecretMap(BTreeMap<String, String>);

impl SecretMap {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<HashMap<String, String>> for SecretMap {
    fn from(map: HashMap<String, String>) -> Self {
        // Moving the Strings keeps their buffers; nothing is copied.
        SecretMap(map.into_iter().collect())
    }
}

impl Drop for SecretMap {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            v.zeroize();
        }
    }
}

impl fmt::Debug for SecretMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Serializes string pairs as a JSON object into one buffer sized for the worst case up
/// front, so no reallocation leaves a stray copy behind; the result is wiped on drop.
pub fn secret_json<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> SecretBox<String> {
    let map: BTreeMap<&str, &str> = pairs.into_iter().collect();
    // JSON escapes a byte as at most 6 bytes (\u00XX); quotes, colon and comma add 4.
    let cap = 2 + map
        .iter()
        .map(|(k, v)| 6 * (k.len() + v.len()) + 4)
        .sum::<usize>();
    let mut buf = Vec::with_capacity(cap);
    // Writing str pairs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut buf, &map);
    let text = String::from_utf8(buf).unwrap_or_default();
    SecretBox::new(Box::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn json_is_exact_and_debug_hides_values() {
        let map = SecretMap::from(HashMap::from([
            ("token".to_string(), "t0k\"\n\u{1}".to_string()),
            ("a".to_string(), "b".to_string()),
        ]));
        let json = secret_json(map.iter());
        let back: BTreeMap<String, String> =
            serde_json::from_str(json.expose_secret()).expect("valid json");
        assert_eq!(back["token"], "t0k\"\n\u{1}");
        assert_eq!(back["a"], "b");
        assert_eq!(
            json.expose_secret().as_str(),
            r#"{"a":"b","token":"t0k\"\n\u0001"}"#
        );
        assert_eq!(
            secret_json(std::iter::empty()).expose_secret().as_str(),
            "{}"
        );
        let dbg = format!("{map:?}");
        assert!(dbg.contains("token") && !dbg.contains("t0k"));
    }
}
