//! The agent's exit codes (a leaf: every layer that ends a command may use them).

/// Exit code for a configuration that was rejected.
pub const EXIT_CONFIG: u8 = 2;
