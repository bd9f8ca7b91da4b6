//! HuJSON (JSON with `//` and `/* */` comments and trailing commas) to plain JSON.
//!
//! Hand-written: no maintained Rust crate parses HuJSON itself, and JSON5 crates accept far
//! more than Headscale does (single quotes, bare keys, hex numbers). Blanking comments and
//! trailing commas with spaces keeps every byte offset and line, so serde_json's syntax
//! errors point at the right line of the file the admin wrote.

/// A comment that never ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: unterminated /* comment")]
pub struct Unterminated {
    pub line: usize,
}

/// Returns `text` with comments and trailing commas replaced by spaces (newlines kept).
pub fn standardize(text: &str) -> Result<String, Unterminated> {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let mut in_str = false;
    // Position of the last comma outside strings not yet followed by a value.
    let mut pending_comma: Option<usize> = None;
    // Last significant byte outside comments: a comma right after `[`, `{`, `:` or `,` is
    // not a trailing comma and stays for the JSON parser to refuse.
    let mut last = b'[';
    while i < b.len() {
        let c = b[i];
        if in_str {
            match c {
                b'\\' => i += 1,
                b'"' => {
                    in_str = false;
                    last = b'"';
                }
                _ => {}
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                in_str = true;
                pending_comma = None;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let start = i;
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                if i + 1 >= b.len() {
                    return Err(Unterminated { line: line_at(text, start) });
                }
                for o in out.iter_mut().take(i + 2).skip(start) {
                    if *o != b'\n' {
                        *o = b' ';
                    }
                }
                i += 2;
                continue;
            }
            b',' => {
                pending_comma = (!matches!(last, b'[' | b'{' | b':' | b',')).then_some(i);
            }
            b']' | b'}' => {
                if let Some(p) = pending_comma.take() {
                    out[p] = b' ';
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => pending_comma = None,
        }
        if !matches!(c, b' ' | b'\t' | b'\r' | b'\n' | b'"') {
            last = c;
        }
        i += 1;
    }
    // Only ASCII bytes outside strings were replaced by ASCII spaces.
    Ok(String::from_utf8(out).expect("ASCII replacements keep UTF-8"))
}

/// 1-based line of byte offset `at`.
pub fn line_at(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())].iter().filter(|&&c| c == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_trailing_commas_become_spaces() {
        let src = "{\n // c \"x\",\n \"a\": [1, 2, /* x\n y */],\n \"s\": \"//not, a comment]\",\n}";
        let out = standardize(src).unwrap();
        assert_eq!(out.len(), src.len());
        assert_eq!(out.lines().count(), src.lines().count());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["a"], serde_json::json!([1, 2]));
        assert_eq!(v["s"], "//not, a comment]");
    }

    #[test]
    fn escaped_quotes_do_not_end_strings() {
        let out = standardize(r#"{"a": "q\" // ,]", }"#).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["a"], "q\" // ,]");
    }

    #[test]
    fn unterminated_comment_names_its_line() {
        assert_eq!(standardize("{\n\n /* open").unwrap_err(), Unterminated { line: 3 });
    }

    #[test]
    fn a_lone_comma_is_left_for_the_json_parser_to_refuse() {
        let out = standardize("[,]").unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&out).is_err());
        let out = standardize("[1,,]").unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&out).is_err());
    }
}
