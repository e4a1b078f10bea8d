//! Trust: TLS, who is calling, what they may do, and files that change
//! under a running collector.

pub mod auth;
pub mod certs;
pub mod tls;
pub mod watched;
