//! The daemon's logs: `tracing` events to stderr, as text or JSON, filtered by `FERRY_LOG` or
//! `RUST_LOG` (default "info").

use crate::args::LogFormat;

/// Install the global subscriber (once; a second call changes nothing).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FERRY_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd, stderr goes to the journal ($JOURNAL_STREAM), which stamps each line
    // itself: no second timestamp, no colours.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match (format, journal) {
        (LogFormat::Json, _) => b.json().try_init(),
        (LogFormat::Text, true) => b.without_time().try_init(),
        (LogFormat::Text, false) => b.try_init(),
    };
}
