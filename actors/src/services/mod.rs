//! Service twins (placeholder, being written).
