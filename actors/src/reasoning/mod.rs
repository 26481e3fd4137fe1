//! Streaming per-signal reasoning (placeholder, being written).
