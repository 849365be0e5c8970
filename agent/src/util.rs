//! Small helpers every layer may use: an error's chain on one line and random numbers from the
//! kernel. This module sits at the bottom of the crate and depends on nothing in it.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum UtilError {
    /// The kernel's random source failed; nothing that needs a secret can go on.
    #[error("the kernel's random source (getrandom) failed: {0}; nothing that needs a secret can be made without it")]
    Random(getrandom::Error),
}

/// An error and its causes on one line, each cause once (for the CLI and API messages).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// 64 random bits from the kernel (`getrandom(2)`). There is no fallback: nonces and data-stream
/// tokens made from anything guessable would let a peer without the key in, so a failure is an
/// error that stops what needed the number.
pub fn random_u64() -> Result<u64, UtilError> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(UtilError::Random)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: inner")]
    struct Repeats(#[source] Inner);

    #[test]
    fn chain_names_each_cause_once() {
        assert_eq!(error_chain(&Outer(Inner)), "outer: inner");
        assert_eq!(error_chain(&Repeats(Inner)), "wrapped: inner");
    }

    #[test]
    fn random_numbers_differ() {
        let a = random_u64().unwrap();
        let b = random_u64().unwrap();
        assert_ne!(a, b, "two 64-bit draws from the kernel are equal");
    }
}
