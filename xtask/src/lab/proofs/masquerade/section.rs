//! How each step of the masquerade proof reports: what it found, and its verdict line.

/// A step's result, as the report shows it.
pub(crate) trait Section {
    fn render(&self) -> String;
    /// One line per thing that did not hold; empty when the step passed.
    fn failures(&self) -> Vec<String>;
}

/// Failures listed in full under a step; the rest are counted.
const SHOWN_FAILURES: usize = 10;

/// A step's last line: "✓ {ok}", or how many things failed and the first of them.
pub(crate) fn verdict(ok: &str, failures: &[String]) -> String {
    if failures.is_empty() {
        return format!("✓ {ok}");
    }
    let mut lines: Vec<&str> = failures
        .iter()
        .take(SHOWN_FAILURES)
        .map(String::as_str)
        .collect();
    let more = format!(
        "... and {} more",
        failures.len().saturating_sub(SHOWN_FAILURES)
    );
    if failures.len() > SHOWN_FAILURES {
        lines.push(&more);
    }
    format!("✗ {} failed:\n    {}", failures.len(), lines.join("\n    "))
}
