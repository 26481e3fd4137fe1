//! The device model catalogue (placeholder, being written).
