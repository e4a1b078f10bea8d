//! The timeline and agents services.
