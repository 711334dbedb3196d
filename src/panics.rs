//! Turning a caught panic into text for a log line or an error message.

/// The message a panic was raised with (`panic!("...")`), or a placeholder for other payloads.
pub fn message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
