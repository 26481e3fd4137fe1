//! Remaining-useful-life estimation (placeholder, being written).
