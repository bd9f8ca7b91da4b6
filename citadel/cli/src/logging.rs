//! Logging to stderr, filtered by `target=level` directives (`CITADEL_LOG`).
//!
//! The filter is tracing-subscriber's `Targets`, not `EnvFilter`: the directives users write
//! here are targets and levels only, and `EnvFilter` compiles its directive syntax with a regex
//! engine at start-up, whose code and tables the long-running node would keep resident.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// The filter `spec` describes, or `default` when `spec` is absent or not valid.
pub fn filter(spec: Option<&str>, default: &str) -> Targets {
    spec.and_then(|s| s.parse().ok()).or_else(|| default.parse().ok()).unwrap_or_default()
}

/// Installs the stderr logger with [`filter`]`(spec, default)`; a `spec` that is not valid is
/// named in a warning rather than ignored silently.
pub fn init(spec: Option<&str>, default: &str) {
    tracing_subscriber::registry()
        .with(filter(spec, default))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    if let Some(bad) = spec.filter(|s| s.parse::<Targets>().is_err()) {
        tracing::warn!("CITADEL_LOG={bad:?} is not a list of target=level directives; using {default:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn directives_set_levels_per_target() {
        let f = filter(Some("info,boringtun=error,citadel::mesh=debug"), "warn");
        assert!(f.would_enable("citadel", &Level::INFO));
        assert!(!f.would_enable("citadel", &Level::DEBUG));
        assert!(f.would_enable("citadel::mesh", &Level::DEBUG));
        assert!(f.would_enable("boringtun::noise", &Level::ERROR));
        assert!(!f.would_enable("boringtun::noise", &Level::WARN));
    }

    #[test]
    fn missing_or_invalid_spec_falls_back_to_the_default() {
        for spec in [None, Some("citadel=loud")] {
            let f = filter(spec, "warn,boringtun=error");
            assert!(f.would_enable("citadel", &Level::WARN));
            assert!(!f.would_enable("citadel", &Level::INFO));
            assert!(!f.would_enable("boringtun", &Level::WARN));
        }
    }
}
