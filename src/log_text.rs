//! [`Untrusted`]: text that came from a browser, a token or the broker, made safe for a log line.
//!
//! Anything an attacker can choose (a token header's `alg`, a desk or event name, a routing
//! key, a header value, a broker's close reason) is written through it: cut to [`MAX_CHARS`]
//! characters as shown (an escape counts its length), so that one frame cannot write kilobytes
//! of log, and with CR, LF and every other control character escaped, so that it cannot forge a
//! second log line or drive a terminal. It formats in place, with no allocation.

use std::fmt::{self, Display, Write};

/// How many characters of untrusted text a log line shows.
pub const MAX_CHARS: usize = 200;

/// Wraps a value whose `Display` may carry untrusted text; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<T>(pub T);

impl<T: Display> Display for Untrusted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Escaper {
            out: f,
            written: 0,
            cut: 0,
        };
        write!(out, "{}", self.0)?;
        let cut = out.cut;
        if cut > 0 {
            write!(f, "…[{cut} more characters]")?;
        }
        Ok(())
    }
}

/// Escapes and counts what it passes on; drops (and counts) what goes past [`MAX_CHARS`].
struct Escaper<'a, 'b> {
    out: &'a mut fmt::Formatter<'b>,
    written: usize,
    cut: usize,
}

impl Write for Escaper<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for c in text.chars() {
            // An escape counts as the characters it takes in the line.
            let shown = match c {
                '\n' | '\r' | '\t' => 2,
                c if needs_code(c) => 4 + hex_digits(c),
                _ => 1,
            };
            if self.cut > 0 || self.written + shown > MAX_CHARS {
                self.cut += 1;
                continue;
            }
            self.written += shown;
            match c {
                '\n' => self.out.write_str("\\n")?,
                '\r' => self.out.write_str("\\r")?,
                '\t' => self.out.write_str("\\t")?,
                c if needs_code(c) => write!(self.out, "\\u{{{:x}}}", c as u32)?,
                c => self.out.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Control characters, and the Unicode line and paragraph separators some viewers break on.
fn needs_code(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

fn hex_digits(c: char) -> usize {
    let bits = 32 - (c as u32).leading_zeros() as usize;
    bits.div_ceil(4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_cut() {
        let long = "a".repeat(MAX_CHARS + 50);
        let exact = "b".repeat(MAX_CHARS);
        let cases: [(&str, String); 7] = [
            ("desk_A", "desk_A".into()),
            ("", "".into()),
            ("two\nlines\r\n", "two\\nlines\\r\\n".into()),
            (
                "bell\u{7}esc\u{1b}[31m nul\0",
                "bell\\u{7}esc\\u{1b}[31m nul\\u{0}".into(),
            ),
            ("sep\u{2028}tab\t", "sep\\u{2028}tab\\t".into()),
            (&exact, exact.clone()),
            (&long, format!("{}…[50 more characters]", "a".repeat(MAX_CHARS))),
        ];
        for (input, expected) in cases {
            assert_eq!(Untrusted(input).to_string(), expected, "{input:?}");
        }
    }

    #[test]
    fn characters_are_counted_not_bytes() {
        let text = "é".repeat(MAX_CHARS + 1);
        let shown = Untrusted(&text).to_string();
        assert!(shown.starts_with(&"é".repeat(MAX_CHARS)), "{shown}");
        assert!(shown.ends_with("…[1 more characters]"), "{shown}");
    }

    #[test]
    fn any_display_is_bounded_not_only_str() {
        let alg = "Y".repeat(46_000);
        let shown = Untrusted(format_args!("algorithm X\n{alg} is not accepted")).to_string();
        assert!(!shown.contains('\n'), "no raw newline");
        assert!(
            shown.chars().count() < MAX_CHARS + 40,
            "{} characters",
            shown.len()
        );
    }

    #[test]
    fn escapes_count_towards_the_limit() {
        let text = "\u{1}".repeat(MAX_CHARS);
        let shown = Untrusted(&text).to_string();
        let (kept, note) = shown.split_once('…').expect("cut");
        assert_eq!(kept, "\\u{1}".repeat(MAX_CHARS / 5));
        assert_eq!(note, format!("[{} more characters]", MAX_CHARS - MAX_CHARS / 5));
    }
}
