//! The keep-alive-safe drain for Node workers: `node/drain.mjs`, loaded into each Node
//! worker as `node --import data:text/javascript,<the module>`, so that nothing has to be
//! written to disk and the program itself is unchanged. What it does is said in the
//! module's opening comment and in [`Settings::node_keepalive_drain`](crate::Settings).

/// The module's source.
const DRAIN_MODULE: &str = include_str!("node/drain.mjs");

/// The arguments for `node`, before the program: `--import` and the module as a
/// `data:` URL.
pub(crate) fn import_args() -> [String; 2] {
    ["--import".to_owned(), data_url(DRAIN_MODULE)]
}

/// `data:text/javascript,` and `source` percent-encoded (everything but RFC 3986's
/// unreserved characters).
fn data_url(source: &str) -> String {
    let mut url = String::from("data:text/javascript,");
    for byte in source.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            url.push(char::from(byte));
        } else {
            url.push_str(&format!("%{byte:02X}"));
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(encoded: &str) -> String {
        let bytes = encoded.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_module_travels_whole_in_a_url_of_safe_characters() {
        let [flag, url] = import_args();
        assert_eq!(flag, "--import");
        let body = url
            .strip_prefix("data:text/javascript,")
            .expect("a data URL");
        assert!(
            body.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
            "{body}"
        );
        assert_eq!(decode(body), DRAIN_MODULE);
        assert!(DRAIN_MODULE.contains("exitedAfterDisconnect"));
    }
}
