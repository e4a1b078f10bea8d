//! The agent stream service.
