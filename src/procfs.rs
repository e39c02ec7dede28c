//! Helpers for reading /proc tables, shared by the mount (fuse) and restore's safety checks.

/// Reads a /proc table as text, whatever bytes its paths hold: the kernel escapes only
/// space, tab, newline and backslash, so one mountpoint that is not UTF-8 (anyone may make
/// one) would make the whole table unreadable as a string. Non-ASCII bytes are escaped the
/// kernel's way (`\377`), so [`unescape`] gives every path's bytes back exactly.
pub fn read_table(path: &str) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    let mut text = String::with_capacity(bytes.len());
    for &b in &bytes {
        if b.is_ascii() {
            text.push(char::from(b));
        } else {
            text.push_str(&format!("\\{b:03o}"));
        }
    }
    Ok(text)
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
    #[test]
    fn tables_with_paths_that_are_not_utf8_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("mountinfo");
        let line = b"36 1 0:45 / /tmp/mnt-\xff-\xc3\xa9\\040x rw - fuse.imgvault imgvault ro\n";
        std::fs::write(&table, line).unwrap();
        let text = super::read_table(table.to_str().unwrap()).unwrap();
        let field = text.split(' ').nth(4).unwrap();
        assert_eq!(super::unescape(field), b"/tmp/mnt-\xff-\xc3\xa9 x");
    }
}
