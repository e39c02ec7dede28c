//! Helpers for reading /proc tables, shared by the mount (fuse) and restore's safety checks.

/// Reads a /proc table (mountinfo, swaps) as text. Paths in it need not be UTF-8: every
/// byte that is not ASCII becomes an octal escape, which [`unescape`] turns back into the
/// same byte (the kernel escapes a backslash itself, so no escape is ambiguous). A single
/// mountpoint with a non-UTF-8 name must not make the whole table unreadable.
pub fn read_table(path: &str) -> std::io::Result<String> {
    Ok(escape_non_ascii(&std::fs::read(path)?))
}

fn escape_non_ascii(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii() {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\{b:03o}");
        }
    }
    out
}

/// Decodes the octal escapes (`\040` for a space, ...) of /proc tables such as mountinfo
/// and swaps; bytes, since paths need not be UTF-8.
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ascii_bytes_survive_a_table_read() {
        let line = b"42 27 0:39 / /tmp/mnt-\xff\\040caf\xc3\xa9 ro - fuse.imgvault imgvault ro";
        let text = escape_non_ascii(line);
        assert!(text.is_ascii());
        let field = text.split(' ').nth(4).unwrap();
        assert_eq!(unescape(field), b"/tmp/mnt-\xff caf\xc3\xa9");
    }
}
