//! The twins: a device twin per device, a customer twin per customer.
//!
//! # Layout
//! - [`device`] — readings applied exactly once, streaming reasoning, insights.
//! - [`customer`] — cases, playbooks, notifications and handoffs for one customer.

pub mod customer;
pub mod device;

#[cfg(test)]
mod tests;
