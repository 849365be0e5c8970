//! The Debian mirror debootstrap fetches from: `FERRY_PACKAGING_MIRROR`, else apt's own sources
//! (deb822 `.sources` and one-line `.list` files).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::SUITE;

/// The Debian mirror: `FERRY_PACKAGING_MIRROR`, else the first `deb` source in apt's own
/// configuration that serves the release itself (not -security or -updates).
pub(super) fn mirror() -> Result<String> {
    if let Some(m) = std::env::var_os("FERRY_PACKAGING_MIRROR") {
        return Ok(m.to_string_lossy().into_owned());
    }
    let mut entries: Vec<(String, Vec<String>)> = Vec::new(); // (uri, suites)
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let name = f.to_string_lossy();
        if name.ends_with(".sources") {
            entries.extend(parse_deb822(&text));
        } else if name.ends_with(".list") {
            entries.extend(parse_one_line(&text));
        }
    }
    let is_base = |s: &str| !s.contains('-') && !s.contains('/');
    entries
        .iter()
        .find(|(_, suites)| suites.iter().any(|s| s == SUITE))
        .or_else(|| entries.iter().find(|(_, s)| s.iter().any(|s| is_base(s))))
        .map(|(uri, _)| uri.clone())
        .context(
            "no Debian mirror in /etc/apt/sources.list or /etc/apt/sources.list.d: set \
             FERRY_PACKAGING_MIRROR (e.g. http://deb.debian.org/debian)",
        )
}

/// `deb` entries of a deb822 `.sources` file: (first URI, suites).
fn parse_deb822(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let field = |name: &str| {
            block
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_owned())
                })
        };
        let (Some(types), Some(uris), Some(suites)) =
            (field("Types"), field("URIs"), field("Suites"))
        else {
            continue;
        };
        if field("Enabled").is_some_and(|e| e.eq_ignore_ascii_case("no"))
            || !types.split_whitespace().any(|t| t == "deb")
        {
            continue;
        }
        if let Some(uri) = uris.split_whitespace().next() {
            out.push((
                uri.to_owned(),
                suites.split_whitespace().map(str::to_owned).collect(),
            ));
        }
    }
    out
}

/// `deb` lines of a one-line-style `.list` file: (URI, \[suite\]).
fn parse_one_line(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        // Options in brackets, e.g. [arch=amd64 signed-by=...].
        let rest = match rest.strip_prefix('[') {
            Some(r) => r.split_once(']').map(|(_, r)| r).unwrap_or(""),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push((uri.to_owned(), vec![suite.to_owned()]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\n\
                      URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n\nTypes: deb-src\n\
                      URIs: http://src.example\nSuites: bookworm\n";
        let e = parse_deb822(deb822);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].0, "http://deb.debian.org/debian");
        assert_eq!(e[0].1, ["bookworm", "bookworm-updates"]);
        let one = "# comment\ndeb-src http://x bookworm main\n\
                   deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            parse_one_line(one),
            [(
                "http://mirror.example/debian".to_owned(),
                vec!["bookworm".to_owned()]
            )]
        );
    }
}
