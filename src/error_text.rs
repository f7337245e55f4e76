//! Error text for operators: an error's message followed by the root causes behind it.
//!
//! The Azure SDK's own message for a request that never got an answer is "retry policy
//! expired"; what went wrong ("invalid peer certificate: UnknownIssuer", "Connection refused")
//! is several `source()` links further down. The status kubelet turns into the pod's event
//! must say that.

/// At most this many characters (a Kubernetes event message is capped at 1 KiB).
const MAX_CHARS: usize = 600;

/// `e`'s message, then each message of its `source()` chain that does not repeat one already
/// said, first lines only, joined with ": ", at most `MAX_CHARS` characters.
pub(crate) fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        let line = text.lines().next().unwrap_or_default().trim();
        if !line.is_empty() && !parts.iter().any(|p| p.contains(line)) {
            parts.push(line.to_string());
        }
        next = err.source();
    }
    parts.join(": ").chars().take(MAX_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Link {
        text: &'static str,
        #[source]
        source: Option<Box<Link>>,
    }

    fn chain(texts: &[&'static str]) -> Link {
        texts
            .iter()
            .rev()
            .fold(None, |source, text| {
                Some(Link {
                    text,
                    source: source.map(Box::new),
                })
            })
            .unwrap()
    }

    #[test]
    fn names_the_root_cause_once() {
        let e = chain(&[
            "retry policy expired",
            "error sending request for url (https://login.example/x)",
            "client error (Connect)",
            "invalid peer certificate: UnknownIssuer",
            "UnknownIssuer",
        ]);
        assert_eq!(
            with_causes(&e),
            "retry policy expired: error sending request for url (https://login.example/x): client error (Connect): invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn first_lines_only_and_bounded() {
        let e = chain(&["failed\nstack backtrace: ...", "x".repeat(2000).leak()]);
        let text = with_causes(&e);
        assert!(text.starts_with("failed: xxx"));
        assert!(!text.contains("backtrace"));
        assert_eq!(text.chars().count(), MAX_CHARS);
    }
}
